//! Exact sparse decode attention over per-KV-head token lists (GQA group union).

use candle::{bail, DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{check_ids, cpu, on_device, TwilightCache};

/// Tokens per work item of the CUDA attention: each `(batch, kv head)` list is split into chunks
/// of this many tokens (`CHUNK` in `cuda/twilight.cu`), each attended by one block (partial
/// output + log-sum-exp), then merged; up to 16 blocks per list loop over its chunks.
pub const ATTN_CHUNK: usize = 64;

/// GQA union: for each `(batch, kv head)`, the ascending union of the kept tokens of its
/// `q_heads / kv_heads` query heads.
///
/// - `kept`: `(batch, q_heads, n)` u32 ids, [`super::NO_TOKEN`] (and ids `≥ len`) ignored.
///
/// Returns `(batch, kv_heads, 1 + cap)` u32 with `cap = min(group · n, len)`: element 0 the count,
/// then the ids; entries past the count are unspecified.
pub fn union_per_group(kept: &Tensor, kv_heads: usize, len: usize) -> Result<Tensor> {
    let (b, hq, n) = match kept.dims() {
        &[b, hq, n] => (b, hq, n),
        dims => bail!("twilight: kept ids must be (batch, q_heads, n), got {dims:?}"),
    };
    if kv_heads == 0 || hq % kv_heads != 0 || len == 0 {
        bail!(
            "twilight: union needs kv_heads dividing q_heads and len > 0, got kept {:?}, kv_heads {kv_heads}, len {len}",
            kept.dims()
        )
    }
    check_ids("kept", kept, b, hq, kept.device())?;
    let cap = (n * (hq / kv_heads)).min(len);
    let kept = kept.contiguous()?;
    on_device!(
        kept.device(),
        cpu::union_per_group(&kept, kv_heads, len, cap),
        cuda::union_per_group(&kept, kv_heads, len, cap)
    )
}

/// Exact attention of each query head over its KV head's list, with the full-precision cache:
/// `o = Σ_j softmax_j(scale · q·k_j) v_j` over the listed tokens (f32 statistics), variable length
/// per head, split over the KV axis in [`ATTN_CHUNK`]-token chunks on CUDA.
///
/// - `q`: `(batch, q_heads, head_dim)`, cache dtype and device; CUDA supports groups
///   `q_heads / kv_heads ≤ 8`.
/// - `lists`: `(batch, kv_heads, 1 + cap)` u32 as made by [`union_per_group`] (ids `< len`).
///
/// Returns `(batch, q_heads, head_dim)` in q's dtype; an empty list gives zeros.
pub fn sparse_decode_attention(
    cache: &TwilightCache,
    q: &Tensor,
    lists: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (b, _, _) = cache.check_stage_query(q, "attention")?;
    if lists.dtype() != DType::U32
        || lists.rank() != 3
        || lists.dims()[..2] != [b, cache.kv_heads()]
        || lists.dims()[2] < 2
    {
        bail!(
            "twilight: lists must be ({b}, {}, 1 + cap) u32, got {:?} {:?}",
            cache.kv_heads(),
            lists.dims(),
            lists.dtype()
        )
    }
    if !lists.device().same_device(cache.device()) {
        bail!(
            "twilight: lists are on {:?}, the cache on {:?}",
            lists.device().location(),
            cache.device().location()
        )
    }
    if !scale.is_finite() {
        bail!("twilight: attention scale must be finite, got {scale}")
    }
    let (q, lists) = (q.contiguous()?, lists.contiguous()?);
    on_device!(
        q.device(),
        cpu::sparse_decode_attention(cache, &q, &lists, scale),
        cuda::sparse_decode_attention(cache, &q, &lists, scale)
    )
}
