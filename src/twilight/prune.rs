//! The pruner: INT4 weight estimates over the candidates, then top-p by threshold search.

use candle::{bail, DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{check_ids, cpu, on_device, union_per_group, TwilightCache};

/// Stop the top-p search once the weights left in `(lo, hi]` lie within this of each other.
pub const TOP_P_EPS: f32 = 1e-5;
/// Iteration cap of the top-p search.
pub const TOP_P_MAX_ITERS: usize = 64;

/// Estimated scores `ŝ_j = scale · q·k̂_j` over the candidates, with the cache's INT4 keys `k̂`.
///
/// - `q`: `(batch, q_heads, head_dim)`, cache dtype and device.
/// - `candidates`: `(batch, q_heads, n)` u32 token ids; [`super::NO_TOKEN`] and ids `≥ len` are
///   padding and score `-inf` (so they get no mass in the softmax).
///
/// Returns `(batch, q_heads, n)` f32. Computed as `scale·(s_k·Σ_d q_d·code_d + m_k·Σ_d q_d)` in f32,
/// with `s_k`, `m_k` the token's f16 scale and min.
pub fn estimate_scores(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    check_estimate_inputs(cache, q, candidates, scale, "estimate")?;
    let (q, candidates) = (q.contiguous()?, candidates.contiguous()?);
    on_device!(
        q.device(),
        cpu::estimate_scores(cache, &q, &candidates, scale),
        cuda::estimate_scores(cache, &q, &candidates, scale)
    )
}

/// Top-p over each row: `ŵ = softmax(est)` over the finite entries (f32), then the kept set
/// `{ŵ_j > t}` with `t` the largest threshold found with mass `Σ_{ŵ > t} ŵ ≥ p`.
///
/// The threshold comes from a binary search on `[0, max ŵ]` (no sort): each iteration is one
/// pass computing `Σ_{ŵ > mid} ŵ`, the smallest weight `> lo` and the largest `≤ hi`; it stops
/// when those two are within [`TOP_P_EPS`] (no two distinct weights left between the bounds) or
/// after [`TOP_P_MAX_ITERS`]. The result is minimal up to weights within `TOP_P_EPS` of each other
/// and never empty (it holds the maximum). Equal weights are kept or dropped together.
/// `p ≥ 1` keeps every finite entry.
///
/// - `est`: `(batch, heads, n)` f32 scores (`-inf` = padding); `candidates`: the matching
///   `(batch, heads, n)` u32 token ids.
///
/// Returns `(batch, heads, n)` u32: the candidate's id where kept, [`super::NO_TOKEN`] elsewhere.
pub fn top_p(est: &Tensor, candidates: &Tensor, p: f32) -> Result<Tensor> {
    check_p(p)?;
    if est.dtype() != DType::F32 {
        bail!("twilight: top_p scores must be f32, got {:?}", est.dtype())
    }
    let (b, h, _) = match est.dims() {
        &[b, h, n] => (b, h, n),
        dims => bail!("twilight: top_p scores must be (batch, heads, n), got {dims:?}"),
    };
    check_ids("candidates", candidates, b, h, est.device())?;
    if est.dims() != candidates.dims() {
        bail!(
            "twilight: top_p scores {:?} and candidates {:?} differ",
            est.dims(),
            candidates.dims()
        )
    }
    let (est, candidates) = (est.contiguous()?, candidates.contiguous()?);
    on_device!(
        est.device(),
        cpu::top_p(&est, &candidates, p),
        cuda::top_p(&est, &candidates, p)
    )
}

/// The whole pruner of a decode step: `top_p(estimate_scores(q, candidates), candidates, p)` and
/// its [`union_per_group`], as `(kept, lists)` with the shapes of those two functions.
///
/// On CUDA this is one kernel per `(batch, kv head)` (estimates in shared memory, the threshold
/// search of each query head on its own warps, the union in a shared bitmap) where the group's
/// estimates fit in shared memory (`≤ 8` query heads per kv head); elsewhere, and on the CPU, the
/// three stages run one after the other. Both give the same sets up to the `TOP_P_EPS` ties of
/// [`top_p`] (sums in another order).
pub fn prune_and_union(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
    p: f32,
) -> Result<(Tensor, Tensor)> {
    check_estimate_inputs(cache, q, candidates, scale, "prune")?;
    check_p(p)?;
    let (q, candidates) = (q.contiguous()?, candidates.contiguous()?);
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        if let Some(fused) = cuda::prune_and_union(cache, &q, &candidates, scale, p)? {
            return Ok(fused);
        }
    }
    let est = estimate_scores(cache, &q, &candidates, scale)?;
    let kept = top_p(&est, &candidates, p)?;
    let lists = union_per_group(&kept, cache.kv_heads(), cache.len())?;
    Ok((kept, lists))
}

/// The checks of [`estimate_scores`]' inputs (`stage` names the caller in the query's errors).
fn check_estimate_inputs(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
    stage: &str,
) -> Result<()> {
    let (b, hq, _) = cache.check_stage_query(q, stage)?;
    if !scale.is_finite() {
        bail!("twilight: estimate scale must be finite, got {scale}")
    }
    check_ids("candidates", candidates, b, hq, cache.device())?;
    Ok(())
}

/// The top-p mass must be in `(0, 1]`.
fn check_p(p: f32) -> Result<()> {
    if !(p > 0.0 && p <= 1.0) {
        bail!("twilight: p must be in (0, 1], got {p}")
    }
    Ok(())
}
