//! A GPT-2 decoder in Hugging Face layout: learned positions, pre-norm blocks (LayerNorm with
//! bias, fused q/k/v `c_attn`, tanh-approximate GELU MLP), a final LayerNorm and an output head
//! tied to the token embeddings. Attention goes through the pluggable [`Attention`].
//!
//! Weights (optionally prefixed with `transformer.`): `wte.weight` `(vocab, n_embd)`,
//! `wpe.weight` `(n_positions, n_embd)`, per layer `h.{i}.`: `ln_1.{weight,bias}`,
//! `attn.c_attn.{weight,bias}`, `attn.c_proj.{weight,bias}`, `ln_2.{weight,bias}`,
//! `mlp.c_fc.{weight,bias}`, `mlp.c_proj.{weight,bias}`; `ln_f.{weight,bias}`. The four
//! `Conv1D` weights are stored `(in, out)` and transposed on load; the buffers `attn.bias` and
//! `attn.masked_bias` are ignored.

use candle::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_sparse_attn::SUPPORTED_HEAD_DIMS;
use serde::Deserialize;

use crate::attention::{Attention, AttentionKind};
use crate::decoder::{CausalLm, DecoderCache};
use crate::llama::Proj;

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".to_string()
}

/// The fields of a Hugging Face GPT-2 `config.json` this model uses (others ignored).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of learned positions (the context length).
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// MLP width; defaults to `4 · n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// MLP activation: `gelu_new`, `gelu_pytorch_tanh` (tanh approximation) or `gelu` (erf).
    #[serde(default = "default_activation")]
    pub activation_function: String,
}

impl Gpt2Config {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// MLP width.
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Checks sizes and options; errors name the offending values.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if v == 0 {
                bail!("gpt2 config: {name} must be positive, got 0")
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "gpt2 config: n_embd {} is not divisible by n_head {}",
                self.n_embd,
                self.n_head
            )
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim()) {
            bail!(
                "gpt2 config: head dim {} is not supported by the attention kernels \
                 (supported: {SUPPORTED_HEAD_DIMS:?})",
                self.head_dim()
            )
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu"
        ) {
            bail!(
                "gpt2 config: activation_function {:?} is not supported (gelu_new, \
                 gelu_pytorch_tanh, gelu)",
                self.activation_function
            )
        }
        Ok(())
    }
}

/// LayerNorm weight and bias, both `(n_embd,)`.
#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, name: &str, dim: usize) -> Result<Self> {
        let vb = vb.pp(name);
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
        })
    }

    /// Normalises the last axis, statistics in f32; the result has the input dtype.
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        let normed = crate::layers::layer_norm(x, &self.weight, eps)?;
        normed.broadcast_add(&self.bias)
    }
}

/// Loads a HF `Conv1D` (weight `(in, out)`, bias `(out,)`) as a [`Proj`] with weight `(out, in)`.
fn load_conv1d(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize) -> Result<Proj> {
    let vb = vb.pp(name);
    let weight = vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Proj::new(weight, Some(bias)))
}

#[derive(Clone, Debug)]
struct Gpt2Block {
    ln_1: LayerNorm,
    /// Fused `(3·n_embd, n_embd)` query, key, value projection (q, k, v in that order).
    c_attn: Proj,
    attn_proj: Proj,
    ln_2: LayerNorm,
    c_fc: Proj,
    mlp_proj: Proj,
}

/// The GPT-2 decoder (inference only).
#[derive(Clone, Debug)]
pub struct Gpt2 {
    config: Gpt2Config,
    /// `(vocab, n_embd)` token embeddings, also the output head.
    wte: Tensor,
    /// `(n_positions, n_embd)` position embeddings.
    wpe: Tensor,
    blocks: Vec<Gpt2Block>,
    ln_f: LayerNorm,
    attention: Attention,
    device: Device,
}

impl Gpt2 {
    /// Builds the model from weights in `vb` (see the module docs; the VarBuilder's dtype is the
    /// compute dtype) with attention `kind`. Missing tensors and shape mismatches are reported
    /// with the tensor name and both shapes.
    pub fn load(config: Gpt2Config, kind: &AttentionKind, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let attention = Attention::for_pretrained(kind, "gpt2", config.n_embd, config.n_head)?;
        let wrap = |e: candle::Error| {
            candle::Error::Msg(format!(
                "gpt2 weights do not match config.json ({} layers, n_embd {}, {} heads, vocab {}, \
                 {} positions): {e}",
                config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.n_positions
            ))
        };
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb
        };
        let (c, inner) = (config.n_embd, config.inner_dim());
        let wte = vb.get((config.vocab_size, c), "wte.weight").map_err(wrap)?;
        let wpe = vb
            .get((config.n_positions, c), "wpe.weight")
            .map_err(wrap)?;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let b = vb.pp(format!("h.{i}"));
            let block = (|| -> Result<Gpt2Block> {
                Ok(Gpt2Block {
                    ln_1: LayerNorm::load(&b, "ln_1", c)?,
                    c_attn: load_conv1d(&b, "attn.c_attn", c, 3 * c)?,
                    attn_proj: load_conv1d(&b, "attn.c_proj", c, c)?,
                    ln_2: LayerNorm::load(&b, "ln_2", c)?,
                    c_fc: load_conv1d(&b, "mlp.c_fc", c, inner)?,
                    mlp_proj: load_conv1d(&b, "mlp.c_proj", inner, c)?,
                })
            })()
            .map_err(wrap)?;
            blocks.push(block);
        }
        let ln_f = LayerNorm::load(&vb, "ln_f", c).map_err(wrap)?;
        Ok(Self {
            wte,
            wpe,
            blocks,
            ln_f,
            attention,
            device: vb.device().clone(),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }
}

impl CausalLm for Gpt2 {
    fn hidden_states(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut DecoderCache>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let cfg = &self.config;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t > cfg.n_positions {
            bail!(
                "gpt2: positions {offset}..{} exceed the context length {}",
                offset + t,
                cfg.n_positions
            )
        }
        if let Some(c) = &cache {
            if c.layers.len() != self.blocks.len() {
                bail!(
                    "gpt2: cache has {} layers, the model {}",
                    c.layers.len(),
                    self.blocks.len()
                )
            }
        }
        let (c, nh, hd) = (cfg.n_embd, cfg.n_head, cfg.head_dim());
        let eps = cfg.layer_norm_epsilon;
        let mut x = self
            .wte
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, c))?
            .broadcast_add(&self.wpe.narrow(0, offset, t)?)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = blk.ln_1.forward(&x, eps)?;
            let qkv = blk
                .c_attn
                .forward(&h)?
                .reshape((b, t, 3 * nh, hd))?
                .transpose(1, 2)?;
            let q = qkv.narrow(1, 0, nh)?.contiguous()?;
            let k = qkv.narrow(1, nh, nh)?.contiguous()?;
            let v = qkv.narrow(1, 2 * nh, nh)?.contiguous()?;
            let layer_cache = cache.as_deref_mut().map(|c| c.layer_mut(i));
            let y = self
                .attention
                .forward(&q, &k, &v, None, layer_cache, i, false, i as u64)?
                .transpose(1, 2)?
                .reshape((b, t, c))?;
            x = (x + blk.attn_proj.forward(&y)?)?;
            let h = blk.c_fc.forward(&blk.ln_2.forward(&x, eps)?)?;
            let h = if cfg.activation_function == "gelu" {
                h.gelu_erf()?
            } else {
                h.gelu()?
            };
            x = (x + blk.mlp_proj.forward(&h)?)?;
        }
        self.ln_f.forward(&x, eps)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        crate::layers::linear(hidden, &self.wte)?.to_dtype(DType::F32)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.config.n_positions
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
