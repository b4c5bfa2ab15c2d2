//! SparseK in the models ([`AttentionKind::SparseK`](crate::AttentionKind)): every layer owns a
//! [`SparseKScorer`](candle_sparse_attn::SparseKScorer) (created by
//! [`Attention::new_scorer`](crate::Attention::new_scorer) from the layer's VarBuilder, so it is
//! trained by the optimiser and saved in checkpoints) that scores the layer's normalised input
//! `x_j` per kv head: `u_j = x_j·w_h + c_h + δ_h·j` at absolute positions `j`. The layer passes
//! these scores to [`sparsek_attn`], which backpropagates into them.
//!
//! - Training and full forward: [`sparsek_attn`] over the sequence; when the window covers every
//!   key (`window ≥ seq`) there is nothing to select and the layer is dense causal attention
//!   (identical output; the scorer gets no gradient from such a call). The GPT's fused training
//!   pass runs [`sparsek_attn_taped`] instead (outside autograd, the same output and gradients).
//! - Decoding: each layer owns a [`SparseKCache`] (window ring plus a candidate pool of at most
//!   `K′ = 2k` keys, evicting keys that can never be selected again), so memory per layer and kv
//!   head stays `O(window + 2k)`. A prompt at least `window` long is prefilled with
//!   [`sparsek_attn`]; shorter prompts and later tokens go through single-token steps. Outputs
//!   equal the full forward on the same tokens.

use std::any::Any;

use candle::{bail, Result, Tensor};
use candle_sparse_attn::tape::AttentionTape;
use candle_sparse_attn::{
    flash_attn, flash_attn_taped, sparsek_attn, sparsek_attn_qkvpacked_taped, sparsek_attn_taped,
    AttnParams, PackedHeads, SparseKCache, SparseKConfig, SparseKScorerConfig,
};

use crate::attention::{downcast_cache, AttentionBackend, AttentionCall, LayerCache};

/// The SparseK attention backend (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct SparseKAttention {
    /// Budget `k`, window, `K′` (the model uses `2k`) and scale (`None`: the call's).
    pub config: SparseKConfig,
}

impl SparseKAttention {
    /// The library config for one call: the call's softmax scale.
    fn config_for(&self, call: &AttentionCall) -> SparseKConfig {
        SparseKConfig {
            softmax_scale: call.softmax_scale,
            ..self.config
        }
    }

    /// Checks a whole-sequence call (causal, `q_len == kv_len`); the parameters of the dense
    /// causal attention that replaces SparseK when the window covers every key, else `None`.
    fn dense_params(
        &self,
        q: &Tensor,
        k: &Tensor,
        call: &AttentionCall,
    ) -> Result<Option<AttnParams>> {
        let (tq, tk) = (q.dim(2)?, k.dim(2)?);
        if tq != tk || !call.causal {
            bail!(
                "attention {}: needs causal self-attention over one sequence, got q {:?} and k {:?}",
                self.name(),
                q.dims(),
                k.dims()
            )
        }
        Ok((self.config.window >= tk).then_some(AttnParams {
            softmax_scale: call.softmax_scale,
            causal: true,
        }))
    }

    /// The call's key scores (an error when the layer passed none).
    fn key_scores<'a>(&self, call: &AttentionCall<'a>) -> Result<&'a Tensor> {
        call.key_scores.ok_or_else(|| {
            candle::Error::Msg(format!(
                "attention {}: no key scores given; the layer must pass its scorer's scores",
                self.name()
            ))
        })
    }

    /// The call's key scores, checked against the keys `(batch, kv_heads, n, head_dim)`.
    fn scores<'a>(&self, k: &Tensor, call: &AttentionCall<'a>) -> Result<&'a Tensor> {
        let u = self.key_scores(call)?;
        let (b, hkv, n, _) = k.dims4()?;
        if u.dims() != [b, hkv, n] {
            bail!(
                "attention {}: key scores {:?} do not match the keys {:?} (expected {:?})",
                self.name(),
                u.dims(),
                k.dims(),
                [b, hkv, n]
            )
        }
        Ok(u)
    }
}

impl AttentionBackend for SparseKAttention {
    fn name(&self) -> String {
        format!(
            "sparsek (k {}, window {})",
            self.config.k, self.config.window
        )
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn key_scorer(&self, d_model: usize, kv_heads: usize) -> Option<SparseKScorerConfig> {
        Some(SparseKScorerConfig::new(d_model, kv_heads))
    }

    /// [`sparsek_attn`] over the whole sequence (`q_len == kv_len`), dense causal attention when
    /// the window covers every key.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        let u = self.scores(k, call)?;
        match self.dense_params(q, k, call)? {
            Some(params) => flash_attn(q, k, v, &params),
            None => sparsek_attn(q, k, v, u, &self.config_for(call)),
        }
    }

    /// [`sparsek_attn_taped`] as [`Self::forward`] runs [`sparsek_attn`] (its tape gives the
    /// scores' gradient), [`flash_attn_taped`] when the window covers every key (no scores'
    /// gradient).
    fn forward_taped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        let u = self.scores(k, call)?;
        match self.dense_params(q, k, call)? {
            Some(params) => flash_attn_taped(q, k, v, &params),
            None => sparsek_attn_taped(q, k, v, u, &self.config_for(call)),
        }
        .map(Some)
    }

    /// [`sparsek_attn_qkvpacked_taped`] (on an H100 the kernels read q, k, v in the projection's
    /// rows and write dqkv into them: no head split or merge); `None` when the window covers
    /// every key (the caller's split-heads path runs dense attention then).
    fn forward_taped_qkvpacked(
        &self,
        qkv: &Tensor,
        heads: PackedHeads,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        if self.config.window >= qkv.dim(1)? {
            return Ok(None);
        }
        let u = self.key_scores(call)?;
        sparsek_attn_qkvpacked_taped(qkv, heads, u, &self.config_for(call)).map(Some)
    }

    fn new_cache(&self, _layer: usize) -> Result<Box<dyn LayerCache>> {
        Ok(Box::new(SparseKLayerCache {
            cache: None,
            kept_fraction: None,
        }))
    }

    /// The first call on an empty cache with at least `window` tokens is a prefill
    /// ([`SparseKCache::prefill`]); every other token goes through [`SparseKCache::step`].
    fn forward_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut dyn LayerCache,
        call: &AttentionCall,
    ) -> Result<Tensor> {
        let name = self.name();
        let u = self.scores(k, call)?;
        let (n, nk) = (q.dim(2)?, k.dim(2)?);
        if n != nk || n == 0 {
            bail!(
                "attention {name}: cached calls need one query per new key, got q {:?} and k {:?}",
                q.dims(),
                k.dims()
            )
        }
        let layer = downcast_cache::<SparseKLayerCache>(cache, &name)?;
        let config = self.config_for(call);
        let (filled_with, cache) = match &mut layer.cache {
            Some((c, cache)) => (*c, cache),
            none => {
                let (_, cache) = none.insert((config, SparseKCache::new(config)?));
                (config, cache)
            }
        };
        if filled_with != config {
            bail!("attention {name}: the cache was filled with {filled_with:?}, this call uses {config:?}")
        }
        let decoding = n == 1 && !cache.is_empty();
        let out = if cache.is_empty() && n >= config.window {
            cache.prefill(q, k, v, u)?
        } else {
            let steps = (0..n)
                .map(|i| {
                    let at = |x: &Tensor| x.narrow(2, i, 1)?.contiguous();
                    cache.step(&at(q)?, &at(k)?, &at(v)?, &at(u)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&steps, 2)?
        };
        layer.kept_fraction = match decoding {
            true => {
                let retained = cache.retained();
                let mean = retained.iter().sum::<usize>() as f32 / retained.len().max(1) as f32;
                Some(Tensor::new(mean / cache.len() as f32, q.device())?)
            }
            false => None,
        };
        Ok(out)
    }
}

/// The decode cache of one SparseK layer: a [`SparseKCache`] created on the first call with the
/// call's config (softmax scale), plus the kept fraction of the last decode step.
#[derive(Debug)]
pub struct SparseKLayerCache {
    cache: Option<(SparseKConfig, SparseKCache)>,
    kept_fraction: Option<Tensor>,
}

impl SparseKLayerCache {
    /// The underlying cache (`None` before the first call).
    pub fn cache(&self) -> Option<&SparseKCache> {
        self.cache.as_ref().map(|(_, c)| c)
    }
}

impl LayerCache for SparseKLayerCache {
    fn len(&self) -> usize {
        self.cache().map_or(0, SparseKCache::len)
    }

    fn reset(&mut self) {
        self.cache = None;
        self.kept_fraction = None;
    }

    /// Keys the last decode step attended to (the window plus the pool: the cache retains exactly
    /// those) over the tokens seen, averaged over batch and kv heads (the query heads of a group
    /// share them); `None` after a prefill.
    fn kept_fraction(&self) -> Option<Tensor> {
        self.kept_fraction.clone()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
