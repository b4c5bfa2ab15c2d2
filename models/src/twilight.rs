//! Twilight decoding in the models ([`AttentionKind::Twilight`](crate::AttentionKind)): each
//! layer owns a [`TwilightCache`] (paged K/V with Quest page bounds and INT4 keys); the prompt is
//! attended densely and appended, every decode step (query length 1) runs
//! [`candle_sparse_attn::twilight::decode_layer`] (dense for the first `dense_layers` layers,
//! Quest + top-p pruning after them).
//!
//! Without a cache (training, full recomputation, sliding-window perplexity) the kind is plain
//! dense attention: Twilight only changes decoding.

use std::any::Any;

use candle::{bail, Result, Tensor};
use candle_sparse_attn::twilight::{decode_layer, TwilightCache, TwilightConfig};
use candle_sparse_attn::{flash_attn, AttnParams};

use crate::attention::{downcast_cache, AttentionBackend, AttentionCall, LayerCache};

/// Smallest capacity (tokens) a layer's [`TwilightCache`] is allocated with; it doubles when full.
const MIN_CAPACITY: usize = 256;

/// The Twilight attention backend (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct TwilightAttention {
    /// Top-p, base budget, page size and number of dense first layers.
    pub config: TwilightConfig,
}

impl TwilightAttention {
    /// A backend with the given parameters (validated).
    pub fn new(config: TwilightConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }
}

/// Dense causal flash attention with the call's scale (prefill and cache-less calls).
fn dense(q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
    flash_attn(
        q,
        k,
        v,
        &AttnParams {
            softmax_scale: call.softmax_scale,
            causal: call.causal,
        },
    )
}

impl AttentionBackend for TwilightAttention {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "twilight (p {}, base budget {}, page size {}, dense layers {})",
            c.p, c.base_budget, c.page_size, c.dense_layers
        )
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    /// Dense attention (Twilight applies to cached decoding only).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        dense(q, k, v, call)
    }

    fn new_cache(&self, layer: usize) -> Result<Box<dyn LayerCache>> {
        Ok(Box::new(TwilightLayerCache {
            layer,
            config: self.config,
            cache: None,
            kept_fraction: None,
        }))
    }

    /// Appends `k`, `v`; a single query over a non-empty cache is a Twilight decode step, any
    /// other call (the prompt, chunks of it) is dense attention over everything cached. Decoding
    /// uses the `1/sqrt(head_dim)` scale; another `call.softmax_scale` is an error.
    fn forward_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut dyn LayerCache,
        call: &AttentionCall,
    ) -> Result<Tensor> {
        let name = self.name();
        let layer = downcast_cache::<TwilightLayerCache>(cache, &name)?;
        let decoding = q.dim(2)? == 1 && !layer.is_empty();
        layer.append(k, v)?;
        let cache = layer.cache.as_ref().expect("appended above");
        if !decoding {
            layer.kept_fraction = None;
            let (keys, values) = (cache.keys()?.contiguous()?, cache.values()?.contiguous()?);
            return dense(q, &keys, &values, call);
        }
        let head_dim = q.dim(3)?;
        if let Some(scale) = call.softmax_scale {
            let default = 1.0 / (head_dim as f32).sqrt();
            if (scale - default).abs() > 1e-6 * default {
                bail!(
                    "attention {name}: decoding uses the scale 1/sqrt({head_dim}) = {default}, \
                     got softmax_scale {scale}"
                )
            }
        }
        let step = decode_layer(layer.layer, cache, &q.contiguous()?, &self.config)?;
        layer.kept_fraction = if self.config.is_dense_layer(layer.layer) {
            None
        } else {
            Some(step.kept_fraction()?)
        };
        Ok(step.output)
    }
}

/// The decode cache of one Twilight layer: a [`TwilightCache`] allocated on the first append
/// (shape, dtype and device of the keys), its capacity doubling when full (a copy into a new
/// cache), plus the kept fraction of the last decode step.
#[derive(Debug)]
pub struct TwilightLayerCache {
    layer: usize,
    config: TwilightConfig,
    cache: Option<TwilightCache>,
    kept_fraction: Option<Tensor>,
}

impl TwilightLayerCache {
    /// The underlying cache (`None` before the first append).
    pub fn cache(&self) -> Option<&TwilightCache> {
        self.cache.as_ref()
    }

    /// Appends `k`, `v` `(batch, kv_heads, n, head_dim)`, growing the cache as needed.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, h, n, d) = k.dims4()?;
        let needed = self.len() + n;
        let capacity = self.cache.as_ref().map_or(0, TwilightCache::capacity);
        if needed > capacity {
            let new_capacity = needed.next_power_of_two().max(MIN_CAPACITY);
            let mut grown = TwilightCache::new(
                b,
                h,
                d,
                new_capacity,
                self.config.page_size,
                k.dtype(),
                k.device(),
            )?;
            if let Some(old) = &self.cache {
                if !old.is_empty() {
                    grown.append(&old.keys()?.contiguous()?, &old.values()?.contiguous()?)?;
                }
            }
            self.cache = Some(grown);
        }
        self.cache.as_mut().expect("allocated above").append(k, v)
    }
}

impl LayerCache for TwilightLayerCache {
    fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, TwilightCache::len)
    }

    /// Drops the cache (the next prefill allocates a fresh one).
    fn reset(&mut self) {
        self.cache = None;
        self.kept_fraction = None;
    }

    /// `|I1| / context` of the last decode step, averaged over batch and query heads (before
    /// the GQA union); `None` for the dense first layers and after a prefill.
    fn kept_fraction(&self) -> Option<Tensor> {
        self.kept_fraction.clone()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
