//! Flash attention as a candle `CustomOp3`: one op for dense (full or causal) and sparse causal
//! visibility, CPU ([`cpu`]) and CUDA (`cuda`) kernels side by side, forward and backward.
//!
//! The log-sum-exp of every query row (f32, `(batch, q_heads, q_len)`, `-inf` for rows with no
//! visible key) is **kept**: the forward stashes it in the op, which the autograd graph owns, and
//! the backward reads it from there (recomputing it with a forward pass if it is missing).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use std::sync::{Arc, Mutex};

use candle::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};

use crate::mask::Visibility;
use crate::tape::AttentionTape;

/// Head dimensions the kernels are compiled for.
pub const SUPPORTED_HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// Parameters of an attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Multiplier of `q·k`; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Causal masking, aligned bottom-right when `q_len != kv_len` (decoding with a KV cache).
    pub causal: bool,
}

impl Default for AttnParams {
    /// Causal attention with the default `1/sqrt(head_dim)` scale.
    fn default() -> Self {
        Self {
            softmax_scale: None,
            causal: true,
        }
    }
}

impl AttnParams {
    /// The scale actually used for a given head dimension.
    pub fn scale(&self, head_dim: usize) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (head_dim as f32).sqrt())
    }

    /// The visibility these parameters describe.
    pub fn visibility(&self) -> Visibility {
        if self.causal {
            Visibility::Causal
        } else {
            Visibility::Full
        }
    }
}

/// Sizes of one attention call: q `(b, hq, nq, d)`, k and v `(b, hkv, nk, d)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
}

impl Dims {
    /// Query heads served by one kv head.
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }
}

/// Dense flash attention: `softmax(scale · q kᵀ + mask) v`, never materialising the scores.
///
/// - `q`: `(batch, q_heads, q_len, head_dim)`; `k`, `v`: `(batch, kv_heads, kv_len, head_dim)`
///   with `q_heads` a multiple of `kv_heads` (GQA/MQA). Returns `(batch, q_heads, q_len, head_dim)`.
/// - dtypes f32, f16, bf16 (all the same); CUDA accumulates in f32, the CPU computes in f32.
/// - `head_dim` one of [`SUPPORTED_HEAD_DIMS`]; any non-zero lengths.
/// - Differentiable: gradients reach `q`, `k` and `v` through the op's own backward kernels.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, params: &AttnParams) -> Result<Tensor> {
    // Validate before reading head_dim, so a wrong rank is reported as such.
    let head_dim = validate(q, k, v)?.d;
    attention(q, k, v, params.scale(head_dim), params.visibility())
}

/// [`flash_attn`] outside candle's autograd: the same output and an [`AttentionTape`] whose
/// backward gives the same `(dq, dk, dv)` (see [`crate::tape`]).
pub fn flash_attn_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &AttnParams,
) -> Result<(Tensor, AttentionTape)> {
    let head_dim = validate(q, k, v)?.d;
    let visibility = params.visibility();
    // `prepare`'s checks (visibility side tensors, scale) run in `forward_with_lse`.
    AttentionTape::flash(q, k, v, params.scale(head_dim), visibility)
}

/// Flash attention with an explicit [`Visibility`]: the public entry for sparse layouts
/// ([`Visibility::Sparse`]), sink + band ([`Visibility::SinkBand`]), and for dense attention with
/// a custom scale.
///
/// Shapes, dtypes and head dims as in [`flash_attn`]; a [`crate::SparseLayout`]'s (or
/// [`crate::mask::SinkBand`]'s) side tensors are i32 on the device of `q` (see their docs for
/// shapes and sentinels). `scale` multiplies
/// `q·k` and must be finite. Rows with no visible key output 0 and get zero gradients.
pub fn flash_attn_with_visibility(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    visibility: Visibility,
) -> Result<Tensor> {
    attention(q, k, v, scale, visibility)
}

/// The shared entry point of every flash-attention-based method: validates, makes the inputs
/// contiguous and applies the differentiable op.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    visibility: Visibility,
) -> Result<Tensor> {
    let op = prepare(q, k, v, scale, visibility)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The forward of [`attention`] outside autograd: the output `(b, hq, nq, d)` and the f32
/// log-sum-exp `(b, hq, nq)` that [`backward`] takes (`-inf` for rows with no visible key). For
/// ops that wrap the attention between other row moves and run its backward themselves.
pub(crate) fn forward_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    visibility: Visibility,
) -> Result<(Tensor, Tensor)> {
    let op = prepare(q, k, v, scale, visibility)?;
    let out = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let lse = op.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
    let lse = lse.ok_or_else(|| candle::Error::Msg("flash attention: no lse".into()))?;
    Ok((out, lse))
}

/// Gradients `(dq, dk, dv)` of the attention of q, k, v (shapes of q, k, v, their dtype) for the
/// forward output `out` and its log-sum-exp `lse` (from [`forward_with_lse`]) and the output
/// gradient `grad_out`, outside autograd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad_out: &Tensor,
    lse: Tensor,
    scale: f32,
    visibility: Visibility,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bwd = FlashAttnBwd {
        scale,
        visibility,
        out: out.contiguous()?,
        grad_out: grad_out.contiguous()?,
        lse,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let packed = q.apply_op3_no_bwd(&k, &v, &bwd)?;
    let (nq, nk) = (q.elem_count(), k.elem_count());
    let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
    let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
    let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
    Ok((dq, dk, dv))
}

/// Validates the inputs and the visibility of an attention call; the op to apply.
fn prepare(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    visibility: Visibility,
) -> Result<FlashAttn> {
    let dims = validate(q, k, v)?;
    let side = match &visibility {
        Visibility::Sparse(layout) => {
            layout.validate(dims.b, dims.hq, dims.hkv, dims.nq, dims.nk)?;
            layout.tensors()
        }
        Visibility::SinkBand(sb) => {
            sb.validate(dims.hkv, dims.nq, dims.nk)?;
            vec![&sb.blocks]
        }
        Visibility::Full | Visibility::Causal => vec![],
    };
    for t in side {
        if !t.device().same_device(q.device()) {
            bail!(
                "visibility side tensors must be on the device of q ({:?}), got {:?}",
                q.device().location(),
                t.device().location()
            )
        }
    }
    if !scale.is_finite() {
        bail!("flash attention: softmax scale must be finite, got {scale}")
    }
    Ok(FlashAttn {
        scale,
        visibility: visibility.contiguous()?,
        lse: Arc::new(Mutex::new(None)),
    })
}

/// Checks ranks, shapes, dtypes and devices of q, k, v; returns their sizes.
pub(crate) fn validate(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 4 {
            bail!(
                "flash attention: {name} must have rank 4 (batch, heads, seq, head_dim), got shape {:?}",
                t.dims()
            )
        }
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!(
            "flash attention: q, k, v must share a dtype, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "flash attention: dtype {:?} is not supported (f32, f16, bf16)",
            q.dtype()
        )
    }
    if !q.device().same_device(k.device()) || !q.device().same_device(v.device()) {
        bail!(
            "flash attention: q, k, v must be on one device, got {:?}, {:?}, {:?}",
            q.device().location(),
            k.device().location(),
            v.device().location()
        )
    }
    let (b, hq, nq, d) = q.dims4()?;
    let (bk, hkv, nk, dk) = k.dims4()?;
    if k.dims() != v.dims() {
        bail!(
            "flash attention: k and v must have the same shape, got k {:?} and v {:?}",
            k.dims(),
            v.dims()
        )
    }
    if bk != b || dk != d {
        bail!(
            "flash attention: batch and head_dim of q {:?} and k {:?} must match",
            q.dims(),
            k.dims()
        )
    }
    if hkv == 0 || hq % hkv != 0 {
        bail!(
            "flash attention: kv heads must divide q heads, got q {:?} and k {:?}",
            q.dims(),
            k.dims()
        )
    }
    if b == 0 || nq == 0 || nk == 0 {
        bail!(
            "flash attention: empty input, q {:?} and k {:?}",
            q.dims(),
            k.dims()
        )
    }
    if !SUPPORTED_HEAD_DIMS.contains(&d) {
        bail!(
            "flash attention: head_dim {d} is not supported (supported: {SUPPORTED_HEAD_DIMS:?}), q {:?}",
            q.dims()
        )
    }
    Ok(Dims {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
    })
}

impl Visibility {
    /// The same visibility with contiguous side tensors.
    fn contiguous(self) -> Result<Self> {
        Ok(match self {
            Visibility::Sparse(mut l) => {
                l.q_pos = l.q_pos.contiguous()?;
                l.k_pos = l.k_pos.contiguous()?;
                if let Some((qb, kb)) = l.buckets {
                    l.buckets = Some((qb.contiguous()?, kb.contiguous()?));
                }
                Visibility::Sparse(l)
            }
            Visibility::SinkBand(mut sb) => {
                sb.blocks = sb.blocks.contiguous()?;
                Visibility::SinkBand(sb)
            }
            other => other,
        })
    }
}

/// Reads the dims of a contiguous q, k layout pair.
pub(crate) fn dims_of(lq: &Layout, lk: &Layout) -> Result<Dims> {
    let (b, hq, nq, d) = lq.shape().dims4()?;
    let (_, hkv, nk, _) = lk.shape().dims4()?;
    Ok(Dims {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
    })
}

/// The contiguous slice of a storage behind a layout.
pub(crate) fn contiguous_slice<'a, T>(s: &'a [T], l: &Layout, name: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s[start..end]),
        None => bail!("flash attention: {name} must be contiguous, got layout {l:?}"),
    }
}

/// The forward op. Inputs q, k, v; output `(b, hq, nq, d)` in the input dtype.
struct FlashAttn {
    scale: f32,
    visibility: Visibility,
    /// Log-sum-exp of the last forward, read by the backward.
    lse: Arc<Mutex<Option<Tensor>>>,
}

impl FlashAttn {
    fn stash(&self, lse: Tensor) {
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    }
}

impl candle::CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flash-attn"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims_of(lq, lk)?;
        let (out, lse) = cpu::forward(
            (sq, lq),
            (sk, lk),
            (sv, lv),
            dims,
            self.scale,
            &self.visibility,
        )?;
        self.stash(Tensor::from_vec(
            lse,
            (dims.b, dims.hq, dims.nq),
            &candle::Device::Cpu,
        )?);
        Ok((out, lq.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle::CudaStorage,
        lq: &Layout,
        sk: &candle::CudaStorage,
        lk: &Layout,
        sv: &candle::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dims = dims_of(lq, lk)?;
        let (out, lse) = cuda::forward(
            (sq, lq),
            (sk, lk),
            (sv, lv),
            dims,
            self.scale,
            &self.visibility,
        )?;
        self.stash(Tensor::from_storage(
            candle::Storage::Cuda(lse),
            (dims.b, dims.hq, dims.nq),
            candle::op::BackpropOp::none(),
            false,
        ));
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stashed = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lse = match stashed {
            Some(lse) => lse,
            None => {
                let op = FlashAttn {
                    scale: self.scale,
                    visibility: self.visibility.clone(),
                    lse: Arc::new(Mutex::new(None)),
                };
                q.apply_op3_no_bwd(k, v, &op)?;
                let lse = op.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
                lse.ok_or_else(|| candle::Error::Msg("flash attention: no lse".into()))?
            }
        };
        let (dq, dk, dv) = backward(
            q,
            k,
            v,
            out,
            grad_out,
            lse,
            self.scale,
            self.visibility.clone(),
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward op. Inputs q, k, v; output the flat concatenation `[dq | dk | dv]` in the input
/// dtype (one output per custom op), split by [`FlashAttn::bwd`].
pub(crate) struct FlashAttnBwd {
    pub scale: f32,
    pub visibility: Visibility,
    /// Forward output `(b, hq, nq, d)`, contiguous.
    pub out: Tensor,
    /// Gradient of the output, contiguous, same shape.
    pub grad_out: Tensor,
    /// Forward log-sum-exp `(b, hq, nq)` f32.
    pub lse: Tensor,
}

impl candle::CustomOp3 for FlashAttnBwd {
    fn name(&self) -> &'static str {
        "flash-attn-bwd"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims_of(lq, lk)?;
        let packed = cpu::backward((sq, lq), (sk, lk), (sv, lv), dims, self)?;
        let n = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        Ok((packed, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle::CudaStorage,
        lq: &Layout,
        sk: &candle::CudaStorage,
        lk: &Layout,
        sv: &candle::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dims = dims_of(lq, lk)?;
        let packed = cuda::backward((sq, lq), (sk, lk), (sv, lv), dims, self)?;
        let n = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        Ok((packed, Shape::from(n)))
    }
}
