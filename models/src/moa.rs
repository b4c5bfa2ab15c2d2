//! MoA in the models ([`AttentionKind::Moa`](crate::AttentionKind)): every layer owns a
//! [`MoaCache`] (per kv head a static sink plus a ring of its band, spans resolved from the plan
//! at `N = prompt + max_new_tokens` when the prompt arrives); the prompt is attended with the
//! layer's sink + band pattern ([`moa_attn`]), every decode step (query length 1) appends to the ring
//! and runs [`moa_decode_scaled`] over all heads of the layer.
//!
//! Without a cache (training, full recomputation) the layer index is unknown, so the kind is plain
//! dense attention there: MoA changes cached inference only.

use std::any::Any;
use std::sync::Arc;

use candle::{bail, Result, Tensor};
use candle_sparse_attn::moa::{moa_attn, moa_decode_scaled, MoaCache, MoaPlan};

use crate::attention::{
    downcast_cache, AttentionBackend, AttentionCall, DenseAttention, LayerCache,
};

/// The MoA attention backend (see the module docs).
#[derive(Clone, Debug)]
pub struct MoaAttention {
    /// The plan (reference JSON; one rule per layer and query head).
    pub plan: Arc<MoaPlan>,
    /// New tokens the spans are resolved for: `N = prompt + max_new_tokens` (reference: 1024).
    pub max_new_tokens: usize,
}

impl AttentionBackend for MoaAttention {
    fn name(&self) -> String {
        format!(
            "moa ({} layers, N = prompt + {})",
            self.plan.num_layers(),
            self.max_new_tokens
        )
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    /// Dense attention (MoA applies to cached inference; see the module docs).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        DenseAttention.forward(q, k, v, call)
    }

    fn new_cache(&self, layer: usize) -> Result<Box<dyn LayerCache>> {
        if layer >= self.plan.num_layers() {
            bail!(
                "attention {}: layer {layer} is past the plan's {} layers",
                self.name(),
                self.plan.num_layers()
            )
        }
        Ok(Box::new(MoaLayerCache { layer, cache: None }))
    }

    /// The first call (the prompt) resolves the layer's spans, attends with the sink + band
    /// pattern and writes the cache; later calls must be single decode steps.
    fn forward_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut dyn LayerCache,
        call: &AttentionCall,
    ) -> Result<Tensor> {
        let name = self.name();
        let layer = downcast_cache::<MoaLayerCache>(cache, &name)?;
        let (b, hq, n, d) = q.dims4()?;
        let hkv = k.dim(1)?;
        let scale = call.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt());
        match &mut layer.cache {
            None => {
                let spans = self.plan.resolve(
                    n + self.max_new_tokens,
                    self.plan.num_layers(),
                    hq,
                    hkv,
                    false,
                )?;
                let plan = &spans[layer.layer];
                let out = moa_attn(q, k, v, plan, Some(scale))?;
                let mut c = MoaCache::new(plan, b, d, k.dtype(), k.device())?;
                c.append(k, v)?;
                layer.cache = Some(c);
                Ok(out)
            }
            Some(c) => {
                if n != 1 {
                    bail!(
                        "attention {name}: after the prompt only single-token decode steps are \
                         supported, got q {:?} (chunked prefill is not implemented)",
                        q.dims()
                    )
                }
                c.append(&k.contiguous()?, &v.contiguous()?)?;
                moa_decode_scaled(&q.contiguous()?, c, scale)
            }
        }
    }
}

/// The decode cache of one MoA layer: a [`MoaCache`] created by the prompt.
#[derive(Debug)]
pub struct MoaLayerCache {
    layer: usize,
    cache: Option<MoaCache>,
}

impl MoaLayerCache {
    /// The underlying cache (`None` before the prompt).
    pub fn cache(&self) -> Option<&MoaCache> {
        self.cache.as_ref()
    }
}

impl LayerCache for MoaLayerCache {
    fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, MoaCache::len)
    }

    fn reset(&mut self) {
        self.cache = None;
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
