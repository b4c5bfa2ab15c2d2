//! Models built on `candle-sparse-attn`: a character-level GPT (nanoGPT style) with pluggable
//! attention, its data pipeline, optimiser and checkpointing.
//!
//! - [`attention`]: [`AttentionKind`] (serde-able choice of method), the [`AttentionBackend`]
//!   trait, the [`Attention`] layer step with [`KvCache`], and [`RotaryEmbedding`].
//! - [`gpt`]: the [`Gpt`] model and its [`GptConfig`].
//! - [`data`]: character vocabulary and seeded train/validation batches.
//! - [`optim`]: AdamW with saveable state, gradient clipping and the learning-rate schedule.
//! - [`train`]: the [`Trainer`] and checkpoints.
//! - [`metrics`]: CSV log and PNG loss curve.
//!
//! Every layer is built from differentiable tensor ops (composite softmax and LayerNorm), so
//! `loss.backward()` reaches every parameter.

pub mod attention;
pub mod data;
pub mod gpt;
pub mod layers;
pub mod metrics;
pub mod optim;
pub mod train;

pub use attention::{
    Attention, AttentionBackend, AttentionCall, AttentionKind, KvCache, RotaryEmbedding,
};
pub use data::{CharDataset, Split, Vocab};
pub use gpt::{Gpt, GptConfig, PositionEncoding, SampleOptions};
pub use train::{CheckpointMeta, Precision, StepStats, TrainConfig, Trainer};
