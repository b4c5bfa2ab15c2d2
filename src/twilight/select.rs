//! Base selectors: the candidate set `I0` the pruner starts from.

use candle::{bail, DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{cpu, on_device, TwilightCache};
use crate::reference::repeat_kv;

/// A base sparse selector for decoding.
///
/// Selection is **per query head** (the GQA union happens after pruning, in
/// [`super::union_per_group`]).
pub trait BaseSelector {
    /// Candidate tokens of each query head for the query `q` `(batch, q_heads, head_dim)`
    /// (contiguous, the cache's dtype and device): `(batch, q_heads, n)` u32 token ids
    /// `< cache.len()`, in any order, padded with [`super::NO_TOKEN`]; `n` is the same for every
    /// head. Must run on the cache's device without host round trips.
    fn select(&self, cache: &TwilightCache, q: &Tensor) -> Result<Tensor>;
}

/// Quest: pages of the cache ranked by the upper bound `Σ_d max(q_d·max_d, q_d·min_d)` of `q·k`
/// over the page's keys; the top `min(ceil(budget / page_size), pages)` pages are kept (ties go to
/// the lower page index). Candidates are their tokens in ascending order, a partial last page
/// padded with [`super::NO_TOKEN`]. Reads `pages · 2 · head_dim` bound values per query head.
///
/// The first `sink_pages` pages (the attention sink) and the last `recent_pages` pages (the page
/// of the current token and those before it) are always kept, inside the budget: they rank above
/// every bound (if they alone exceed the budget, the lower page indices win). Quest's kernels
/// always keep the current page; [`QuestSelector::new`] pins one sink page and one recent page.
///
/// On CUDA, scoring and selection are one kernel per `(batch, kv head)` where the group's page
/// scores fit in shared memory (`≤ 8` query heads per kv head), with the same result as
/// [`top_indices`] over [`page_scores`] (the two stages, which run elsewhere and on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuestSelector {
    /// Budget `B0` in tokens (> 0).
    pub budget: usize,
    /// Leading pages always kept (counted in the budget).
    pub sink_pages: usize,
    /// Trailing pages always kept (counted in the budget).
    pub recent_pages: usize,
}

impl QuestSelector {
    /// Quest with budget `B0 = budget` tokens, the first and the last page pinned.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            sink_pages: 1,
            recent_pages: 1,
        }
    }

    /// Quest without pinned pages (selection by bounds alone, as the Twilight reference code).
    pub fn unpinned(budget: usize) -> Self {
        Self {
            budget,
            sink_pages: 0,
            recent_pages: 0,
        }
    }
}

impl BaseSelector for QuestSelector {
    fn select(&self, cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
        if self.budget == 0 {
            bail!("twilight: the Quest budget must be > 0 tokens, got 0")
        }
        let pages = cache.num_pages();
        let keep = self.budget.div_ceil(cache.page_size()).min(pages);
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            cache.check_stage_query(q, "quest select")?;
            let pinned = (self.sink_pages, self.recent_pages);
            if let Some(fused) = cuda::quest_select(cache, &q.contiguous()?, keep, pinned)? {
                return Ok(fused);
            }
        }
        let scores = pin_pages(&page_scores(cache, q)?, self.sink_pages, self.recent_pages)?;
        top_indices(&scores, keep, cache.page_size(), cache.len())
    }
}

/// `scores` `(batch, heads, pages)` f32 with the first `sink` and the last `recent` pages set to
/// `+inf` (on the scores' device, no host round trip).
fn pin_pages(scores: &Tensor, sink: usize, recent: usize) -> Result<Tensor> {
    let np = scores.dim(2)?;
    if sink == 0 && recent == 0 {
        return Ok(scores.clone());
    }
    let page = Tensor::arange(0u32, np as u32, scores.device())?;
    let pinned = (page.lt(sink.min(np) as u32)? + page.ge(np.saturating_sub(recent) as u32)?)?
        .gt(0u32)?
        .broadcast_as(scores.shape())?;
    let inf = Tensor::new(f32::INFINITY, scores.device())?.broadcast_as(scores.shape())?;
    pinned.where_cond(&inf, scores)
}

/// Exact top-k: the `min(budget, len)` tokens with the largest `q·k` (full-precision keys, ties to
/// the lower index). Reads the whole key cache, so it is a quality baseline, not a fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopKSelector {
    /// Tokens kept per query head (> 0).
    pub budget: usize,
}

impl BaseSelector for TopKSelector {
    fn select(&self, cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
        if self.budget == 0 {
            bail!("twilight: the top-k budget must be > 0 tokens, got 0")
        }
        let hq = q.dim(1)?;
        let k = repeat_kv(&cache.keys()?, hq / cache.kv_heads())?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let scores = q
            .to_dtype(DType::F32)?
            .unsqueeze(2)?
            .matmul(&k.t()?)?
            .squeeze(2)?
            .contiguous()?;
        top_indices(&scores, self.budget.min(cache.len()), 1, cache.len())
    }
}

/// A static window: the first `sink` tokens (attention sinks) and the last `window` tokens.
/// The ids are built on the host from the cache length (known there) and uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSelector {
    /// Leading tokens always kept.
    pub sink: usize,
    /// Trailing tokens kept.
    pub window: usize,
}

impl BaseSelector for WindowSelector {
    fn select(&self, cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
        let len = cache.len();
        let sink = self.sink.min(len);
        let start = len.saturating_sub(self.window).max(sink);
        let ids: Vec<u32> = (0..sink).chain(start..len).map(|t| t as u32).collect();
        if ids.is_empty() {
            bail!(
                "twilight: window selector with sink {} and window {} selects nothing",
                self.sink,
                self.window
            )
        }
        broadcast_ids(ids, q)
    }
}

/// Every stored token (the "Full" base of the paper; with `p = 1` this is dense decoding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullSelector;

impl BaseSelector for FullSelector {
    fn select(&self, cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
        broadcast_ids((0..cache.len() as u32).collect(), q)
    }
}

/// The same id list for every (batch, head) of `q` `(batch, heads, head_dim)`, on q's device.
fn broadcast_ids(ids: Vec<u32>, q: &Tensor) -> Result<Tensor> {
    let (b, h, _) = q.dims3()?;
    let n = ids.len();
    Tensor::from_vec(ids, (1, 1, n), q.device())?
        .broadcast_as((b, h, n))?
        .contiguous()
}

/// Quest page scores: for q `(batch, q_heads, head_dim)` (the cache's dtype and device), the
/// upper bound `Σ_d max(q_d·max_d, q_d·min_d)` of `q·k` over each stored page's keys, per query
/// head (its kv head's bounds): `(batch, q_heads, num_pages)` f32, computed in f32.
pub fn page_scores(cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
    cache.check_stage_query(q, "page_scores")?;
    let q = q.contiguous()?;
    on_device!(
        q.device(),
        cpu::page_scores(cache, &q),
        cuda::page_scores(cache, &q)
    )
}

/// Top-`k` of each row of `scores` `(batch, heads, n)` f32 (ties to the lower index; NaN ranks
/// lowest), expanded to tokens: row index `i` becomes the ids `i·expand .. i·expand + expand`,
/// those `≥ valid_len` replaced by [`super::NO_TOKEN`]. Returns `(batch, heads, k·expand)` u32, the
/// kept indices in ascending order. Selection by radix select on the CUDA side (no sort).
pub fn top_indices(scores: &Tensor, k: usize, expand: usize, valid_len: usize) -> Result<Tensor> {
    if scores.dtype() != DType::F32 {
        bail!(
            "twilight: top_indices scores must be f32, got {:?}",
            scores.dtype()
        )
    }
    let (b, h, n) = match scores.dims() {
        &[b, h, n] => (b, h, n),
        dims => bail!("twilight: top_indices scores must be (batch, heads, n), got {dims:?}"),
    };
    if k == 0 || k > n || expand == 0 {
        bail!(
            "twilight: top_indices needs 0 < k <= n and expand > 0, got k {k}, expand {expand}, scores {:?}",
            scores.dims()
        )
    }
    if k * expand > u32::MAX as usize || (b * h) == 0 {
        bail!(
            "twilight: top_indices output too large or empty: scores {:?}, k {k}",
            scores.dims()
        )
    }
    let scores = scores.contiguous()?;
    on_device!(
        scores.device(),
        cpu::top_indices(&scores, k, expand, valid_len),
        cuda::top_indices(&scores, k, expand, valid_len)
    )
}
