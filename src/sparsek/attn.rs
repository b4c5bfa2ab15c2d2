//! The SparseK attention op: selection fused with attention, forward and backward.

use std::sync::{Arc, Mutex};

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};

use super::cpu::{self, HostSelection};
use super::SparseKConfig;

/// Sizes of one call: q `(b, hq, t, d)`, k and v `(b, hkv, t, d)`, scores `(b, hkv, t)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub t: usize,
    pub d: usize,
}

/// SparseK attention: query `i` attends to its window `{i − window < j ≤ i}` (weight 1) and to the
/// older keys with SPARSEK weight `p_ij = clip(u_j − τ_i, 0, 1) > 0`, in one softmax, with value
/// weighting `o_i = Σ_j α_ij w_ij v_j` (see the [module docs](super) for every documented choice).
///
/// - `q`: `(batch, q_heads, seq, head_dim)`; `k`, `v`: `(batch, kv_heads, seq, head_dim)` with
///   `kv_heads` dividing `q_heads` (GQA: a group shares its kv head's selection). f32, f16 or bf16,
///   all the same; computed in f32. Returns `(batch, q_heads, seq, head_dim)` in that dtype.
/// - `scores`: `(batch, kv_heads, seq)` f32, e.g. from [`super::SparseKScorer`]; key `j`'s score.
/// - Differentiable in `q`, `k`, `v` and `scores` (through the SPARSEK backward summed over rows).
/// - Cost `O(N·(K′ + window)·D)` time and `O(N·K′/64)` extra memory on the GPU (per-block
///   top-`K′` lists) / `O(N·K′)` on the CPU (explicit per-query lists).
/// - Errors (never panics) on `k = 0`, `K′ < k`, `window > seq`, shape / dtype / device mismatches
///   (messages name the tensors and shapes), and NaN scores on the CPU.
pub fn sparsek_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: &Tensor,
    cfg: &SparseKConfig,
) -> Result<Tensor> {
    let dims = validate(q, k, v, scores, cfg)?;
    let kv = Tensor::cat(&[k, v], 3)?.contiguous()?;
    let op = SparseKAttn {
        cfg: *cfg,
        scale: cfg.scale(dims.d),
        saved: Arc::new(Mutex::new(None)),
    };
    q.contiguous()?.apply_op3(&kv, &scores.contiguous()?, op)
}

fn validate(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: &Tensor,
    cfg: &SparseKConfig,
) -> Result<Dims> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 4 {
            bail!(
                "sparsek_attn: {name} must have rank 4 (batch, heads, seq, head_dim), got {:?}",
                t.dims()
            )
        }
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!(
            "sparsek_attn: q, k, v must share a dtype, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "sparsek_attn: dtype {:?} not supported (f32, f16, bf16)",
            q.dtype()
        )
    }
    if scores.dtype() != DType::F32 {
        bail!("sparsek_attn: scores must be f32, got {:?}", scores.dtype())
    }
    for (name, t) in [("k", k), ("v", v), ("scores", scores)] {
        if !t.device().same_device(q.device()) {
            bail!(
                "sparsek_attn: {name} must be on the device of q ({:?}), got {:?}",
                q.device().location(),
                t.device().location()
            )
        }
    }
    let (b, hq, t, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if k.dims() != v.dims() {
        bail!(
            "sparsek_attn: k {:?} and v {:?} must have the same shape",
            k.dims(),
            v.dims()
        )
    }
    if bk != b || tk != t || dk != d {
        bail!(
            "sparsek_attn: k {:?} must match q {:?} in batch, seq and head_dim",
            k.dims(),
            q.dims()
        )
    }
    if hkv == 0 || hq % hkv != 0 {
        bail!(
            "sparsek_attn: kv heads must divide q heads, got q {:?} and k {:?}",
            q.dims(),
            k.dims()
        )
    }
    if b == 0 || t == 0 || d == 0 {
        bail!("sparsek_attn: empty input, q {:?}", q.dims())
    }
    if scores.dims() != [b, hkv, t] {
        bail!(
            "sparsek_attn: scores must be (batch, kv_heads, seq) = {:?}, got {:?}",
            [b, hkv, t],
            scores.dims()
        )
    }
    if !crate::SUPPORTED_HEAD_DIMS.contains(&d) {
        bail!(
            "sparsek_attn: head_dim {d} is not supported (supported: {:?}), q {:?}",
            crate::SUPPORTED_HEAD_DIMS,
            q.dims()
        )
    }
    cfg.validate(Some(t))?;
    Ok(Dims { b, hq, hkv, t, d })
}

/// What the forward hands to the backward.
#[derive(Clone)]
enum Selection {
    Cpu(Arc<HostSelection>),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::Selection),
}

/// Forward statistics: the selection and the f32 log-sum-exp `(b, hq, t)`.
#[derive(Clone)]
struct Saved {
    selection: Selection,
    lse: Tensor,
}

/// The forward op. Inputs q `(b, hq, t, d)`, kv = `[k | v]` `(b, hkv, t, 2d)`, scores
/// `(b, hkv, t)` f32; output `(b, hq, t, d)` in the input dtype.
struct SparseKAttn {
    cfg: SparseKConfig,
    scale: f32,
    saved: Arc<Mutex<Option<Saved>>>,
}

fn dims_of(lq: &Layout, lkv: &Layout) -> Result<Dims> {
    let (b, hq, t, d) = lq.shape().dims4()?;
    let hkv = lkv.shape().dims4()?.1;
    Ok(Dims { b, hq, hkv, t, d })
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, name: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("sparsek_attn: {name} must be contiguous, got {l:?}"),
    }
}

fn host_scores<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => {
            let u = contiguous(v, l, "scores")?;
            if u.iter().any(|x| x.is_nan()) {
                bail!("sparsek_attn: NaN in the scores {:?}", l.dims())
            }
            Ok(u)
        }
        other => bail!("sparsek_attn: scores must be f32, got {:?}", other.dtype()),
    }
}

impl candle::CustomOp3 for SparseKAttn {
    fn name(&self) -> &'static str {
        "sparsek-attn"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        skv: &CpuStorage,
        lkv: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims_of(lq, lkv)?;
        let u = host_scores(su, lu)?;
        let sel = cpu::select(u, dims.t, self.cfg.k, self.cfg.window, self.cfg.cap());
        let (q, kv) = (cpu::as_f32(sq, lq, "q")?, cpu::as_f32(skv, lkv, "kv")?);
        let (out, lse) = cpu::forward(&q, &kv, &sel, dims, self.cfg.window, self.scale);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved {
            selection: Selection::Cpu(Arc::new(sel)),
            lse: Tensor::from_vec(lse, (dims.b, dims.hq, dims.t), &Device::Cpu)?,
        });
        Ok((cpu::from_f32(out, sq)?, lq.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle::CudaStorage,
        lq: &Layout,
        skv: &candle::CudaStorage,
        lkv: &Layout,
        su: &candle::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dims = dims_of(lq, lkv)?;
        let sel = super::cuda::select((su, lu), dims, &self.cfg)?;
        let (out, lse) = super::cuda::forward(
            (sq, lq),
            (skv, lkv),
            (su, lu),
            &sel,
            dims,
            &self.cfg,
            self.scale,
        )?;
        let lse = Tensor::from_storage(
            candle::Storage::Cuda(lse),
            (dims.b, dims.hq, dims.t),
            candle::op::BackpropOp::none(),
            false,
        );
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved {
            selection: Selection::Cuda(sel),
            lse,
        });
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        u: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stashed = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let saved = match stashed {
            Some(s) => s,
            None => {
                let op = SparseKAttn {
                    cfg: self.cfg,
                    scale: self.scale,
                    saved: Arc::new(Mutex::new(None)),
                };
                q.apply_op3_no_bwd(kv, u, &op)?;
                let s = op.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
                s.ok_or_else(|| candle::Error::Msg("sparsek_attn: no saved selection".into()))?
            }
        };
        let bwd = SparseKAttnBwd {
            cfg: self.cfg,
            scale: self.scale,
            out: out.contiguous()?,
            grad_out: grad_out.contiguous()?,
            saved,
        };
        let packed = q.apply_op3_no_bwd(kv, u, &bwd)?;
        let (nq, nkv, nu) = (q.elem_count(), kv.elem_count(), u.elem_count());
        let dq = packed
            .narrow(0, 0, nq)?
            .reshape(q.shape())?
            .to_dtype(q.dtype())?;
        let dkv = packed
            .narrow(0, nq, nkv)?
            .reshape(kv.shape())?
            .to_dtype(kv.dtype())?;
        let du = packed.narrow(0, nq + nkv, nu)?.reshape(u.shape())?;
        Ok((Some(dq), Some(dkv), Some(du)))
    }
}

/// The backward op. Inputs as the forward; output the flat f32 concatenation `[dq | dkv | du]`.
struct SparseKAttnBwd {
    cfg: SparseKConfig,
    scale: f32,
    out: Tensor,
    grad_out: Tensor,
    saved: Saved,
}

impl candle::CustomOp3 for SparseKAttnBwd {
    fn name(&self) -> &'static str {
        "sparsek-attn-bwd"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        skv: &CpuStorage,
        lkv: &Layout,
        _su: &CpuStorage,
        _lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims_of(lq, lkv)?;
        let sel = match &self.saved.selection {
            Selection::Cpu(s) => s.clone(),
            #[cfg(feature = "cuda")]
            Selection::Cuda(_) => bail!("sparsek_attn: CUDA selection in a CPU backward"),
        };
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (o, go, lse) = (
            host(&self.out)?,
            host(&self.grad_out)?,
            host(&self.saved.lse)?,
        );
        let (q, kv) = (cpu::as_f32(sq, lq, "q")?, cpu::as_f32(skv, lkv, "kv")?);
        let (mut dq, dkv, du) = cpu::backward(
            &q,
            &kv,
            &sel,
            &o,
            &go,
            &lse,
            dims,
            self.cfg.window,
            self.scale,
        );
        dq.extend(dkv);
        dq.extend(du);
        let n = dq.len();
        Ok((CpuStorage::F32(dq), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle::CudaStorage,
        lq: &Layout,
        skv: &candle::CudaStorage,
        lkv: &Layout,
        su: &candle::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dims = dims_of(lq, lkv)?;
        let sel = match &self.saved.selection {
            Selection::Cuda(s) => s,
            Selection::Cpu(_) => bail!("sparsek_attn: CPU selection in a CUDA backward"),
        };
        let packed = super::cuda::backward(
            (sq, lq),
            (skv, lkv),
            (su, lu),
            sel,
            dims,
            &self.cfg,
            self.scale,
            (&self.out, &self.grad_out, &self.saved.lse),
        )?;
        let n = lq.shape().elem_count() + lkv.shape().elem_count() + dims.b * dims.hkv * dims.t;
        Ok((packed, Shape::from(n)))
    }
}
