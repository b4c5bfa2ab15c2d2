//! Fused training ops for small transformers, each a candle custom op with a CPU and a CUDA
//! kernel (`cuda/fused.cu`) and a real backward pass, replacing chains of candle primitives whose
//! autograd dominates a training step of a narrow model at long context:
//!
//! - [`layer_norm`]: LayerNorm over the last axis with a gain and no bias (gradients for the input
//!   and the gain).
//! - [`gelu`]: GELU, tanh approximation; [`linear_gelu`] / [`gelu_linear_backward`]: an MLP's
//!   first projection with its GELU, and the second projection's backward with GELU's, in the
//!   GEMMs' epilogues on CUDA (cuBLASLt).
//! - [`embedding`]: row lookup whose backward scatters with f32 atomics on CUDA (candle's
//!   `index_add` loops over the ids serially).
//! - [`split_heads`]: one of the query / key / value parts of a fused projection
//!   `(b, t, 3·h·d)` as a contiguous `(b, h, t, d)` tensor, gradient written in one pass.
//! - [`linear`]: `x · wᵀ` as one node whose backward returns both gradients (candle's reshape,
//!   transpose, matmul, reshape chain costs autograd a zero fill and an add of the activation
//!   per reshape); on CUDA with f16 / bf16 its GEMMs run through cuBLASLt with each problem's
//!   algorithm timed once (`cublaslt.rs`).
//! - [`to_heads`] / [`merge_heads`]: `(b, t, h·d)` ↔ `(b, h, t, d)`, each the other's backward
//!   (one pass each way, no transpose copies in autograd).
//! - [`adamw_update`]: one AdamW update of an f32 parameter and its moments in one kernel;
//!   [`adamw_update_many`]: many parameters in place, one launch on CUDA.
//!
//! For training loops that run their own backward pass (the char-level GPT's fused training
//! pass), the backward kernels are also public, without autograd: [`layer_norm_backward`] (and
//! [`layer_norm_backward_add`], adding a residual gradient in the same kernel),
//! [`gelu_backward`], [`embedding_backward`], [`linear_backward`], plus
//! [`cross_entropy_with_grad`] (softmax cross-entropy's losses and logit gradients in one kernel)
//! and [`backward_from`] (candle's backward of a sub-graph seeded with a given output gradient);
//! and forward pieces without autograd: [`add_layer_norm`] (a residual add and the next
//! LayerNorm in one pass), [`split_qkv`] / [`merge_qkv`] (all three parts of a fused q/k/v
//! projection in one pass each way) and [`sum_of_squares`] (a global gradient norm in two
//! launches).
//!
//! Inputs are made contiguous; float ops take f32, bf16 or f16 and compute in f32.

mod cpu;
#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
mod cuda;

use candle::backend::BackendStorage;
use candle::backprop::GradStore;
use candle::op::BackpropOp;
use candle::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor, Var};

/// The dtype check shared by the float ops: f32, bf16 or f16, or an error naming `what`.
fn check_float(what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => bail!(
            "{what}: dtype {other:?} is not supported (f32, bf16, f16), shape {:?}",
            t.dims()
        ),
    }
}

/// Rows and width of a tensor seen as `(rows, last dim)`.
fn rows_cols(l: &Layout) -> (usize, usize) {
    let c = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / c.max(1), c)
}

/// Dispatches a CPU kernel generic over the float type on the storage's dtype.
macro_rules! cpu_float {
    ($what:expr, $s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => cpu::$f::<f32>($($arg),*),
            CpuStorage::BF16(_) => cpu::$f::<half::bf16>($($arg),*),
            CpuStorage::F16(_) => cpu::$f::<half::f16>($($arg),*),
            other => bail!(
                "{}: dtype {:?} is not supported (f32, bf16, f16)",
                $what,
                candle::backend::BackendStorage::dtype(other)
            ),
        }
    };
}

/// LayerNorm over the last axis with a learned gain and no bias:
/// `y = (x − mean) / √(var + eps) · gain`, statistics in f32, `y` in the dtype of `x`.
/// `x`: `(..., c)`; `gain`: `(c,)` of the same dtype and device. Gradients reach both.
pub fn layer_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    check_float("layer_norm", x)?;
    let c = match x.dims().last() {
        Some(&c) if c > 0 => c,
        _ => bail!(
            "layer_norm: x must have a non-empty last axis, got {:?}",
            x.dims()
        ),
    };
    if gain.dims() != [c] || gain.dtype() != x.dtype() {
        bail!(
            "layer_norm: gain must be ({c},) {:?} to match x {:?}, got {:?} {:?}",
            x.dtype(),
            x.dims(),
            gain.dims(),
            gain.dtype()
        )
    }
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("layer_norm: eps must be positive and finite, got {eps}")
    }
    x.contiguous()?
        .apply_op2(&gain.contiguous()?, LayerNorm { eps: eps as f32 })
}

/// A residual add followed by [`layer_norm`]: returns `(s, layer_norm(s, gain, eps))` with
/// `s = x + delta` (rounded to the dtype of `x`, as candle's add), in one pass on CUDA. `x`
/// `(..., c)`; `delta` of its dtype and shape, or of a trailing part of its shape (broadcast over
/// the leading axes: position embeddings `(t, c)` for `x` `(b, t, c)`); `gain` `(c,)`. No autograd
/// (for hand-written training passes: the gradient of `s` is [`layer_norm_backward_add`]'s).
pub fn add_layer_norm(
    x: &Tensor,
    delta: &Tensor,
    gain: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    check_float("add_layer_norm", x)?;
    let c = x.dims().last().copied().unwrap_or(0);
    if !x.dims().ends_with(delta.dims())
        || delta.rank() == 0
        || delta.dtype() != x.dtype()
        || gain.dims() != [c]
        || gain.dtype() != x.dtype()
        || c == 0
    {
        bail!(
            "add_layer_norm: delta {:?} {:?} (the shape of x or a trailing part of it) and gain \
             {:?} {:?} must match x {:?} {:?} (gain (c,), c > 0)",
            delta.dims(),
            delta.dtype(),
            gain.dims(),
            gain.dtype(),
            x.dims(),
            x.dtype()
        )
    }
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("add_layer_norm: eps must be positive and finite, got {eps}")
    }
    let (x, delta, gain) = (x.contiguous()?, delta.contiguous()?, gain.contiguous()?);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (sx, lx) = x.storage_and_layout();
        let (sd, ld) = delta.storage_and_layout();
        let (sg, lg) = gain.storage_and_layout();
        let (Storage::Cuda(sx), Storage::Cuda(sd), Storage::Cuda(sg)) = (&*sx, &*sd, &*sg) else {
            bail!(
                "add_layer_norm: x, delta and gain must share one device, got {:?}, {:?}, {:?}",
                x.device().location(),
                delta.device().location(),
                gain.device().location()
            )
        };
        let (sum, y) = cuda::add_ln_fwd((sx, lx), (sd, ld), (sg, lg), eps as f32)?;
        let none = BackpropOp::none;
        return Ok((
            Tensor::from_storage(Storage::Cuda(sum), x.shape(), none(), false),
            Tensor::from_storage(Storage::Cuda(y), x.shape(), none(), false),
        ));
    }
    let sum = x.detach().broadcast_add(&delta.detach())?;
    let y = sum.apply_op2_no_bwd(&gain, &LayerNorm { eps: eps as f32 })?;
    Ok((sum, y))
}

/// GELU in its tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (GPT-2's
/// `gelu_new`, the form cuBLASLt's GEMM epilogues compute), element-wise in the dtype of `x`
/// (f32 math), with its gradient.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    check_float("gelu", x)?;
    x.contiguous()?.apply_op1(Gelu)
}

/// Whether the cuBLASLt GELU epilogues take `(rows, k) · (k, n)` on this tensor's device and
/// dtype: CUDA, f16 / bf16, `n` a multiple of 8, sizes that fit i32.
#[cfg(feature = "cuda")]
fn gelu_epilogue_fits(x: &Tensor, rows: usize, k: usize, n: usize) -> bool {
    let fits = |v: usize| v > 0 && v <= i32::MAX as usize;
    x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && n.is_multiple_of(8)
        && [rows, k, n].into_iter().all(fits)
}

/// `(pre, act)` for `x` `(..., in)` and `w` `(out, in)` of one float dtype: `pre = x · wᵀ` and
/// `act = gelu(pre)` ([`gelu`]), both `(..., out)`. On CUDA with f16 / bf16 and `out` a multiple
/// of 8 this is one cuBLASLt GEMM whose epilogue writes both (no element-wise pass); elsewhere
/// [`linear`] then [`gelu`]. No autograd: [`gelu_linear_backward`] is the backward of the pair.
pub fn linear_gelu(x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let k = w.dims2()?.1;
    if x.dims().last() != Some(&k) || w.dtype() != x.dtype() {
        bail!(
            "linear_gelu: x {:?} {:?} does not match weight {:?} {:?} (expected (..., in) and \
             (out, in) of one dtype)",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        )
    }
    check_float("linear_gelu", x)?;
    #[cfg(feature = "cuda")]
    if gelu_epilogue_fits(x, x.elem_count() / k.max(1), k, w.dim(0)?) {
        let (rows, n) = (x.elem_count() / k, w.dim(0)?);
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has rank >= 1") = n;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (act, pre) = match (&*sx, &*sw) {
            (Storage::Cuda(sx), Storage::Cuda(sw)) => {
                cublaslt::linear((sx, lx), (sw, lw), (rows, n, k), cublaslt::Epilogue::Gelu)?
            }
            _ => bail!("linear_gelu: x and w must both be on the CUDA device"),
        };
        let pre = pre.expect("the GELU epilogue returns the pre-activation");
        let wrap = |s| {
            Tensor::from_storage(
                Storage::Cuda(s),
                out_dims.clone(),
                BackpropOp::none(),
                false,
            )
        };
        return Ok((wrap(pre), wrap(act)));
    }
    let pre = linear(&x.detach(), &w.detach())?;
    let act = gelu(&pre)?.detach();
    Ok((pre, act))
}

/// Rows of `table` `(vocab, c)` picked by `ids` `(n,)` u32: `(n, c)` in the table's dtype. The
/// backward sums the output gradient rows into the table's gradient (f32 atomics on CUDA).
/// Ids outside the vocabulary are an error on the CPU and give rows of NaN on CUDA (checking
/// them there would wait for the device).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    check_float("embedding", table)?;
    if table.rank() != 2 {
        bail!(
            "embedding: table must be (vocab, c), got {:?}",
            table.dims()
        )
    }
    if ids.rank() != 1 || ids.dtype() != DType::U32 {
        bail!(
            "embedding: ids must be (n,) u32, got {:?} {:?}",
            ids.dims(),
            ids.dtype()
        )
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, Embedding)
}

/// Part `part` (0 = queries, 1 = keys, 2 = values) of a fused projection `qkv` `(b, t, 3·h·d)`
/// laid out as `(b, t, 3, h, d)`, returned as a contiguous `(b, h, t, d)` tensor. The gradient
/// of `qkv` is written in one pass (zero outside the part).
pub fn split_heads(qkv: &Tensor, n_head: usize, part: usize) -> Result<Tensor> {
    check_float("split_heads", qkv)?;
    let (b, t, w) = qkv.dims3().map_err(|_| {
        candle::Error::Msg(format!(
            "split_heads: qkv must be (b, t, 3·h·d), got {:?}",
            qkv.dims()
        ))
    })?;
    if n_head == 0 || part > 2 || !w.is_multiple_of(3 * n_head) || w == 0 {
        bail!(
            "split_heads: width {w} of qkv {:?} must be a positive multiple of 3 · n_head \
             ({n_head}), and part ({part}) 0, 1 or 2",
            qkv.dims()
        )
    }
    let heads = Heads {
        b,
        h: n_head,
        t,
        d: w / (3 * n_head),
        parts: 3,
        part,
    };
    qkv.contiguous()?.apply_op1(SplitHeads(heads))
}

/// Heads of `x` `(b, t, h·d)` as a contiguous `(b, h, t, d)` tensor (the transpose of
/// `x.reshape((b, t, h, d))`); the backward is [`merge_heads`] of the gradient.
pub fn to_heads(x: &Tensor, n_head: usize) -> Result<Tensor> {
    check_float("to_heads", x)?;
    let (b, t, w) = x.dims3().map_err(|_| {
        candle::Error::Msg(format!(
            "to_heads: x must be (b, t, h·d), got {:?}",
            x.dims()
        ))
    })?;
    if n_head == 0 || w == 0 || !w.is_multiple_of(n_head) {
        bail!(
            "to_heads: width {w} of x {:?} must be a positive multiple of n_head ({n_head})",
            x.dims()
        )
    }
    let heads = Heads {
        b,
        h: n_head,
        t,
        d: w / n_head,
        parts: 1,
        part: 0,
    };
    x.contiguous()?.apply_op1(SplitHeads(heads))
}

/// Heads `x` `(b, h, t, d)` merged into a contiguous `(b, t, h·d)` tensor (the inverse of
/// [`to_heads`], which is its backward).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    check_float("merge_heads", x)?;
    let (b, h, t, d) = x.dims4().map_err(|_| {
        candle::Error::Msg(format!(
            "merge_heads: x must be (b, h, t, d), got {:?}",
            x.dims()
        ))
    })?;
    let heads = Heads {
        b,
        h,
        t,
        d,
        parts: 1,
        part: 0,
    };
    x.contiguous()?.apply_op1(MergeHeads(heads))
}

/// The queries, keys and values of a fused projection `qkv` `(b, t, 3·h·d)` (laid out as
/// `(b, t, 3, h, d)`) as three contiguous `(b, h, t, d)` tensors, written in one pass and returned
/// as fresh variables: leaves of a local autograd graph without the copy `Var::from_tensor` makes
/// of a plain tensor. `qkv` may be a view of the first `3·h·d` columns of a wider projection
/// (rows `ld ≥ 3·h·d` elements apart, read in place, e.g. one with a [`SparseKScorer`]'s weight
/// rows folded in). Their gradients go back with [`merge_qkv`] (or [`merge_qkv_with`]). No
/// autograd to `qkv`.
///
/// [`SparseKScorer`]: crate::SparseKScorer
pub fn split_qkv(qkv: &Tensor, n_head: usize) -> Result<[Var; 3]> {
    check_float("split_qkv", qkv)?;
    let (b, t, w) = qkv.dims3().map_err(|_| {
        candle::Error::Msg(format!(
            "split_qkv: qkv must be (b, t, 3·h·d), got {:?}",
            qkv.dims()
        ))
    })?;
    if n_head == 0 || w == 0 || !w.is_multiple_of(3 * n_head) {
        bail!(
            "split_qkv: width {w} of qkv {:?} must be a positive multiple of 3 · n_head ({n_head})",
            qkv.dims()
        )
    }
    let n = Heads {
        b,
        h: n_head,
        t,
        d: w / (3 * n_head),
        parts: 3,
        part: 0,
    };
    let (qkv, ld) = rows_in_place(qkv)?;
    let (s, l) = qkv.storage_and_layout();
    let parts: [Storage; 3] = match &*s {
        Storage::Cpu(s) => {
            cpu_float!("split_qkv", s, heads_split3((s, l), n, ld))?.map(Storage::Cpu)
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => cuda::heads_split3((s, l), n, ld)?.map(Storage::Cuda),
        #[allow(unreachable_patterns)]
        _ => bail!(
            "split_qkv: device {:?} is not supported (cpu, cuda)",
            qkv.device().location()
        ),
    };
    let shape = Shape::from((b, n_head, t, n.d));
    let [q, k, v] = parts.map(|p| Tensor::from_storage(p, shape.clone(), BackpropOp::none(), true));
    Ok([
        Var::from_tensor(&q)?,
        Var::from_tensor(&k)?,
        Var::from_tensor(&v)?,
    ])
}

/// A `(b, t, w)` tensor whose `(b, t)` rows are each contiguous and equally far apart (e.g. a
/// view of some columns of a wider contiguous tensor), with that distance in elements, to be read
/// in place; any other layout is copied into a contiguous tensor (distance `w`).
pub(crate) fn rows_in_place(x: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, w) = x.dims3()?;
    Ok(match x.stride() {
        &[s0, ld, 1] if ld >= w && (b == 1 || s0 == t * ld) => (x.clone(), ld),
        _ => (x.contiguous()?, w),
    })
}

/// The inverse of [`split_qkv`]: queries, keys and values `(b, h, t, d)` (one shape and dtype)
/// merged into a contiguous `(b, t, 3·h·d)` tensor in one pass (the gradient of the fused
/// projection). No autograd.
pub fn merge_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    merge_qkv_extra(q, k, v, None)
}

/// [`merge_qkv`] with the columns of `extra` `(b, t, e)` (the dtype of `q`) appended: a contiguous
/// `(b, t, 3·h·d + e)` tensor in one pass, the gradient of a projection with more outputs after
/// q, k, v (e.g. a [`SparseKScorer`]'s scores, see [`split_qkv`]). No autograd.
///
/// [`SparseKScorer`]: crate::SparseKScorer
pub fn merge_qkv_with(q: &Tensor, k: &Tensor, v: &Tensor, extra: &Tensor) -> Result<Tensor> {
    merge_qkv_extra(q, k, v, Some(extra))
}

fn merge_qkv_extra(q: &Tensor, k: &Tensor, v: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
    check_float("merge_qkv", q)?;
    let (b, h, t, d) = q.dims4().map_err(|_| {
        candle::Error::Msg(format!(
            "merge_qkv: q must be (b, h, t, d), got {:?}",
            q.dims()
        ))
    })?;
    if [k, v]
        .iter()
        .any(|x| x.shape() != q.shape() || x.dtype() != q.dtype())
    {
        bail!(
            "merge_qkv: q {:?} {:?}, k {:?} {:?} and v {:?} {:?} must have one shape and dtype",
            q.dims(),
            q.dtype(),
            k.dims(),
            k.dtype(),
            v.dims(),
            v.dtype()
        )
    }
    let e = match extra {
        None => 0,
        Some(x) => match x.dims() {
            &[xb, xt, e] if xb == b && xt == t && e > 0 && x.dtype() == q.dtype() => e,
            _ => bail!(
                "merge_qkv: extra must be ({b}, {t}, e > 0) {:?} for q {:?}, got {:?} {:?}",
                q.dtype(),
                q.dims(),
                x.dims(),
                x.dtype()
            ),
        },
    };
    let n = Heads {
        b,
        h,
        t,
        d,
        parts: 3,
        part: 0,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let extra = extra.map(|x| x.contiguous()).transpose()?;
    let (sq, lq) = q.storage_and_layout();
    let (sk, lk) = k.storage_and_layout();
    let (sv, lv) = v.storage_and_layout();
    let sx = extra.as_ref().map(|x| x.storage_and_layout());
    let sx = sx.as_ref().map(|(s, l)| (&**s, *l));
    let out = match (&*sq, &*sk, &*sv, sx) {
        (
            Storage::Cpu(sq),
            Storage::Cpu(sk),
            Storage::Cpu(sv),
            None | Some((Storage::Cpu(_), _)),
        ) => {
            let ex = match sx {
                Some((Storage::Cpu(s), l)) => Some((s, l)),
                _ => None,
            };
            Storage::Cpu(cpu_float!(
                "merge_qkv",
                sq,
                heads_merge3([(sq, lq), (sk, lk), (sv, lv)], ex, n)
            )?)
        }
        #[cfg(feature = "cuda")]
        (
            Storage::Cuda(sq),
            Storage::Cuda(sk),
            Storage::Cuda(sv),
            None | Some((Storage::Cuda(_), _)),
        ) => {
            let ex = match sx {
                Some((Storage::Cuda(s), l)) => Some((s, l)),
                _ => None,
            };
            Storage::Cuda(cuda::heads_merge3([(sq, lq), (sk, lk), (sv, lv)], ex, n)?)
        }
        _ => bail!(
            "merge_qkv: q, k, v (and extra) must share a CPU or CUDA device, got {:?}, {:?}, {:?}",
            q.device().location(),
            k.device().location(),
            v.device().location()
        ),
    };
    Ok(Tensor::from_storage(
        out,
        (b, t, 3 * h * d + e),
        BackpropOp::none(),
        false,
    ))
}

/// The sum of the squares of every element of `tensors` (f32, one device; any shapes), a scalar
/// f32: on CUDA one kernel over a table of pointers plus one block adding the per-block partial
/// sums in a fixed order (the global gradient norm in two launches instead of a reduction per
/// tensor). An empty list sums to zero on the CPU. No autograd.
pub fn sum_of_squares(tensors: &[Tensor]) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Tensor::zeros((), DType::F32, &candle::Device::Cpu);
    };
    let dev = first.device();
    for (i, t) in tensors.iter().enumerate() {
        if t.dtype() != DType::F32 || !t.device().same_device(dev) {
            bail!(
                "sum_of_squares: tensor {i} {:?} {:?} on {:?} must be f32 on {:?}",
                t.dims(),
                t.dtype(),
                t.device().location(),
                dev.location()
            )
        }
    }
    let tensors = tensors
        .iter()
        .map(Tensor::contiguous)
        .collect::<Result<Vec<_>>>()?;
    let storages: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let out = match dev {
        candle::Device::Cpu => {
            let mut sum = 0f64;
            for (s, l) in &storages {
                let Storage::Cpu(s) = &**s else {
                    bail!("sum_of_squares: tensors must share one device")
                };
                let x = cpu::slice::<f32>(s, l, "sum_of_squares")?;
                sum += x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
            }
            Storage::Cpu(CpuStorage::F32(vec![sum as f32]))
        }
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(cuda_dev) => {
            let parts = storages
                .iter()
                .map(|(s, l)| match &**s {
                    Storage::Cuda(s) => Ok((s, *l)),
                    _ => bail!("sum_of_squares: tensors must share one device"),
                })
                .collect::<Result<Vec<_>>>()?;
            Storage::Cuda(cuda::sum_of_squares(cuda_dev, &parts)?)
        }
        other => bail!(
            "sum_of_squares: device {:?} is not supported (cpu, cuda)",
            other.location()
        ),
    };
    Ok(Tensor::from_storage(out, (), BackpropOp::none(), false))
}

/// The global norm `√sumsq · |scale|` of gradients whose sum of squares is `sumsq` (one f32,
/// e.g. from [`sum_of_squares`]) and the factor clipping it to `max_norm`:
/// `max_norm / (norm + 1e-6)` where the norm exceeds `max_norm` and is finite, else 1. Both f32
/// scalars on `sumsq`'s device, from one kernel on CUDA (no read back). No autograd.
pub fn norm_clip_factor(sumsq: &Tensor, scale: f64, max_norm: f64) -> Result<(Tensor, Tensor)> {
    if sumsq.dtype() != DType::F32 || sumsq.elem_count() != 1 {
        bail!(
            "norm_clip_factor: sumsq must be one f32, got {:?} {:?}",
            sumsq.dims(),
            sumsq.dtype()
        )
    }
    #[cfg(feature = "cuda")]
    if sumsq.device().is_cuda() {
        let out = sumsq.contiguous()?.apply_op1_no_bwd(&NormClip {
            scale: scale.abs() as f32,
            max_norm: max_norm as f32,
        })?;
        return Ok((out.get(0)?, out.get(1)?));
    }
    let norm = (sumsq.flatten_all()?.get(0)?.sqrt()? * scale.abs())?;
    let over = norm.gt(max_norm)?.mul(&norm.le(f32::MAX as f64)?)?;
    let clip = ((&norm + 1e-6)?.recip()? * max_norm)?;
    let factor = over.where_cond(&clip, &norm.ones_like()?)?;
    Ok((norm, factor))
}

/// [`norm_clip_factor`]'s CUDA kernel: `[norm, factor]` `(2,)`.
#[cfg(feature = "cuda")]
struct NormClip {
    scale: f32,
    max_norm: f32,
}

#[cfg(feature = "cuda")]
impl candle::CustomOp1 for NormClip {
    fn name(&self) -> &'static str {
        "fused-norm-clip"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("norm_clip_factor: CUDA only (the CPU uses candle's ops)")
    }

    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((
            cuda::norm_clip((s, l), self.scale, self.max_norm)?,
            Shape::from(2),
        ))
    }
}

/// `tensors` (f32, one device, any shapes) cast to `dtype` and concatenated, each flattened in
/// row-major order: a 1-D tensor of all their elements, in order (an empty list gives an empty
/// tensor of `dtype` on the CPU). On CUDA to bf16 / f16 one launch over a device table of
/// pointers, instead of a cast per tensor and a copy per concatenation (a model's weights cast to
/// the compute dtype every step, adjacent matrices then usable as one). No autograd.
pub fn cast_concat(tensors: &[Tensor], dtype: DType) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Tensor::zeros(0, dtype, &candle::Device::Cpu);
    };
    let dev = first.device();
    for (i, t) in tensors.iter().enumerate() {
        if t.dtype() != DType::F32 || !t.device().same_device(dev) {
            bail!(
                "cast_concat: tensor {i} {:?} {:?} on {:?} must be f32 on {:?}",
                t.dims(),
                t.dtype(),
                t.device().location(),
                dev.location()
            )
        }
    }
    match dev {
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(cuda_dev) if matches!(dtype, DType::BF16 | DType::F16) => {
            let tensors = tensors
                .iter()
                .map(Tensor::contiguous)
                .collect::<Result<Vec<_>>>()?;
            let offsets: Vec<usize> = tensors
                .iter()
                .scan(0, |at, t| {
                    let start = *at;
                    *at += t.elem_count();
                    Some(start)
                })
                .collect();
            let total =
                offsets.last().copied().unwrap_or(0) + tensors.last().map_or(0, |t| t.elem_count());
            let storages: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
            let parts = storages
                .iter()
                .map(|(s, l)| match &**s {
                    Storage::Cuda(s) => Ok((s, *l)),
                    _ => bail!("cast_concat: tensors must share one device"),
                })
                .collect::<Result<Vec<_>>>()?;
            let out = cuda::cast_concat(cuda_dev, &parts, &offsets, dtype)?;
            Ok(Tensor::from_storage(
                Storage::Cuda(out),
                total,
                BackpropOp::none(),
                false,
            ))
        }
        _ => {
            let flat = tensors
                .iter()
                .map(|t| t.flatten_all()?.to_dtype(dtype))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&flat, 0)
        }
    }
}

/// `x · wᵀ` for `x` `(..., in)` and `w` `(out, in)` of one float dtype (f32, bf16, f16 or
/// f64); returns `(..., out)`.
/// One matmul on the contiguous inputs (on CUDA with f16 / bf16 a cuBLASLt GEMM whose algorithm
/// was timed on the problem's first call); the backward computes `dx = dy · w` and `dw = dyᵀ · x`
/// directly.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F64 {
        check_float("linear", x)?;
    }
    let input = x.dims().last().copied();
    match w.dims() {
        &[_, w_in] if x.rank() >= 1 && input == Some(w_in) && w.dtype() == x.dtype() => {}
        _ => bail!(
            "linear: x {:?} {:?} does not match weight {:?} {:?} (expected (..., in) and (out, in) of one dtype)",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        ),
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// The gradients `(dx, dgain)` of [`layer_norm`] `(x, gain, eps)` for the output gradient `dy`
/// (the shape of `x`): `dx` in the dtype of `x`, `dgain` `(c,)` f32. No autograd.
pub fn layer_norm_backward(
    x: &Tensor,
    gain: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    ln_backward(x, gain, dy, None, eps)
}

/// [`layer_norm_backward`] with the input gradient added to `acc` (the shape and dtype of `x`) in
/// the same kernel: returns `(acc + dx, dgain)`. For a residual stream whose gradient already
/// holds the skip path's part. No autograd.
pub fn layer_norm_backward_add(
    x: &Tensor,
    gain: &Tensor,
    dy: &Tensor,
    acc: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    ln_backward(x, gain, dy, Some(acc), eps)
}

/// [`layer_norm_backward`] and [`layer_norm_backward_add`]: one kernel on CUDA writes `dx` (plus
/// `acc`) and per-block partial sums of the gain gradient, summed here.
fn ln_backward(
    x: &Tensor,
    gain: &Tensor,
    dy: &Tensor,
    acc: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    check_float("layer_norm_backward", x)?;
    let c = x.dims().last().copied().unwrap_or(0);
    let acc_ok = acc.is_none_or(|a| a.shape() == x.shape() && a.dtype() == x.dtype());
    if dy.shape() != x.shape()
        || dy.dtype() != x.dtype()
        || gain.dtype() != x.dtype()
        || gain.dims() != [c]
        || c == 0
        || !acc_ok
    {
        bail!(
            "layer_norm_backward: dy {:?} {:?}, gain {:?} {:?} and residual {:?} must match x \
             {:?} {:?} (gain (c,), c > 0)",
            dy.dims(),
            dy.dtype(),
            gain.dims(),
            gain.dtype(),
            acc.map(|a| (a.dims(), a.dtype())),
            x.dims(),
            x.dtype()
        )
    }
    let (x, gain, dy) = (x.contiguous()?, gain.contiguous()?, dy.contiguous()?);
    let acc = acc.map(Tensor::contiguous).transpose()?;
    let eps = eps as f32;
    let (sx, lx) = x.storage_and_layout();
    let (sg, lg) = gain.storage_and_layout();
    let (sd, ld) = dy.storage_and_layout();
    let (dx, partial, parts) = match (&*sx, &*sg, &*sd) {
        (Storage::Cpu(sx), Storage::Cpu(sg), Storage::Cpu(sd)) => {
            let what = "layer_norm backward";
            let dx = cpu_float!(what, sx, ln_bwd_dx((sx, lx), (sg, lg), (sd, ld), eps))?;
            let partial = cpu_float!(what, sx, ln_bwd_dgain((sx, lx), (sd, ld), eps))?;
            (
                Storage::Cpu(dx),
                Storage::Cpu(CpuStorage::F32(partial)),
                cpu::DGAIN_PARTS,
            )
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(sx), Storage::Cuda(sg), Storage::Cuda(sd)) => {
            let acc_storage = acc.as_ref().map(|a| a.storage_and_layout());
            let acc = match &acc_storage {
                Some((s, l)) => match &**s {
                    Storage::Cuda(s) => Some((s, *l)),
                    _ => bail!("layer_norm_backward: the residual must be on the device of x"),
                },
                None => None,
            };
            let (dx, partial, parts) = cuda::ln_bwd((sx, lx), (sg, lg), (sd, ld), acc, eps)?;
            (Storage::Cuda(dx), Storage::Cuda(partial), parts)
        }
        _ => bail!(
            "layer_norm_backward: x, gain and dy must share a CPU or CUDA device, got {:?}, {:?}, \
             {:?}",
            x.device().location(),
            gain.device().location(),
            dy.device().location()
        ),
    };
    let none = BackpropOp::none;
    let dx = Tensor::from_storage(dx, x.shape(), none(), false);
    let dgain = Tensor::from_storage(partial, (parts, c), none(), false).sum(0)?;
    let dx = match &acc {
        // The CPU kernel leaves the residual out: add it here.
        Some(a) if !x.device().is_cuda() => (dx + a)?,
        _ => dx,
    };
    Ok((dx, dgain))
}

/// The input gradient of [`gelu`] at `x` for the output gradient `dy` (same shape and dtype).
/// No autograd.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_float("gelu_backward", x)?;
    if dy.shape() != x.shape() || dy.dtype() != x.dtype() {
        bail!(
            "gelu_backward: dy {:?} {:?} must match x {:?} {:?}",
            dy.dims(),
            dy.dtype(),
            x.dims(),
            x.dtype()
        )
    }
    x.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &GeluBwd)
}

/// The gradients `(dpre, dw)` of `y = gelu(pre) · wᵀ` ([`linear_gelu`]'s output through the
/// next linear) for the output gradient `dy` `(..., out)`, given `pre` `(..., in)` and
/// `act = gelu(pre)`: `dpre = (dy · w) ⊙ gelu'(pre)` in the dtype of `pre` and `dw = dyᵀ · act`
/// `(out, in)` f32 (as [`linear_backward`]). On CUDA with f16 / bf16 and `in` a multiple of 8,
/// `dpre` is one cuBLASLt GEMM with GELU's gradient in its epilogue; elsewhere
/// [`linear_backward`] then [`gelu_backward`]. No autograd.
pub fn gelu_linear_backward(
    pre: &Tensor,
    act: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (n, k) = w.dims2()?;
    let rows = pre.elem_count() / k.max(1);
    let fits = pre.shape() == act.shape()
        && pre.dims().last() == Some(&k)
        && dy.elem_count() == rows * n
        && dy.dims().last() == Some(&n)
        && [act, w, dy].iter().all(|t| t.dtype() == pre.dtype());
    if !fits {
        bail!(
            "gelu_linear_backward: pre {:?}, act {:?}, w {:?} and dy {:?} ({:?}, {:?}, {:?}, \
             {:?}) do not fit pre = act (..., in), w (out, in), dy (..., out) of one dtype",
            pre.dims(),
            act.dims(),
            w.dims(),
            dy.dims(),
            pre.dtype(),
            act.dtype(),
            w.dtype(),
            dy.dtype()
        )
    }
    check_float("gelu_linear_backward", pre)?;
    #[cfg(feature = "cuda")]
    if gelu_epilogue_fits(pre, rows, n, k) {
        let (dy, w, pre_c) = (dy.contiguous()?, w.contiguous()?, pre.contiguous()?);
        let (sd, ld) = dy.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sp, lp) = pre_c.storage_and_layout();
        let dpre = match (&*sd, &*sw, &*sp) {
            (Storage::Cuda(sd), Storage::Cuda(sw), Storage::Cuda(sp)) => {
                let dy = cublaslt::Operand {
                    storage: sd,
                    layout: ld,
                    rows,
                    cols: n,
                    transposed: false,
                };
                let w = cublaslt::Operand {
                    storage: sw,
                    layout: lw,
                    rows: n,
                    cols: k,
                    transposed: false,
                };
                cublaslt::gemm(dy, w, cublaslt::Epilogue::DGelu { aux: (sp, lp) }, false)?.0
            }
            _ => bail!("gelu_linear_backward: every input must be on the CUDA device"),
        };
        let dpre =
            Tensor::from_storage(Storage::Cuda(dpre), pre.shape(), BackpropOp::none(), false);
        return Ok((dpre, weight_grad(act, &dy.reshape((rows, n))?)?));
    }
    let (dact, dw) = linear_backward(act, w, dy)?;
    Ok((gelu_backward(pre, &dact)?, dw))
}

/// The sum of `x` `(b, ...)` over its leading axis, in f32: `(...)` (e.g. a position table's
/// gradient from a batch of rows). One pass over `x` on CUDA (f32 accumulation in a fixed order);
/// `to_dtype(f32)` then `sum(0)` elsewhere. No autograd.
pub fn batch_sum_f32(x: &Tensor) -> Result<Tensor> {
    check_float("batch_sum_f32", x)?;
    if x.rank() == 0 {
        bail!("batch_sum_f32: x must have a leading axis, got a scalar")
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.elem_count() > 0 {
        return x.contiguous()?.apply_op1_no_bwd(&BatchSumF32);
    }
    x.detach().to_dtype(DType::F32)?.sum(0)
}

/// [`batch_sum_f32`]'s CUDA kernel (the CPU takes candle's ops).
#[cfg(feature = "cuda")]
struct BatchSumF32;

#[cfg(feature = "cuda")]
impl candle::CustomOp1 for BatchSumF32 {
    fn name(&self) -> &'static str {
        "fused-batch-sum-f32"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("batch_sum_f32: CUDA only (the CPU sums with candle's ops)")
    }

    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (&b, rest) = l
            .dims()
            .split_first()
            .expect("batch_sum_f32 checks the rank");
        Ok((cuda::batch_sum((s, l), b)?, Shape::from(rest)))
    }
}

/// The table gradient `(vocab, c)` f32 of [`embedding`]: the rows of `dy` `(n, c)` summed by
/// `ids` `(n,)` u32 (on CUDA one GEMM with one-hot rows for f16 / bf16 and a vocabulary of at most
/// 256, else f32 atomics). Ids outside the vocabulary are an error on the CPU and skipped on
/// CUDA. No autograd.
pub fn embedding_backward(dy: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    check_float("embedding_backward", dy)?;
    let ok = dy.rank() == 2 && ids.dims() == [dy.dim(0)?] && ids.dtype() == DType::U32 && vocab > 0;
    if !ok {
        bail!(
            "embedding_backward: need dy (n, c), ids (n,) u32 and vocab > 0, got dy {:?}, ids \
             {:?} {:?}, vocab {vocab}",
            dy.dims(),
            ids.dims(),
            ids.dtype()
        )
    }
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda()
        && matches!(dy.dtype(), DType::BF16 | DType::F16)
        && vocab <= ONE_HOT_VOCAB
        && dy.elem_count() > 0
    {
        // one_hot(ids)ᵀ · dy: one GEMM with an f32 output instead of an atomic per element of dy
        // into a few rows (deterministic too).
        let one_hot = ids.contiguous()?.apply_op1_no_bwd(&OneHot {
            vocab,
            dtype: dy.dtype(),
        })?;
        return weight_grad(&dy.contiguous()?, &one_hot);
    }
    dy.contiguous()?
        .apply_op2_no_bwd(&ids.contiguous()?, &EmbeddingBwd { vocab })
}

/// Largest vocabulary whose [`embedding_backward`] runs as a GEMM with one-hot rows on CUDA
/// (characters, bytes; larger ones scatter with atomics).
#[cfg(feature = "cuda")]
const ONE_HOT_VOCAB: usize = 256;

/// The one-hot rows `(n, vocab)` of ids `(n,)` in `dtype` (CUDA only: [`embedding_backward`]'s
/// GEMM).
#[cfg(feature = "cuda")]
struct OneHot {
    vocab: usize,
    dtype: DType,
}

#[cfg(feature = "cuda")]
impl candle::CustomOp1 for OneHot {
    fn name(&self) -> &'static str {
        "fused-one-hot"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("one_hot: CUDA only (embedding_backward scatters on the CPU)")
    }

    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = cuda::one_hot((s, l), self.vocab, self.dtype)?;
        Ok((out, Shape::from((l.shape().elem_count(), self.vocab))))
    }
}

/// The gradients `(dx, dw)` of [`linear`] `(x, w)` for the output gradient `dy` `(..., out)`:
/// `dx = dy · w` (the shape and dtype of `x`) and `dw = dyᵀ · x` `(out, in)` in f32 (f64 for f64
/// inputs), the dtype optimisers keep their weights in. On CUDA with f16 / bf16 inputs `dw` is one
/// GEMM with an f32 output (f32 accumulation, no rounding to the input dtype, no cast). Two
/// matmuls, no autograd.
pub fn linear_backward(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    if dy.elem_count() != rows * n || x.dims().last() != Some(&k) || dy.dims().last() != Some(&n) {
        bail!(
            "linear_backward: x {:?}, w {:?} and dy {:?} do not fit x (..., in), w (out, in), \
             dy (..., out)",
            x.dims(),
            w.dims(),
            dy.dims()
        )
    }
    let dy = dy.contiguous()?.reshape((rows, n))?;
    let w = w.contiguous()?;
    let dx = match (dy.device(), dy.dtype()) {
        #[cfg(feature = "cuda")]
        (candle::Device::Cuda(_), DType::F16 | DType::BF16) if w.dtype() == dy.dtype() => {
            let product = HalfProduct {
                transpose_a: false,
                f32_out: false,
            };
            dy.apply_op2_no_bwd(&w, &product)?
        }
        _ => dy.matmul(&w)?,
    };
    Ok((dx.reshape(x.shape())?, weight_grad(x, &dy)?))
}

/// `dw = dyᵀ · x` `(n, k)` for `x` `(..., k)` and contiguous `dy` `(rows, n)`: f32 (f64 for f64
/// inputs), one GEMM with an f32 output on CUDA with f16 / bf16.
fn weight_grad(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let k = x.dims().last().copied().unwrap_or(1);
    let x = x.contiguous()?.reshape((dy.dim(0)?, k))?;
    match (x.device(), x.dtype()) {
        #[cfg(feature = "cuda")]
        (candle::Device::Cuda(_), DType::F16 | DType::BF16) if dy.dtype() == x.dtype() => {
            let product = HalfProduct {
                transpose_a: true,
                f32_out: true,
            };
            dy.apply_op2_no_bwd(&x, &product)
        }
        (_, DType::F64) => dy.t()?.matmul(&x),
        _ => dy.t()?.matmul(&x)?.to_dtype(DType::F32),
    }
}

/// `op(a) · b` for contiguous 2-D `a` and `b` of one half dtype (f16 / bf16), `op(a)` = `aᵀ` when
/// `transpose_a`: one cuBLASLt GEMM, its output in the inputs' dtype or in f32 (`f32_out`). CUDA
/// only: [`linear_backward`] picks it for `dx = dy · w` and the f32 `dw = dyᵀ · x`.
#[cfg(feature = "cuda")]
struct HalfProduct {
    transpose_a: bool,
    f32_out: bool,
}

#[cfg(feature = "cuda")]
impl candle::CustomOp2 for HalfProduct {
    fn name(&self) -> &'static str {
        "fused-half-product"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("half product: CUDA only (linear_backward uses a matmul on the CPU)")
    }

    fn cuda_fwd(
        &self,
        sa: &candle::CudaStorage,
        la: &Layout,
        sb: &candle::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (a_rows, a_cols) = la.shape().dims2()?;
        let (b_rows, b_cols) = lb.shape().dims2()?;
        let a = cublaslt::Operand {
            storage: sa,
            layout: la,
            rows: a_rows,
            cols: a_cols,
            transposed: self.transpose_a,
        };
        let b = cublaslt::Operand {
            storage: sb,
            layout: lb,
            rows: b_rows,
            cols: b_cols,
            transposed: false,
        };
        let m = if self.transpose_a { a_cols } else { a_rows };
        let out = cublaslt::gemm(a, b, cublaslt::Epilogue::None, self.f32_out)?.0;
        Ok((out, Shape::from((m, b_cols))))
    }
}

/// Softmax cross-entropy of `logits` `(n, v)` (f32, bf16 or f16) against `targets` `(n,)` u32,
/// with its gradient, in one kernel (one warp per row on CUDA, f32 math): returns the per-row
/// losses `(n,)` f32, `logsumexp(row) − row[target]`, and `dlogits` `(n, v)` in the logits'
/// dtype, `(softmax(row) − onehot(target)) · grad_scale` (`grad_scale = 1/n` for the gradient of
/// the mean). A target outside `0..v` is an error on the CPU and gives a NaN loss (and a zero
/// gradient row) on CUDA. No autograd.
pub fn cross_entropy_with_grad(
    logits: &Tensor,
    targets: &Tensor,
    grad_scale: f32,
) -> Result<(Tensor, Tensor)> {
    check_float("cross_entropy_with_grad", logits)?;
    let (n, v) = match logits.dims() {
        &[n, v] if v > 0 => (n, v),
        _ => bail!(
            "cross_entropy_with_grad: logits must be (n, v) with v > 0, got {:?}",
            logits.dims()
        ),
    };
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        bail!(
            "cross_entropy_with_grad: targets must be ({n},) u32 for logits {:?}, got {:?} {:?}",
            logits.dims(),
            targets.dims(),
            targets.dtype()
        )
    }
    if !grad_scale.is_finite() {
        bail!("cross_entropy_with_grad: grad_scale must be finite, got {grad_scale}")
    }
    let (logits, targets) = (logits.contiguous()?, targets.contiguous()?);
    let (sl, ll) = logits.storage_and_layout();
    let (st, lt) = targets.storage_and_layout();
    let (losses, dlogits) = match (&*sl, &*st) {
        (Storage::Cpu(sl), Storage::Cpu(st)) => {
            let (losses, d) = cpu_float!(
                "cross_entropy_with_grad",
                sl,
                xent((sl, ll), (st, lt), grad_scale)
            )?;
            (Storage::Cpu(CpuStorage::F32(losses)), Storage::Cpu(d))
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(sl), Storage::Cuda(st)) => {
            let (losses, d) = cuda::xent((sl, ll), (st, lt), grad_scale)?;
            (Storage::Cuda(losses), Storage::Cuda(d))
        }
        _ => bail!(
            "cross_entropy_with_grad: logits on {:?} and targets on {:?} must share a CPU or \
             CUDA device",
            logits.device().location(),
            targets.device().location()
        ),
    };
    let none = BackpropOp::none;
    Ok((
        Tensor::from_storage(losses, n, none(), false),
        Tensor::from_storage(dlogits, (n, v), none(), false),
    ))
}

/// Runs candle's backward pass from `y` as if `y` were an intermediate result whose gradient is
/// `dy` (same shape and dtype): the returned store holds the gradients of every variable `y`
/// depends on (and of the tensors in between), as `(y · dy).sum_all().backward()` would, without
/// the product and the sum. Used to differentiate a pluggable sub-graph (an attention backend)
/// inside a hand-written backward pass.
pub fn backward_from(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    if dy.shape() != y.shape() || dy.dtype() != y.dtype() {
        bail!(
            "backward_from: dy {:?} {:?} must match y {:?} {:?}",
            dy.dims(),
            dy.dtype(),
            y.dims(),
            y.dtype()
        )
    }
    y.apply_op1(SeedGrad(dy.detach()))?.backward()
}

/// [`backward_from`]: a scalar f32 zero whose backward hands out the stored gradient.
struct SeedGrad(Tensor);

impl candle::CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "fused-seed-grad"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((cuda::scalar_zero(s.device())?, Shape::from(())))
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// Hyper-parameters of one [`adamw_update`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWUpdate {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
    /// Bias correction of the first moment, `1 / (1 − β₁ᵗ)`.
    pub scale_m: f32,
    /// Bias correction of the second moment, `1 / (1 − β₂ᵗ)`.
    pub scale_v: f32,
    /// Factor applied to the gradient first (gradient clipping, accumulation).
    pub grad_scale: f32,
}

/// One AdamW step: with `g = grad · grad_scale`, `m ← β₁m + (1 − β₁)g`,
/// `v ← β₂v + (1 − β₂)g²`, `θ ← θ(1 − lr·λ) − lr · (m·scale_m) / (√(v·scale_v) + ε)`.
/// `param` and `grad`: f32 of one shape; `state`: f32 `(2, n)` holding `m` then `v` for the
/// `n` elements of `param`. Returns the new `(param, state)` (same shapes), computed in one
/// kernel. No gradient.
pub fn adamw_update(
    param: &Tensor,
    state: &Tensor,
    grad: &Tensor,
    hp: &AdamWUpdate,
) -> Result<(Tensor, Tensor)> {
    let n = param.elem_count();
    let ok = param.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && state.dtype() == DType::F32
        && grad.shape() == param.shape()
        && state.dims() == [2, n];
    if !ok || n == 0 {
        bail!(
            "adamw_update: need f32 param and grad of one non-empty shape and f32 state (2, n), \
             got param {:?} {:?}, grad {:?} {:?}, state {:?} {:?}",
            param.dims(),
            param.dtype(),
            grad.dims(),
            grad.dtype(),
            state.dims(),
            state.dtype()
        )
    }
    let out = param.contiguous()?.apply_op3_no_bwd(
        &state.contiguous()?,
        &grad.contiguous()?,
        &AdamWStep(*hp),
    )?;
    Ok((
        out.narrow(0, 0, 1)?.reshape(param.shape())?,
        out.narrow(0, 1, 2)?,
    ))
}

/// [`adamw_update`] of many parameters in place: `params[i]` (f32) and `states[i]` (f32 `(2, n)`,
/// `m` then `v`, a [`Var`] owned by the optimiser) take their new values as [`Var::set`] would
/// give them (tensors sharing their storage see the update), from `grads[i]` (f32, the shape of
/// `params[i]`). `grad_factor`, an f32 scalar (shape `()` or `(1,)`) on the params' device,
/// multiplies `hp.grad_scale` when given: a clipping factor computed on the device is applied
/// without reading it back. `schedule`, an f32 `(3,)` `[lr, scale_m, scale_v]` on the params'
/// device, replaces those three of `hp` when given: a captured CUDA graph reads each step's
/// learning rate and bias corrections from the device. On CUDA one kernel per 120 parameters, the
/// pointers passed as a kernel argument (no copy to the device, so the launch can be captured in a
/// CUDA graph). No gradient.
pub fn adamw_update_many(
    params: &[&Var],
    states: &[&Var],
    grads: &[&Tensor],
    grad_factor: Option<&Tensor>,
    schedule: Option<&Tensor>,
    hp: &AdamWUpdate,
) -> Result<()> {
    if params.len() != states.len() || params.len() != grads.len() {
        bail!(
            "adamw_update_many: {} params, {} states and {} grads must be as many",
            params.len(),
            states.len(),
            grads.len()
        )
    }
    for (i, ((p, s), g)) in params.iter().zip(states).zip(grads).enumerate() {
        let n = p.elem_count();
        let ok = [p.dtype(), s.dtype(), g.dtype()] == [DType::F32; 3]
            && g.shape() == p.shape()
            && s.dims() == [2, n]
            && n > 0
            && p.as_tensor().is_contiguous()
            && s.as_tensor().is_contiguous()
            && p.device().same_device(s.device())
            && p.device().same_device(g.device());
        if !ok {
            bail!(
                "adamw_update_many: item {i} needs contiguous f32 param and grad of one non-empty \
                 shape and f32 state (2, n) on one device, got param {:?} {:?}, grad {:?} {:?}, \
                 state {:?} {:?}",
                p.dims(),
                p.dtype(),
                g.dims(),
                g.dtype(),
                s.dims(),
                s.dtype()
            )
        }
    }
    let Some(first) = params.first() else {
        return Ok(());
    };
    if let Some(f) = grad_factor {
        if f.dtype() != DType::F32 || f.elem_count() != 1 || !f.device().same_device(first.device())
        {
            bail!(
                "adamw_update_many: grad_factor must be one f32 on the params' device, got {:?} {:?}",
                f.dims(),
                f.dtype()
            )
        }
    }
    if let Some(t) = schedule {
        if t.dtype() != DType::F32 || t.dims() != [3] || !t.device().same_device(first.device()) {
            bail!(
                "adamw_update_many: schedule must be f32 (3,) [lr, scale_m, scale_v] on the \
                 params' device, got {:?} {:?}",
                t.dims(),
                t.dtype()
            )
        }
    }
    match first.device() {
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(dev) => {
            let grads = grads
                .iter()
                .map(|g| g.contiguous())
                .collect::<Result<Vec<_>>>()?;
            let guards: Vec<_> = params
                .iter()
                .zip(states)
                .zip(&grads)
                .map(|((p, s), g)| {
                    [
                        p.as_tensor().storage_and_layout(),
                        s.as_tensor().storage_and_layout(),
                        g.storage_and_layout(),
                    ]
                })
                .collect();
            let items = guards
                .iter()
                .map(|item| {
                    let mut out = Vec::with_capacity(3);
                    for (s, l) in item {
                        match &**s {
                            Storage::Cuda(s) => out.push((s, *l)),
                            _ => bail!("adamw_update_many: tensors must share one CUDA device"),
                        }
                    }
                    Ok([out[0], out[1], out[2]])
                })
                .collect::<Result<Vec<_>>>()?;
            let scalars = [grad_factor, schedule].map(|t| t.map(|t| t.storage_and_layout()));
            let [factor, schedule] = scalars.each_ref().map(|t| match t {
                Some((s, l)) => match &**s {
                    Storage::Cuda(s) => Ok(Some((s, *l))),
                    _ => bail!(
                        "adamw_update_many: grad_factor and schedule must be on the CUDA device"
                    ),
                },
                None => Ok(None),
            });
            cuda::adamw_many(dev, &items, factor?, schedule?, hp)
        }
        _ => {
            let mut hp = *hp;
            if let Some(f) = grad_factor {
                hp.grad_scale *= f.flatten_all()?.to_vec1::<f32>()?[0];
            }
            if let Some(t) = schedule {
                let v = t.to_vec1::<f32>()?;
                (hp.lr, hp.scale_m, hp.scale_v) = (v[0], v[1], v[2]);
            }
            for ((p, s), g) in params.iter().zip(states).zip(grads) {
                let (new_p, new_s) = adamw_update(p.as_tensor(), s.as_tensor(), g, &hp)?;
                p.set(&new_p)?;
                s.set(&new_s)?;
            }
            Ok(())
        }
    }
}

struct LayerNorm {
    eps: f32,
}

impl candle::CustomOp2 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_float!("layer_norm", sx, ln_fwd((sx, lx), (sg, lg), self.eps))?;
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        sg: &candle::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = cuda::ln_fwd((sx, lx), (sg, lg), self.eps)?;
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gain: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgain) = layer_norm_backward(x, gain, grad, self.eps as f64)?;
        Ok((Some(dx), Some(dgain.to_dtype(gain.dtype())?)))
    }
}

struct Gelu;

impl candle::CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_float!("gelu", s, gelu_fwd((s, l)))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((cuda::gelu_fwd((s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_backward(x, grad)?))
    }
}

/// `dx` of [`Gelu`] from `(x, dy)`.
struct GeluBwd;

impl candle::CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_float!("gelu backward", sx, gelu_bwd((sx, lx), (sd, ld)))?;
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        sd: &candle::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((cuda::gelu_bwd((sx, lx), (sd, ld))?, lx.shape().clone()))
    }
}

struct Embedding;

impl candle::CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(
        &self,
        st: &CpuStorage,
        lt: &Layout,
        si: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle::backend::BackendStorage;
        let out = st.index_select(si, lt, li, 0)?;
        Ok((out, (li.dims()[0], lt.dims()[1]).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle::CudaStorage,
        lt: &Layout,
        si: &candle::CudaStorage,
        li: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = cuda::emb_fwd((st, lt), (si, li))?;
        Ok((out, (li.dims()[0], lt.dims()[1]).into()))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dtable = embedding_backward(grad, ids, table.dim(0)?)?.to_dtype(table.dtype())?;
        Ok((Some(dtable), None))
    }
}

/// The table gradient `(vocab, c)` f32 of [`Embedding`] from `(dy, ids)`.
struct EmbeddingBwd {
    vocab: usize,
}

impl candle::CustomOp2 for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "fused-embedding-bwd"
    }

    fn cpu_fwd(
        &self,
        sd: &CpuStorage,
        ld: &Layout,
        si: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_float!(
            "embedding backward",
            sd,
            emb_bwd((sd, ld), (si, li), self.vocab)
        )?;
        Ok((CpuStorage::F32(out), (self.vocab, rows_cols(ld).1).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sd: &candle::CudaStorage,
        ld: &Layout,
        si: &candle::CudaStorage,
        li: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = cuda::emb_bwd((sd, ld), (si, li), self.vocab)?;
        Ok((out, (self.vocab, rows_cols(ld).1).into()))
    }
}

/// [`linear`]: inputs `x` `(..., in)` and `w` `(out, in)`, both contiguous.
struct Linear;

/// Sizes `(batch, m, n, k)` of a matmul.
type Bmnk = (usize, usize, usize, usize);

impl Linear {
    /// The batch-of-one matmul arguments `(bmnk, x layout, wᵀ layout)` and the output shape.
    fn args(lx: &Layout, lw: &Layout) -> Result<(Bmnk, Layout, Layout, Shape)> {
        let (rows, k) = rows_cols(lx);
        let (n, _) = lw.shape().dims2()?;
        let x = Layout::contiguous_with_offset((1, rows, k), lx.start_offset());
        let wt = Layout::contiguous_with_offset((1, n, k), lw.start_offset()).transpose(1, 2)?;
        let mut dims = lx.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok(((1, rows, n, k), x, wt, Shape::from(dims)))
    }
}

impl candle::CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, x, wt, shape) = Self::args(lx, lw)?;
        Ok((sx.matmul(sw, bmnk, &x, &wt)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        sw: &candle::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (bmnk, x, wt, shape) = Self::args(lx, lw)?;
        if !matches!(sx.dtype(), DType::BF16 | DType::F16) {
            return Ok((sx.matmul(sw, bmnk, &x, &wt)?, shape));
        }
        let (_, rows, n, k) = bmnk;
        let (out, _) =
            cublaslt::linear((sx, lx), (sw, lw), (rows, n, k), cublaslt::Epilogue::None)?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = linear_backward(x, w, grad)?;
        let dw = dw.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Sizes of a `(b, t, parts, h, d)` tensor (3 parts: a fused q/k/v projection) and the part
/// taken.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Heads {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    parts: usize,
    part: usize,
}

/// [`split_heads`] and [`to_heads`]: `(b, t, parts·h·d)` → part `part` as `(b, h, t, d)`.
struct SplitHeads(Heads);

impl candle::CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "fused-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.0;
        let out = cpu_float!("heads split", s, heads_split((s, l), n))?;
        Ok((out, (n.b, n.h, n.t, n.d).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let n = self.0;
        Ok((cuda::heads_split((s, l), n)?, (n.b, n.h, n.t, n.d).into()))
    }

    fn bwd(&self, _qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&MergeHeads(self.0))?,
        ))
    }
}

/// The gradient of [`SplitHeads`] and [`merge_heads`]: `(b, h, t, d)` → `(b, t, parts·h·d)`,
/// zero outside the part.
struct MergeHeads(Heads);

impl candle::CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "fused-merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.0;
        let out = cpu_float!("heads merge", s, heads_merge((s, l), n))?;
        Ok((out, (n.b, n.t, n.parts * n.h * n.d).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let n = self.0;
        Ok((
            cuda::heads_merge((s, l), n)?,
            (n.b, n.t, n.parts * n.h * n.d).into(),
        ))
    }

    /// The backward takes the part back out (for [`merge_heads`]: [`to_heads`]).
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&SplitHeads(self.0))?,
        ))
    }
}

/// [`adamw_update`]: `(param, state, grad)` → `(3, n)` f32: new param, m, v.
struct AdamWStep(AdamWUpdate);

impl candle::CustomOp3 for AdamWStep {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        sp: &CpuStorage,
        lp: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu::adamw((sp, lp), (ss, ls), (sg, lg), &self.0)?;
        Ok((CpuStorage::F32(out), (3, lp.shape().elem_count()).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sp: &candle::CudaStorage,
        lp: &Layout,
        ss: &candle::CudaStorage,
        ls: &Layout,
        sg: &candle::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = cuda::adamw((sp, lp), (ss, ls), (sg, lg), &self.0)?;
        Ok((out, (3, lp.shape().elem_count()).into()))
    }
}
