//! Twilight (Lin et al. 2025, arXiv 2502.02770): adaptive top-p pruning of a base sparse selector,
//! for decoding (query length 1).
//!
//! One decode step per layer, every stage on the device of the cache (CPU or CUDA), no host
//! round trip:
//! 1. **Select** ([`BaseSelector`], default [`QuestSelector`]): candidate tokens `I0` per query
//!    head, at most `base_budget` of them (rounded up to whole pages). Quest always keeps the
//!    first [`TwilightConfig::sink_pages`] pages and the last [`TwilightConfig::recent_pages`]
//!    (the page of the current token): a partial last page has a smaller bound than full pages
//!    and lost the ranking in about half of SmolLM2's heads, although recent tokens carry much
//!    attention (EXPERIMENTS.md).
//! 2. **Estimate** ([`estimate_scores`]): `ŝ_j = scale · q·k̂_j` for `j ∈ I0` with the INT4 keys
//!    of the cache ([`TwilightCache`]); every other token is `-inf`.
//! 3. **Prune** ([`top_p`]): `ŵ = softmax(ŝ)` over the candidates only, then the smallest set
//!    `I1 = {ŵ > t}` with mass `≥ p`, `t` found by binary search from the true row maximum.
//!    Stages 2–3 and the union of stage 4 run as one call, [`prune_and_union`] (one fused kernel
//!    per `(batch, kv head)` on CUDA).
//! 4. **Attend** ([`union_per_group`], [`sparse_decode_attention`]): exact attention with the
//!    full-precision K and V over, per KV head, the **union** of its query heads' `I1` (GQA
//!    "group varlen": every query head of a group attends over the same tokens; the union keeps
//!    `≥ p` of each head's estimated mass, but differs slightly from strict per-head pruning).
//!
//! Prefill stays dense: run dense attention on the prompt and [`TwilightCache::append`] its keys
//! and values. The first [`TwilightConfig::dense_layers`] layers decode densely.
//! With `p = 1` the pruner is skipped and the base selector's candidates are attended to exactly
//! (the fallback to the plain base selector).

mod attend;
mod cache;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod prune;
mod select;

use candle::{bail, DType, Result, Tensor};

pub use attend::{sparse_decode_attention, union_per_group, ATTN_CHUNK};
pub use cache::{quantize_int4, TwilightCache};
pub use prune::{estimate_scores, prune_and_union, top_p, TOP_P_EPS, TOP_P_MAX_ITERS};
pub use select::{
    page_scores, top_indices, BaseSelector, FullSelector, QuestSelector, TopKSelector,
    WindowSelector,
};

/// Padding / "not selected" token id in every index tensor of this module.
pub const NO_TOKEN: u32 = u32::MAX;

/// Parameters of Twilight decoding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TwilightConfig {
    /// Top-p threshold in `(0, 1]`: the kept set holds at least this fraction of the estimated
    /// attention mass of the candidates. `1` disables pruning (base selector only).
    pub p: f32,
    /// Budget `B0` of the base selector, in tokens (Quest keeps `ceil(B0 / page_size)` pages).
    pub base_budget: usize,
    /// Tokens per page of the cache (Quest granularity); must equal the cache's page size.
    pub page_size: usize,
    /// The first `dense_layers` layers decode densely (the paper keeps 2).
    pub dense_layers: usize,
    /// Leading pages Quest always keeps (the attention sink), inside the budget.
    pub sink_pages: usize,
    /// Trailing pages Quest always keeps (the current page and those before it), inside the
    /// budget.
    pub recent_pages: usize,
}

impl Default for TwilightConfig {
    /// The paper's LLaMA setting: p = 0.95, Quest with B0 = 8192 tokens in 16-token pages, first
    /// two layers dense; the first and the last page pinned ([`QuestSelector::new`]).
    fn default() -> Self {
        let quest = QuestSelector::new(8192);
        Self {
            p: 0.95,
            base_budget: quest.budget,
            page_size: 16,
            dense_layers: 2,
            sink_pages: quest.sink_pages,
            recent_pages: quest.recent_pages,
        }
    }
}

impl TwilightConfig {
    /// Checks `p ∈ (0, 1]`, `base_budget > 0` and `page_size > 0`.
    pub fn validate(&self) -> Result<()> {
        if !(self.p > 0.0 && self.p <= 1.0) {
            bail!("twilight: p must be in (0, 1], got {}", self.p)
        }
        if self.base_budget == 0 {
            bail!("twilight: base_budget must be > 0 tokens, got 0")
        }
        if self.page_size == 0 {
            bail!("twilight: page_size must be > 0 tokens, got 0")
        }
        Ok(())
    }

    /// Whether `layer` (0-based) decodes densely.
    pub fn is_dense_layer(&self, layer: usize) -> bool {
        layer < self.dense_layers
    }
}

/// The result of one decode step.
#[derive(Clone, Debug)]
pub struct TwilightStep {
    /// Attention output `(batch, q_heads, 1, head_dim)`, dtype of q.
    pub output: Tensor,
    /// Tokens each query head kept after pruning, `(batch, q_heads, n)` u32 ids with
    /// [`NO_TOKEN`] padding (before the GQA union).
    pub kept: Tensor,
    /// Per KV head the union lists actually attended to: `(batch, kv_heads, 1 + cap)` u32,
    /// element 0 the count, then the ascending token ids (entries past the count unspecified).
    pub lists: Tensor,
    /// Cache length at this step.
    pub context_len: usize,
}

impl TwilightStep {
    /// Tokens kept per query head `(batch, q_heads)` f32, on the device (no host sync).
    pub fn kept_per_head(&self) -> Result<Tensor> {
        self.kept
            .ne(NO_TOKEN)?
            .to_dtype(DType::F32)?
            .sum(candle::D::Minus1)
    }

    /// Average kept fraction of the context: mean over `(batch, q head)` of `|I1| / context_len`,
    /// a 0-dim f32 tensor on the device (reading it is the caller's choice of sync point).
    pub fn kept_fraction(&self) -> Result<Tensor> {
        self.kept_per_head()?.mean_all()? / self.context_len as f64
    }
}

/// Decodes one token of one layer: dense for the first [`TwilightConfig::dense_layers`] layers,
/// else Twilight over the Quest base selector.
///
/// - `cache`: the layer's cache, already holding the current token's key and value.
/// - `q`: `(batch, q_heads, 1, head_dim)`, same dtype and device as the cache, `q_heads` a
///   multiple of the cache's kv heads.
///
/// Dense layers run the same kernels over every stored token ([`FullSelector`], `p = 1`), which is
/// exact dense decoding without copying the cache.
///
/// Returns the output `(batch, q_heads, 1, head_dim)` and the kept sets.
pub fn decode_layer(
    layer: usize,
    cache: &TwilightCache,
    q: &Tensor,
    cfg: &TwilightConfig,
) -> Result<TwilightStep> {
    if cfg.is_dense_layer(layer) {
        let dense = TwilightConfig { p: 1.0, ..*cfg };
        decode_with(cache, q, &dense, &FullSelector)
    } else {
        let quest = QuestSelector {
            budget: cfg.base_budget,
            sink_pages: cfg.sink_pages,
            recent_pages: cfg.recent_pages,
        };
        decode_with(cache, q, cfg, &quest)
    }
}

/// One Twilight decode step over any base selector (see the module docs for the stages).
/// Shapes as in [`decode_layer`]; `p = 1` skips the estimate and top-p stages.
pub fn decode_with(
    cache: &TwilightCache,
    q: &Tensor,
    cfg: &TwilightConfig,
    selector: &dyn BaseSelector,
) -> Result<TwilightStep> {
    cfg.validate()?;
    if cfg.page_size != cache.page_size() {
        bail!(
            "twilight: config page_size {} differs from the cache's {}",
            cfg.page_size,
            cache.page_size()
        )
    }
    let q3 = cache.check_query(q)?;
    let scale = 1.0 / (cache.head_dim() as f32).sqrt();
    let candidates = selector.select(cache, &q3)?;
    let (kept, lists) = if cfg.p >= 1.0 {
        let lists = union_per_group(&candidates, cache.kv_heads(), cache.len())?;
        (candidates, lists)
    } else {
        prune_and_union(cache, &q3, &candidates, scale, cfg.p)?
    };
    let out = sparse_decode_attention(cache, &q3, &lists, scale)?;
    Ok(TwilightStep {
        output: out.unsqueeze(2)?,
        kept,
        lists,
        context_len: cache.len(),
    })
}

/// Checks that an index tensor is `(batch, heads, n)` u32 on `device`, with `n > 0`.
pub(crate) fn check_ids(
    name: &str,
    t: &Tensor,
    batch: usize,
    heads: usize,
    device: &candle::Device,
) -> Result<usize> {
    if t.dtype() != DType::U32 {
        bail!("twilight: {name} must be u32, got {:?}", t.dtype())
    }
    if !t.device().same_device(device) {
        bail!(
            "twilight: {name} is on {:?}, expected {:?}",
            t.device().location(),
            device.location()
        )
    }
    match t.dims() {
        &[b, h, n] if b == batch && h == heads && n > 0 => Ok(n),
        dims => bail!("twilight: {name} must be ({batch}, {heads}, n > 0), got {dims:?}"),
    }
}

/// Dispatches a stage to its CPU or CUDA implementation.
macro_rules! on_device {
    ($dev:expr, $cpu:expr, $cuda:expr) => {
        match $dev {
            candle::Device::Cpu => $cpu,
            #[cfg(feature = "cuda")]
            candle::Device::Cuda(_) => $cuda,
            other => candle::bail!("twilight: device {:?} is not supported", other.location()),
        }
    };
}
pub(crate) use on_device;
