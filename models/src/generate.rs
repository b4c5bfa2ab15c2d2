//! Sampling (temperature, top-k, top-p, repetition penalty, seed), token generation with a KV
//! cache where the attention kind supports one, and sliding-window perplexity, for any
//! [`CausalLm`].

use std::time::{Duration, Instant};

use candle::{bail, DType, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::decoder::CausalLm;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus).
    pub top_p: Option<f64>,
    /// CTRL-style penalty (> 1 discourages repeats) on tokens already in the sequence.
    pub repetition_penalty: f32,
    /// How many of the latest tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Checks the values (temperature ≥ 0, top-k ≥ 1, top-p in (0, 1], penalty > 0).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "sampling: temperature must be finite and >= 0, got {}",
                self.temperature
            )
        }
        if self.top_k == Some(0) {
            bail!("sampling: top_k must be at least 1")
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("sampling: top_p must be in (0, 1], got {p}")
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "sampling: repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            )
        }
        Ok(())
    }
}

/// Picks tokens from logits according to [`SamplingOptions`], with its own seeded generator.
#[derive(Clone, Debug)]
pub struct Sampler {
    options: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; fails on invalid options.
    pub fn new(options: SamplingOptions) -> Result<Self> {
        options.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(options.seed),
            options,
        })
    }

    /// The next token from `logits`: `(vocab,)` (any float dtype) given the sequence so far
    /// (`history`, for the repetition penalty).
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        if logits.is_empty() {
            bail!("sampling: empty logits")
        }
        let o = self.options;
        if o.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(o.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l >= 0.0 {
                        *l / o.repetition_penalty
                    } else {
                        *l * o.repetition_penalty
                    };
                }
            }
        }
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                    if x > best.1 {
                        (i, x)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if o.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        // Candidates sorted by decreasing logit, cut by top-k, softmax, cut by top-p.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = o.top_k {
            order.truncate(k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (((logits[i] - max) as f64) / o.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = o.top_p {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (p, &i) in probs.iter().zip(&order) {
            if u < *p {
                return Ok(i as u32);
            }
            u -= p;
        }
        Ok(order[order.len() - 1] as u32)
    }
}

/// Timing of one [`generate`] call, and the kept fraction of sparse decoders.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Time to process the prompt (up to the first generated token's logits).
    pub prompt_time: Duration,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time spent generating after the prompt.
    pub generation_time: Duration,
    /// Per decode step (every generated token after the first), the kept fraction averaged over
    /// the sparse decode layers ([`DecoderCache::kept_fraction`](crate::decoder::DecoderCache::kept_fraction));
    /// empty for dense kinds.
    pub kept_fractions: Vec<f64>,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second (the first generated token is counted with the prompt time).
    pub fn generation_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64
            / self.generation_time.as_secs_f64().max(1e-9)
    }

    /// Mean of [`Self::kept_fractions`] over the decode steps (`None` if there are none).
    pub fn mean_kept_fraction(&self) -> Option<f64> {
        mean(&self.kept_fractions)
    }
}

/// Mean of `values`, `None` when empty.
fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Generates up to `max_new_tokens` after `prompt` (token ids), stopping early at any token of
/// `stop_tokens`. `on_token` sees each new token as soon as it is chosen (the stop token too).
/// Uses a [`DecoderCache`](crate::decoder::DecoderCache) when the model's attention kind supports one, and recomputes the
/// whole sequence every step otherwise. Fails, before any work, if the prompt is empty or the
/// prompt plus `max_new_tokens` exceeds the model's context. Returns the generated ids and
/// timing.
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        bail!("generate: the prompt is empty (no tokens)")
    }
    let context = model.max_context();
    if prompt.len() + max_new_tokens > context {
        bail!(
            "generate: the prompt has {} tokens, plus {max_new_tokens} new tokens that is {}, \
             more than the model's context of {context} tokens",
            prompt.len(),
            prompt.len() + max_new_tokens
        )
    }
    let device = model.device();
    let mut cache = match model.supports_kv_cache() {
        true => Some(model.new_cache()?),
        false => None,
    };
    let mut sequence = prompt.to_vec();
    let mut generated = Vec::new();
    let start = Instant::now();
    let mut prompt_time = Duration::ZERO;
    let mut pending: &[u32] = prompt;
    let mut last = [0u32];
    let mut kept_fractions = Vec::new();
    for step in 0..max_new_tokens {
        let input = match &cache {
            Some(_) => pending,
            None => &sequence[..],
        };
        let tokens = Tensor::new(input, device)?.unsqueeze(0)?;
        let logits = model.forward_last(&tokens, cache.as_mut())?.squeeze(0)?;
        let next = sampler.sample(&logits, &sequence)?;
        if step == 0 {
            prompt_time = start.elapsed();
        } else if let Some(fraction) = cache.as_ref().map(|c| c.kept_fraction()).transpose()? {
            kept_fractions.extend(fraction);
        }
        sequence.push(next);
        generated.push(next);
        on_token(next)?;
        if stop_tokens.contains(&next) {
            break;
        }
        last[0] = next;
        pending = &last;
    }
    let total = start.elapsed();
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_time,
        generated_tokens: generated.len(),
        generation_time: total.saturating_sub(prompt_time),
        kept_fractions,
    };
    Ok((generated, stats))
}

/// Result of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityReport {
    /// Tokens whose prediction was scored.
    pub scored_tokens: usize,
    /// Sum of their negative log-likelihoods (nats).
    pub total_nll: f64,
    /// Forward passes run.
    pub windows: usize,
    /// Mean kept fraction of the sparse decode layers over the scored decode steps
    /// ([`perplexity_decode`] with a sparse decoder); `None` otherwise.
    pub mean_kept_fraction: Option<f64>,
    /// The model's argmax token at each scored position ([`perplexity_decode`]; empty for
    /// [`perplexity`]), to compare the top-1 predictions of two models on the same text.
    pub predictions: Vec<u32>,
}

impl PerplexityReport {
    /// Mean negative log-likelihood per scored token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.total_nll / self.scored_tokens.max(1) as f64
    }

    /// `exp(mean_nll)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Sliding-window perplexity (the Hugging Face recipe): windows of `context_len` tokens start
/// every `stride` tokens; each window scores only the tokens not scored by the previous one, so
/// every token from the second on is scored once, with up to `context_len - 1` tokens of context.
/// Windows run without a cache, so every attention kind applies.
pub fn perplexity(
    model: &dyn CausalLm,
    tokens: &[u32],
    context_len: usize,
    stride: usize,
) -> Result<PerplexityReport> {
    if tokens.len() < 2 {
        bail!("perplexity: need at least 2 tokens, got {}", tokens.len())
    }
    if context_len < 2 || context_len > model.max_context() {
        bail!(
            "perplexity: context length {context_len} must be in 2..={}",
            model.max_context()
        )
    }
    if stride == 0 || stride > context_len {
        bail!("perplexity: stride {stride} must be in 1..={context_len}")
    }
    let device = model.device();
    let mut report = PerplexityReport {
        scored_tokens: 0,
        total_nll: 0.0,
        windows: 0,
        mean_kept_fraction: None,
        predictions: Vec::new(),
    };
    // `scored_until`: targets at positions < scored_until are done (position 0 is never a target).
    let mut scored_until = 1;
    let mut begin = 0;
    while scored_until < tokens.len() {
        let end = (begin + context_len).min(tokens.len());
        let window = &tokens[begin..end];
        let input = Tensor::new(&window[..window.len() - 1], device)?.unsqueeze(0)?;
        let logits = model.forward(&input, None)?.squeeze(0)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        // Row r predicts window[r + 1], the token at position begin + r + 1.
        let first_row = scored_until - begin - 1;
        let rows = window.len() - 1 - first_row;
        let targets = Tensor::new(&window[first_row + 1..], device)?.unsqueeze(1)?;
        let picked = log_probs
            .narrow(0, first_row, rows)?
            .gather(&targets, 1)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        report.total_nll -= picked;
        report.scored_tokens += rows;
        report.windows += 1;
        scored_until = end;
        begin += stride;
        if begin + 1 >= scored_until && scored_until < tokens.len() {
            // Always keep at least one token of overlap to predict the next target from.
            begin = scored_until - 1;
        }
    }
    Ok(report)
}

/// Decode-style perplexity, for attention kinds that only change decoding (Twilight): the first
/// `prefix_len` tokens are run as one cached prefill (dense), then every following token is fed
/// one at a time through the cache, so each of the `tokens.len() - prefix_len` targets after the
/// prefix is predicted by a decode step (the first by the prefill). Needs a kind with a KV cache
/// and `tokens` within the model's context.
pub fn perplexity_decode(
    model: &dyn CausalLm,
    tokens: &[u32],
    prefix_len: usize,
) -> Result<PerplexityReport> {
    if prefix_len == 0 || prefix_len >= tokens.len() {
        bail!(
            "perplexity_decode: prefix length {prefix_len} must be in 1..{} (the token count)",
            tokens.len()
        )
    }
    if tokens.len() > model.max_context() {
        bail!(
            "perplexity_decode: {} tokens exceed the model's context of {} tokens",
            tokens.len(),
            model.max_context()
        )
    }
    let device = model.device();
    let mut cache = model.new_cache()?;
    let mut total_nll = 0.0;
    let mut kept_fractions = Vec::new();
    let mut predictions = Vec::with_capacity(tokens.len() - prefix_len);
    let mut input = &tokens[..prefix_len];
    for (position, &target) in tokens.iter().enumerate().skip(prefix_len) {
        let logits = model.forward(&Tensor::new(input, device)?.unsqueeze(0)?, Some(&mut cache))?;
        let last = logits.squeeze(0)?.get(input.len() - 1)?;
        let log_probs = candle_nn::ops::log_softmax(&last, D::Minus1)?;
        total_nll -= f64::from(log_probs.get(target as usize)?.to_scalar::<f32>()?);
        predictions.push(log_probs.argmax(0)?.to_scalar::<u32>()?);
        if position > prefix_len {
            kept_fractions.extend(cache.kept_fraction()?);
        }
        input = &tokens[position..position + 1];
    }
    Ok(PerplexityReport {
        scored_tokens: tokens.len() - prefix_len,
        total_nll,
        windows: tokens.len() - prefix_len,
        mean_kept_fraction: mean(&kept_fractions),
        predictions,
    })
}
