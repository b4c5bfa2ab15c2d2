//! Models built on `candle-sparse-attn`: a character-level GPT (nanoGPT style) with pluggable
//! attention, its data pipeline, optimiser and checkpointing.
//!
//! - [`attention`]: [`AttentionKind`] (serde-able choice of method), the [`AttentionBackend`]
//!   trait, the [`Attention`] layer step, per-kind decode caches ([`LayerCache`], the dense
//!   [`KvCache`]), and [`RotaryEmbedding`].
//! - [`twilight`]: the Twilight decoding backend and its per-layer cache.
//! - [`sparsek`]: the SparseK backend (learned key scorer per layer, trainable) and its
//!   evicting per-layer decode cache.
//! - [`gpt`]: the [`Gpt`] model and its [`GptConfig`].
//! - [`data`]: character vocabulary and seeded train/validation batches.
//! - [`optim`]: AdamW with saveable state, gradient clipping and the learning-rate schedule.
//! - [`train`]: the [`Trainer`] and checkpoints.
//! - [`metrics`]: CSV log and PNG loss curve.
//! - Hugging Face decoders: [`llama`] (Llama 2/3, SmolLM2, Mistral-style) and [`gpt2`], behind
//!   the [`decoder::CausalLm`] interface; [`hub`] finds their files (directory, cache, Hub),
//!   [`gguf`] loads GGUF files and their tokenizer, [`generate`] samples and measures
//!   perplexity.
//!
//! Every layer is built from differentiable tensor ops (composite softmax and LayerNorm), so
//! `loss.backward()` reaches every parameter.

pub mod attention;
pub mod data;
pub mod decoder;
pub mod generate;
pub mod gguf;
pub mod gpt;
pub mod gpt2;
pub mod gpt_grad;
pub mod hub;
pub mod layers;
pub mod llama;
pub mod metrics;
pub mod moa;
pub mod optim;
pub mod sparsek;
pub mod train;
pub mod twilight;

pub use attention::{
    downcast_cache, Attention, AttentionBackend, AttentionCall, AttentionKind, KvCache, LayerCache,
    RotaryEmbedding,
};
pub use data::{CharDataset, Split, Vocab};
pub use decoder::{load_decoder, load_model, CausalLm, DecoderCache, LoadedModel};
pub use generate::{
    generate, perplexity, perplexity_decode, GenerationStats, PerplexityReport, Sampler,
    SamplingOptions,
};
pub use gpt::{Gpt, GptConfig, PositionEncoding, SampleOptions};
pub use gpt2::{Gpt2, Gpt2Config};
pub use gpt_grad::TrainingPass;
pub use llama::{Llama, LlamaConfig};
pub use train::{CheckpointMeta, PhaseTimes, Precision, StepStats, TrainConfig, Trainer};
