//! SparseK attention (Lou et al., arXiv 2406.16747): every query attends to its last `window`
//! keys plus the keys that the differentiable top-k operator SPARSEK selects among the older keys,
//! in one softmax. Cost `O(N·(K′ + window)·D)`: no `N×N` buffer and no `O(N²)` pass.
//!
//! Pieces:
//! - [`sparsek`]: the SPARSEK operator alone, the projection of each row of scores onto the capped
//!   simplex `{0 ≤ p ≤ 1, Σp = k}`, with its backward `g_z = 1_S ⊙ (g − mean_S g)`.
//! - [`SparseKScorer`]: the scoring network (per kv head: linear score plus a position slope).
//! - [`sparsek_attn`]: the attention op (selection fused with attention, CPU and CUDA, forward and
//!   backward; gradients reach `q`, `k`, `v` and the scores); [`sparsek_attn_taped`] runs the same
//!   kernels outside autograd and returns an [`AttentionTape`](crate::tape::AttentionTape) whose
//!   gradients include the scores'.
//! - [`SparseKCache`]: the decode KV cache that evicts keys that can never be selected again.
//!
//! # Documented choices (the paper's method section was not available; see the spec)
//! - **Scores per kv head**: `scores` is `(batch, kv_heads, seq)` f32; all query heads of a GQA group
//!   share one selection.
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
//!   merging sorted lists (the blocks of a row in groups that run in parallel, each group starting
//!   from the earlier groups' merged lists), then per query, one thread each, its cut (the
//!   `K′`-th largest candidate), τ (safeguarded Newton steps on the piecewise-linear budget from a
//!   bracket read off the sorted list, f32; each step `O(log K′)` on the list through binary
//!   searches and f64 prefix sums of its scores) and the length of the list prefix it attends.
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
//! Forward + backward through the loss `(out·g).sum()`: 27.9 / 55.2 / 111.0 ms at 8k / 16k / 32k
//! tokens (linear: ×1.98, ×2.01), beside the dense [`crate::flash_attn`] at 39.4 / 122.0 / 427.7
//! ms (1.41× / 2.21× / 3.85× faster); with the output gradient handed in directly (no loss ops;
//! the op's own time) 18.5 / 37.5 / 74.7 ms against 29.6 / 104.0 / 391.9 ms (1.60× / 2.78× /
//! 5.25×). With the CUDA memory pool kept (as `train_char_lm` runs) 16k takes 49.8 / 32.1 ms
//! (2.33× / 3.07×). Device memory in use after the backward 2.40 / 4.15 / 7.40 GiB. At 16k the
//! kernels take 28.3 ms: selection 0.76 + 3.41, forward 6.92, dQ 5.27, dK / dV / dScores 4.04
//! (band) + 7.07 (list tiles, f32 atomics) + 0.83 (conversion); the rest is candle's gradient
//! accumulation (zeros + add per gradient, as for the dense op). The tensor-core kernels are
//! latency-bound: compiled for 3 CTAs per SM at head_dim ≤ 64 (168 registers) instead of 2
//! (232–255), dQ went 8.3 → 5.3 ms and dK / dV 14.0 → 11.1 ms, while the forward, which
//! recomputes its weights to fit, went 6.0 → 6.9 ms (table and commands in BENCHMARKS.md,
//! "SparseK: occupancy"). Not yet at the 5× target (≈ 20 ms seeded at 16k). Measured and
//! dropped: halving the list kernel's atomics (one CTA per pair of query blocks) saved 0.3 ms
//! there but cost the band kernel 0.5 ms; a fused query-major backward (session 4). Since then
//! (BENCHMARKS.md, "SparseK: one thread per query in the selection"): the list construction runs
//! in parallel groups (B4 H6 8k, the GPT layer: forward 1.06 → 0.81 ms) and `sk_select` takes
//! one thread per query instead of one warp; 16k with the pool kept 50.39 / 32.27 → 48.07 /
//! 30.02 ms, forward 10.67 → 8.39 ms (dense 83.2 ms seeded in session 6: 2.77×; still short of
//! 5×). Next steps: keep the forward's weights in registers at 3 CTAs; one backward pass for dQ
//! and the list tiles' dK / dV (the score gradient's `−mean_S` term per key over the interval of
//! queries whose support holds it, from prefix sums of `r_i / |S_i|`).

mod attn;
mod cache;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod project;
mod scorer;

pub(crate) use attn::SparseKRun;
pub use attn::{sparsek_attn, sparsek_attn_taped};
pub use cache::SparseKCache;
pub use project::sparsek;
pub use scorer::{SparseKScorer, SparseKScorerConfig};

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
