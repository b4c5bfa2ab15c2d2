//! MoA plan search against brute force: the exact knapsack DP (one or several density
//! constraints, with and without the per-layer rule cap) vs enumerating every assignment, the
//! masked influence of a rule vs its explicit block mask, the candidate grid's filters, and whole
//! searches on synthetic profiles at one and at several lengths (bad inputs included).

use candle::{Device, Result, Tensor};
use candle_sparse_attn::moa::search::{
    candidate_rules, masked_influence, rule_weight, solve, Knapsack,
};
use candle_sparse_attn::moa::{search_plan, HeadSpan, MoaInfluence, SearchOptions, SpanRule};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The best objective over all assignments meeting the constraints, by enumeration.
fn brute_force(
    ks: &Knapsack,
    cap: &[usize],
    lower: &[usize],
    max_rules: Option<usize>,
) -> Option<f64> {
    let (g, r) = (ks.loss.len(), ks.loss[0].len());
    let mut best: Option<f64> = None;
    for code in 0..r.pow(g as u32) {
        let rule: Vec<usize> = (0..g).map(|i| code / r.pow(i as u32) % r).collect();
        let fits = (0..cap.len()).all(|d| {
            let w: usize = (0..g).map(|i| ks.weight[i][rule[i]][d]).sum();
            w <= cap[d] && w >= lower[d]
        });
        if !fits {
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
    let mut compared = [0; 3];
    for case in 0..600 {
        let (layers, per_layer, r, dims) = (
            rng.random_range(1..=3),
            rng.random_range(1..=3),
            rng.random_range(1..=4usize),
            rng.random_range(1..=3usize),
        );
        let g = layers * per_layer;
        if r.pow(g as u32) > 200_000 {
            continue;
        }
        // Weights share a factor in some constraints (the DP divides it out).
        let factor: Vec<usize> = (0..dims).map(|_| rng.random_range(1..=3)).collect();
        let ks = Knapsack {
            loss: (0..g)
                .map(|_| (0..r).map(|_| rng.random_range(0.0..10.0)).collect())
                .collect(),
            weight: (0..g)
                .map(|_| {
                    (0..r)
                        .map(|_| factor.iter().map(|f| f * rng.random_range(1..=6)).collect())
                        .collect()
                })
                .collect(),
            layer: (0..g).map(|i| i / per_layer).collect(),
        };
        let cap: Vec<usize> = factor
            .iter()
            .map(|f| rng.random_range(g * f..=6 * g * f))
            .collect();
        let lower: Vec<usize> = cap
            .iter()
            .map(|&c| {
                if case % 2 == 0 {
                    (c as f64 * 0.8).ceil() as usize
                } else {
                    0
                }
            })
            .collect();
        for max_rules in [None, Some(1), Some(2)] {
            let want = brute_force(&ks, &cap, &lower, max_rules);
            match (solve(&ks, &cap, &lower, max_rules), want) {
                (Ok(a), Some(w)) => {
                    assert!(
                        (a.loss - w).abs() < 1e-9,
                        "case {case} {max_rules:?}: dp {} vs brute force {w}",
                        a.loss
                    );
                    // The assignment is consistent with its reported objective and constraints.
                    let loss: f64 = (0..g).map(|i| ks.loss[i][a.rule[i]]).sum();
                    assert!((loss - a.loss).abs() < 1e-9);
                    for d in 0..dims {
                        let weight: usize = (0..g).map(|i| ks.weight[i][a.rule[i]][d]).sum();
                        assert_eq!(weight, a.weight[d]);
                        assert!(weight <= cap[d] && weight >= lower[d]);
                    }
                    compared[dims - 1] += 1;
                }
                (Err(e), None) => assert!(e.to_string().contains("no assignment"), "{e}"),
                (got, want) => {
                    panic!("case {case} {max_rules:?}: dp {got:?} vs brute force {want:?}")
                }
            }
        }
    }
    assert!(
        compared.iter().all(|&c| c > 100),
        "feasible comparisons per constraint count: {compared:?}"
    );
}

#[test]
fn solve_rejects_bad_instances() {
    let ks = Knapsack {
        loss: vec![vec![1.0, 2.0]],
        weight: vec![vec![vec![1, 3], vec![3, 1]]],
        layer: vec![0],
    };
    let err =
        |cap: &[usize], lower: &[usize], k| solve(&ks, cap, lower, k).unwrap_err().to_string();
    assert!(err(&[], &[], None).contains("capacities"));
    assert!(err(&[4], &[0], None).contains("weights of 1 constraints"));
    assert!(err(&[4, 4], &[0], None).contains("lower bounds"));
    assert!(err(&[4, 4], &[0, 0], Some(0)).contains("max rules"));
    // Each constraint alone can be met (rule 0 meets the first, rule 1 the second), not both.
    assert!(err(&[2, 2], &[0, 0], None).contains("no assignment"));
    assert!(err(&[4, 4], &[4, 0], None).contains("no assignment"));
    let mut nan = ks.clone();
    nan.loss[0][1] = f64::NAN;
    assert!(solve(&nan, &[4, 4], &[0, 0], None).is_err());
    let a = solve(&ks, &[4, 4], &[2, 0], None).unwrap();
    assert_eq!((a.rule, a.weight), (vec![1], vec![3, 1]));
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

/// A synthetic profile of `layers` × `hq` query heads at `n` tokens: influence decays with the
/// distance from the diagonal at a head-specific rate, faster at longer lengths for some heads.
fn synthetic_profile(layers: usize, hq: usize, n: usize) -> Result<MoaInfluence> {
    let nb = n.div_ceil(64);
    let mut data = Vec::new();
    for l in 0..layers {
        for h in 0..hq {
            let rate =
                0.05 + 0.2 * ((l * hq + h) % 5) as f32 * (n as f32 / 2048.0).powi(h as i32 % 2);
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
    Ok(MoaInfluence {
        blocks: Tensor::from_vec(data, (layers, hq, nb, nb), &Device::Cpu)?,
        length: n,
        items: 1,
    })
}

#[test]
fn search_plan_meets_the_density_bound_at_every_length() -> Result<()> {
    let (layers, hq, hkv) = (4, 6, 3);
    for lengths in [vec![2048], vec![2048, 1024], vec![1024, 2048, 4096]] {
        let profiles = lengths
            .iter()
            .map(|&n| synthetic_profile(layers, hq, n))
            .collect::<Result<Vec<_>>>()?;
        for max_rules in [None, Some(2)] {
            let opts = SearchOptions {
                density: 0.5,
                lower_fraction: 0.9,
                max_rules_per_layer: max_rules,
                n_min: 1024,
                n_max: 8192,
            };
            let found = search_plan(&profiles, hkv, &opts)?;
            let plan = &found.plan;
            let mut sorted = lengths.clone();
            sorted.sort();
            assert_eq!(found.lengths, sorted);
            assert_eq!(plan.profiled_lengths.as_ref(), Some(&sorted));
            plan.validate_for(layers, hq)?;
            for (i, &n) in sorted.iter().enumerate() {
                let spans = plan.resolve(n, layers, hq, hkv, true)?;
                let kept: usize = spans
                    .iter()
                    .flat_map(|l| l.spans.iter())
                    .map(|s| s.size().min(n))
                    .sum();
                let budget = 0.5 * (n * layers * hkv) as f64;
                assert!(
                    kept as f64 <= budget && kept as f64 >= 0.9 * budget - 64.0,
                    "{lengths:?} at {n}: kept {kept} of budget {budget}"
                );
                assert_eq!(found.assignment.weight[i] * 64, kept);
                let density = kept as f64 / (n * layers * hkv) as f64;
                assert!((found.density[i] - density).abs() < 1e-12);
                assert!((0.0..=1.0).contains(&found.masked_fraction[i]));
            }
            let objective: f64 = found.masked_fraction.iter().sum();
            assert!((objective - found.assignment.loss).abs() < 1e-9);
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
    }
    Ok(())
}

#[test]
fn search_plan_rejects_bad_profiles() -> Result<()> {
    let opts = SearchOptions {
        density: 0.5,
        lower_fraction: 0.9,
        max_rules_per_layer: Some(2),
        n_min: 1024,
        n_max: 8192,
    };
    let err = |profiles: &[MoaInfluence], opts: &SearchOptions| {
        search_plan(profiles, 3, opts).unwrap_err().to_string()
    };
    let (a, b) = (
        synthetic_profile(2, 6, 1024)?,
        synthetic_profile(2, 6, 2048)?,
    );
    assert!(err(&[], &opts).contains("no influence profile"));
    // Profiles of different models.
    let other = synthetic_profile(3, 6, 2048)?;
    let e = err(&[a.clone(), other], &opts);
    assert!(
        e.contains("different models") && e.contains("2 layers × 6 heads"),
        "{e}"
    );
    // The same length twice.
    assert!(err(&[b.clone(), a.clone(), b.clone()], &opts).contains("two profiles at 2048"));
    // Blocks that do not match the stated length.
    let mut wrong = b.clone();
    wrong.length = 4096;
    let e = err(&[a.clone(), wrong], &opts);
    assert!(
        e.contains("4096 tokens") && e.contains("[2, 6, 32, 32]"),
        "{e}"
    );
    // A density bound below the shortest span at the short length only: the minimum of 128
    // tokens is 25% of 512 but 12.5% of 2048 (beta = 0.125).
    let tight = SearchOptions {
        density: 0.2,
        n_min: 512,
        ..opts.clone()
    };
    let short = synthetic_profile(2, 6, 512)?;
    let e = err(&[short, b.clone()], &tight);
    assert!(e.contains("unreachable at 512 tokens"), "{e}");
    assert!(search_plan(std::slice::from_ref(&b), 3, &tight).is_ok());
    // The other extreme is feasible: full attention at every length.
    let greedy = SearchOptions {
        density: 1.0,
        lower_fraction: 1.0,
        n_min: 1024,
        n_max: 1024,
        ..opts.clone()
    };
    assert!(search_plan(&[a, b], 3, &greedy).is_ok());
    Ok(())
}
