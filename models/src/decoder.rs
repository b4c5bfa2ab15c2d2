//! What the Hugging Face decoders have in common: the [`CausalLm`] interface used by generation
//! and perplexity, the per-layer [`DecoderCache`], architecture detection from `config.json`, and
//! [`load_decoder`] from resolved [`ModelFiles`].

use std::path::Path;

use candle::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use tokenizers::Tokenizer;

use crate::attention::{Attention, AttentionKind, LayerCache};
use crate::gguf::GgufFile;
use crate::gpt2::{Gpt2, Gpt2Config};
use crate::hub::{resolve_model_files, ModelFiles};
use crate::llama::{Llama, LlamaConfig};

/// One decode cache per layer, each created by the layer's attention kind
/// ([`Attention::new_cache`]); the number of cached positions is the position offset of the next
/// forward call.
#[derive(Debug, Default)]
pub struct DecoderCache {
    /// The caches, layer by layer.
    pub layers: Vec<Box<dyn LayerCache>>,
}

impl DecoderCache {
    /// Empty caches for `n_layers` layers of `attention` (layer `i` gets
    /// `attention.new_cache(i)`); fails if the kind cannot decode with a cache.
    pub fn new(attention: &Attention, n_layers: usize) -> Result<Self> {
        Ok(Self {
            layers: (0..n_layers)
                .map(|i| attention.new_cache(i))
                .collect::<Result<_>>()?,
        })
    }

    /// Number of cached positions (that of the first layer; all layers agree).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache of layer `layer` (panics if out of range, like indexing `layers`).
    pub fn layer_mut(&mut self, layer: usize) -> &mut dyn LayerCache {
        self.layers[layer].as_mut()
    }

    /// Drops everything cached in every layer.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
    }

    /// The kept fraction of the last decode step averaged over the layers that report one
    /// ([`LayerCache::kept_fraction`]: sparse decode layers); `None` if no layer does. Reads one
    /// scalar from the device.
    pub fn kept_fraction(&self) -> Result<Option<f64>> {
        let fractions: Vec<Tensor> = self
            .layers
            .iter()
            .filter_map(|c| c.kept_fraction())
            .collect();
        if fractions.is_empty() {
            return Ok(None);
        }
        let mean = Tensor::stack(&fractions, 0)?.mean_all()?;
        Ok(Some(mean.to_dtype(DType::F64)?.to_scalar::<f64>()?))
    }
}

/// A causal language model: token ids in, next-token logits out.
pub trait CausalLm: Send + Sync {
    /// Final hidden states `(batch, seq, hidden)` (after the last norm, before the output head)
    /// for token ids `tokens`: `(batch, seq)` u32. With a cache, the tokens sit at positions
    /// `cache.len()..cache.len() + seq` and their keys and values are appended; without one they
    /// sit at `0..seq`.
    fn hidden_states(&self, tokens: &Tensor, cache: Option<&mut DecoderCache>) -> Result<Tensor>;
    /// The output head: logits `(…, vocab_size)` f32 for hidden states `(…, hidden)`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
    /// Logits `(batch, seq, vocab_size)` f32 of every position ([`Self::hidden_states`] then
    /// [`Self::logits`]).
    fn forward(&self, tokens: &Tensor, cache: Option<&mut DecoderCache>) -> Result<Tensor> {
        self.logits(&self.hidden_states(tokens, cache)?)
    }
    /// Logits `(batch, vocab_size)` f32 of the last position only: what generation needs; the
    /// output head runs on one position instead of `seq` (at an 8k prompt and a 49k vocabulary
    /// that is a 1.6 GB f32 tensor saved).
    fn forward_last(&self, tokens: &Tensor, cache: Option<&mut DecoderCache>) -> Result<Tensor> {
        let hidden = self.hidden_states(tokens, cache)?;
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)
    }
    /// Number of layers (the length of a [`DecoderCache`]).
    fn num_layers(&self) -> usize;
    /// An empty [`DecoderCache`] for this model, with the caches of its attention kind; fails
    /// if the kind cannot decode with a cache ([`Self::supports_kv_cache`]).
    fn new_cache(&self) -> Result<DecoderCache>;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Longest sequence (prompt plus generation) the model accepts.
    fn max_context(&self) -> usize;
    /// Whether the attention kind decodes with a KV cache (otherwise every step recomputes).
    fn supports_kv_cache(&self) -> bool;
    /// The device of the weights.
    fn device(&self) -> &Device;
}

/// Model architectures this crate can load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, Mistral-style decoders ([`Llama`]).
    Llama,
    /// GPT-2 ([`Gpt2`]).
    Gpt2,
}

/// The architecture declared by a `config.json` (`architectures`, else `model_type`).
pub fn detect_architecture(config: &serde_json::Value) -> Result<Architecture> {
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(|m| m.as_str());
    for name in architectures.iter().copied().chain(model_type) {
        match name {
            "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral" => {
                return Ok(Architecture::Llama)
            }
            "GPT2LMHeadModel" | "GPT2Model" | "gpt2" => return Ok(Architecture::Gpt2),
            _ => {}
        }
    }
    bail!(
        "unsupported architecture: config.json declares architectures {architectures:?} and \
         model_type {model_type:?}; supported: LlamaForCausalLM / MistralForCausalLM (llama, \
         mistral) and GPT2LMHeadModel (gpt2)"
    )
}

/// Reads and parses a JSON file, naming the file in errors.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle::Error::Msg(format!("reading {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| candle::Error::Msg(format!("parsing {}: {e}", path.display())))
}

/// Loads the decoder described by `files` with attention `kind`, weights converted to `dtype`
/// on `device`.
pub fn load_decoder(
    files: &ModelFiles,
    kind: &AttentionKind,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    let json = read_json(&files.config)?;
    let architecture = detect_architecture(&json)?;
    let parse_err = |e: serde_json::Error| {
        candle::Error::Msg(format!("config {}: {e}", files.config.display()))
    };
    for path in &files.weights {
        if !path.is_file() {
            bail!("weights file {} does not exist", path.display())
        }
    }
    // SAFETY: the files are memory-mapped read-only; they must not be modified while loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device)? };
    Ok(match architecture {
        Architecture::Llama => {
            let config: LlamaConfig = serde_json::from_value(json).map_err(parse_err)?;
            Box::new(Llama::load(config, kind, vb)?)
        }
        Architecture::Gpt2 => {
            let config: Gpt2Config = serde_json::from_value(json).map_err(parse_err)?;
            Box::new(Gpt2::load(config, kind, vb)?)
        }
    })
}

/// A model ready for generation: the decoder, its tokenizer and its end-of-sequence ids.
pub struct LoadedModel {
    /// The decoder.
    pub model: Box<dyn CausalLm>,
    /// The tokenizer (`tokenizer.json`, or rebuilt from GGUF metadata).
    pub tokenizer: Tokenizer,
    /// Token ids that end generation (`eos_token_id` of the config or the GGUF metadata).
    pub eos_token_ids: Vec<u32>,
}

/// The `eos_token_id` of a `config.json` (a number or a list of numbers).
fn eos_ids_of(config: &serde_json::Value) -> Vec<u32> {
    match config.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Loads `model`: a `.gguf` file, or a directory / Hub model id resolved by
/// [`resolve_model_files`] at `revision`, with attention `kind`, weights in `dtype` on `device`.
pub fn load_model(
    model: &str,
    revision: Option<&str>,
    kind: &AttentionKind,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let path = Path::new(model);
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let gguf = GgufFile::open(path)?;
        let tokenizer = gguf.tokenizer()?;
        let eos_token_ids = gguf.special_token_id("eos").into_iter().collect();
        let model = Box::new(gguf.load_llama(kind, dtype, device)?);
        return Ok(LoadedModel {
            model,
            tokenizer,
            eos_token_ids,
        });
    }
    let files = resolve_model_files(model, revision)?;
    let Some(tokenizer_path) = &files.tokenizer else {
        bail!(
            "model {model:?}: tokenizer.json not found next to {}; add the model's \
             tokenizer.json to that directory",
            files.config.display()
        )
    };
    let tokenizer = Tokenizer::from_file(tokenizer_path)
        .map_err(|e| candle::Error::Msg(format!("loading {}: {e}", tokenizer_path.display())))?;
    let eos_token_ids = eos_ids_of(&read_json(&files.config)?);
    Ok(LoadedModel {
        model: load_decoder(&files, kind, dtype, device)?,
        tokenizer,
        eos_token_ids,
    })
}
