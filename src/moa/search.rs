//! MoA plan search (spec §9): one rule `(alpha, beta)` per (layer, kv head) from the candidate
//! grid, minimising the summed block influence of what the rules mask at the profiled length,
//! under an average density bound, solved **exactly** by dynamic programming (a multiple-choice
//! knapsack over capacity in 64-token units), optionally with at most `R` distinct rules per layer
//! (subset enumeration per layer plus an outer DP over layers).
//!
//! Spans, masks and densities all come from [`SpanRule::span`] (one function for the search, the
//! density and the runtime). A rule keeps, for query block `qb`, key blocks
//! `{0} ∪ [qb − band_blocks + 1, qb]` (the prefill kernel's visibility); its weight is the KV
//! tokens the last query row keeps, `ceil(min(span, N) / 64)` units.

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

/// A search instance: for every group (a (layer, kv head)), the loss and weight of each rule.
#[derive(Clone, Debug)]
pub struct Knapsack {
    /// `loss[g][r]`.
    pub loss: Vec<Vec<f64>>,
    /// `weight[g][r]` in capacity units.
    pub weight: Vec<Vec<usize>>,
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
    /// Summed weight of the choice.
    pub weight: usize,
}

/// `dp[c]` = min loss with total weight exactly `c`, `f64::INFINITY` where unreachable.
type Curve = Vec<f64>;

/// Exact multiple-choice knapsack over `groups` (each choosing one of `allowed` rules): the loss
/// curve over exact total weight `0..=cap` and the per-group choice table for backtracking.
fn mckp(ks: &Knapsack, groups: &[usize], allowed: &[usize], cap: usize) -> (Curve, Vec<Vec<u16>>) {
    let mut dp = vec![f64::INFINITY; cap + 1];
    dp[0] = 0.0;
    let mut choice = Vec::with_capacity(groups.len());
    for &g in groups {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut ch = vec![u16::MAX; cap + 1];
        for &r in allowed {
            let (w, l) = (ks.weight[g][r], ks.loss[g][r]);
            for c in w..=cap {
                let v = dp[c - w] + l;
                if v < next[c] {
                    next[c] = v;
                    ch[c] = r as u16;
                }
            }
        }
        dp = next;
        choice.push(ch);
    }
    (dp, choice)
}

/// Walks a choice table back from total weight `c`, filling `rule` for `groups`.
fn backtrack(
    ks: &Knapsack,
    groups: &[usize],
    choice: &[Vec<u16>],
    mut c: usize,
    rule: &mut [usize],
) {
    for (i, &g) in groups.iter().enumerate().rev() {
        let r = choice[i][c] as usize;
        rule[g] = r;
        c -= ks.weight[g][r];
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

/// Solves the instance exactly: minimise the summed loss subject to `lower ≤ Σ weight ≤ cap` and,
/// with `max_rules`, at most that many distinct rules per layer. Errors when infeasible.
pub fn solve(
    ks: &Knapsack,
    cap: usize,
    lower: usize,
    max_rules: Option<usize>,
) -> Result<Assignment> {
    let g_count = ks.loss.len();
    let r_count = ks.loss.first().map_or(0, |l| l.len());
    if g_count == 0 || r_count == 0 || ks.weight.len() != g_count || ks.layer.len() != g_count {
        bail!("moa search: {g_count} groups with {r_count} rules (and matching weights and layers) are needed")
    }
    if ks.loss.iter().any(|l| l.len() != r_count)
        || ks.weight.iter().any(|w| w.len() != r_count)
        || ks.loss.iter().flatten().any(|l| !l.is_finite())
    {
        bail!("moa search: every group needs {r_count} finite losses and weights")
    }
    let mut rule = vec![0; g_count];
    let best = |curve: &Curve| -> Option<usize> {
        (lower..=cap)
            .filter(|&c| curve[c].is_finite())
            .min_by(|&a, &b| curve[a].total_cmp(&curve[b]))
    };
    let infeasible = || {
        candle::Error::Msg(format!(
            "moa search: no assignment of weight in [{lower}, {cap}] units exists (max rules per layer {max_rules:?})"
        ))
    };
    let all: Vec<usize> = (0..r_count).collect();
    let c = match max_rules {
        None => {
            let groups: Vec<usize> = (0..g_count).collect();
            let (dp, choice) = mckp(ks, &groups, &all, cap);
            let c = best(&dp).ok_or_else(infeasible)?;
            backtrack(ks, &groups, &choice, c, &mut rule);
            c
        }
        Some(k) => {
            if k == 0 {
                bail!("moa search: max rules per layer must be ≥ 1")
            }
            let mut layers: Vec<Vec<usize>> = Vec::new();
            for g in 0..g_count {
                match layers.last_mut() {
                    Some(l) if ks.layer[l[0]] == ks.layer[g] => l.push(g),
                    _ => layers.push(vec![g]),
                }
            }
            // Per layer: the min over rule subsets of the layer curve, and the arg subset.
            let sets = subsets(r_count, k.min(r_count));
            let mut curves: Vec<(Curve, Vec<usize>)> = Vec::new();
            for groups in &layers {
                let lcap = groups
                    .iter()
                    .map(|&g| ks.weight[g].iter().max().unwrap())
                    .sum::<usize>()
                    .min(cap);
                let mut curve = vec![f64::INFINITY; lcap + 1];
                let mut arg = vec![usize::MAX; lcap + 1];
                for (s, set) in sets.iter().enumerate() {
                    let (dp, _) = mckp(ks, groups, set, lcap);
                    for c in 0..=lcap {
                        if dp[c] < curve[c] {
                            curve[c] = dp[c];
                            arg[c] = s;
                        }
                    }
                }
                curves.push((curve, arg));
            }
            // Outer DP over layers (min-plus convolution of the layer curves).
            let mut dp = vec![f64::INFINITY; cap + 1];
            dp[0] = 0.0;
            let mut take: Vec<Vec<usize>> = Vec::new();
            for (curve, _) in &curves {
                let mut next = vec![f64::INFINITY; cap + 1];
                let mut t = vec![usize::MAX; cap + 1];
                for c in 0..=cap {
                    if !dp[c].is_finite() {
                        continue;
                    }
                    for (w, &l) in curve.iter().enumerate().take(cap - c + 1) {
                        if dp[c] + l < next[c + w] {
                            next[c + w] = dp[c] + l;
                            t[c + w] = w;
                        }
                    }
                }
                dp = next;
                take.push(t);
            }
            let total = best(&dp).ok_or_else(infeasible)?;
            let mut c = total;
            for (li, groups) in layers.iter().enumerate().rev() {
                let w = take[li][c];
                let set = &sets[curves[li].1[w]];
                let (_, choice) = mckp(ks, groups, set, w);
                backtrack(ks, groups, &choice, w, &mut rule);
                c -= w;
            }
            total
        }
    };
    let loss = (0..g_count).map(|g| ks.loss[g][rule[g]]).sum();
    Ok(Assignment {
        rule,
        loss,
        weight: c,
    })
}

/// Options of [`search_plan`].
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// Average density bound `d` (kept KV tokens / N, averaged over kv heads).
    pub density: f64,
    /// Lower bound as a fraction of the density budget (the reference's 0.9).
    pub lower_fraction: f64,
    /// At most this many distinct rules per layer (`None`: no cap).
    pub max_rules_per_layer: Option<usize>,
    /// Shortest and longest lengths the plan must be feasible at (candidate filters).
    pub n_min: usize,
    pub n_max: usize,
}

/// Finds a plan from one profile: groups are (layer, kv head) with the influence reduced over
/// each group's query heads by max, losses and weights at the profiled length `N`, capacity
/// `floor(d · N · G / 64)` units and lower bound `lower_fraction` of it. The plan repeats each kv
/// head's rule over its query heads (reference JSON, query-head order).
pub fn search_plan(
    influence: &MoaInfluence,
    kv_heads: usize,
    opts: &SearchOptions,
) -> Result<(MoaPlan, Assignment)> {
    let n = influence.length;
    let red = influence.reduce_gqa(kv_heads)?;
    let (layers, _, nb, _) = red.dims4()?;
    let q_heads = influence.blocks.dim(1)?;
    let density_ok = opts.density > 0.0 && opts.density <= 1.0;
    if !density_ok || !(0.0..=1.0).contains(&opts.lower_fraction) {
        bail!(
            "moa search: density {} must be in (0, 1] and lower fraction {} in [0, 1]",
            opts.density,
            opts.lower_fraction
        )
    }
    let rules = candidate_rules(opts.n_min, n, opts.n_max.max(n));
    if rules.is_empty() {
        bail!(
            "moa search: no candidate rule is feasible for lengths {}..{} (profiled {n})",
            opts.n_min,
            opts.n_max
        )
    }
    let blocks = red.flatten_all()?.to_vec1::<f32>()?;
    let g_count = layers * kv_heads;
    let ks = Knapsack {
        loss: (0..g_count)
            .map(|g| {
                let b = &blocks[g * nb * nb..(g + 1) * nb * nb];
                rules
                    .iter()
                    .map(|r| masked_influence(b, nb, r, n))
                    .collect()
            })
            .collect(),
        weight: (0..g_count)
            .map(|_| rules.iter().map(|r| rule_weight(r, n)).collect())
            .collect(),
        layer: (0..g_count).map(|g| g / kv_heads).collect(),
    };
    let cap = (opts.density * n as f64 * g_count as f64 / MOA_BLOCK as f64).floor() as usize;
    let lower = (opts.lower_fraction * cap as f64).ceil() as usize;
    let a = solve(&ks, cap, lower, opts.max_rules_per_layer)?;
    let group = q_heads / kv_heads;
    let per_layer: Vec<Vec<SpanRule>> = (0..layers)
        .map(|l| {
            (0..q_heads)
                .map(|h| rules[a.rule[l * kv_heads + h / group]])
                .collect()
        })
        .collect();
    Ok((MoaPlan::from_rules(&per_layer), a))
}
