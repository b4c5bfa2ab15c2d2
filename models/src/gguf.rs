//! Loading Llama-architecture GGUF files (llama.cpp's format, read with
//! `candle::quantized::gguf_file`): every tensor is dequantised to the compute dtype, renamed
//! to the Hugging Face layout and fed to [`Llama::load`]; the tokenizer is rebuilt from the
//! GGUF metadata (BPE vocabulary and merges, pre-tokenizer, special tokens).
//!
//! llama.cpp's converter permutes the rows of `attn_q` / `attn_k` for its interleaved RoPE;
//! they are permuted back to the rotate-half layout that [`crate::RotaryEmbedding`] uses.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle::quantized::gguf_file;
use candle::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::attention::AttentionKind;
use crate::llama::{Llama, LlamaConfig, RopeScaling};

/// A GGUF file's header: metadata and tensor directory (tensors stay on disk).
pub struct GgufFile {
    path: std::path::PathBuf,
    content: gguf_file::Content,
}

/// llama.cpp's `tokenizer.ggml.token_type` value of control (special) tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp's `tokenizer.ggml.token_type` value of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

impl GgufFile {
    /// Reads the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            candle::Error::Msg(format!(
                "cannot open GGUF file {}: {e} (for SmolLM2-135M-Instruct run \
                 scripts/fetch-smollm2.sh)",
                path.display()
            ))
        })?;
        let content = gguf_file::Content::read(&mut BufReader::new(file))
            .map_err(|e| candle::Error::Msg(format!("reading GGUF {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// The metadata value `key`, or an error naming the key and the file.
    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content.metadata.get(key).ok_or_else(|| {
            candle::Error::Msg(format!(
                "GGUF {}: metadata key {key:?} is missing",
                self.path.display()
            ))
        })
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        Ok(self.get("general.architecture")?.to_string()?.clone())
    }

    /// The Llama configuration from the `llama.*` metadata (vocabulary size from the token
    /// list when `llama.vocab_size` is absent; linear RoPE scaling). Fails for other
    /// architectures and for per-frequency RoPE factors (`rope_freqs.weight`).
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if arch != "llama" {
            bail!(
                "GGUF {}: unsupported architecture {arch:?} (only llama)",
                self.path.display()
            )
        }
        let u = |key: &str| -> Result<usize> {
            Ok(self.get(&format!("llama.{key}"))?.to_u32()? as usize)
        };
        let vocab_size = match self.content.metadata.get("llama.vocab_size") {
            Some(v) => v.to_u32()? as usize,
            None => self.get("tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let head_dim = match self.content.metadata.get("llama.rope.dimension_count") {
            Some(v) => v.to_u32()? as usize,
            None => hidden / heads.max(1),
        };
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let rope_theta = match self.content.metadata.get("llama.rope.freq_base") {
            Some(v) => v.to_f32()?,
            None => 10_000.0,
        };
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            bail!(
                "GGUF {}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style scaling) \
                 are not supported; load the Hugging Face safetensors checkpoint instead",
                self.path.display()
            )
        }
        let rope_scaling = match self.content.metadata.get("llama.rope.scaling.type") {
            None => None,
            Some(v) => match v.to_string()?.as_str() {
                "none" => None,
                "linear" => Some(RopeScaling {
                    rope_type: "linear".to_string(),
                    factor: Some(self.get("llama.rope.scaling.factor")?.to_f32()?),
                    low_freq_factor: None,
                    high_freq_factor: None,
                    original_max_position_embeddings: None,
                }),
                other => bail!(
                    "GGUF {}: RoPE scaling type {other:?} is not supported (none, linear)",
                    self.path.display()
                ),
            },
        };
        Ok(LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
            head_dim: Some(head_dim),
            rms_norm_eps: self
                .get("llama.attention.layer_norm_rms_epsilon")?
                .to_f32()? as f64,
            rope_theta,
            rope_scaling,
            max_position_embeddings: u("context_length")?,
            sliding_window: None,
            tie_word_embeddings: tied,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".to_string(),
        })
    }

    /// Dequantises every tensor to `dtype` on `device`, with Hugging Face names, q/k rows
    /// permuted back to rotate-half order.
    pub fn hf_tensors(
        &self,
        config: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let file = File::open(&self.path)
            .map_err(|e| candle::Error::Msg(format!("opening {}: {e}", self.path.display())))?;
        let mut reader = BufReader::new(file);
        let mut tensors = HashMap::new();
        let hd = config.head_dim();
        for name in self.content.tensor_infos.keys() {
            let Some(hf_name) = hf_tensor_name(name) else {
                continue;
            };
            let q = self.content.tensor(&mut reader, name, device)?;
            let mut t = q.dequantize(device)?;
            if name.ends_with("attn_q.weight") {
                t = unpermute_rope_rows(&t, config.num_attention_heads, hd)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute_rope_rows(&t, config.kv_heads(), hd)?;
            }
            tensors.insert(hf_name, t.to_dtype(dtype)?);
        }
        Ok(tensors)
    }

    /// Writes the model as a Hugging Face checkpoint into `dir` (created if needed):
    /// `model.safetensors` (every tensor dequantised to `dtype`, HF names, rotate-half q/k rows),
    /// `config.json` (`LlamaForCausalLM`, the [`LlamaConfig`] fields) and `tokenizer.json`, so
    /// that other implementations (`transformers`) can load the same weights.
    pub fn write_hf_checkpoint(&self, dir: &Path, dtype: DType) -> Result<()> {
        let config = self.llama_config()?;
        let io_err = |what: &Path, e: std::io::Error| {
            candle::Error::Msg(format!("writing {}: {e}", what.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let tensors = self.hf_tensors(&config, dtype, &Device::Cpu)?;
        candle::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let mut json = serde_json::to_value(&config).map_err(candle::Error::wrap)?;
        json["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        json["model_type"] = serde_json::json!("llama");
        json["torch_dtype"] = serde_json::json!(match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        });
        for (key, name) in [("bos_token_id", "bos"), ("eos_token_id", "eos")] {
            if let Some(id) = self.special_token_id(name) {
                json[key] = serde_json::json!(id);
            }
        }
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&json).map_err(candle::Error::wrap)?;
        std::fs::write(&path, text).map_err(|e| io_err(&path, e))?;
        let path = dir.join("tokenizer.json");
        self.tokenizer()?
            .save(&path, false)
            .map_err(|e| candle::Error::Msg(format!("writing {}: {e}", path.display())))?;
        Ok(())
    }

    /// Loads the model (Llama architecture) with attention `kind` in `dtype` on `device`.
    pub fn load_llama(&self, kind: &AttentionKind, dtype: DType, device: &Device) -> Result<Llama> {
        let config = self.llama_config()?;
        let tensors = self.hf_tensors(&config, dtype, device)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Llama::load(config, kind, vb)
            .map_err(|e| candle::Error::Msg(format!("GGUF {}: {e}", self.path.display())))
    }

    /// The tokenizer described by the `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`
    /// model) with the vocabulary, merges and pre-tokenizer of the file, control and
    /// user-defined tokens registered as special tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.path.display();
        let model = self.get("tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            bail!("GGUF {path}: tokenizer model {model:?} is not supported (only gpt2 byte-level BPE)")
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            self.get(key)?
                .to_vec()?
                .iter()
                .map(|v| v.to_string().cloned())
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => bail!("GGUF {path}: merge {m:?} is not two tokens separated by a space"),
            })
            .collect::<Result<_>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| candle::Error::Msg(format!("GGUF {path}: building BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = match self.content.metadata.get("tokenizer.ggml.pre") {
            Some(v) => v.to_string()?.clone(),
            None => "default".to_string(),
        };
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "default" | "gpt2" => byte_level.into(),
            // SmolLM / StarCoder: every digit on its own, then GPT-2's byte-level split.
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            other => bail!(
                "GGUF {path}: pre-tokenizer {other:?} is not supported (default, gpt2, smollm, \
                 starcoder, refact)"
            ),
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        let types: Vec<i32> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, &ty)| AddedToken::from(t.clone(), ty == TOKEN_TYPE_CONTROL))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| candle::Error::Msg(format!("GGUF {path}: special tokens: {e}")))?;
        Ok(tokenizer)
    }

    /// The id of `tokenizer.ggml.{name}_token_id` (`bos`, `eos`, ...), if present.
    pub fn special_token_id(&self, name: &str) -> Option<u32> {
        self.content
            .metadata
            .get(&format!("tokenizer.ggml.{name}_token_id"))
            .and_then(|v| v.to_u32().ok())
    }
}

/// The Hugging Face name of a llama.cpp tensor name (`None` for tensors the model does not use,
/// such as `rope_freqs.weight`).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".to_string()),
        "output_norm.weight" => return Some("model.norm.weight".to_string()),
        "output.weight" => return Some("lm_head.weight".to_string()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's RoPE permutation of a q or k weight `(heads·head_dim, in)`: within every
/// head, rows are stored as interleaved pairs `(hd/2, 2)`; rotate-half wants `(2, hd/2)`.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if rows != heads * head_dim {
        bail!("GGUF q/k weight has {rows} rows, expected heads {heads} × head_dim {head_dim}")
    }
    w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
}
