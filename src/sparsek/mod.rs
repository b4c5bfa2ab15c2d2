//! SparseK attention (Lou et al., arXiv 2406.16747): every query attends to its last `window`
//! keys plus the keys that the differentiable top-k operator SPARSEK selects among the older keys,
//! in one softmax. Cost `O(N·(K′ + window)·D)`: no `N×N` buffer and no `O(N²)` pass.
//!
//! Pieces:
//! - [`sparsek`]: the SPARSEK operator alone, the projection of each row of scores onto the capped
//!   simplex `{0 ≤ p ≤ 1, Σp = k}`, with its backward `g_z = 1_S ⊙ (g − mean_S g)`.
//! - [`SparseKScorer`]: the scoring network (per kv head: linear score plus a position slope), one
//!   op with CPU and CUDA kernels; [`SparseKScorer::backward`] gives its gradients without autograd
//!   ([`ScorerGrads`]) for training loops that run their own backward, and
//!   [`SparseKScorer::scores_from_linear`] / [`SparseKScorer::backward_linear`] let such a loop fold
//!   the scorer's weight into the q/k/v projection (one GEMM; the char-level GPT does).
//! - [`sparsek_attn`]: the attention op (selection fused with attention, CPU and CUDA, forward and
//!   backward; gradients reach `q`, `k`, `v` and the scores); [`sparsek_attn_taped`] runs the same
//!   kernels outside autograd and returns an [`AttentionTape`](crate::tape::AttentionTape) whose
//!   gradients include the scores'. [`sparsek_attn_qkvpacked_taped`] takes q, k, v as head
//!   columns of one projection's rows `(batch, seq, width)` ([`PackedHeads`]) and returns the
//!   output with heads merged and `dqkv` in the same layout: on an H100 (f16 / bf16, head_dim 64
//!   or 128) its kernels read and write those rows in place, so a model skips the copies that
//!   split the heads out and merge them back (four per layer and step in the char-level GPT).
//! - [`SparseKCache`]: the decode KV cache that evicts keys that can never be selected again.
//!
//! # Documented choices (the paper's method section was not available; see the spec)
//! - **Scores per kv head**: `scores` is `(batch, kv_heads, seq)` f32; all query heads of a GQA group
//!   share one selection.
//! - **Initial score spread** ([`SparseKScorerConfig::score_std`], default 4): the scorer's
//!   weight starts so that its linear scores have std 4 on unit-variance inputs, a sharper
//!   initial selection than Kaiming's `√2` (support about 320 instead of 420 keys for k = 256
//!   among 8k), at the same bpc on the char-level GPT.
//! - **Window excluded from the candidates**: query `i` attends to the window
//!   `W_i = {j : i − window < j ≤ i}` with weight 1 and to candidates `C_i = {j : j ≤ i − window}`
//!   with weight `p_ij = clip(u_j − τ_i, 0, 1)`; a key is never counted twice. `window = 0` means
//!   no window (every causal key is a candidate).
//! - **Attended set (spec §4 option b)**: SPARSEK is solved over the top-`K′` candidates of `C_i`
//!   ordered by `(u_j, j)` (ties: the newer key wins), `K′ = max_selected` (default `2k`). This is
//!   exact whenever the support `{p > 0}` has at most `K′` keys; otherwise τ is solved over the
//!   top-`K′` only and p is over-estimated (the ignored keys would raise τ).
//! - **Value weighting (spec §4 option V)**: `o_i = Σ_j α_ij · w_ij · v_j` with
//!   `α_i = softmax_j(scale · q_i·k_j)` over the window and the keys with `p_ij > 0`; rows are not
//!   renormalised (`Σ α·w ≤ 1`). When every `p = 1` this is hard top-k plus window attention.
//! - **Early positions**: when `|C_i| ≤ k` every candidate gets `p = 1` (zero score gradient).
//! - **Score gradient**: `g_w[i,j] = α_ij (dO_i·v_j)` summed over the GQA group, then the SPARSEK
//!   backward per row, summed over all rows that have `j` in their strict support `S_i`.
//! - **Kernels**: CPU: an incremental top-`K′` structure per kv head (one insertion per query) and
//!   an exact sorted scan for τ (f64). CUDA: per block of 64 queries the top-`K′` of the prefix by
//!   merging sorted lists (merge path: one binary search per thread, then its run; the blocks of
//!   a row in groups that run in parallel, each group starting from the earlier groups' merged
//!   lists), then per query, one thread each, its cut (the
//!   `K′`-th largest candidate: one binary search on the list, against the block's newer
//!   candidates sorted once per block by 64-bit key compares, the query's visible ones a bit
//!   mask in that order), τ (safeguarded Newton steps on the piecewise-linear budget from a
//!   bracket read off the sorted list, f32; each step `O(log K′)` on the list through binary
//!   searches and f64 prefix sums of its scores, and on the block's newer candidates through
//!   binary searches over them sorted once per block) and the length of the list prefix it
//!   attends.
//!   Attention, f16 / bf16 with head_dim ≤ 128: blocked tensor-core kernels (mma.sync m16n8k16,
//!   f32 accumulation), one CTA per block of 64 queries and query head. τ_i and the cut are
//!   non-decreasing in i, so the block's queries attend a prefix of its sorted list plus the
//!   contiguous band of its newer candidates and window keys; both are walked in tiles of 64
//!   gathered K/V rows (cp.async, double-buffered, the keys' positions read two tiles ahead; 3
//!   CTAs per SM at head_dim ≤ 64) with the weight `w_ij` applied per element (list tiles: one
//!   comparison with the query's attended prefix; band tiles inside every query's window: no
//!   test). Forward:
//!   online softmax; dQ (written in the input dtype), `r_i`, `|S_i|`: the same walk. On Hopper
//!   (compute capability 9.0, head_dim 64 / 128) the forward and dQ run the same walk with
//!   warpgroup MMA: a producer warpgroup copies the block's list positions into shared memory and
//!   gathers each tile's K / V rows into a ring of stages (mbarriers), a consumer warpgroup runs
//!   `S = QKᵀ` (and `dP = dO Vᵀ`) from shared memory and `O += (P∘w) V` (`dQ += dS K`) from
//!   registers, the next tile's scores overlapping this tile's second product. dK, dV and
//!   the score gradient: the band part key-major (one CTA per block of 64 keys and kv head over
//!   the query blocks whose band holds them; registers, plain stores), then the list tiles
//!   query-major with each warp owning 16 keys of the tile, added with f32 vector atomics (list
//!   keys are shared by many blocks and heads: not bitwise deterministic), then one pass to the
//!   input dtype. f32 (and head_dim 256) keep the exact row kernels: forward and dQ one warp per
//!   query row, dK / dV / scores one warp per key over the interval of queries attending it (no
//!   atomics, deterministic). CUDA needs `K′ ≤ 8192`.
//! - **Autograd**: candle's `CustomOp3` has three inputs, so `k` and `v` enter through a
//!   one-element link op on `(k, v)`; the attention op `(q, link, scores)` reads k and v from its
//!   own fields, and its backward hands `(dk, dv)` to the link's backward (no `[k | v]` copy).
//! - **Scores**: `−0.0` and `+0.0` are the same score. NaN scores are rejected on the CPU; the CUDA
//!   path never syncs with the host and does not check them.
//!
//! # Performance (measured: H100, bf16, B = 4, H = 48, D = 64, k = 256, window = 256, K′ = 512)
//! Forward + backward of the op's kernels ([`sparsek_attn_taped`] and its tape's `grads`, memory
//! pool kept as `train_char_lm` runs): 15.0 / 30.1 ms at 16k / 32k tokens (×2.00), against the
//! dense [`crate::flash_attn`]'s 80.1 / 314.5 ms measured in the same run: **5.32× / 10.47×
//! faster** (session 19; without the pool, 8.9 ms at 8k, 2.47×, and 73.2 ms at 64k). Through
//! candle's autograd with the output gradient handed in, both ops pay four zero-fill + add passes
//! over their input gradients: 19.5 against 82.8 ms at 16k (4.25×), 38.7 against 321.2 ms at 32k
//! (8.31×). Forward alone 4.4 ms at 16k. Memory grows linearly (2.55 / 4.15 / 7.40 / 13.90 GiB in
//! use after the backward, 8k to 64k, without the pool). The char-level GPT at 8k (6 layers,
//! width 384, k = 256, window = 256) trains 2.03–2.07× as fast as with dense attention. At 16k
//! the kernels took 15.4 ms in session 12 (ncu): selection 1.6 (lists 0.6, `sk_select` 1.0),
//! forward 3.2, dQ 3.7 (its producer warpgroup also zeroes the key side's f32 accumulator),
//! dK / dV / dScores 4.4 (list keys with
//! vector atomics, a warpgroup per pair of query blocks walking the union of their lists) + 2.5
//! (band keys, adding the list part and writing dK, dV in the input dtype), all warpgroup MMA on
//! Hopper. Each kernel is bound by its element-wise work's issue and latency (ncu: 160 to 195
//! TFLOP/s of MMA); band tiles come in four kinds (full, diagonal, window edge, general) so that
//! only the general ones run the whole weight test. Tables, commands and the history of each step
//! are in BENCHMARKS.md ("SparseK attention (H100)" and its subsections, the latest "SparseK:
//! merge-path list construction").

mod attn;
mod cache;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod project;
mod scorer;

pub use attn::{sparsek_attn, sparsek_attn_qkvpacked_taped, sparsek_attn_taped, PackedHeads};
pub(crate) use attn::{ScorerColumns, SparseKPackedRun, SparseKRun};
pub use cache::SparseKCache;
pub use project::sparsek;
pub use scorer::{ScorerGrads, SparseKScorer, SparseKScorerConfig};

use candle::{bail, Result};

/// Configuration of [`sparsek_attn`] and [`SparseKCache`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseKConfig {
    /// Budget of SPARSEK: the soft mask over the candidates sums to `k` (≥ 1).
    pub k: usize,
    /// Sliding-window length: the last `window` keys (the query's own included) are always
    /// attended with weight 1 and excluded from the candidates; 0 means no window.
    pub window: usize,
    /// `K′`, the cap on the keys SPARSEK is solved over (the top-`K′` candidates by `(u, j)`);
    /// `None` means `2k`. Must be ≥ `k`.
    pub max_selected: Option<usize>,
    /// Multiplier of `q·k`; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

impl SparseKConfig {
    /// A config with budget `k`, the given window, `K′ = 2k` and the default scale.
    pub fn new(k: usize, window: usize) -> Self {
        Self {
            k,
            window,
            max_selected: None,
            softmax_scale: None,
        }
    }

    /// `K′` actually used.
    pub fn cap(&self) -> usize {
        self.max_selected.unwrap_or(2 * self.k)
    }

    /// The scale actually used for a given head dimension.
    pub fn scale(&self, head_dim: usize) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (head_dim as f32).sqrt())
    }

    /// Checks `k ≥ 1`, `K′ ≥ k`, a finite scale and, for a sequence of `seq_len` tokens,
    /// `window ≤ seq_len`.
    pub fn validate(&self, seq_len: Option<usize>) -> Result<()> {
        if self.k == 0 {
            bail!("sparsek: k must be at least 1, got k = 0 ({self:?})")
        }
        if self.cap() < self.k {
            bail!(
                "sparsek: max_selected (K′ = {}) must be at least k = {}",
                self.cap(),
                self.k
            )
        }
        if let Some(s) = self.softmax_scale {
            if !s.is_finite() {
                bail!("sparsek: softmax scale must be finite, got {s}")
            }
        }
        if let Some(t) = seq_len {
            if self.window > t {
                bail!(
                    "sparsek: window {} is larger than the sequence length {t}",
                    self.window
                )
            }
        }
        Ok(())
    }
}

/// Exact SPARSEK threshold over scores sorted in **descending** order: the τ with
/// `Σ clip(z − τ, 0, 1) = k`, computed in f64 by scanning the breakpoints `{z_i} ∪ {z_i − 1}`.
/// Returns `None` when `k ≥ z.len()` (every entry gets `p = 1`).
pub(crate) fn tau_sorted(z: &[f64], k: f64) -> Option<f64> {
    let m = z.len();
    if k >= m as f64 {
        return None;
    }
    // Entries [c, a) are in S (0 < p < 1), [0, c) are saturated (p = 1).
    let (mut a, mut c) = (0usize, 0usize);
    let mut sum_s = 0f64;
    let mut hi = f64::INFINITY;
    loop {
        let next_enter = if a < m { z[a] } else { f64::NEG_INFINITY };
        let next_sat = if c < a { z[c] - 1.0 } else { f64::NEG_INFINITY };
        let lo = next_enter.max(next_sat);
        let (n_s, n_u) = ((a - c) as f64, c as f64);
        if n_s > 0.0 {
            let tau = (sum_s + n_u - k) / n_s;
            if tau >= lo && tau <= hi {
                return Some(tau);
            }
        } else if n_u == k && lo.is_finite() {
            return Some(lo);
        }
        if lo == f64::NEG_INFINITY {
            // Unreachable for k < m (f(−∞) = m > k); the midpoint fallback keeps it total.
            return Some(z[m - 1] - 1.0);
        }
        if next_enter >= next_sat {
            sum_s += z[a];
            a += 1;
        } else {
            sum_s -= z[c];
            c += 1;
        }
        hi = lo;
    }
}

#[cfg(test)]
mod tests {
    use super::tau_sorted;

    fn f(z: &[f64], tau: f64) -> f64 {
        z.iter().map(|x| (x - tau).clamp(0.0, 1.0)).sum()
    }

    #[test]
    fn tau_sorted_hits_budget() {
        let cases: [(&[f64], f64); 6] = [
            (&[3.0, 2.5, 0.1, -1.0], 2.0),
            (&[0.0, 0.0, 0.0, 0.0], 1.0),
            (&[5.0, 1.0, 0.5], 1.0),
            (&[5.0, 4.0, 0.5], 2.0),
            (&[1.0, 0.9, 0.8, 0.7, 0.6], 2.5),
            (&[2.0, 2.0, 1.0, 1.0], 3.0),
        ];
        for (z, k) in cases {
            let tau = tau_sorted(z, k).unwrap();
            assert!((f(z, tau) - k).abs() < 1e-12, "{z:?} {k} {tau}");
        }
        assert_eq!(tau_sorted(&[1.0, 2.0], 2.0), None);
    }
}
