//! MoA prefill attention (spec §5): causal attention where every kv head sees a sink of its first
//! blocks plus a band of its newest blocks, on the flash-attention op with
//! [`Visibility::SinkBand`]. Tiles outside sink ∪ band are never loaded, so the work per query
//! block is at most `1 + band_blocks` key tiles.

use candle::{bail, Device, Result, Tensor};

use super::plan::{MoaLayerPlan, MOA_BLOCK};
use crate::flash;
use crate::mask::{SinkBand, Visibility, SINK_BAND_BLOCK};

const _: () = assert!(MOA_BLOCK == SINK_BAND_BLOCK);

/// The [`Visibility::SinkBand`] of a layer plan, its `(kv_heads, 2)` block table on `device`.
/// Checks the plan ([`MoaLayerPlan::validate`]).
pub fn sink_band(plan: &MoaLayerPlan, device: &Device) -> Result<Visibility> {
    plan.validate()?;
    let blocks: Vec<i32> = plan
        .spans
        .iter()
        .flat_map(|s| [(s.sink / MOA_BLOCK) as i32, s.band_blocks() as i32])
        .collect();
    Ok(Visibility::SinkBand(SinkBand {
        blocks: Tensor::from_vec(blocks, (plan.kv_heads(), 2), device)?,
    }))
}

/// MoA prefill attention: `softmax(scale · q kᵀ, masked) v` where query block `qb` (64 rows) of a
/// head attends key blocks `{0} ∪ [max(0, qb − band_blocks + 1), qb]` of its kv head `h`
/// (`band_blocks = plan.spans[h].band / 64`, the sink block only when `spans[h].sink` is 64), with
/// the causal mask on the diagonal block.
///
/// - `q`: `(batch, q_heads, n, head_dim)`; `k`, `v`: `(batch, kv_heads, n, head_dim)` with
///   `kv_heads == plan.kv_heads()` dividing `q_heads` (all query heads of a group use their kv
///   head's span). Returns `(batch, q_heads, n, head_dim)`.
/// - dtypes f32, f16, bf16; head dims [`crate::SUPPORTED_HEAD_DIMS`]; any `n ≥ 1`.
/// - `softmax_scale`: `None` means `1/sqrt(head_dim)`.
/// - Differentiable (dq, dk, dv), on the CPU and CUDA.
pub fn moa_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &MoaLayerPlan,
    softmax_scale: Option<f32>,
) -> Result<Tensor> {
    let dims = flash::validate(q, k, v)?;
    if plan.kv_heads() != dims.hkv {
        bail!(
            "moa_attn: the plan has {} kv heads but k has shape {:?} ({} kv heads)",
            plan.kv_heads(),
            k.dims(),
            dims.hkv
        )
    }
    if dims.nq != dims.nk {
        bail!(
            "moa_attn: prefill needs q and k of one length, got q {:?} and k {:?}",
            q.dims(),
            k.dims()
        )
    }
    let scale = softmax_scale.unwrap_or_else(|| 1.0 / (dims.d as f32).sqrt());
    flash::attention(q, k, v, scale, sink_band(plan, q.device())?)
}
