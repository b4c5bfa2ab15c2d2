//! A GPT in the nanoGPT mould: token embeddings plus learned positions (or RoPE), pre-norm blocks
//! (LayerNorm, causal self-attention, GELU MLP), a final LayerNorm and an output head tied to the
//! token embeddings. No biases. Parameters are f32 [`Var`]s; the forward pass runs in a
//! configurable compute dtype (f32, or bf16 with f32 master weights). Attention kinds with a key
//! scorer (SparseK) add one per block, scoring the attention LayerNorm's output
//! ([`crate::sparsek`]).
//!
//! Training computes gradients with [`Gpt::training_pass`] ([`crate::gpt_grad`]: a hand-written
//! backward through the fused kernels, the attention under a local autograd); [`Gpt::loss`]
//! followed by candle's `backward` is the reference it is tested against.

use std::collections::HashMap;

use candle::{bail, DType, Device, Result, Tensor, Var};
use candle_sparse_attn::{fused, SparseKScorer, SUPPORTED_HEAD_DIMS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, AttentionKind, RotaryEmbedding};
use crate::decoder::DecoderCache;
use crate::layers::{dropout, in_dtype, layer_norm, linear, mix_seed, normal_var, SeededVars};

/// LayerNorm epsilon (PyTorch's default, as in nanoGPT).
pub(crate) const LN_EPS: f64 = 1e-5;
/// Standard deviation of the N(0, σ²) initialisation.
const INIT_STD: f64 = 0.02;

/// How positions enter the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PositionEncoding {
    /// A learned `(block_size, n_embd)` table added to the token embeddings.
    Learned,
    /// Rotary embeddings applied to queries and keys in every layer.
    Rope {
        /// Base of the rotary frequencies (10000 in most models).
        theta: f32,
    },
}

/// The architecture of a [`Gpt`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Number of distinct tokens.
    pub vocab_size: usize,
    /// Longest context the model sees.
    pub block_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; `n_embd / n_head` must be a supported flash-attention head dim.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Dropout probability on embeddings, attention output and MLP output during training.
    pub dropout: f32,
    /// Learned absolute positions or RoPE.
    pub positions: PositionEncoding,
    /// The attention method.
    pub attention: AttentionKind,
}

impl GptConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks that the sizes are usable; the error names the offending values.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 {
                bail!("gpt config: {name} must be positive, got 0")
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "gpt config: n_embd {} is not divisible by n_head {}",
                self.n_embd,
                self.n_head
            )
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim()) {
            bail!(
                "gpt config: head dim n_embd / n_head = {} / {} = {} is not supported by the \
                 attention kernels (supported: {SUPPORTED_HEAD_DIMS:?})",
                self.n_embd,
                self.n_head,
                self.head_dim()
            )
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!(
                "gpt config: dropout must be in [0, 1), got {}",
                self.dropout
            )
        }
        if let PositionEncoding::Rope { theta } = self.positions {
            if !(theta > 1.0 && theta.is_finite()) {
                bail!("gpt config: rope theta must be a finite number above 1, got {theta}")
            }
        }
        self.attention.validate()
    }
}

/// Parameters of one transformer block (weights are `(out, in)`).
#[derive(Debug)]
pub(crate) struct Block {
    /// `(n_embd,)` gain of the attention LayerNorm.
    pub(crate) ln_1: Var,
    /// `(3·n_embd, n_embd)` fused query, key, value projection.
    pub(crate) c_attn: Var,
    /// `(n_embd, n_embd)` attention output projection.
    pub(crate) attn_proj: Var,
    /// `(n_embd,)` gain of the MLP LayerNorm.
    pub(crate) ln_2: Var,
    /// `(4·n_embd, n_embd)` MLP up projection.
    pub(crate) c_fc: Var,
    /// `(n_embd, 4·n_embd)` MLP down projection.
    pub(crate) mlp_proj: Var,
    /// The attention kind's key scorer (SparseK), reading the attention LayerNorm's output.
    pub(crate) scorer: Option<SparseKScorer>,
    /// The scorer's parameters, named under `h.{i}.` (empty without a scorer).
    pub(crate) scorer_params: Vec<(String, Var)>,
}

/// Options of [`Gpt::generate`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Number of tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Seed of the sampling generator.
    pub seed: u64,
}

/// The GPT model.
#[derive(Debug)]
pub struct Gpt {
    pub(crate) config: GptConfig,
    /// `(vocab_size, n_embd)` token embeddings, also the output head.
    pub(crate) wte: Var,
    /// `(block_size, n_embd)` learned positions (absent with RoPE).
    pub(crate) wpe: Option<Var>,
    pub(crate) blocks: Vec<Block>,
    /// `(n_embd,)` final LayerNorm gain.
    pub(crate) ln_f: Var,
    pub(crate) attention: Attention,
    pub(crate) rope: Option<RotaryEmbedding>,
    pub(crate) compute_dtype: DType,
    pub(crate) device: Device,
}

impl Gpt {
    /// A freshly initialised model: weights `N(0, 0.02²)`, residual output projections
    /// `N(0, (0.02/√(2·n_layer))²)`, LayerNorm gains 1; key scorers (SparseK) with their own
    /// initialisation ([`SparseKScorerConfig`](candle_sparse_attn::SparseKScorerConfig)'s defaults:
    /// initial score spread 4, slope `1e-3`). Deterministic in `seed`.
    pub fn new(config: GptConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let c = config.n_embd;
        let residual_std = INIT_STD / (2.0 * config.n_layer as f64).sqrt();
        let mut counter = 0u64;
        let mut normal = |shape: &[usize], std: f64| {
            counter += 1;
            normal_var(shape, std, mix_seed(&[seed, counter]), device)
        };
        let ones = |n: usize| Var::ones(n, DType::F32, device);
        let wte = normal(&[config.vocab_size, c], INIT_STD)?;
        let wpe = match config.positions {
            PositionEncoding::Learned => Some(normal(&[config.block_size, c], INIT_STD)?),
            PositionEncoding::Rope { .. } => None,
        };
        let attention = Attention::new(&config.attention)?;
        let blocks = (0..config.n_layer)
            .map(|i| {
                // Seeded apart from the counter above, so kinds without a scorer are unchanged.
                let vars = SeededVars::new(mix_seed(&[seed, u64::MAX, i as u64]));
                let scorer = attention.new_scorer(
                    c,
                    config.n_head,
                    vars.var_builder(device).pp(format!("h.{i}.attn.scorer")),
                )?;
                Ok(Block {
                    scorer,
                    scorer_params: vars.vars(),
                    ln_1: ones(c)?,
                    c_attn: normal(&[3 * c, c], INIT_STD)?,
                    attn_proj: normal(&[c, c], residual_std)?,
                    ln_2: ones(c)?,
                    c_fc: normal(&[4 * c, c], INIT_STD)?,
                    mlp_proj: normal(&[c, 4 * c], residual_std)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rope = match config.positions {
            PositionEncoding::Rope { theta } => Some(RotaryEmbedding::new(
                config.head_dim(),
                config.block_size,
                theta,
                device,
            )?),
            PositionEncoding::Learned => None,
        };
        Ok(Self {
            attention,
            wte,
            wpe,
            blocks,
            ln_f: ones(c)?,
            rope,
            config,
            compute_dtype: DType::F32,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether [`Gpt::generate`] decodes with a KV cache (the attention kind allows it).
    pub fn supports_kv_cache(&self) -> bool {
        self.attention.supports_kv_cache()
    }

    /// Empty decode caches for [`Gpt::forward`], one per layer, of the attention kind's type;
    /// fails if the kind cannot decode with a cache.
    pub fn new_cache(&self) -> Result<DecoderCache> {
        DecoderCache::new(&self.attention, self.config.n_layer)
    }

    /// The dtype the forward pass computes in (parameters stay f32).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Sets the compute dtype: f32, or bf16 / f16 (mixed precision, f32 master weights).
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("gpt: compute dtype must be f32, bf16 or f16, got {dtype:?}")
        }
        self.compute_dtype = dtype;
        Ok(())
    }

    /// All parameters with stable names (`wte`, `wpe`, `h.{i}.attn.c_attn.weight`, ...,
    /// `h.{i}.attn.scorer.{weight,slope}` for kinds with a key scorer), in a fixed order.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        let mut out = vec![("wte".to_string(), self.wte.clone())];
        if let Some(wpe) = &self.wpe {
            out.push(("wpe".to_string(), wpe.clone()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, var) in [
                ("ln_1.weight", &b.ln_1),
                ("attn.c_attn.weight", &b.c_attn),
                ("attn.c_proj.weight", &b.attn_proj),
                ("ln_2.weight", &b.ln_2),
                ("mlp.c_fc.weight", &b.c_fc),
                ("mlp.c_proj.weight", &b.mlp_proj),
            ] {
                out.push((format!("h.{i}.{name}"), var.clone()));
            }
            out.extend(b.scorer_params.iter().cloned());
        }
        out.push(("ln_f.weight".to_string(), self.ln_f.clone()));
        out
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.named_params()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Overwrites every parameter from `tensors[prefix + name]`; every name must be present with
    /// the exact shape (the error names the first missing or mismatched one).
    pub fn load_params(&self, tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        for (name, var) in self.named_params() {
            let key = format!("{prefix}{name}");
            let Some(t) = tensors.get(&key) else {
                bail!("checkpoint is missing parameter {key:?}")
            };
            if t.dims() != var.dims() {
                bail!(
                    "checkpoint parameter {key:?} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Logits `(batch, seq, vocab_size)` f32 for token ids `idx`: `(batch, seq)` u32 at positions
    /// `offset..offset + seq`. With `caches` (from [`Gpt::new_cache`]), keys and values are
    /// appended to them and attention covers everything cached. `seed` drives dropout (and random attention
    /// decisions) when `train` is set.
    pub fn forward(
        &self,
        idx: &Tensor,
        offset: usize,
        mut caches: Option<&mut DecoderCache>,
        train: bool,
        seed: u64,
    ) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let cfg = &self.config;
        if offset + t > cfg.block_size {
            bail!(
                "gpt: positions {offset}..{} exceed block_size {}",
                offset + t,
                cfg.block_size
            )
        }
        if let Some(c) = &caches {
            if c.layers.len() != cfg.n_layer {
                bail!(
                    "gpt: got {} kv caches for {} layers",
                    c.layers.len(),
                    cfg.n_layer
                )
            }
        }
        let dt = self.compute_dtype;
        let p = if train { cfg.dropout } else { 0.0 };
        let (c, nh) = (cfg.n_embd, cfg.n_head);
        let wte = in_dtype(&self.wte, dt)?;
        let mut x = fused::embedding(&wte, &idx.flatten_all()?)?.reshape((b, t, c))?;
        if let Some(wpe) = &self.wpe {
            let pos = in_dtype(wpe, dt)?.narrow(0, offset, t)?;
            x = x.broadcast_add(&pos)?;
        }
        x = dropout(&x, p, mix_seed(&[seed, 0]))?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let layer_seed = |k: u64| mix_seed(&[seed, 1 + i as u64, k]);
            let h = layer_norm(&x, &in_dtype(&blk.ln_1, dt)?, LN_EPS)?;
            // Queries, keys and values as contiguous (b, nh, t, hd): one projection per part (the
            // rows of c_attn), so that autograd sums three (b, t, c) input gradients instead of
            // three zero-padded (b, t, 3·c) ones.
            let c_attn = in_dtype(&blk.c_attn, dt)?;
            let project = |part: usize| -> Result<Tensor> {
                fused::to_heads(&linear(&h, &c_attn.narrow(0, part * c, c)?)?, nh)
            };
            let (mut q, mut k, v) = (project(0)?, project(1)?, project(2)?);
            if let Some(rope) = &self.rope {
                q = rope.apply(&q, offset)?;
                k = rope.apply(&k, offset)?;
            }
            let scores = match &blk.scorer {
                Some(s) => Some(s.forward_at(&h, offset)?),
                None => None,
            };
            let cache = caches.as_deref_mut().map(|c| c.layer_mut(i));
            let y = self.attention.forward(
                &q,
                &k,
                &v,
                scores.as_ref(),
                cache,
                i,
                train,
                layer_seed(0),
            )?;
            let y = fused::merge_heads(&y)?;
            let y = linear(&y, &in_dtype(&blk.attn_proj, dt)?)?;
            x = (x + dropout(&y, p, layer_seed(1))?)?;
            let h = layer_norm(&x, &in_dtype(&blk.ln_2, dt)?, LN_EPS)?;
            let h = fused::gelu(&linear(&h, &in_dtype(&blk.c_fc, dt)?)?)?;
            let h = linear(&h, &in_dtype(&blk.mlp_proj, dt)?)?;
            x = (x + dropout(&h, p, layer_seed(2))?)?;
        }
        let x = layer_norm(&x, &in_dtype(&self.ln_f, dt)?, LN_EPS)?;
        linear(&x, &wte)?.to_dtype(DType::F32)
    }

    /// Mean cross-entropy (nats per token) of predicting `targets` from `inputs`, both
    /// `(batch, seq)` u32.
    pub fn loss(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        train: bool,
        seed: u64,
    ) -> Result<Tensor> {
        let logits = self.forward(inputs, 0, None, train, seed)?;
        let (b, t, v) = logits.dims3()?;
        candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.flatten_all()?)
    }

    /// Continues `prompt` (token ids, non-empty) by `opts.max_new_tokens` tokens and returns the
    /// new ones. Uses a KV cache when the attention kind supports one; contexts longer than
    /// `block_size` are cropped (with a cache: re-filled from the last `block_size / 2` tokens
    /// whenever it is full).
    pub fn generate(&self, prompt: &[u32], opts: &SampleOptions) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("gpt: generation needs a non-empty prompt")
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            bail!(
                "gpt: prompt token {bad} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )
        }
        if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
            bail!(
                "gpt: temperature must be finite and non-negative, got {}",
                opts.temperature
            )
        }
        if opts.top_k == Some(0) {
            bail!("gpt: top_k must be at least 1")
        }
        let block = self.config.block_size;
        let use_cache = self.attention.supports_kv_cache();
        let mut caches = match use_cache {
            true => Some(self.new_cache()?),
            false => None,
        };
        let mut cached = 0usize;
        let mut tokens = prompt.to_vec();
        let mut rng = StdRng::seed_from_u64(opts.seed);
        for _ in 0..opts.max_new_tokens {
            let len = tokens.len();
            let logits = if use_cache && cached > 0 && cached < block {
                // The cache holds every token but the last one.
                let last = Tensor::new(&tokens[len - 1..], &self.device)?.unsqueeze(0)?;
                cached += 1;
                self.forward(&last, cached - 1, caches.as_mut(), false, 0)?
            } else {
                let keep = if cached == 0 {
                    len.min(block)
                } else {
                    len.min((block / 2).max(1))
                };
                let window = Tensor::new(&tokens[len - keep..], &self.device)?.unsqueeze(0)?;
                if let Some(caches) = caches.as_mut() {
                    caches.reset();
                    cached = keep;
                }
                self.forward(&window, 0, caches.as_mut(), false, 0)?
            };
            let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
            tokens.push(sample_token(&last.to_vec1::<f32>()?, opts, &mut rng));
        }
        Ok(tokens.split_off(prompt.len()))
    }
}

/// Draws one token from `logits` with temperature and top-k (argmax at temperature 0).
fn sample_token(logits: &[f32], opts: &SampleOptions, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if opts.temperature == 0.0 {
        return argmax();
    }
    let threshold = match opts.top_k {
        Some(k) if k < logits.len() => {
            let mut sorted = logits.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        }
        _ => f32::NEG_INFINITY,
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| {
            if l >= threshold {
                (((l - max) / opts.temperature) as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return argmax();
    }
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    argmax()
}
