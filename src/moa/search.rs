//! MoA plan search (spec §9): one rule `(alpha, beta)` per (layer, kv head) from the candidate
//! grid, minimising the block influence of what the rules mask summed over the profiled lengths
//! (each length's influence normalised by its total, so every length weighs the same), under an
//! average density bound **at every profiled length**, optionally with at most `R` distinct rules
//! per layer, solved **exactly** by dynamic programming: a multiple-choice knapsack whose capacity
//! is a vector with one dimension per profiled length (in units of the gcd of the rule weights at
//! that length), plus, for the rule cap, an enumeration of rule subsets per layer and an outer DP
//! over layers.
//!
//! Spans, masks and densities all come from [`SpanRule::span`] (one function for the search, the
//! density and the runtime). A rule keeps, for query block `qb`, key blocks
//! `{0} ∪ [qb − band_blocks + 1, qb]` (the prefill kernel's visibility); its weight at length `N`
//! is the KV tokens the last query row keeps, `ceil(min(span, N) / 64)` units.

use candle::{bail, Result};

use super::plan::{HeadSpan, MoaPlan, SpanRule, MOA_BLOCK};
use super::profile::MoaInfluence;

/// The candidate grid (spec §2): `alpha ∈ {−2048, −1024, …, 8192}`, `beta ∈ {0, 0.125, …, 1}`,
/// keeping a pair only if `alpha + beta·n_prof_max ≤ n_prof_max`, `alpha + beta·n_max ≤ n_max`
/// and `alpha + beta·n_min > 0`.
pub fn candidate_rules(n_min: usize, n_prof_max: usize, n_max: usize) -> Vec<SpanRule> {
    let mut rules = Vec::new();
    for a in 0..=10 {
        for b in 0..=8 {
            let (alpha, beta) = (-2048.0 + 1024.0 * a as f64, 0.125 * b as f64);
            let at = |n: usize| alpha + beta * n as f64;
            if at(n_prof_max) <= n_prof_max as f64 && at(n_max) <= n_max as f64 && at(n_min) > 0.0 {
                rules.push(SpanRule { alpha, beta });
            }
        }
    }
    rules
}

/// The summed influence of the causal blocks `rule` masks at length `n`: `blocks` is one head's
/// `(nb, nb)` row-major block influence (`nb = ceil(n / 64)`).
pub fn masked_influence(blocks: &[f32], nb: usize, rule: &SpanRule, n: usize) -> f64 {
    let band_blocks = HeadSpan::resolve(rule, n).band_blocks();
    let mut loss = 0.0;
    for qb in 0..nb {
        // Kept: block 0 and [qb + 1 − band_blocks, qb]; masked: 1 ≤ kb ≤ qb − band_blocks.
        for kb in 1..(qb + 1).saturating_sub(band_blocks) {
            loss += blocks[qb * nb + kb] as f64;
        }
    }
    loss
}

/// Weight of a rule at length `n` in [`MOA_BLOCK`]-token units: `ceil(min(span, n) / 64)`.
pub fn rule_weight(rule: &SpanRule, n: usize) -> usize {
    rule.kept_tokens(n).div_ceil(MOA_BLOCK)
}

/// A search instance: for every group (a (layer, kv head)), the loss of each rule and its weight
/// in each constraint (one constraint per profiled length).
#[derive(Clone, Debug)]
pub struct Knapsack {
    /// `loss[g][r]`.
    pub loss: Vec<Vec<f64>>,
    /// `weight[g][r][d]`: the weight of rule `r` of group `g` in constraint `d`, in capacity
    /// units.
    pub weight: Vec<Vec<Vec<usize>>>,
    /// Layer of each group (groups of a layer are consecutive).
    pub layer: Vec<usize>,
}

/// The chosen rule index per group and the objective.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// `rule[g]`: the index of the chosen rule of group `g`.
    pub rule: Vec<usize>,
    /// Summed loss of the choice.
    pub loss: f64,
    /// Summed weight of the choice in each constraint.
    pub weight: Vec<usize>,
}

/// Most DP cells (states × steps of the choice tables) [`solve`] builds before refusing: about
/// 1 GiB of choice tables.
pub const MAX_DP_CELLS: usize = 1 << 28;

/// A dense box of weight vectors, `0..ext[d]` in each dimension, flattened row-major (the last
/// dimension contiguous).
struct Grid {
    ext: Vec<usize>,
    stride: Vec<usize>,
}

impl Grid {
    fn new(ext: Vec<usize>) -> Self {
        let mut stride = vec![1; ext.len()];
        for d in (0..ext.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * ext[d + 1];
        }
        Self { ext, stride }
    }

    fn size(&self) -> usize {
        self.ext.iter().product()
    }

    fn offset(&self, w: &[usize]) -> usize {
        w.iter().zip(&self.stride).map(|(c, s)| c * s).sum()
    }

    fn coords(&self, mut i: usize) -> Vec<usize> {
        self.stride
            .iter()
            .map(|s| {
                let c = i / s;
                i %= s;
                c
            })
            .collect()
    }

    /// Calls `f(start, len)` for every run of source states `s` (contiguous along the last
    /// dimension) whose shift `s + w` stays inside the grid; nothing if `w` itself does not fit.
    fn for_each_run(&self, w: &[usize], mut f: impl FnMut(usize, usize)) {
        if w.iter().zip(&self.ext).any(|(w, e)| w >= e) {
            return;
        }
        let k = self.ext.len();
        let len = self.ext[k - 1] - w[k - 1];
        let mut outer = vec![0; k - 1];
        loop {
            f(self.offset(&outer), len);
            let mut d = k - 1;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                outer[d] += 1;
                if outer[d] < self.ext[d] - w[d] {
                    break;
                }
                outer[d] = 0;
            }
        }
    }
}

/// `dp[c]` = min loss with total weight exactly the grid state `c`, `f64::INFINITY` where
/// unreachable.
type Curve = Vec<f64>;

/// One DP step over `grid`: `next[s + w_i] = min_i (dp[s] + loss_i)` over `items` `(w_i, loss_i)`,
/// with the arg item per state (`u32::MAX` where unreachable).
fn step(grid: &Grid, dp: &[f64], items: &[(Vec<usize>, f64)]) -> (Curve, Vec<u32>) {
    let mut next = vec![f64::INFINITY; dp.len()];
    let mut arg = vec![u32::MAX; dp.len()];
    for (i, (w, l)) in items.iter().enumerate() {
        let off = grid.offset(w);
        grid.for_each_run(w, |start, len| {
            let src = &dp[start..start + len];
            let dst = &mut next[start + off..start + off + len];
            let a = &mut arg[start + off..start + off + len];
            for j in 0..len {
                let v = src[j] + l;
                if v < dst[j] {
                    dst[j] = v;
                    a[j] = i as u32;
                }
            }
        });
    }
    (next, arg)
}

/// Exact multiple-choice knapsack over `groups` (each choosing one of the `allowed` rules, with
/// weights `w[g][r]` in grid units): the loss curve over the exact total weight and the
/// per-group choice table (indices into `allowed`) for backtracking.
fn mckp(
    ks: &Knapsack,
    w: &[Vec<Vec<usize>>],
    groups: &[usize],
    allowed: &[usize],
    grid: &Grid,
) -> (Curve, Vec<Vec<u32>>) {
    let mut dp = vec![f64::INFINITY; grid.size()];
    dp[0] = 0.0;
    let mut choice = Vec::with_capacity(groups.len());
    for &g in groups {
        let items: Vec<(Vec<usize>, f64)> = allowed
            .iter()
            .map(|&r| (w[g][r].clone(), ks.loss[g][r]))
            .collect();
        let (next, arg) = step(grid, &dp, &items);
        dp = next;
        choice.push(arg);
    }
    (dp, choice)
}

/// Walks a choice table of [`mckp`] back from state `c` of `grid`, filling `rule` for `groups`.
fn backtrack(
    w: &[Vec<Vec<usize>>],
    (groups, allowed): (&[usize], &[usize]),
    choice: &[Vec<u32>],
    grid: &Grid,
    mut c: usize,
    rule: &mut [usize],
) {
    for (i, &g) in groups.iter().enumerate().rev() {
        let r = allowed[choice[i][c] as usize];
        rule[g] = r;
        c -= grid.offset(&w[g][r]);
    }
}

/// All subsets of `0..n` of size `k` (`k ≤ n`), in lexicographic order.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur: Vec<usize> = (0..k).collect();
    if k == 0 || k > n {
        return vec![(0..n).collect()];
    }
    loop {
        out.push(cur.clone());
        let Some(i) = (0..k).rev().find(|&i| cur[i] < n - k + i) else {
            return out;
        };
        cur[i] += 1;
        for j in i + 1..k {
            cur[j] = cur[j - 1] + 1;
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Solves the instance exactly: minimise the summed loss subject to
/// `lower[d] ≤ Σ weight[d] ≤ cap[d]` in every constraint `d` and, with `max_rules`, at most that
/// many distinct rules per layer. Errors when infeasible or when the DP would exceed
/// [`MAX_DP_CELLS`].
pub fn solve(
    ks: &Knapsack,
    cap: &[usize],
    lower: &[usize],
    max_rules: Option<usize>,
) -> Result<Assignment> {
    let g_count = ks.loss.len();
    let r_count = ks.loss.first().map_or(0, |l| l.len());
    let dims = cap.len();
    if g_count == 0 || r_count == 0 || ks.weight.len() != g_count || ks.layer.len() != g_count {
        bail!("moa search: {g_count} groups with {r_count} rules (and matching weights and layers) are needed")
    }
    if dims == 0 || lower.len() != dims {
        bail!(
            "moa search: {dims} capacities and {} lower bounds; one of each per constraint \
             (at least one) is needed",
            lower.len()
        )
    }
    if ks.loss.iter().any(|l| l.len() != r_count)
        || ks.weight.iter().any(|w| w.len() != r_count)
        || ks.weight.iter().flatten().any(|w| w.len() != dims)
        || ks.loss.iter().flatten().any(|l| !l.is_finite())
    {
        bail!("moa search: every group needs {r_count} finite losses and {r_count} weights of {dims} constraints")
    }
    if max_rules == Some(0) {
        bail!("moa search: max rules per layer must be ≥ 1")
    }
    let infeasible = || {
        candle::Error::Msg(format!(
            "moa search: no assignment of weights in [{lower:?}, {cap:?}] units exists (max \
             rules per layer {max_rules:?})"
        ))
    };
    // Every total weight in constraint d is a multiple of the gcd of its weights: the DP runs in
    // those units (exact).
    let unit: Vec<usize> = (0..dims)
        .map(|d| {
            ks.weight
                .iter()
                .flatten()
                .fold(0, |a, w| gcd(a, w[d]))
                .max(1)
        })
        .collect();
    let w: Vec<Vec<Vec<usize>>> = ks
        .weight
        .iter()
        .map(|g| {
            g.iter()
                .map(|r| r.iter().zip(&unit).map(|(x, u)| x / u).collect())
                .collect()
        })
        .collect();
    let cap_u: Vec<usize> = cap.iter().zip(&unit).map(|(c, u)| c / u).collect();
    let lower_u: Vec<usize> = lower
        .iter()
        .zip(&unit)
        .map(|(l, u)| l.div_ceil(*u))
        .collect();
    if lower_u.iter().zip(&cap_u).any(|(l, c)| l > c) {
        return Err(infeasible());
    }
    let grid = Grid::new(cap_u.iter().map(|c| c + 1).collect());
    let cells = grid.size().saturating_mul(g_count);
    if cells > MAX_DP_CELLS {
        bail!(
            "moa search: the exact DP needs {} states × {g_count} steps (capacities {cap:?} in \
             units of {unit:?}), more than {MAX_DP_CELLS} cells: profile fewer lengths or \
             search fewer groups",
            grid.size()
        )
    }
    let best = |curve: &Curve| -> Option<usize> {
        (0..curve.len())
            .filter(|&c| curve[c].is_finite())
            .filter(|&c| grid.coords(c).iter().zip(&lower_u).all(|(x, l)| x >= l))
            .min_by(|&a, &b| curve[a].total_cmp(&curve[b]))
    };
    let mut rule = vec![0; g_count];
    let all: Vec<usize> = (0..r_count).collect();
    let c = match max_rules {
        None => {
            let groups: Vec<usize> = (0..g_count).collect();
            let (dp, choice) = mckp(ks, &w, &groups, &all, &grid);
            let c = best(&dp).ok_or_else(infeasible)?;
            backtrack(&w, (&groups, &all), &choice, &grid, c, &mut rule);
            c
        }
        Some(k) => {
            let mut layers: Vec<Vec<usize>> = Vec::new();
            for g in 0..g_count {
                match layers.last_mut() {
                    Some(l) if ks.layer[l[0]] == ks.layer[g] => l.push(g),
                    _ => layers.push(vec![g]),
                }
            }
            // Per layer: its own grid (up to the layer's largest weights), the min over rule
            // subsets of the layer curve, and the arg subset per state.
            let sets = subsets(r_count, k.min(r_count));
            struct Layer {
                grid: Grid,
                best_set: Vec<usize>,
                /// The layer's reachable states as outer-DP items, with their layer-grid index.
                items: Vec<(Vec<usize>, f64)>,
                index: Vec<usize>,
            }
            let mut per_layer = Vec::with_capacity(layers.len());
            for groups in &layers {
                let lgrid = Grid::new(
                    (0..dims)
                        .map(|d| {
                            let most: usize = groups
                                .iter()
                                .map(|&g| w[g].iter().map(|r| r[d]).max().unwrap_or(0))
                                .sum();
                            most.min(cap_u[d]) + 1
                        })
                        .collect(),
                );
                let mut curve = vec![f64::INFINITY; lgrid.size()];
                let mut best_set = vec![usize::MAX; lgrid.size()];
                for (s, set) in sets.iter().enumerate() {
                    let (dp, _) = mckp(ks, &w, groups, set, &lgrid);
                    for c in 0..dp.len() {
                        if dp[c] < curve[c] {
                            curve[c] = dp[c];
                            best_set[c] = s;
                        }
                    }
                }
                let index: Vec<usize> =
                    (0..curve.len()).filter(|&c| curve[c].is_finite()).collect();
                let items = index.iter().map(|&c| (lgrid.coords(c), curve[c])).collect();
                per_layer.push(Layer {
                    grid: lgrid,
                    best_set,
                    items,
                    index,
                });
            }
            // Outer DP over layers (min-plus convolution of the layer curves).
            let mut dp = vec![f64::INFINITY; grid.size()];
            dp[0] = 0.0;
            let mut take = Vec::with_capacity(layers.len());
            for l in &per_layer {
                let (next, arg) = step(&grid, &dp, &l.items);
                dp = next;
                take.push(arg);
            }
            let total = best(&dp).ok_or_else(infeasible)?;
            let mut c = total;
            for (li, groups) in layers.iter().enumerate().rev() {
                let l = &per_layer[li];
                let item = take[li][c] as usize;
                let lc = l.index[item];
                let set = &sets[l.best_set[lc]];
                let (_, choice) = mckp(ks, &w, groups, set, &l.grid);
                backtrack(&w, (groups, set), &choice, &l.grid, lc, &mut rule);
                c -= grid.offset(&l.items[item].0);
            }
            total
        }
    };
    debug_assert!(c < grid.size());
    let loss = (0..g_count).map(|g| ks.loss[g][rule[g]]).sum();
    let weight = (0..dims)
        .map(|d| (0..g_count).map(|g| ks.weight[g][rule[g]][d]).sum())
        .collect();
    Ok(Assignment { rule, loss, weight })
}

/// Options of [`search_plan`].
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// Average density bound `d` (kept KV tokens / N, averaged over kv heads), applied at every
    /// profiled length.
    pub density: f64,
    /// Lower bound as a fraction of the density budget at every profiled length (the
    /// reference's 0.9).
    pub lower_fraction: f64,
    /// At most this many distinct rules per layer (`None`: no cap).
    pub max_rules_per_layer: Option<usize>,
    /// Shortest and longest lengths the plan must be feasible at (candidate filters).
    pub n_min: usize,
    pub n_max: usize,
}

/// The result of [`search_plan`].
#[derive(Clone, Debug)]
pub struct PlanSearch {
    /// The plan, each kv head's rule repeated over its query heads (reference JSON, query-head
    /// order), with the profiled lengths in its metadata.
    pub plan: MoaPlan,
    /// The DP's choice; `assignment.weight[i]` is the kept 64-token units at `lengths[i]`.
    pub assignment: Assignment,
    /// The profiled lengths in tokens, ascending.
    pub lengths: Vec<usize>,
    /// Per length: the influence the plan masks over the total causal influence (both after the
    /// GQA max reduction).
    pub masked_fraction: Vec<f64>,
    /// Per length: the plan's average density (kept KV tokens of the last row / N over kv heads).
    pub density: Vec<f64>,
}

/// Finds a plan from one influence profile per length: groups are (layer, kv head) with the
/// influence reduced over each group's query heads by max; the loss of a rule is
/// `Σ_N masked_N / total_N` (its masked influence at each profiled length over that length's
/// total causal influence); at each length `N` the weights are the kept tokens at `N`, the
/// capacity `floor(d · N · G / 64)` units and the lower bound `lower_fraction` of it.
///
/// Errors on an empty list, profiles of different models (layer or head counts) or the same
/// length twice, blocks that do not match their length, and a density bound no candidate plan
/// meets at some length.
pub fn search_plan(
    influences: &[MoaInfluence],
    kv_heads: usize,
    opts: &SearchOptions,
) -> Result<PlanSearch> {
    let density_ok = opts.density > 0.0 && opts.density <= 1.0;
    if !density_ok || !(0.0..=1.0).contains(&opts.lower_fraction) {
        bail!(
            "moa search: density {} must be in (0, 1] and lower fraction {} in [0, 1]",
            opts.density,
            opts.lower_fraction
        )
    }
    let mut profiles: Vec<&MoaInfluence> = influences.iter().collect();
    profiles.sort_by_key(|p| p.length);
    let Some(first) = profiles.first() else {
        bail!("moa search: no influence profile (one per profiled length is needed)")
    };
    let (layers, q_heads, _, _) = first.blocks.dims4()?;
    for (i, p) in profiles.iter().enumerate() {
        let dims = p.blocks.dims();
        let nb = p.length.div_ceil(MOA_BLOCK);
        if dims.len() != 4 || dims[2] != nb || dims[3] != nb || p.length == 0 {
            bail!(
                "moa search: the profile at {} tokens has blocks {dims:?}, expected (layers, \
                 heads, {nb}, {nb}) (ceil(length / {MOA_BLOCK}) blocks)",
                p.length
            )
        }
        if dims[..2] != [layers, q_heads] {
            bail!(
                "moa search: profiles of different models: {layers} layers × {q_heads} heads at \
                 {} tokens, {} × {} at {} tokens",
                first.length,
                dims[0],
                dims[1],
                p.length
            )
        }
        if i > 0 && profiles[i - 1].length == p.length {
            bail!(
                "moa search: two profiles at {} tokens (one per length)",
                p.length
            )
        }
    }
    let lengths: Vec<usize> = profiles.iter().map(|p| p.length).collect();
    let n_prof_max = *lengths.last().expect("not empty");
    let rules = candidate_rules(opts.n_min, n_prof_max, opts.n_max.max(n_prof_max));
    if rules.is_empty() {
        bail!(
            "moa search: no candidate rule is feasible for lengths {}..{} (profiled up to \
             {n_prof_max})",
            opts.n_min,
            opts.n_max
        )
    }
    let g_count = layers * kv_heads;
    // masked[N][g][r] and the total causal influence per length.
    let mut masked = Vec::with_capacity(lengths.len());
    let mut totals = Vec::with_capacity(lengths.len());
    for p in &profiles {
        let (n, nb) = (p.length, p.length.div_ceil(MOA_BLOCK));
        let blocks = p.reduce_gqa(kv_heads)?.flatten_all()?.to_vec1::<f32>()?;
        let per_group: Vec<Vec<f64>> = (0..g_count)
            .map(|g| {
                let b = &blocks[g * nb * nb..(g + 1) * nb * nb];
                rules
                    .iter()
                    .map(|r| masked_influence(b, nb, r, n))
                    .collect()
            })
            .collect();
        let total: f64 = (0..g_count * nb)
            .map(|row| {
                let qb = row % nb;
                blocks[row * nb..row * nb + qb + 1]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
            })
            .sum();
        masked.push(per_group);
        totals.push(if total > 0.0 { total } else { 1.0 });
    }
    let ks = Knapsack {
        loss: (0..g_count)
            .map(|g| {
                (0..rules.len())
                    .map(|r| {
                        (0..lengths.len())
                            .map(|i| masked[i][g][r] / totals[i])
                            .sum()
                    })
                    .collect()
            })
            .collect(),
        weight: (0..g_count)
            .map(|_| {
                rules
                    .iter()
                    .map(|r| lengths.iter().map(|&n| rule_weight(r, n)).collect())
                    .collect()
            })
            .collect(),
        layer: (0..g_count).map(|g| g / kv_heads).collect(),
    };
    let cap: Vec<usize> = lengths
        .iter()
        .map(|&n| (opts.density * n as f64 * g_count as f64 / MOA_BLOCK as f64).floor() as usize)
        .collect();
    let lower: Vec<usize> = cap
        .iter()
        .map(|&c| (opts.lower_fraction * c as f64).ceil() as usize)
        .collect();
    for (i, &n) in lengths.iter().enumerate() {
        let least: usize = rules
            .iter()
            .map(|r| rule_weight(r, n))
            .min()
            .expect("rules")
            * g_count;
        let most: usize = rules
            .iter()
            .map(|r| rule_weight(r, n))
            .max()
            .expect("rules")
            * g_count;
        if least > cap[i] || most < lower[i] {
            bail!(
                "moa search: the density bound {} (kept tokens in [{}, {}] units of \
                 {MOA_BLOCK}) is unreachable at {n} tokens: the candidate rules keep {}..{} \
                 tokens per kv head on average",
                opts.density,
                lower[i],
                cap[i],
                least * MOA_BLOCK / g_count,
                most * MOA_BLOCK / g_count
            )
        }
    }
    let assignment = solve(&ks, &cap, &lower, opts.max_rules_per_layer)?;
    let group = q_heads / kv_heads;
    let per_layer: Vec<Vec<SpanRule>> = (0..layers)
        .map(|l| {
            (0..q_heads)
                .map(|h| rules[assignment.rule[l * kv_heads + h / group]])
                .collect()
        })
        .collect();
    let mut plan = MoaPlan::from_rules(&per_layer);
    plan.profiled_lengths = Some(lengths.clone());
    let masked_fraction = (0..lengths.len())
        .map(|i| {
            (0..g_count)
                .map(|g| masked[i][g][assignment.rule[g]])
                .sum::<f64>()
                / totals[i]
        })
        .collect();
    let density = lengths
        .iter()
        .zip(&assignment.weight)
        .map(|(&n, &w)| {
            let kept: usize = (0..g_count)
                .map(|g| rules[assignment.rule[g]].kept_tokens(n))
                .sum();
            debug_assert!(kept <= w * MOA_BLOCK);
            kept as f64 / (g_count * n) as f64
        })
        .collect();
    Ok(PlanSearch {
        plan,
        assignment,
        lengths,
        masked_fraction,
        density,
    })
}
