//! MoA in the models ([`AttentionKind::Moa`](crate::AttentionKind)): every layer owns a
//! [`MoaCache`] (per kv head a static sink plus a ring of its band, spans resolved from the plan
//! at `N = prompt + max_new_tokens` when the prompt arrives); the prompt is attended with the
//! layer's sink + band pattern ([`moa_attn`]), every decode step (query length 1) appends to the ring
//! and runs [`moa_decode_scaled`] over all heads of the layer.
//!
//! Without a cache (training with a plan, sliding-window perplexity, full recomputation) the
//! layer's spans are resolved at `N = seq_len` and the call is [`moa_attn`] (forward and
//! backward), so a model can be evaluated and fine-tuned with its plan.
//!
//! Profiling (the first step of making a plan): [`MoaProfiler`] runs a [`Llama`] over calibration
//! items with [`MoaProfileAttention`] in every layer (dense attention whose backward pass adds the
//! block influence of the layer into its [`InfluenceTap`], see
//! [`candle_sparse_attn::moa::profiled_attention`]), backpropagates the language-model loss in
//! bounded memory (loss in chunks of positions, backward recomputed one layer at a time) and
//! returns the per layer / head / block influence at the items' length that
//! [`candle_sparse_attn::moa::search_plan`] turns into a plan (one profiler per length, the
//! search takes several).

use std::any::Any;
use std::sync::Arc;

use candle::{bail, DType, Device, Result, Tensor, Var};
use candle_sparse_attn::moa::{
    moa_attn, moa_decode_scaled, profiled_attention, InfluenceTap, MoaCache, MoaInfluence, MoaPlan,
};

use crate::attention::{
    downcast_cache, Attention, AttentionBackend, AttentionCall, DenseAttention, LayerCache,
};
use crate::decoder::CausalLm;
use crate::llama::Llama;

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

    /// The layer's sink + band attention with spans resolved at `N = seq_len` (self-attention
    /// over a whole sequence: `q_len == kv_len`).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        let (_, hq, n, d) = q.dims4()?;
        let (hkv, kv_len) = (k.dim(1)?, k.dim(2)?);
        if n != kv_len || !call.causal {
            bail!(
                "attention {}: without a cache MoA is causal self-attention over one sequence, \
                 got q {:?} and k {:?} (causal: {})",
                self.name(),
                q.dims(),
                k.dims(),
                call.causal
            )
        }
        let spans = self
            .plan
            .resolve(n, self.plan.num_layers(), hq, hkv, false)?;
        let Some(plan) = spans.get(call.layer) else {
            bail!(
                "attention {}: layer {} is past the plan's {} layers",
                self.name(),
                call.layer,
                self.plan.num_layers()
            )
        };
        let scale = call.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt());
        moa_attn(q, k, v, plan, Some(scale))
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

/// Profiling backend: the cached call of layer `l` is dense causal attention whose backward pass
/// adds the block influence of the call into `taps[l]`
/// ([`profiled_attention`]); cache-less calls are plain dense attention.
///
/// Candle only differentiates what depends on a [`Var`], and a loaded model's weights are plain
/// tensors, so every layer adds a zero scalar `Var` (the anchor) to its queries: the graph from
/// the first layer on is tracked and `loss.backward()` reaches every tap.
#[derive(Clone, Debug)]
pub struct MoaProfileAttention {
    taps: Vec<InfluenceTap>,
    anchor: Var,
}

impl MoaProfileAttention {
    /// Empty taps for `num_layers` layers; `dtype` and `device` are the model's (the anchor's).
    pub fn new(num_layers: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            taps: (0..num_layers).map(|_| InfluenceTap::new()).collect(),
            anchor: Var::zeros((1, 1, 1, 1), dtype, device)?,
        })
    }

    /// The taps, one per layer.
    pub fn taps(&self) -> &[InfluenceTap] {
        &self.taps
    }
}

impl AttentionBackend for MoaProfileAttention {
    fn name(&self) -> String {
        format!("moa profile ({} layers)", self.taps.len())
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        DenseAttention.forward(q, k, v, call)
    }

    fn new_cache(&self, layer: usize) -> Result<Box<dyn LayerCache>> {
        let Some(tap) = self.taps.get(layer) else {
            bail!("attention {}: no tap for layer {layer}", self.name())
        };
        Ok(Box::new(ProfileLayerCache {
            tap: tap.clone(),
            len: 0,
        }))
    }

    /// One call per cache: the whole profiled sequence (a prefill).
    fn forward_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut dyn LayerCache,
        call: &AttentionCall,
    ) -> Result<Tensor> {
        let name = self.name();
        let layer = downcast_cache::<ProfileLayerCache>(cache, &name)?;
        if layer.len != 0 {
            bail!(
                "attention {name}: profiling takes the whole sequence in one call, got q {:?} \
                 after {} cached positions",
                q.dims(),
                layer.len
            )
        }
        layer.len = k.dim(2)?;
        let scale = call
            .softmax_scale
            .unwrap_or(1.0 / (q.dim(3)? as f32).sqrt());
        let q = q.broadcast_add(self.anchor.as_tensor())?;
        profiled_attention(&q, k, v, scale, &layer.tap)
    }
}

/// The "cache" of a profiled layer: its tap and the profiled length.
#[derive(Debug)]
pub struct ProfileLayerCache {
    tap: InfluenceTap,
    len: usize,
}

impl LayerCache for ProfileLayerCache {
    fn len(&self) -> usize {
        self.len
    }

    fn reset(&mut self) {
        self.len = 0;
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Positions per chunk of the language-model loss in [`MoaProfiler::add_item`]: the logits of
/// at most this many positions (`× vocab` floats) exist at a time.
pub const LOSS_CHUNK: usize = 256;

/// Accumulates the MoA influence of a [`Llama`] at one length over calibration items (see the
/// module docs). Items are processed one at a time and each in chunks, so memory stays bounded:
/// the forward pass keeps only the residual stream entering each layer (`layers × length ×
/// hidden` floats), the loss is computed [`LOSS_CHUNK`] positions at a time, and the backward
/// pass recomputes one layer at a time from its saved input (the autograd graph of one layer),
/// its influence computed `O(64 · length)` per head by the profiling attention.
#[derive(Debug)]
pub struct MoaProfiler {
    model: Llama,
    backend: Arc<MoaProfileAttention>,
    length: Option<usize>,
    items: usize,
}

impl MoaProfiler {
    /// A profiler for (a cheap clone of) `model`, whose attention is replaced by
    /// [`MoaProfileAttention`].
    pub fn new(model: &Llama) -> Result<Self> {
        let backend = Arc::new(MoaProfileAttention::new(
            model.num_layers(),
            model.dtype(),
            model.device(),
        )?);
        let mut model = model.clone();
        model.set_attention(Attention::with_backend(backend.clone()));
        Ok(Self {
            model,
            backend,
            length: None,
            items: 0,
        })
    }

    /// Profiles one item: `tokens` (`length + 1` ids; every item of a profiler has the same
    /// length) are run as input `tokens[..length]` with targets `tokens[1..]`, the mean
    /// cross-entropy is backpropagated (chunked, layer by layer, see the type's docs) and each
    /// layer's influence added to its tap. Returns the item's mean loss in nats.
    pub fn add_item(&mut self, tokens: &[u32]) -> Result<f64> {
        let length = tokens.len().saturating_sub(1);
        if length > self.model.max_context() {
            bail!(
                "moa profiler: an item of {length} positions exceeds the model's context of {}",
                self.model.max_context()
            )
        }
        if length == 0 || self.length.is_some_and(|l| l != length) {
            bail!(
                "moa profiler: an item of {} tokens; items need length + 1 tokens with one length \
                 per profiler (so far {:?})",
                tokens.len(),
                self.length
            )
        }
        let device = self.model.device().clone();
        let input = Tensor::new(&tokens[..length], &device)?.unsqueeze(0)?;
        let targets = Tensor::new(&tokens[1..], &device)?;
        let layers = self.model.num_layers();
        // Forward without a graph (cache-less calls are plain dense attention): the residual
        // stream entering each layer.
        let mut inputs = Vec::with_capacity(layers);
        let mut x = self.model.embed(&input)?;
        for l in 0..layers {
            let next = self.model.layer_forward(l, &x, 0, None)?.detach();
            inputs.push(x);
            x = next;
        }
        // The loss in chunks of positions: dL/dx at the top of the last layer.
        let top = Var::from_tensor(&x)?;
        let hidden = self.model.final_norm(top.as_tensor())?;
        let mut grad = top.zeros_like()?;
        let mut loss = 0f64;
        for start in (0..length).step_by(LOSS_CHUNK) {
            let len = LOSS_CHUNK.min(length - start);
            let logits = self
                .model
                .logits(&hidden.narrow(1, start, len)?)?
                .squeeze(0)?;
            let part = (candle_nn::loss::cross_entropy(&logits, &targets.narrow(0, start, len)?)?
                * (len as f64 / length as f64))?;
            loss += part.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let grads = part.backward()?;
            grad = (grad + grads.get(&top).expect("the loss depends on the top"))?;
        }
        // Backward one layer at a time, recomputed from its saved input with the profiling
        // attention (its backward fills the layer's tap).
        let mut cache = self.model.new_cache()?;
        for (l, x) in inputs.iter().enumerate().rev() {
            let x = Var::from_tensor(x)?;
            let y = self
                .model
                .layer_forward(l, x.as_tensor(), 0, Some(cache.layer_mut(l)))?;
            let grads = (y * &grad)?.sum_all()?.backward()?;
            grad = grads
                .get(&x)
                .expect("a layer's output depends on its input")
                .clone();
        }
        self.length = Some(length);
        self.items += 1;
        Ok(loss)
    }

    /// The mean influence over the items so far: `(layers, q_heads, nb, nb)` blocks at the
    /// items' length.
    pub fn influence(&self) -> Result<MoaInfluence> {
        let Some(length) = self.length else {
            bail!("moa profiler: no item was profiled")
        };
        MoaInfluence::from_taps(self.backend.taps(), length)
    }
}
