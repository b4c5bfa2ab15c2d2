//! The SparseK attention op: selection fused with attention, forward and backward.

use std::sync::{Arc, Mutex};

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};

use super::cpu::{self, HostSelection};
use super::SparseKConfig;
#[cfg(feature = "cuda")]
use crate::cuda_launch::wrap_storage;
use crate::tape::{check_grad, AttentionTape};

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
    let forward = SparseKForward::new(k, v, cfg, dims)?;
    // CustomOp3 takes three inputs: k and v join the graph through a one-element link tensor; the
    // attention op reads them from its fields and hands their gradients to the link's backward.
    let kv_grads = Arc::new(Mutex::new(None));
    let link = forward.k.apply_op2(
        &forward.v,
        KvLink {
            grads: kv_grads.clone(),
        },
    )?;
    let op = SparseKAttn { forward, kv_grads };
    q.contiguous()?.apply_op3(&link, &scores.contiguous()?, op)
}

/// [`sparsek_attn`] outside candle's autograd: the same validation, kernels and output, and an
/// [`AttentionTape`] whose [`AttentionTape::grads`] gives the same `dq`, `dk`, `dv` (the dtype
/// and shapes of q, k, v) and `dscores` (`(batch, kv_heads, seq)` f32) as autograd through
/// [`sparsek_attn`] (see [`crate::tape`]).
pub fn sparsek_attn_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: &Tensor,
    cfg: &SparseKConfig,
) -> Result<(Tensor, AttentionTape)> {
    let dims = validate(q, k, v, scores, cfg)?;
    let forward = SparseKForward::new(k, v, cfg, dims)?;
    let (q, scores) = (q.contiguous()?, scores.contiguous()?);
    let (out, saved) = forward.run(&q, &scores)?;
    AttentionTape::sparsek(SparseKRun {
        forward,
        q,
        scores,
        out,
        saved,
    })
}

/// Where the heads lie in the projection rows that [`sparsek_attn_qkvpacked_taped`] reads:
/// `qkv` `(batch, seq, width)` holds the query heads in columns `[0, q_heads·head_dim)`, then the
/// key heads and the value heads (`kv_heads·head_dim` columns each), head after head; columns
/// past those (`width` larger, e.g. a key scorer's folded into the same projection) are not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedHeads {
    /// Query heads (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Key (and value) heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// [`sparsek_attn_taped`] on queries, keys and values packed in the rows of one projection
/// `qkv` `(batch, seq, width)` (layout [`PackedHeads`]; f32, f16 or bf16), with `scores`
/// `(batch, kv_heads, seq)` f32: returns the output `(batch, seq, q_heads·head_dim)` (heads
/// merged, as an output projection takes them) and the tape, whose
/// [`AttentionTape::grads_qkvpacked`] gives `dqkv` `(batch, seq, width)` (zero in the columns
/// not read) and the scores' gradient. Same values as splitting the heads out and calling
/// [`sparsek_attn_taped`].
///
/// Where every kernel of the call is a Hopper kernel (compute capability 9.0, f16 / bf16,
/// head_dim 64 or 128; `qkv` contiguous with `width` a multiple of 8) they read q, k, v in place
/// and write the output and dq, dk, dv in these layouts: no copies of the heads either way
/// (fastest with `width` a multiple of 64, so that no 128-byte row straddles a cache line).
/// Elsewhere (the CPU, f32, other kernels) the heads are copied out and the results merged back.
pub fn sparsek_attn_qkvpacked_taped(
    qkv: &Tensor,
    heads: PackedHeads,
    scores: &Tensor,
    cfg: &SparseKConfig,
) -> Result<(Tensor, AttentionTape)> {
    let dims = validate_packed(qkv, heads, scores, cfg)?;
    let Dims { hq, hkv, d, .. } = dims;
    let width = qkv.dim(2)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = qkv.device() {
        if qkv.is_contiguous()
            && width.is_multiple_of(8)
            && super::cuda::reads_rows_in_place(dev, qkv.dtype(), dims, cfg)?
        {
            let scores = scores.contiguous()?;
            let (out, saved) = {
                let (su, lu) = scores.storage_and_layout();
                let candle::Storage::Cuda(su) = &*su else {
                    bail!("sparsek_attn_qkvpacked: scores must be on the device of qkv")
                };
                let sel = super::cuda::select((su, lu), dims, cfg)?;
                let (out, lse) =
                    super::cuda::forward_packed(qkv, (su, lu), &sel, dims, cfg, cfg.scale(d))?;
                let saved = Saved {
                    selection: Selection::Cuda(sel),
                    lse: wrap_storage(lse, (dims.b, hq, dims.t)),
                };
                (wrap_storage(out, (dims.b, dims.t, hq * d)), saved)
            };
            return AttentionTape::sparsek_packed(SparseKPackedRun::InPlace {
                qkv: qkv.clone(),
                scores,
                out: out.clone(),
                saved,
                dims,
                cfg: *cfg,
            });
        }
    }
    // Elsewhere the heads are copied out (contiguous `(b, h, t, d)`) and the output merged back.
    let split = |at: usize, h: usize| crate::fused::to_heads(&qkv.narrow(2, at * d, h * d)?, h);
    let (q, k, v) = (split(0, hq)?, split(hq, hkv)?, split(hq + hkv, hkv)?);
    let (y, tape) = sparsek_attn_taped(&q, &k, &v, scores, cfg)?;
    let y = crate::fused::merge_heads(&y)?;
    AttentionTape::sparsek_packed(SparseKPackedRun::Split {
        tape: Box::new(tape),
        heads,
        width,
        out: y.clone(),
    })
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
    let dims = Dims { b, hq, hkv, t, d };
    validate_scores_and_sizes(dims, scores, cfg, &format!("q {:?}", q.dims()))?;
    Ok(dims)
}

/// The checks [`validate`] and [`validate_packed`] share, on the sizes of a call (`what` names
/// the queries' tensor in messages): the scores' shape, the head dim, the config.
fn validate_scores_and_sizes(
    dims: Dims,
    scores: &Tensor,
    cfg: &SparseKConfig,
    what: &str,
) -> Result<()> {
    let Dims { b, hkv, t, d, .. } = dims;
    if scores.dims() != [b, hkv, t] {
        bail!(
            "sparsek_attn: scores must be (batch, kv_heads, seq) = {:?}, got {:?}",
            [b, hkv, t],
            scores.dims()
        )
    }
    if !crate::SUPPORTED_HEAD_DIMS.contains(&d) {
        bail!(
            "sparsek_attn: head_dim {d} is not supported (supported: {:?}), {what}",
            crate::SUPPORTED_HEAD_DIMS
        )
    }
    cfg.validate(Some(t))
}

/// [`validate`] for [`sparsek_attn_qkvpacked_taped`]: `qkv` `(b, t, width)` of a supported
/// dtype holding the columns of `heads`, and scores on its device.
fn validate_packed(
    qkv: &Tensor,
    heads: PackedHeads,
    scores: &Tensor,
    cfg: &SparseKConfig,
) -> Result<Dims> {
    let PackedHeads {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
    } = heads;
    let &[b, t, width] = qkv.dims() else {
        bail!(
            "sparsek_attn_qkvpacked: qkv must be (batch, seq, width), got {:?}",
            qkv.dims()
        )
    };
    if width < (hq + 2 * hkv) * d {
        bail!(
            "sparsek_attn_qkvpacked: qkv {:?} is narrower than the {} columns of {heads:?}",
            qkv.dims(),
            (hq + 2 * hkv) * d
        )
    }
    if !matches!(qkv.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "sparsek_attn_qkvpacked: dtype {:?} not supported (f32, f16, bf16)",
            qkv.dtype()
        )
    }
    if scores.dtype() != DType::F32 || !scores.device().same_device(qkv.device()) {
        bail!(
            "sparsek_attn_qkvpacked: scores must be f32 on the device of qkv ({:?}), got {:?} on {:?}",
            qkv.device().location(),
            scores.dtype(),
            scores.device().location()
        )
    }
    if hkv == 0 || hq % hkv != 0 || b == 0 || t == 0 || d == 0 {
        bail!(
            "sparsek_attn_qkvpacked: {heads:?} (kv heads dividing q heads) over qkv {:?} must \
             not be empty",
            qkv.dims()
        )
    }
    let dims = Dims { b, hq, hkv, t, d };
    validate_scores_and_sizes(dims, scores, cfg, &format!("qkv {:?}", qkv.dims()))?;
    Ok(dims)
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
pub(crate) struct Saved {
    selection: Selection,
    lse: Tensor,
}

/// `(dk, dv)` handed from the attention backward to the link's backward.
type KvGrads = Arc<Mutex<Option<(Tensor, Tensor)>>>;

/// Ties k and v into the autograd graph of [`SparseKAttn`] (whose second input is this op's
/// output): forward, one f32 zero of shape `(1,)`; backward, the `(dk, dv)` that the attention
/// backward computed (it runs first, the link being its input).
struct KvLink {
    grads: KvGrads,
}

impl candle::CustomOp2 for KvLink {
    fn name(&self) -> &'static str {
        "sparsek-kv-link"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sk: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use candle::backend::BackendDevice;
        let link = sk.device().zeros_impl(&Shape::from(1), DType::F32)?;
        Ok((link, Shape::from(1)))
    }

    fn bwd(
        &self,
        _k: &Tensor,
        _v: &Tensor,
        _link: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = self.grads.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (dk, dv) = grads.ok_or_else(|| {
            candle::Error::Msg("sparsek_attn: the attention backward left no dk, dv".into())
        })?;
        Ok((Some(dk), Some(dv)))
    }
}

/// Selection and attention of one call, as a `CustomOp3` without backward over
/// `(q, any tensor on q's device, scores)`: k and v are fields (the middle input is not read; the
/// differentiable op passes the [`KvLink`] there), the forward stashes its [`Saved`] in `saved`.
/// Inputs q `(b, hq, t, d)` and scores `(b, hkv, t)` f32, contiguous; output `(b, hq, t, d)` in
/// the input dtype.
struct SparseKForward {
    cfg: SparseKConfig,
    scale: f32,
    /// Keys and values `(b, hkv, t, d)`, contiguous.
    k: Tensor,
    v: Tensor,
    dims: Dims,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl SparseKForward {
    /// The forward of a call whose inputs passed [`validate`] with `dims`.
    fn new(k: &Tensor, v: &Tensor, cfg: &SparseKConfig, dims: Dims) -> Result<Self> {
        Ok(Self {
            cfg: *cfg,
            scale: cfg.scale(dims.d),
            k: k.contiguous()?,
            v: v.contiguous()?,
            dims,
            saved: Arc::new(Mutex::new(None)),
        })
    }

    fn save(&self, saved: Saved) {
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
    }

    /// Runs the forward on `q` and `scores` (contiguous) outside autograd: the output and what
    /// the backward needs.
    fn run(&self, q: &Tensor, scores: &Tensor) -> Result<(Tensor, Saved)> {
        let out = q.apply_op3_no_bwd(&self.k, scores, self)?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let saved =
            saved.ok_or_else(|| candle::Error::Msg("sparsek_attn: no saved selection".into()))?;
        Ok((out, saved))
    }

    /// Gradients `(dq, dk, dv, du)` (the dtype of q, k, v; du f32 `(b, hkv, t)`) for the output
    /// gradient `grad_out`, from the inputs `q` and `scores` (contiguous), the output and the
    /// forward's [`Saved`].
    fn backward(
        &self,
        (q, scores): (&Tensor, &Tensor),
        (out, grad_out): (&Tensor, &Tensor),
        saved: &Saved,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let dims = self.dims;
        let (out, grad_out) = (out.contiguous()?, grad_out.contiguous()?);
        match &saved.selection {
            Selection::Cpu(sel) => {
                let (dq, dk, dv, du) = cpu::backward(
                    &host(q)?,
                    &host(&self.k)?,
                    &host(&self.v)?,
                    sel,
                    &host(&out)?,
                    &host(&grad_out)?,
                    &host(&saved.lse)?,
                    dims,
                    self.cfg.window,
                    self.scale,
                );
                let dev = q.device();
                let like = |x: Vec<f32>, t: &Tensor| {
                    Tensor::from_vec(x, t.shape(), dev)?.to_dtype(t.dtype())
                };
                Ok((
                    like(dq, q)?,
                    like(dk, &self.k)?,
                    like(dv, &self.v)?,
                    Tensor::from_vec(du, scores.shape(), dev)?,
                ))
            }
            #[cfg(feature = "cuda")]
            Selection::Cuda(sel) => super::cuda::backward(
                (q, &self.k, &self.v, scores),
                sel,
                dims,
                &self.cfg,
                self.scale,
                (&out, &grad_out, &saved.lse),
            ),
        }
    }
}

/// The differentiable attention op: [`SparseKForward`] over q, the [`KvLink`] of its k and v, and
/// the scores, with the backward that hands `(dk, dv)` to the link.
struct SparseKAttn {
    forward: SparseKForward,
    kv_grads: KvGrads,
}

/// One [`sparsek_attn_taped`] call: its forward, inputs q and scores (contiguous), output and
/// forward statistics, for [`AttentionTape`].
pub(crate) struct SparseKRun {
    forward: SparseKForward,
    q: Tensor,
    scores: Tensor,
    out: Tensor,
    saved: Saved,
}

impl SparseKRun {
    /// The output `(b, hq, t, d)`.
    pub(crate) fn output(&self) -> &Tensor {
        &self.out
    }

    /// Gradients `(dq, dk, dv, dscores)` for the output gradient `grad_out` (the output's shape,
    /// dtype and device).
    pub(crate) fn grads(&self, grad_out: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        check_grad(grad_out, &self.out)?;
        self.forward
            .backward((&self.q, &self.scores), (&self.out, grad_out), &self.saved)
    }
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

/// One [`sparsek_attn_qkvpacked_taped`] call, for [`AttentionTape`].
pub(crate) enum SparseKPackedRun {
    /// The Hopper kernels on the rows in place: the inputs, the output `(b, t, hq·d)` and the
    /// forward's statistics.
    #[cfg(feature = "cuda")]
    InPlace {
        qkv: Tensor,
        scores: Tensor,
        out: Tensor,
        saved: Saved,
        dims: Dims,
        cfg: SparseKConfig,
    },
    /// The heads copied out: the tape of [`sparsek_attn_taped`] on them, the rows' width and the
    /// merged output `(b, t, hq·d)`.
    Split {
        tape: Box<AttentionTape>,
        heads: PackedHeads,
        width: usize,
        out: Tensor,
    },
}

/// A SparseK scorer folded into packed projection rows (its linear part computed by the same
/// GEMM): its raw slopes `rho` `(kv_heads)` f32 (positions from `offset`) and its first column
/// `col` of the rows (`kv_heads` columns, then zeros to the rows' end).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct ScorerColumns<'a> {
    pub rho: &'a Tensor,
    pub col: usize,
    pub offset: usize,
}

impl SparseKPackedRun {
    /// The output `(b, t, hq·d)`.
    pub(crate) fn output(&self) -> &Tensor {
        match self {
            #[cfg(feature = "cuda")]
            Self::InPlace { out, .. } => out,
            Self::Split { out, .. } => out,
        }
    }

    /// `(dqkv, dscores, dslope)` for the output gradient `dy` (the output's shape, dtype and
    /// device): `dqkv` `(b, t, width)` in the dtype of qkv, zero past q, k, v's columns; `dscores`
    /// `(b, hkv, t)` f32. With `scorer`, where the Hopper kernels run, the backward also writes
    /// the scorer's columns of `dqkv` and returns its raw slopes' gradient `dslope`; otherwise
    /// `dslope` is `None` and those columns are zeros.
    pub(crate) fn grads(
        &self,
        dy: &Tensor,
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] scorer: Option<&ScorerColumns>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        check_grad(dy, self.output())?;
        match self {
            #[cfg(feature = "cuda")]
            Self::InPlace {
                qkv,
                scores,
                out,
                saved,
                dims,
                cfg,
            } => {
                let Selection::Cuda(sel) = &saved.selection else {
                    bail!("sparsek_attn_qkvpacked: the in-place run has no device selection")
                };
                super::cuda::backward_packed(
                    qkv,
                    scores,
                    sel,
                    *dims,
                    cfg,
                    cfg.scale(dims.d),
                    (out, &dy.contiguous()?, &saved.lse),
                    scorer,
                )
            }
            Self::Split {
                tape, heads, width, ..
            } => {
                let (b, t, _) = dy.dims3()?;
                let grads = tape.grads(&crate::fused::to_heads(dy, heads.q_heads)?)?;
                let merge = crate::fused::merge_heads;
                let mut parts = vec![merge(&grads.dq)?, merge(&grads.dk)?, merge(&grads.dv)?];
                let used: usize = parts.iter().map(|p| p.dim(2)).sum::<Result<usize>>()?;
                if used < *width {
                    parts.push(Tensor::zeros(
                        (b, t, width - used),
                        grads.dq.dtype(),
                        dy.device(),
                    )?);
                }
                let dscores = grads.dscores.ok_or_else(|| {
                    candle::Error::Msg("sparsek_attn_qkvpacked: no scores' gradient".into())
                })?;
                Ok((Tensor::cat(&parts, 2)?, dscores, None))
            }
        }
    }
}

/// A tensor's values as host f32, in row-major order.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl candle::CustomOp3 for SparseKForward {
    fn name(&self) -> &'static str {
        "sparsek-attn-forward"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        _: &CpuStorage,
        _: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        let u = host_scores(su, lu)?;
        let sel = cpu::select(u, dims.t, self.cfg.k, self.cfg.window, self.cfg.cap());
        let (k, v) = (host(&self.k)?, host(&self.v)?);
        let q = cpu::as_f32(sq, lq, "q")?;
        let (out, lse) = cpu::forward(&q, &k, &v, &sel, dims, self.cfg.window, self.scale);
        self.save(Saved {
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
        _: &candle::CudaStorage,
        _: &Layout,
        su: &candle::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dims = self.dims;
        let sel = super::cuda::select((su, lu), dims, &self.cfg)?;
        let (out, lse) = super::cuda::forward(
            (sq, lq),
            (&self.k, &self.v),
            (su, lu),
            &sel,
            dims,
            &self.cfg,
            self.scale,
        )?;
        let lse = wrap_storage(lse, (dims.b, dims.hq, dims.t));
        self.save(Saved {
            selection: Selection::Cuda(sel),
            lse,
        });
        Ok((out, lq.shape().clone()))
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
        sl: &CpuStorage,
        ll: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward.cpu_fwd(sq, lq, sl, ll, su, lu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle::CudaStorage,
        lq: &Layout,
        sl: &candle::CudaStorage,
        ll: &Layout,
        su: &candle::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.forward.cuda_fwd(sq, lq, sl, ll, su, lu)
    }

    fn bwd(
        &self,
        q: &Tensor,
        link: &Tensor,
        u: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let f = &self.forward;
        let stashed = f.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let saved = match stashed {
            Some(s) => s,
            None => f.run(q, u)?.1,
        };
        let (dq, dk, dv, du) = f.backward((q, u), (out, grad_out), &saved)?;
        // Without a graph behind the link (k and v not tracked) nobody collects dk, dv.
        if link.track_op() {
            *self.kv_grads.lock().unwrap_or_else(|e| e.into_inner()) = Some((dk, dv));
        }
        Ok((Some(dq), Some(link.zeros_like()?), Some(du)))
    }
}
