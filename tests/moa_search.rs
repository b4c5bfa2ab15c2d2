//! MoA plan search against brute force: the exact knapsack DP (with and without the per-layer rule
//! cap) vs enumerating every assignment, the masked influence of a rule vs its explicit block
//! mask, the candidate grid's filters, and a whole search on a synthetic profile.

use candle::{Device, Result, Tensor};
use candle_sparse_attn::moa::search::{
    candidate_rules, masked_influence, rule_weight, solve, Knapsack,
};
use candle_sparse_attn::moa::{search_plan, HeadSpan, MoaInfluence, SearchOptions, SpanRule};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The best objective over all assignments meeting the constraints, by enumeration.
fn brute_force(ks: &Knapsack, cap: usize, lower: usize, max_rules: Option<usize>) -> Option<f64> {
    let (g, r) = (ks.loss.len(), ks.loss[0].len());
    let mut best: Option<f64> = None;
    for code in 0..r.pow(g as u32) {
        let rule: Vec<usize> = (0..g).map(|i| code / r.pow(i as u32) % r).collect();
        let w: usize = (0..g).map(|i| ks.weight[i][rule[i]]).sum();
        if w > cap || w < lower {
            continue;
        }
        if let Some(k) = max_rules {
            let layers = ks.layer.iter().max().unwrap() + 1;
            let ok = (0..layers).all(|l| {
                let mut used: Vec<usize> = (0..g)
                    .filter(|&i| ks.layer[i] == l)
                    .map(|i| rule[i])
                    .collect();
                used.sort();
                used.dedup();
                used.len() <= k
            });
            if !ok {
                continue;
            }
        }
        let loss: f64 = (0..g).map(|i| ks.loss[i][rule[i]]).sum();
        if best.is_none_or(|b| loss < b) {
            best = Some(loss);
        }
    }
    best
}

#[test]
fn dp_matches_brute_force() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut compared = 0;
    for case in 0..300 {
        let (layers, per_layer, r) = (
            rng.random_range(1..=3),
            rng.random_range(1..=3),
            rng.random_range(1..=4usize),
        );
        let g = layers * per_layer;
        if r.pow(g as u32) > 200_000 {
            continue;
        }
        let ks = Knapsack {
            loss: (0..g)
                .map(|_| (0..r).map(|_| rng.random_range(0.0..10.0)).collect())
                .collect(),
            weight: (0..g)
                .map(|_| (0..r).map(|_| rng.random_range(1..=6)).collect())
                .collect(),
            layer: (0..g).map(|i| i / per_layer).collect(),
        };
        let cap = rng.random_range(g..=6 * g);
        let lower = if case % 2 == 0 {
            (cap as f64 * 0.9).ceil() as usize
        } else {
            0
        };
        for max_rules in [None, Some(1), Some(2)] {
            let want = brute_force(&ks, cap, lower, max_rules);
            match (solve(&ks, cap, lower, max_rules), want) {
                (Ok(a), Some(w)) => {
                    assert!(
                        (a.loss - w).abs() < 1e-9,
                        "case {case} {max_rules:?}: dp {} vs brute force {w}",
                        a.loss
                    );
                    // The assignment is consistent with its reported objective and constraints.
                    let loss: f64 = (0..g).map(|i| ks.loss[i][a.rule[i]]).sum();
                    let weight: usize = (0..g).map(|i| ks.weight[i][a.rule[i]]).sum();
                    assert!((loss - a.loss).abs() < 1e-9 && weight == a.weight);
                    assert!(weight <= cap && weight >= lower);
                    compared += 1;
                }
                (Err(e), None) => assert!(e.to_string().contains("no assignment"), "{e}"),
                (got, want) => {
                    panic!("case {case} {max_rules:?}: dp {got:?} vs brute force {want:?}")
                }
            }
        }
    }
    assert!(compared > 300, "only {compared} feasible comparisons");
}

#[test]
fn masked_influence_matches_the_block_mask() {
    let mut rng = StdRng::seed_from_u64(8);
    for n in [1000usize, 2048, 4096] {
        let nb = n.div_ceil(64);
        let blocks: Vec<f32> = (0..nb * nb).map(|_| rng.random()).collect();
        for rule in candidate_rules(1024, n, n) {
            let band_blocks = HeadSpan::resolve(&rule, n).band / 64;
            let mut want = 0.0;
            for qb in 0..nb {
                for kb in 0..=qb {
                    let kept = kb == 0 || kb + band_blocks > qb;
                    if !kept {
                        want += blocks[qb * nb + kb] as f64;
                    }
                }
            }
            let got = masked_influence(&blocks, nb, &rule, n);
            assert!(
                (got - want).abs() <= 1e-9 * want.max(1.0),
                "{rule:?} at {n}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn candidate_grid_filters() {
    let rules = candidate_rules(2048, 8192, 16384);
    assert!(!rules.is_empty() && rules.len() < 99);
    for r in &rules {
        assert!(r.alpha + r.beta * 8192.0 <= 8192.0);
        assert!(r.alpha + r.beta * 16384.0 <= 16384.0);
        assert!(r.alpha + r.beta * 2048.0 > 0.0);
        r.validate().unwrap();
    }
    assert!(rules.contains(&SpanRule {
        alpha: 0.0,
        beta: 0.5
    }));
    assert!(!rules.contains(&SpanRule {
        alpha: -2048.0,
        beta: 0.5
    })); // 0 at 4k... and ≤ 0 at 2k
    assert_eq!(
        rule_weight(
            &SpanRule {
                alpha: 1024.0,
                beta: 0.125
            },
            9216
        ),
        2176 / 64
    );
}

#[test]
fn search_plan_meets_the_density_bound() -> Result<()> {
    // A synthetic profile of 4 layers × 6 query heads (3 kv heads) at 2048 tokens: influence decays
    // with distance from the diagonal at a head-specific rate.
    let (layers, hq, hkv, n) = (4, 6, 3, 2048);
    let nb = n / 64;
    let mut data = Vec::new();
    for l in 0..layers {
        for h in 0..hq {
            let rate = 0.05 + 0.2 * ((l * hq + h) % 5) as f32;
            for qb in 0..nb {
                for kb in 0..nb {
                    data.push(if kb <= qb {
                        (-(rate * (qb - kb) as f32)).exp()
                    } else {
                        0.0
                    });
                }
            }
        }
    }
    let inf = MoaInfluence {
        blocks: Tensor::from_vec(data, (layers, hq, nb, nb), &Device::Cpu)?,
        length: n,
        items: 1,
    };
    for max_rules in [None, Some(2)] {
        let opts = SearchOptions {
            density: 0.5,
            lower_fraction: 0.9,
            max_rules_per_layer: max_rules,
            n_min: 1024,
            n_max: 8192,
        };
        let (plan, a) = search_plan(&inf, hkv, &opts)?;
        plan.validate_for(layers, hq)?;
        let spans = plan.resolve(n, layers, hq, hkv, true)?;
        let kept: usize = spans
            .iter()
            .flat_map(|l| l.spans.iter())
            .map(|s| s.size().min(n))
            .sum();
        let budget = 0.5 * (n * layers * hkv) as f64;
        assert!(
            kept as f64 <= budget && kept as f64 >= 0.9 * budget - 64.0,
            "kept {kept} of budget {budget}"
        );
        assert_eq!(a.weight * 64, kept);
        if max_rules == Some(2) {
            for l in 0..layers {
                let mut r: Vec<(u64, u64)> = (0..hq)
                    .map(|h| (plan.alphas[l][h].to_bits(), plan.betas[l][h].to_bits()))
                    .collect();
                r.sort();
                r.dedup();
                assert!(r.len() <= 2);
            }
        }
    }
    Ok(())
}
