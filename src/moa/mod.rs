//! MoA (Fu et al., arXiv 2406.14909, "Mixture of Attention Spans"): every key/value head gets its
//! own causal sliding window ("band") plus a sink of the first 64 tokens, with a span
//! `alpha + beta·N` that grows with the total length `N`, found by profiling.
//!
//! - [`plan`]: the plan file (the reference's JSON) and its resolution to per-head spans.
//! - [`prefill`]: block-sparse prefill attention with per-kv-head spans ([`moa_attn`]).
//! - [`cache`]: the per-layer decode cache (static sink + ring per kv head, one buffer).
//! - [`decode`]: decode attention over that cache, all heads of a layer in one launch.
//! - [`profile`]: the attention influence (first-order loss change of masking) per 64×64 block.
//! - [`search`]: the exact plan search over the candidate grid (multiple-choice knapsack DP with
//!   one density constraint per profiled length).

pub mod cache;
#[cfg(feature = "cuda")]
mod cuda;
pub mod decode;
pub mod plan;
pub mod prefill;
pub mod profile;
pub mod search;

pub use cache::MoaCache;
pub use decode::{moa_decode, moa_decode_scaled};
pub use plan::{HeadSpan, MoaLayerPlan, MoaPlan, SpanRule, MOA_BLOCK, MOA_MIN_SPAN, MOA_SINK};
pub use prefill::{moa_attn, sink_band};
pub use profile::{profiled_attention, InfluenceTap, MoaInfluence};
pub use search::{search_plan, PlanSearch, SearchOptions};
