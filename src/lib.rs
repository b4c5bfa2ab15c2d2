//! Sparse and dense flash attention for [candle](https://github.com/huggingface/candle).
//!
//! Every method is a candle `CustomOp3` with a CPU and a CUDA kernel, forward and backward, so
//! `loss.backward()` flows through it. All of them share one tensor layout:
//! `(batch, heads, seq, head_dim)` for queries, keys, values and outputs, with grouped-query
//! attention when the query heads are a multiple of the key/value heads.
//!
//! - [`flash_attn`]: dense (optionally causal) flash attention, the baseline and the kernel the
//!   sparse methods extend.
//! - [`scfa`]: sparse causal flash attention (query/key dropping and hash buckets) on top of the
//!   same kernel: [`qk_sparse_attn`], [`hash_sparse_attn`], [`sparse_causal_attn`].
//! - [`sparsek`]: SparseK, a learned top-k selection of older keys plus a sliding window.
//! - [`moa`]: a sink plus a sliding band of its own length per head, and the plans that set them.
//! - [`twilight`]: top-p pruning of a base sparse selector's candidates, for decoding.
//! - [`reference`]: the naive materialised implementation every test compares against.
//! - [`fused`]: fused training ops with backward passes (LayerNorm, GELU, embedding, head split,
//!   AdamW) that keep a small transformer's training step attention-bound.
//! - [`tape`]: the dense and SCFA attentions outside autograd, with their backward kept, for
//!   training passes that run their own backward.
//! - [`cuda_graph`]: candle's CUDA work recorded once and replayed by one launch (a training
//!   step).
//!
//! ```
//! use candle::{Device, Tensor};
//! use candle_sparse_attn::{flash_attn, AttnParams};
//! # fn main() -> candle::Result<()> {
//! let q = Tensor::randn(0f32, 1., (1, 4, 128, 64), &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1., (1, 2, 128, 64), &Device::Cpu)?; // GQA: 2 kv heads
//! let v = Tensor::randn(0f32, 1., (1, 2, 128, 64), &Device::Cpu)?;
//! let out = flash_attn(&q, &k, &v, &AttnParams::default())?; // causal, scale 1/sqrt(64)
//! assert_eq!(out.dims(), &[1, 4, 128, 64]);
//! # Ok(()) }
//! ```

pub mod cuda_graph;
#[cfg(feature = "cuda")]
mod cuda_launch;
pub mod flash;
pub mod fused;
#[cfg(feature = "cuda")]
mod kernels;
pub mod mask;
mod memory_pool;
pub mod moa;
pub mod reference;
pub mod scfa;
pub mod sparsek;
pub mod tape;
pub mod twilight;

pub use cuda_graph::CudaGraph;
pub use flash::{
    flash_attn, flash_attn_taped, flash_attn_with_visibility, AttnParams, SUPPORTED_HEAD_DIMS,
};
pub use mask::{SinkBand, SparseLayout, Visibility};
pub use memory_pool::keep_memory_pool;
pub use moa::moa_attn;
pub use scfa::{
    hash_sparse_attn, hash_sparse_attn_taped, hash_sparse_attn_with_buckets, qk_sparse_attn,
    qk_sparse_attn_taped, sparse_causal_attn, HashConfig, ScfaParams,
};
pub use sparsek::{
    sparsek, sparsek_attn, sparsek_attn_qkvpacked_taped, sparsek_attn_taped, PackedHeads,
    ScorerGrads, SparseKCache, SparseKConfig, SparseKScorer, SparseKScorerConfig,
};
pub use twilight::{decode_layer, TwilightCache, TwilightConfig, TwilightStep};
