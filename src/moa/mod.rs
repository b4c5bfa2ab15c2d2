//! MoA (Fu et al., arXiv 2406.14909, "Mixture of Attention Spans"): every key/value head gets its
//! own causal sliding window ("band") plus a sink of the first 64 tokens, with a span
//! `alpha + beta·N` that grows with the total length `N`, found by profiling.
//!
//! - [`plan`]: the plan file (the reference's JSON) and its resolution to per-head spans.
//! - [`prefill`]: block-sparse prefill attention with per-kv-head spans ([`moa_attn`]).

pub mod plan;
pub mod prefill;

pub use plan::{HeadSpan, MoaLayerPlan, MoaPlan, SpanRule, MOA_BLOCK, MOA_MIN_SPAN, MOA_SINK};
pub use prefill::{moa_attn, sink_band};
