//! A Llama-architecture decoder (Llama 2/3, SmolLM2, Mistral-style) in Hugging Face layout:
//! RMSNorm, RoPE (rotate-half) with the config's theta and scaling, grouped-query attention
//! through the pluggable [`Attention`], a SwiGLU MLP, and a tied or untied output head.
//!
//! Weights (PyTorch `(out, in)` layout, any float dtype, converted to the compute dtype):
//! `model.embed_tokens.weight` `(vocab, hidden)`, per layer `i` under `model.layers.{i}.`:
//! `input_layernorm.weight`, `self_attn.{q,k,v,o}_proj.weight`, `post_attention_layernorm.weight`,
//! `mlp.{gate,up,down}_proj.weight`; then `model.norm.weight` and, untied, `lm_head.weight`.

use candle::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use candle_sparse_attn::SUPPORTED_HEAD_DIMS;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, AttentionKind, LayerCache, RotaryEmbedding};
use crate::decoder::{CausalLm, DecoderCache};

/// RoPE scaling of `config.json` (`rope_scaling`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `llama3`, `linear` or `default` (`type` in older configs).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scaling factor.
    pub factor: Option<f32>,
    /// Llama 3: low-frequency factor.
    pub low_freq_factor: Option<f32>,
    /// Llama 3: high-frequency factor.
    pub high_freq_factor: Option<f32>,
    /// Llama 3: context length of pre-training.
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

/// The fields of a Hugging Face Llama/Mistral `config.json` this model uses (others ignored).
/// Serialises to the same field names (see [`crate::gguf::GgufFile::write_hf_checkpoint`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Mistral's sliding window; the context is limited to it (where full causal attention and
    /// sliding-window attention agree).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Whether `lm_head` reuses `embed_tokens`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v, o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

impl LlamaConfig {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Longest context: `max_position_embeddings`, capped by `sliding_window`.
    pub fn max_context(&self) -> usize {
        match self.sliding_window {
            Some(w) if w > 0 => w.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }

    /// Checks sizes, head layout and options; errors name the offending values.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("llama config: {name} must be positive, got 0")
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "llama config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim()) {
            bail!(
                "llama config: head dim {} is not supported by the attention kernels \
                 (supported: {SUPPORTED_HEAD_DIMS:?})",
                self.head_dim()
            )
        }
        if self.hidden_act != "silu" {
            bail!(
                "llama config: hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            )
        }
        self.rope_frequencies().map(|_| ())
    }

    /// The RoPE frequencies `(head_dim / 2)` after scaling.
    pub fn rope_frequencies(&self) -> Result<Vec<f32>> {
        let hd = self.head_dim();
        let base: Vec<f32> = (0..hd / 2)
            .map(|i| self.rope_theta.powf(-((2 * i) as f32) / hd as f32))
            .collect();
        let Some(scaling) = &self.rope_scaling else {
            return Ok(base);
        };
        let need = |v: Option<f32>, name: &str| {
            v.ok_or_else(|| {
                candle::Error::Msg(format!(
                    "llama config: rope_scaling {:?} needs {name}",
                    scaling.rope_type
                ))
            })
        };
        match scaling.rope_type.as_str() {
            "default" => Ok(base),
            "linear" => {
                let factor = need(scaling.factor, "factor")?;
                Ok(base.iter().map(|f| f / factor).collect())
            }
            "llama3" => {
                let factor = need(scaling.factor, "factor")?;
                let low = need(scaling.low_freq_factor, "low_freq_factor")?;
                let high = need(scaling.high_freq_factor, "high_freq_factor")?;
                let old_ctx = scaling.original_max_position_embeddings.ok_or_else(|| {
                    candle::Error::Msg(
                        "llama config: rope_scaling llama3 needs \
                             original_max_position_embeddings"
                            .to_string(),
                    )
                })? as f32;
                let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
                Ok(base
                    .iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect())
            }
            other => bail!(
                "llama config: rope_scaling type {other:?} is not supported (default, linear, \
                 llama3)"
            ),
        }
    }
}

/// A linear layer with weight `(out, in)` and an optional bias `(out,)`.
#[derive(Clone, Debug)]
pub(crate) struct Proj {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Proj {
    /// Loads `{name}.weight` `(out, in)` (and `{name}.bias` `(out,)` when `bias`).
    pub(crate) fn load(
        vb: &VarBuilder,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let vb = vb.pp(name);
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A projection from an already laid out `(out, in)` weight.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `x · Wᵀ (+ b)` for `x`: `(..., in)`; returns `(..., out)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::layers::linear(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
struct LlamaLayer {
    /// `(hidden,)` RMSNorm gain before attention.
    input_layernorm: Tensor,
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    /// `(hidden,)` RMSNorm gain before the MLP.
    post_attention_layernorm: Tensor,
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

/// The Llama-architecture decoder (inference only).
#[derive(Clone, Debug)]
pub struct Llama {
    config: LlamaConfig,
    /// `(vocab, hidden)` token embeddings.
    embed_tokens: Tensor,
    layers: Vec<LlamaLayer>,
    /// `(hidden,)` final RMSNorm gain.
    norm: Tensor,
    /// `(vocab, hidden)` output head (the embeddings when tied).
    lm_head: Tensor,
    rope: RotaryEmbedding,
    attention: Attention,
    device: Device,
}

/// RMSNorm over the last axis with gain `weight`, statistics in f32; the result has the input
/// dtype.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

impl Llama {
    /// Builds the model from weights in `vb` (Hugging Face names, see the module docs; the
    /// VarBuilder's dtype is the compute dtype) with attention `kind`. Missing tensors and shape
    /// mismatches are reported with the tensor name and both shapes.
    pub fn load(config: LlamaConfig, kind: &AttentionKind, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let attention =
            Attention::for_pretrained(kind, "llama", config.hidden_size, config.kv_heads())?;
        let wrap = |e: candle::Error| {
            candle::Error::Msg(format!(
                "llama weights do not match config.json ({} layers, hidden {}, {} / {} heads of \
                 dim {}, vocab {}): {e}",
                config.num_hidden_layers,
                config.hidden_size,
                config.num_attention_heads,
                config.kv_heads(),
                config.head_dim(),
                config.vocab_size
            ))
        };
        let (h, hd) = (config.hidden_size, config.head_dim());
        let (nq, nkv) = (config.num_attention_heads, config.kv_heads());
        let i_size = config.intermediate_size;
        let m = vb.pp("model");
        let embed_tokens = m
            .get((config.vocab_size, h), "embed_tokens.weight")
            .map_err(wrap)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let ab = config.attention_bias;
            let mb = config.mlp_bias;
            let attn = l.pp("self_attn");
            let mlp = l.pp("mlp");
            let layer = (|| -> Result<LlamaLayer> {
                Ok(LlamaLayer {
                    input_layernorm: l.get(h, "input_layernorm.weight")?,
                    q_proj: Proj::load(&attn, "q_proj", nq * hd, h, ab)?,
                    k_proj: Proj::load(&attn, "k_proj", nkv * hd, h, ab)?,
                    v_proj: Proj::load(&attn, "v_proj", nkv * hd, h, ab)?,
                    o_proj: Proj::load(&attn, "o_proj", h, nq * hd, ab)?,
                    post_attention_layernorm: l.get(h, "post_attention_layernorm.weight")?,
                    gate_proj: Proj::load(&mlp, "gate_proj", i_size, h, mb)?,
                    up_proj: Proj::load(&mlp, "up_proj", i_size, h, mb)?,
                    down_proj: Proj::load(&mlp, "down_proj", h, i_size, mb)?,
                })
            })()
            .map_err(wrap)?;
            layers.push(layer);
        }
        let norm = m.get(h, "norm.weight").map_err(wrap)?;
        let lm_head = if config.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            embed_tokens.clone()
        } else {
            vb.get((config.vocab_size, h), "lm_head.weight")
                .map_err(|e| {
                    candle::Error::Msg(format!(
                        "{e} (config.json has tie_word_embeddings = {}; untied models need \
                         lm_head.weight)",
                        config.tie_word_embeddings
                    ))
                })
                .map_err(wrap)?
        };
        let device = vb.device().clone();
        let rope = RotaryEmbedding::from_inv_freq(
            &config.rope_frequencies()?,
            config.max_context(),
            &device,
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            attention,
            device,
            config,
        })
    }

    /// Swaps the attention of every layer, e.g. for a user backend through
    /// [`Attention::with_backend`]; caches made before the swap no longer fit.
    pub fn set_attention(&mut self, attention: Attention) {
        self.attention = attention;
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Token embeddings `(b, t, hidden)` of `tokens` `(b, t)` (u32 ids).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.embed_tokens
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// Decoder layer `i` on the residual stream `x` `(b, t, hidden)` at positions
    /// `offset..offset + t`, attending through `cache` when given (the layer's entry of a
    /// [`DecoderCache`]): the residual stream after the layer. [`CausalLm::hidden_states`] is
    /// [`Self::embed`], this for every layer, then [`Self::final_norm`]; calling the pieces lets
    /// a caller recompute one layer at a time (the MoA profiler's backward).
    pub fn layer_forward(
        &self,
        i: usize,
        x: &Tensor,
        offset: usize,
        cache: Option<&mut dyn LayerCache>,
    ) -> Result<Tensor> {
        let Some(layer) = self.layers.get(i) else {
            bail!("llama: layer {i} of a {}-layer model", self.layers.len())
        };
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nq, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps;
        let h = rms_norm(x, &layer.input_layernorm, eps)?;
        let heads = |p: &Proj, n: usize| -> Result<Tensor> {
            p.forward(&h)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = self.rope.apply(&heads(&layer.q_proj, nq)?, offset)?;
        let k = self.rope.apply(&heads(&layer.k_proj, nkv)?, offset)?;
        let v = heads(&layer.v_proj, nkv)?;
        let y = self
            .attention
            .forward(&q, &k, &v, None, cache, i, false, i as u64)?
            .transpose(1, 2)?
            .reshape((b, t, nq * hd))?;
        let x = (x + layer.o_proj.forward(&y)?)?;
        let h = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
        let gate = candle_nn::Activation::Silu.forward(&layer.gate_proj.forward(&h)?)?;
        let mlp = layer
            .down_proj
            .forward(&(gate * layer.up_proj.forward(&h)?)?)?;
        x + mlp
    }

    /// The final RMSNorm of the residual stream (before [`CausalLm::logits`]).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }
}

impl CausalLm for Llama {
    fn hidden_states(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut DecoderCache>,
    ) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t > self.max_context() {
            bail!(
                "llama: positions {offset}..{} exceed the context length {}",
                offset + t,
                self.max_context()
            )
        }
        if let Some(c) = &cache {
            if c.layers.len() != self.layers.len() {
                bail!(
                    "llama: cache has {} layers, the model {}",
                    c.layers.len(),
                    self.layers.len()
                )
            }
        }
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            let layer_cache = cache.as_deref_mut().map(|c| c.layer_mut(i));
            x = self.layer_forward(i, &x, offset, layer_cache)?;
        }
        self.final_norm(&x)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        crate::layers::linear(hidden, &self.lm_head)?.to_dtype(DType::F32)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.config.max_context()
    }

    fn new_cache(&self) -> Result<DecoderCache> {
        DecoderCache::new(&self.attention, self.num_layers())
    }

    fn supports_kv_cache(&self) -> bool {
        self.attention.supports_kv_cache()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
