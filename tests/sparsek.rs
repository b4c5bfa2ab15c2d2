//! SparseK attention against the dense f64 reference with the equivalent explicit mask and
//! weights (outputs and gradients of q, k, v and the scores), the SPARSEK operator against
//! sort / bisection references and finite differences, the decode cache against the full
//! computation, the scorer, and bad input. CUDA cases run with `--features cuda` on a GPU and
//! print a visible SKIP otherwise.

use candle::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use candle_sparse_attn::reference::{rel_err, repeat_kv};
use candle_sparse_attn::{
    sparsek, sparsek_attn, sparsek_attn_qkvpacked_taped, sparsek_attn_taped, PackedHeads,
    SparseKCache, SparseKConfig, SparseKScorer, SparseKScorerConfig,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

type R<T> = anyhow::Result<T>;

/// The SPARSEK threshold of `z` with budget `k` by bisection in f64 (`None` when `k ≥ m`).
fn tau_bisect(z: &[f64], k: f64) -> Option<f64> {
    if k >= z.len() as f64 {
        return None;
    }
    let f = |t: f64| z.iter().map(|x| (x - t).clamp(0.0, 1.0)).sum::<f64>();
    let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mn = z.iter().copied().fold(f64::INFINITY, f64::min);
    let (mut lo, mut hi) = (mn - 1.0, mx);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if f(mid) >= k {
            lo = mid
        } else {
            hi = mid
        }
    }
    Some(0.5 * (lo + hi))
}

/// Per (b, kv_head, query): (saturated keys U, strict-support keys S) of the reference selection:
/// top-`cap` of the candidates `j ≤ i − window` by `(u_j, j)`, SPARSEK over them by bisection.
fn reference_sets(
    u: &[f64],
    rows: usize,
    t: usize,
    k: usize,
    window: usize,
    cap: usize,
) -> Vec<(Vec<usize>, Vec<usize>)> {
    let mut out = Vec::new();
    for r in 0..rows {
        let u = &u[r * t..(r + 1) * t];
        for i in 0..t {
            let mut c: Vec<usize> = (0..t).filter(|&j| j + window <= i).collect();
            c.sort_by(|&a, &b| u[b].total_cmp(&u[a]).then(b.cmp(&a)));
            c.truncate(cap);
            let z: Vec<f64> = c.iter().map(|&j| u[j]).collect();
            match tau_bisect(&z, k as f64) {
                None => out.push((c, vec![])),
                Some(tau) => {
                    let p = |j: usize| u[j] - tau;
                    let sat = c.iter().copied().filter(|&j| p(j) >= 1.0 - 1e-9).collect();
                    let sup = c
                        .iter()
                        .copied()
                        .filter(|&j| p(j) > 1e-9 && p(j) < 1.0 - 1e-9)
                        .collect();
                    out.push((sat, sup))
                }
            }
        }
    }
    out
}

/// Dense weighted reference: `o = (softmax(scale q kᵀ | mask) ⊙ W) v`, with W built
/// differentiably from the scores `u` `(b, hkv, t)` (f64 Var) given the reference sets.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    u: &Tensor,
    cfg: &SparseKConfig,
    sets: &[(Vec<usize>, Vec<usize>)],
) -> R<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let rows = b * hkv;
    let (mut ms, mut mu, mut mw, mut n_s, mut n_u) = (
        vec![0f64; rows * t * t],
        vec![0f64; rows * t * t],
        vec![0f64; rows * t * t],
        vec![1f64; rows * t],
        vec![0f64; rows * t],
    );
    for r in 0..rows {
        for i in 0..t {
            let (sat, sup) = &sets[r * t + i];
            let base = (r * t + i) * t;
            for &j in sat {
                mu[base + j] = 1.0;
            }
            for &j in sup {
                ms[base + j] = 1.0;
            }
            for j in (i + 1).saturating_sub(cfg.window)..=i {
                if cfg.window > 0 {
                    mw[base + j] = 1.0;
                }
            }
            n_s[r * t + i] = sup.len().max(1) as f64;
            n_u[r * t + i] = sat.len() as f64;
        }
    }
    let dev = &Device::Cpu;
    let ms = Tensor::from_vec(ms, (b, hkv, t, t), dev)?;
    let mu = Tensor::from_vec(mu, (b, hkv, t, t), dev)?;
    let mw = Tensor::from_vec(mw, (b, hkv, t, t), dev)?;
    let n_s = Tensor::from_vec(n_s, (b, hkv, t, 1), dev)?;
    let n_u = Tensor::from_vec(n_u, (b, hkv, t, 1), dev)?;
    // τ_i = (Σ_S u + |U| − k) / |S|;  p = 1_S (u − τ) + 1_U.
    let tau = ((ms.matmul(&u.unsqueeze(3)?)? + n_u)? - cfg.k as f64)?.div(&n_s)?;
    let p = ms.mul(&u.unsqueeze(2)?.broadcast_sub(&tau)?)?.add(&mu)?;
    let w = (p + &mw)?;
    let mask = ((ms + mu)? + mw)?.gt(0.0)?;
    let g = hq / hkv;
    let rep = |x: &Tensor| -> R<Tensor> {
        Ok(x.unsqueeze(2)?
            .expand((b, hkv, g, t, t))?
            .reshape((b, hq, t, t))?)
    };
    let (w, mask) = (rep(&w)?, rep(&mask)?);
    let (kr, vr) = (repeat_kv(k, g)?, repeat_kv(v, g)?);
    let s = (q.matmul(&kr.t()?)? * cfg.scale(d) as f64)?;
    let s = mask.where_cond(&s, &Tensor::full(f64::NEG_INFINITY, s.shape(), dev)?)?;
    let a = candle_nn::ops::softmax(&s, D::Minus1)?;
    Ok(a.mul(&w)?.matmul(&vr)?)
}

struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
    cfg: SparseKConfig,
    /// Scores: `spread · N(0,1)` (+ `slope · j`), rounded to multiples of `quantum` if > 0.
    spread: f64,
    slope: f64,
    quantum: f64,
    seed: u64,
}

impl Case {
    fn new(t: usize, k: usize, window: usize) -> Self {
        Case {
            b: 2,
            hq: 4,
            hkv: 2,
            t,
            d: 32,
            cfg: SparseKConfig::new(k, window),
            spread: 0.7,
            slope: 0.0,
            quantum: 0.0,
            seed: 1,
        }
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    go: Tensor,
}

fn inputs(c: &Case) -> R<Inputs> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let dev = &Device::Cpu;
    let mut randn = |n: usize, s: f64| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                s * (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
            })
            .collect()
    };
    let (b, hq, hkv, t, d) = (c.b, c.hq, c.hkv, c.t, c.d);
    let q = Tensor::from_vec(randn(b * hq * t * d, 1.0), (b, hq, t, d), dev)?;
    let k = Tensor::from_vec(randn(b * hkv * t * d, 1.0), (b, hkv, t, d), dev)?;
    let v = Tensor::from_vec(randn(b * hkv * t * d, 1.0), (b, hkv, t, d), dev)?;
    let go = Tensor::from_vec(randn(b * hq * t * d, 1.0), (b, hq, t, d), dev)?;
    let mut u = randn(b * hkv * t, c.spread);
    for (n, x) in u.iter_mut().enumerate() {
        *x += c.slope * (n % t) as f64;
        if c.quantum > 0.0 {
            *x = (*x / c.quantum).round() * c.quantum;
        }
        *x = *x as f32 as f64 + 0.0; // f32-exact like the op's input; −0 → +0
    }
    let u = Tensor::from_vec(u, (b, hkv, t), dev)?;
    Ok(Inputs { q, k, v, u, go })
}

/// Runs the op on `dev` in `dtype` and the f64 reference; returns the relative errors of
/// (out, dq, dk, dv, du).
fn compare(c: &Case, dev: &Device, dtype: DType) -> R<[f64; 5]> {
    let x = inputs(c)?;
    let vars =
        |t: &Tensor, dt: DType, dev: &Device| Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?);
    let (q, k, v) = (
        vars(&x.q, dtype, dev)?,
        vars(&x.k, dtype, dev)?,
        vars(&x.v, dtype, dev)?,
    );
    let u = vars(&x.u, DType::F32, dev)?;
    let out = sparsek_attn(&q, &k, &v, &u, &c.cfg)?;
    let loss = out
        .to_dtype(DType::F32)?
        .mul(&x.go.to_dtype(DType::F32)?.to_device(dev)?)?
        .sum_all()?;
    let g = loss.backward()?;

    let (rq, rk, rv, ru) = (
        Var::from_tensor(&x.q)?,
        Var::from_tensor(&x.k)?,
        Var::from_tensor(&x.v)?,
        Var::from_tensor(&x.u)?,
    );
    let uh = x.u.flatten_all()?.to_vec1::<f64>()?;
    let sets = reference_sets(&uh, c.b * c.hkv, c.t, c.cfg.k, c.cfg.window, c.cfg.cap());
    let rout = reference(&rq, &rk, &rv, &ru, &c.cfg, &sets)?;
    let rg = rout.mul(&x.go)?.sum_all()?.backward()?;
    let grad = |g: &candle::backprop::GradStore, v: &Var| -> R<Tensor> {
        Ok(g.get(v)
            .ok_or_else(|| anyhow::anyhow!("missing gradient"))?
            .clone())
    };
    Ok([
        rel_err(&out, &rout)?,
        rel_err(&grad(&g, &q)?, &grad(&rg, &rq)?)?,
        rel_err(&grad(&g, &k)?, &grad(&rg, &rk)?)?,
        rel_err(&grad(&g, &v)?, &grad(&rg, &rv)?)?,
        rel_err(&grad(&g, &u)?, &grad(&rg, &ru)?)?,
    ])
}

fn check(name: &str, c: &Case, dev: &Device, dtype: DType, tol: f64) -> R<()> {
    let e = compare(c, dev, dtype)?;
    println!(
        "{name} {dtype:?} {:?}: out {:.2e} dq {:.2e} dk {:.2e} dv {:.2e} du {:.2e}",
        dev.location(),
        e[0],
        e[1],
        e[2],
        e[3],
        e[4]
    );
    for (what, err) in ["out", "dq", "dk", "dv", "du"].iter().zip(e) {
        anyhow::ensure!(err < tol, "{name}: {what} rel err {err:.3e} ≥ {tol:e}");
    }
    Ok(())
}

/// The attention cases shared by the CPU and CUDA tests.
fn cases() -> Vec<(&'static str, Case)> {
    let mut v = vec![
        ("gqa_t77_k4_w8", Case::new(77, 4, 8)),
        ("k1_window0", Case::new(50, 1, 0)),
        ("early_positions_all_selected", Case::new(20, 12, 8)),
        ("window_only_k_large", Case::new(40, 64, 40)),
    ];
    let mut ties = Case::new(70, 5, 6);
    ties.quantum = 0.5;
    ties.seed = 3;
    v.push(("ties", ties));
    let mut flat = Case::new(90, 6, 4);
    flat.spread = 0.05;
    flat.cfg.max_selected = Some(9);
    flat.seed = 4;
    v.push(("flat_scores_capped", flat));
    // Heavy duplication: the oldest keys score high, so every query picks the same few keys.
    let mut dup = Case::new(130, 3, 4);
    dup.slope = -0.05;
    dup.spread = 0.3;
    dup.hq = 8;
    dup.seed = 5;
    v.push(("heavy_duplication", dup));
    let mut mha = Case::new(65, 8, 16);
    mha.hq = 2;
    mha.d = 64;
    mha.slope = 0.02;
    mha.seed = 6;
    v.push(("mha_d64_slope", mha));
    // Tiling of the CUDA tensor-core kernels (blocks of 64 queries, tiles of 64 keys): lengths
    // around multiples of 64, windows that are not, lists of several tiles, many queries (and a
    // GQA group of 4 heads) adding into the same keys.
    let mut t129 = Case::new(129, 10, 70);
    t129.d = 64;
    t129.slope = 0.01;
    t129.seed = 7;
    v.push(("tiles_t129_w70_d64", t129));
    let mut t200 = Case::new(192, 40, 0);
    t200.cfg.max_selected = Some(80);
    t200.seed = 8;
    v.push(("tiles_t192_window0_cap80", t200));
    let mut same = Case::new(257, 6, 64);
    same.hq = 4;
    same.hkv = 1;
    same.d = 64;
    same.slope = -0.05;
    same.spread = 0.3;
    same.seed = 9;
    v.push(("tiles_t257_gqa4_same_keys", same));
    let mut d96 = Case::new(255, 30, 33);
    d96.b = 1;
    d96.hq = 2;
    d96.d = 96;
    d96.slope = 0.003;
    d96.seed = 10;
    v.push(("tiles_t255_w33_d96", d96));
    // Head dim 128 (the Hopper kernels' second size): GQA pair, lists of two tiles.
    let mut d128 = Case::new(203, 70, 45);
    d128.b = 1;
    d128.hq = 4;
    d128.hkv = 2;
    d128.d = 128;
    d128.slope = 0.005;
    d128.seed = 21;
    v.push(("tiles_t203_w45_d128_gqa", d128));
    // Windows longer than two tiles: band tiles inside every query's window (no weight test),
    // lists of two tiles.
    let mut full = Case::new(300, 40, 150);
    full.hq = 4;
    full.hkv = 2;
    full.d = 64;
    full.slope = 0.01;
    full.seed = 11;
    v.push(("tiles_t300_w150_full_band", full));
    // Seven query blocks (the last one partial) with lists of four tiles that change from block
    // to block (the kernels prefetch the keys of tile t + 2 while tile t computes).
    let mut long = Case::new(420, 100, 37);
    long.b = 1;
    long.d = 64;
    long.slope = 0.004;
    long.seed = 12;
    v.push(("tiles_t420_w37_long_lists", long));
    // Eighteen query blocks with K′ = 40 < 64 (a block adds more keys than a list holds): long
    // chains of list merges.
    let mut groups = Case::new(1100, 20, 30);
    groups.b = 1;
    groups.hq = 1;
    groups.hkv = 1;
    groups.d = 64;
    groups.slope = 0.002;
    groups.seed = 13;
    v.push(("list_groups_t1100", groups));
    // Sixteen query blocks with K′ = 100, tied scores and a short window: about one query in
    // seven has its cut among its block's newer candidates, at many ranks there (sk_select's
    // sorted extras), the rest in the block's list.
    let mut cuts = Case::new(1000, 50, 20);
    cuts.b = 1;
    cuts.hq = 2;
    cuts.hkv = 1;
    cuts.d = 64;
    cuts.quantum = 0.25;
    cuts.cfg.max_selected = Some(100);
    cuts.seed = 14;
    v.push(("cuts_among_newer_t1000", cuts));
    v
}

#[test]
fn cpu_matches_reference() -> R<()> {
    for (name, c) in cases() {
        check(name, &c, &Device::Cpu, DType::F32, 2e-4)?;
    }
    Ok(())
}

#[test]
fn cpu_bf16_close() -> R<()> {
    check(
        "gqa_bf16",
        &Case::new(77, 4, 8),
        &Device::Cpu,
        DType::BF16,
        3e-2,
    )
}

#[test]
fn early_positions_equal_dense_causal() -> R<()> {
    // t ≤ k + window: every causal key is attended with weight 1 = dense causal attention.
    let c = Case::new(24, 16, 8);
    let x = inputs(&c)?;
    let (q, k, v) = (
        x.q.to_dtype(DType::F32)?,
        x.k.to_dtype(DType::F32)?,
        x.v.to_dtype(DType::F32)?,
    );
    let out = sparsek_attn(&q, &k, &v, &x.u.to_dtype(DType::F32)?, &c.cfg)?;
    let m = candle_sparse_attn::reference::mask(
        &candle_sparse_attn::Visibility::Causal,
        (c.b, c.hq, c.hkv, c.t, c.t),
    )?;
    let dense = candle_sparse_attn::reference::attention(
        &x.q,
        &x.k,
        &x.v,
        c.cfg.scale(c.d) as f64,
        Some(&m),
    )?;
    let e = rel_err(&out, &dense)?;
    anyhow::ensure!(e < 1e-5, "early positions vs dense causal: {e}");
    Ok(())
}

#[test]
fn bad_input_errors() -> R<()> {
    let c = Case::new(16, 2, 4);
    let x = inputs(&c)?;
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (q, k, v, u) = (f(&x.q), f(&x.k), f(&x.v), f(&x.u));
    let msg = |r: candle::Result<Tensor>| match r {
        Ok(_) => "no error".to_string(),
        Err(e) => e.to_string(),
    };
    let e = msg(sparsek_attn(&q, &k, &v, &u, &SparseKConfig::new(0, 4)));
    assert!(e.contains("k must be at least 1"), "{e}");
    let e = msg(sparsek_attn(&q, &k, &v, &u, &SparseKConfig::new(2, 17)));
    assert!(e.contains("window 17") && e.contains("16"), "{e}");
    let e = msg(sparsek_attn(&q, &k, &v, &u.narrow(2, 0, 8)?, &c.cfg));
    assert!(
        e.contains("scores") && e.contains("[2, 2, 16]") && e.contains("[2, 2, 8]"),
        "{e}"
    );
    let e = msg(sparsek_attn(&q, &k, &v, &u.to_dtype(DType::F64)?, &c.cfg));
    assert!(e.contains("f32"), "{e}");
    let mut capped = c.cfg;
    capped.max_selected = Some(1);
    let e = msg(sparsek_attn(&q, &k, &v, &u, &capped));
    assert!(e.contains("max_selected"), "{e}");
    let e = msg(sparsek_attn(&q, &k.narrow(2, 0, 8)?, &v, &u, &c.cfg));
    assert!(e.contains("k [2, 2, 8, 32]"), "{e}");
    let nan = u.affine(0.0, f64::NAN)?;
    let e = msg(sparsek_attn(&q, &k, &v, &nan, &c.cfg));
    assert!(e.contains("NaN"), "{e}");
    let e = msg(sparsek(&u, 0.0));
    assert!(e.contains("k must be"), "{e}");
    Ok(())
}

/// `sparsek_attn_qkvpacked_taped` on heads packed in projection rows (GQA, 8 columns past q, k, v
/// that it must not read and whose gradient is zero, a length not a multiple of the tile) equals
/// splitting the heads out and calling `sparsek_attn_taped`: output and gradients. On an H100 in
/// f16 / bf16 this is the in-place path (the Hopper kernels on the rows), elsewhere the copies.
fn packed_suite(dev: &Device) -> R<()> {
    let (b, hq, hkv, t, d, extra) = (2, 4, 2, 200, 64, 8);
    let heads = PackedHeads {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
    };
    let width = (hq + 2 * hkv) * d + extra;
    let mut rng = StdRng::seed_from_u64(41);
    let mut randn = |shape: &[usize], s: f32| -> R<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (a, c): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                s * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * c).cos()
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, dev)?)
    };
    let (qkv, u, dy) = (
        randn(&[b, t, width], 1.0)?,
        randn(&[b, hkv, t], 0.7)?,
        randn(&[b, t, hq * d], 1.0)?,
    );
    let cfg = SparseKConfig::new(24, 40);
    let heads_of = |x: &Tensor, at: usize, h: usize| -> R<Tensor> {
        Ok(x.narrow(2, at * d, h * d)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let merged = |x: &Tensor| -> R<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b, t, h * d))?)
    };
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 1e-3)] {
        let (qkv, dy) = (qkv.to_dtype(dtype)?, dy.to_dtype(dtype)?);
        let (y, tape) = sparsek_attn_qkvpacked_taped(&qkv, heads, &u, &cfg)?;
        let g = tape.grads_qkvpacked(&dy)?;
        let (q, k, v) = (
            heads_of(&qkv, 0, hq)?,
            heads_of(&qkv, hq, hkv)?,
            heads_of(&qkv, hq + hkv, hkv)?,
        );
        let (y_ref, tape_ref) = sparsek_attn_taped(&q, &k, &v, &u, &cfg)?;
        let g_ref = tape_ref.grads(&heads_of(&dy, 0, hq)?)?;
        let zeros = Tensor::zeros((b, t, extra), dtype, dev)?;
        let dqkv_ref = Tensor::cat(
            &[
                merged(&g_ref.dq)?,
                merged(&g_ref.dk)?,
                merged(&g_ref.dv)?,
                zeros.clone(),
            ],
            2,
        )?;
        let dscores_ref = g_ref.dscores.expect("sparsek tapes give dscores");
        anyhow::ensure!(y.dims() == [b, t, hq * d] && g.dqkv.dims() == [b, t, width]);
        for (what, got, want) in [
            ("out", &y, &merged(&y_ref)?),
            ("dqkv", &g.dqkv, &dqkv_ref),
            ("dscores", &g.dscores, &dscores_ref),
        ] {
            let err = rel_err(got, want)?;
            println!(
                "packed {dtype:?} {:?}: {what} rel err {err:.2e}",
                dev.location()
            );
            anyhow::ensure!(
                err <= tol,
                "packed {dtype:?} {what}: rel err {err:.3e} > {tol:e}"
            );
        }
        let past = g
            .dqkv
            .narrow(2, width - extra, extra)?
            .to_dtype(DType::F32)?;
        anyhow::ensure!(past.abs()?.max_all()?.to_scalar::<f32>()? == 0.0);
        // A scorer folded in after v: the folded gradients (written by the backward's band kernel
        // on Hopper) equal the unfolded ones followed by the scorer's own backward.
        let vm = VarMap::new();
        let scorer_cfg = SparseKScorerConfig {
            slope_init: 0.3,
            ..SparseKScorerConfig::new(16, hkv)
        };
        let scorer = SparseKScorer::new(scorer_cfg, VarBuilder::from_varmap(&vm, DType::F32, dev))?;
        let col = (hq + 2 * hkv) * d;
        let (dqkv_folded, dslope) = tape.grads_qkvpacked_folded(&dy, &scorer, col, 3)?;
        let dslope_ref = scorer.backward_linear_into(&g.dscores, 3, &g.dqkv, col)?;
        let cols_err = rel_err(&dqkv_folded, &g.dqkv)?;
        let slope_err = rel_err(&dslope, &dslope_ref)?;
        anyhow::ensure!(
            cols_err <= 1e-6 && slope_err <= 1e-4,
            "packed {dtype:?} folded scorer: dqkv rel err {cols_err:.3e}, dslope {slope_err:.3e}"
        );
        // The tapes refuse each other's gradient calls.
        let e = tape.grads(&dy).map(|_| ()).unwrap_err().to_string();
        anyhow::ensure!(e.contains("grads_qkvpacked"), "{e}");
        let e = tape_ref
            .grads_qkvpacked(&dy)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        anyhow::ensure!(e.contains("call grads"), "{e}");
        let e = tape_ref
            .grads_qkvpacked_folded(&dy, &scorer, col, 0)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        anyhow::ensure!(e.contains("grads_qkvpacked_folded needs"), "{e}");
    }
    let narrow = qkv.narrow(2, 0, (hq + 2 * hkv) * d - 1)?;
    let e = sparsek_attn_qkvpacked_taped(&narrow, heads, &u, &cfg)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    anyhow::ensure!(e.contains("narrower") && e.contains("511"), "{e}");
    let e = sparsek_attn_qkvpacked_taped(&qkv.flatten(0, 1)?, heads, &u, &cfg)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    anyhow::ensure!(e.contains("(batch, seq, width)"), "{e}");
    Ok(())
}

#[test]
fn qkvpacked_matches_split_heads() -> R<()> {
    packed_suite(&Device::Cpu)
}

#[test]
fn cuda_qkvpacked_matches_split_heads() -> R<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    packed_suite(&dev)
}

/// The scorer's initial weight has std `score_std / √d_model`; bad init settings are errors.
#[test]
fn scorer_init_spread_and_bad_config() -> R<()> {
    let dev = Device::Cpu;
    let (dm, h) = (400, 8);
    for score_std in [std::f64::consts::SQRT_2, 4.0] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let cfg = SparseKScorerConfig {
            score_std,
            ..SparseKScorerConfig::new(dm, h)
        };
        let scorer = SparseKScorer::new(cfg, vb.pp("scorer"))?;
        let w = scorer.params()[0].flatten_all()?.to_vec1::<f32>()?;
        let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
        let want = score_std / (dm as f64).sqrt();
        anyhow::ensure!(
            (var.sqrt() / want - 1.0).abs() < 0.05,
            "weight std {} for score_std {score_std}, want {want}",
            var.sqrt()
        );
    }
    for (slope_init, score_std, what) in [
        (0.0, 4.0, "slope_init"),
        (1e-3, 0.0, "score_std"),
        (1e-3, f64::NAN, "score_std"),
    ] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let cfg = SparseKScorerConfig {
            slope_init,
            score_std,
            ..SparseKScorerConfig::new(dm, h)
        };
        let e = match SparseKScorer::new(cfg, vb) {
            Ok(_) => "no error".to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(what) && e.contains("must be > 0"), "{e}");
    }
    Ok(())
}

/// SPARSEK rows against the bisection reference; p sums to k and lies in [0, 1].
fn check_project(z: &[f32], m: usize, k: f64, dev: &Device) -> R<()> {
    let zt = Tensor::from_vec(z.to_vec(), (z.len() / m, m), &Device::Cpu)?.to_device(dev)?;
    let p = sparsek(&zt, k)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    for (row, p) in z.chunks(m).zip(&p) {
        let zz: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let want: Vec<f64> = match tau_bisect(&zz, k) {
            None => vec![1.0; m],
            Some(t) => zz.iter().map(|x| (x - t).clamp(0.0, 1.0)).collect(),
        };
        for (a, b) in p.iter().zip(&want) {
            anyhow::ensure!(
                (*a as f64 - b).abs() < 2e-5,
                "sparsek {row:?} k={k}: {p:?} vs {want:?}"
            );
        }
        let s: f64 = p.iter().map(|&x| x as f64).sum();
        anyhow::ensure!((s - k.min(m as f64)).abs() < 1e-4, "sum {s} k {k}");
    }
    Ok(())
}

fn project_suite(dev: &Device) -> R<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let z: Vec<f32> = (0..40 * 33)
        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
        .collect();
    for k in [1.0, 2.5, 7.0, 32.0, 33.0, 50.0] {
        check_project(&z, 33, k, dev)?;
    }
    // Ties, hard top-k (gap ≥ 1), all equal, a single entry.
    check_project(&[1.0, 1.0, 1.0, 0.0, 3.0, 3.0], 6, 2.0, dev)?;
    check_project(&[5.0, 4.0, 0.5, 0.1], 4, 2.0, dev)?;
    check_project(&[0.3; 8], 8, 3.0, dev)?;
    check_project(&[2.0], 1, 1.0, dev)?;
    check_project(&[2.0, -7.0, 1e4, -1e4], 4, 1.5, dev)?;
    Ok(())
}

#[test]
fn sparsek_projection_cpu() -> R<()> {
    project_suite(&Device::Cpu)
}

#[test]
fn sparsek_projection_sort_reference() -> R<()> {
    // Independent brute force: sort, then try every (U, W) pair for a consistent τ.
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..50 {
        let m = rng.random_range(2..20);
        let k = rng.random_range(1..m) as f64 + if rng.random::<bool>() { 0.5 } else { 0.0 };
        if k >= m as f64 {
            continue;
        }
        let z: Vec<f32> = (0..m)
            .map(|_| (rng.random::<f32>() * 6.0).round() / 2.0)
            .collect();
        let mut s: Vec<f64> = z.iter().map(|&x| x as f64).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        let f = |t: f64| s.iter().map(|x| (x - t).clamp(0.0, 1.0)).sum::<f64>();
        let mut tau = None;
        'outer: for u in 0..=m {
            for w in u + 1..=m {
                let sum: f64 = s[u..w].iter().sum();
                let t = (sum + u as f64 - k) / (w - u) as f64;
                if (f(t) - k).abs() < 1e-9 {
                    tau = Some(t);
                    break 'outer;
                }
            }
        }
        let tau = tau.or_else(|| tau_bisect(&s, k)).unwrap();
        let p = sparsek(&Tensor::from_vec(z.clone(), m, &Device::Cpu)?, k)?.to_vec1::<f32>()?;
        for (a, x) in p.iter().zip(&z) {
            let want = (*x as f64 - tau).clamp(0.0, 1.0);
            anyhow::ensure!((*a as f64 - want).abs() < 1e-5, "{z:?} k={k}: {p:?}");
        }
    }
    Ok(())
}

fn project_grad_suite(dev: &Device) -> R<()> {
    // Finite differences of L = Σ c ⊙ SPARSEK(z, k) (piecewise linear: exact away from kinks).
    let mut rng = StdRng::seed_from_u64(13);
    let (rows, m, k) = (6, 17, 4.5);
    let z: Vec<f32> = (0..rows * m).map(|_| rng.random::<f32>() * 3.0).collect();
    let c: Vec<f32> = (0..rows * m).map(|_| rng.random::<f32>() - 0.5).collect();
    let ct = Tensor::from_vec(c.clone(), (rows, m), dev)?;
    let zv = Var::from_tensor(&Tensor::from_vec(z.clone(), (rows, m), dev)?)?;
    let g = sparsek(&zv, k)?.mul(&ct)?.sum_all()?.backward()?;
    let g = g
        .get(&zv)
        .unwrap()
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let loss = |z: &[f32]| -> R<f64> {
        let p = sparsek(&Tensor::from_vec(z.to_vec(), (rows, m), &Device::Cpu)?, k)?;
        Ok(
            p.mul(&Tensor::from_vec(c.clone(), (rows, m), &Device::Cpu)?)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        )
    };
    let eps = 1e-3f32;
    for n in 0..rows * m {
        let (mut a, mut b) = (z.clone(), z.clone());
        a[n] += eps;
        b[n] -= eps;
        let fd = (loss(&a)? - loss(&b)?) / (2.0 * eps as f64);
        anyhow::ensure!(
            (fd - g[n] as f64).abs() < 2e-3,
            "fd {fd} vs {} at {n}",
            g[n]
        );
    }
    Ok(())
}

#[test]
fn sparsek_projection_grad_fd() -> R<()> {
    project_grad_suite(&Device::Cpu)
}

/// Decode through the cache (optionally after a prefill) equals the full computation, and the
/// cache never holds more than window + K′ tokens per head.
fn cache_suite(dev: &Device, prefill: usize) -> R<()> {
    let mut c = Case::new(120, 4, 6);
    c.cfg.max_selected = Some(7);
    c.slope = 0.01;
    let x = inputs(&c)?;
    let f = |t: &Tensor| -> R<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(dev)?) };
    let (q, k, v, u) = (f(&x.q)?, f(&x.k)?, f(&x.v)?, f(&x.u)?);
    let full = sparsek_attn(&q, &k, &v, &u, &c.cfg)?;
    let mut cache = SparseKCache::new(c.cfg)?;
    let mut outs = Vec::new();
    if prefill > 0 {
        let n = |t: &Tensor| t.narrow(2, 0, prefill);
        outs.push(cache.prefill(&n(&q)?, &n(&k)?, &n(&v)?, &n(&u)?)?);
    }
    for i in prefill..c.t {
        let n = |t: &Tensor| t.narrow(2, i, 1);
        outs.push(cache.step(&n(&q)?, &n(&k)?, &n(&v)?, &n(&u)?)?);
        for r in cache.retained() {
            anyhow::ensure!(r <= c.cfg.window + c.cfg.cap(), "cache holds {r} tokens");
        }
    }
    let dec = Tensor::cat(&outs, 2)?;
    let e = rel_err(&dec, &full)?;
    println!(
        "cache (prefill {prefill}) {:?}: rel err {e:.2e}",
        dev.location()
    );
    anyhow::ensure!(e < 1e-5, "decode vs full: {e}");
    Ok(())
}

#[test]
fn cache_decode_matches_full() -> R<()> {
    cache_suite(&Device::Cpu, 0)?;
    cache_suite(&Device::Cpu, 37)
}

#[test]
fn scorer_trains_end_to_end() -> R<()> {
    let dev = Device::Cpu;
    let (b, t, dm, hq, hkv, d) = (2, 40, 16, 4, 2, 32);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let scorer = SparseKScorer::new(SparseKScorerConfig::new(dm, hkv), vb.pp("scorer"))?;
    let slopes = scorer.slopes()?.to_vec1::<f32>()?;
    assert!(slopes.iter().all(|s| (s - 1e-3).abs() < 1e-6), "{slopes:?}");
    let x = Tensor::randn(0f32, 1., (b, t, dm), &dev)?;
    let u = scorer.forward(&x)?;
    assert_eq!(u.dims(), &[b, hkv, t]);
    let q = Tensor::randn(0f32, 1., (b, hq, t, d), &dev)?;
    let k = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev)?;
    let v = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev)?;
    let out = sparsek_attn(&q, &k, &v, &u, &SparseKConfig::new(4, 4))?;
    let go = Tensor::randn(0f32, 1., out.shape(), &dev)?;
    let g = out.mul(&go)?.sum_all()?.backward()?;
    for (name, var) in vm.data().lock().unwrap().iter() {
        let gv = g
            .get(var)
            .ok_or_else(|| anyhow::anyhow!("{name}: no gradient"))?;
        let n = gv.abs()?.sum_all()?.to_scalar::<f32>()?;
        anyhow::ensure!(n > 0.0, "{name}: zero gradient");
    }
    // Decode positions: forward_at shifts the slope term only.
    let tail = scorer.forward_at(&x.narrow(1, 30, 10)?, 30)?;
    anyhow::ensure!(rel_err(&tail, &u.narrow(2, 30, 10)?)? < 1e-6);
    Ok(())
}

/// The scorer op against an f64 host reference on `dev`: scores, the no-autograd backward (with
/// and without `dx_add`) and autograd, for f32 and bf16 inputs; heads past one 8-head chunk of the
/// CUDA kernels, widths and row counts that are not multiples of the kernels' tiles, an offset.
fn scorer_suite(dev: &Device) -> R<()> {
    // Widths: multiples of the CUDA dx kernel's 16-byte vector, 20 (not one for bf16), and
    // 1000 x 9 heads (w too large for its shared memory).
    for (b, t, dm, h, offset) in [
        (2, 75, 40, 3, 0),
        (1, 130, 96, 10, 17),
        (1, 33, 20, 2, 5),
        (1, 40, 1000, 9, 3),
    ] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
        let cfg = SparseKScorerConfig {
            slope_init: 0.05,
            ..SparseKScorerConfig::new(dm, h)
        };
        let scorer = SparseKScorer::new(cfg, vb.pp("scorer"))?;
        let [w, rho] = scorer.params();
        let (wv, rv) = (w.to_vec2::<f32>()?, rho.to_vec1::<f32>()?);
        let delta: Vec<f64> = rv.iter().map(|&r| (r as f64).exp().ln_1p()).collect();
        let sig: Vec<f64> = rv
            .iter()
            .map(|&r| 1.0 / (1.0 + (-r as f64).exp()))
            .collect();
        for dtype in [DType::F32, DType::BF16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let x = Tensor::randn(0f32, 1., (b, t, dm), dev)?.to_dtype(dtype)?;
            let du = Tensor::randn(0f32, 1., (b, h, t), dev)?;
            let add = Tensor::randn(0f32, 1., (b, t, dm), dev)?.to_dtype(dtype)?;
            let xv = x.to_dtype(DType::F64)?.to_vec3::<f64>()?;
            let duv = du.to_dtype(DType::F64)?.to_vec3::<f64>()?;
            let (mut u, mut dx) = (vec![0f64; b * h * t], vec![0f64; b * t * dm]);
            let (mut dw, mut drho) = (vec![0f64; h * dm], vec![0f64; h]);
            for bi in 0..b {
                for j in 0..t {
                    for hi in 0..h {
                        let pos = (offset + j) as f64;
                        let g = duv[bi][hi][j];
                        let dot: f64 = (0..dm).map(|c| xv[bi][j][c] * wv[hi][c] as f64).sum();
                        u[(bi * h + hi) * t + j] = dot + delta[hi] * pos;
                        for c in 0..dm {
                            dx[(bi * t + j) * dm + c] += g * wv[hi][c] as f64;
                            dw[hi * dm + c] += g * xv[bi][j][c];
                        }
                        drho[hi] += g * pos * sig[hi];
                    }
                }
            }
            let host = |v: Vec<f64>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu);
            let (u_ref, dx_ref) = (host(u, &[b, h, t])?, host(dx, &[b, t, dm])?);
            let (dw_ref, drho_ref) = (host(dw, &[h, dm])?, host(drho, &[h])?);
            let on_host = |t: &Tensor| t.to_device(&Device::Cpu);
            let check = |what: &str, got: &Tensor, want: &Tensor| -> R<()> {
                let err = rel_err(&on_host(got)?, want)?;
                anyhow::ensure!(
                    err <= tol,
                    "scorer {dtype:?} h={h}: {what} rel err {err:.2e}"
                );
                Ok(())
            };
            check("scores", &scorer.scores(&x, offset)?, &u_ref)?;
            let g = scorer.backward(&x, offset, &du, None)?;
            anyhow::ensure!(g.dx.dtype() == dtype && g.dx.dims() == [b, t, dm]);
            check("dx", &g.dx, &dx_ref)?;
            check("dw", &g.weight, &dw_ref)?;
            check("drho", &g.slope, &drho_ref)?;
            let g = scorer.backward(&x, offset, &du, Some(&add))?;
            let want = (&dx_ref + on_host(&add)?.to_dtype(DType::F64)?)?;
            check("dx + dx_add", &g.dx, &want)?;
            // Autograd through forward_at: the same gradients.
            let xvar = Var::from_tensor(&x)?;
            let u = scorer.forward_at(xvar.as_tensor(), offset)?;
            check("forward_at", &u, &u_ref)?;
            let grads = u.mul(&du)?.sum_all()?.backward()?;
            let got = |t: &Tensor| grads.get(t).cloned().ok_or(anyhow::anyhow!("no gradient"));
            check("autograd dx", &got(xvar.as_tensor())?, &dx_ref)?;
            check("autograd dw", &got(w)?, &dw_ref)?;
            check("autograd drho", &got(rho)?, &drho_ref)?;
            // Folded into a wider projection (5 columns before the scorer's rows, 3 zero rows
            // after): scores from the view of its columns, gradients padded to its width.
            let (before, width) = (5, h + 3);
            let wext = Tensor::cat(
                &[
                    &Tensor::randn(0f32, 1., (before, dm), dev)?,
                    w,
                    &Tensor::zeros((3, dm), DType::F32, dev)?,
                ],
                0,
            )?;
            let x32 = x.to_dtype(DType::F32)?;
            let proj = x32.broadcast_matmul(&wext.t()?)?.to_dtype(dtype)?;
            let lin = proj.narrow(2, before, h)?;
            check(
                "scores_from_linear",
                &scorer.scores_from_linear(&lin, offset)?,
                &u_ref,
            )?;
            let (dlin, dslope) = scorer.backward_linear(&du, offset, dtype, width)?;
            anyhow::ensure!(dlin.dtype() == dtype && dlin.dims() == [b, t, width]);
            let du_t = du
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .transpose(1, 2)?;
            check("backward_linear dlin", &dlin.narrow(2, 0, h)?, &du_t)?;
            let pad = dlin
                .narrow(2, h, 3)?
                .to_dtype(DType::F32)?
                .abs()?
                .sum_all()?;
            anyhow::ensure!(
                pad.to_scalar::<f32>()? == 0.0,
                "backward_linear: padding not zero"
            );
            check("backward_linear drho", &dslope, &drho_ref)?;
            let dw = dlin
                .narrow(2, 0, h)?
                .to_dtype(DType::F32)?
                .reshape((b * t, h))?
                .t()?
                .matmul(&x32.reshape((b * t, dm))?)?;
            check("backward_linear dw", &dw, &dw_ref)?;
            // In place, into columns [2, 2 + h) of a wider tensor: the same gradient there, the
            // other columns untouched.
            let fill = Tensor::ones((b, t, h + 5), dtype, dev)?;
            let dst = (&fill * 7.0)?;
            let dslope_into = scorer.backward_linear_into(&du, offset, &dst, 2)?;
            check("backward_linear_into drho", &dslope_into, &drho_ref)?;
            let want = dlin.narrow(2, 0, h)?.to_dtype(DType::F32)?;
            let got = dst.narrow(2, 2, h)?.to_dtype(DType::F32)?;
            anyhow::ensure!(
                (got - want)?.abs()?.sum_all()?.to_scalar::<f32>()? == 0.0,
                "backward_linear_into: columns differ from backward_linear"
            );
            for (start, len) in [(0, 2), (2 + h, 3)] {
                let rest = dst.narrow(2, start, len)?.to_dtype(DType::F32)?;
                anyhow::ensure!(
                    rest.min_keepdim(2)?
                        .min_keepdim(1)?
                        .min_keepdim(0)?
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        == [7.0]
                        && rest
                            .max_keepdim(2)?
                            .max_keepdim(1)?
                            .max_keepdim(0)?
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            == [7.0],
                    "backward_linear_into: columns outside the target changed"
                );
            }
        }
        // Bad input: clear errors.
        let x = Tensor::zeros((b, t, dm), DType::F32, dev)?;
        anyhow::ensure!(scorer.scores(&x.narrow(2, 0, dm - 1)?, 0).is_err());
        anyhow::ensure!(scorer.scores(&x.flatten_to(1)?, 0).is_err());
        let du = Tensor::zeros((b, h, t + 1), DType::F32, dev)?;
        anyhow::ensure!(scorer.backward(&x, 0, &du, None).is_err());
        let du = Tensor::zeros((b, h, t), DType::BF16, dev)?;
        anyhow::ensure!(scorer.backward(&x, 0, &du, None).is_err());
        anyhow::ensure!(scorer.backward_linear(&du, 0, DType::F32, h).is_err());
        let du = Tensor::zeros((b, h, t), DType::F32, dev)?;
        anyhow::ensure!(scorer.backward_linear(&du, 0, DType::F32, h - 1).is_err());
        let narrow_dst = Tensor::zeros((b, t, h + 1), DType::F32, dev)?;
        anyhow::ensure!(scorer.backward_linear_into(&du, 0, &narrow_dst, 2).is_err());
        let lin = Tensor::zeros((b, t, h + 1), DType::F32, dev)?;
        anyhow::ensure!(scorer.scores_from_linear(&lin, 0).is_err());
    }
    Ok(())
}

#[test]
fn scorer_matches_reference() -> R<()> {
    scorer_suite(&Device::Cpu)
}

#[test]
fn cuda_scorer_matches_reference() -> R<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    scorer_suite(&dev)
}

fn gpu() -> Option<Device> {
    if !cfg!(feature = "cuda") {
        println!("SKIP: CUDA sparsek tests (built without --features cuda)");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("SKIP: CUDA sparsek tests (no GPU: {e})");
            None
        }
    }
}

#[test]
fn cuda_matches_reference() -> R<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    // SPARSEK_QUICK: a small subset (for compute-sanitizer): the first two cases and the last two
    // (chains of list merges; cuts among the newer candidates). SPARSEK_ONLY=name,name: only those cases.
    let quick = std::env::var("SPARSEK_QUICK").is_ok();
    let only = std::env::var("SPARSEK_ONLY").ok();
    let all = cases();
    let n = all.len();
    for (idx, (name, c)) in all.into_iter().enumerate() {
        if quick && idx >= 2 && idx + 2 < n {
            continue;
        }
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|x| x == name))
        {
            continue;
        }
        check(name, &c, &dev, DType::F32, 1e-3)?;
        check(name, &c, &dev, DType::BF16, 3e-2)?;
        check(name, &c, &dev, DType::F16, 1e-2)?;
    }
    Ok(())
}

#[test]
fn cuda_projection_and_cache() -> R<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    project_suite(&dev)?;
    project_grad_suite(&dev)?;
    cache_suite(&dev, 0)?;
    cache_suite(&dev, 37)
}

/// Bytes of GPU memory in use (0 when unknown).
fn device_memory_in_use() -> usize {
    #[cfg(feature = "cuda")]
    {
        let (free, total) =
            candle::cuda_backend::cudarc::driver::result::mem_get_info().unwrap_or((0, 0));
        total - free
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// Seeds a backward with a given output gradient and no loss ops: forward, a scalar f32 zero;
/// backward, `grad` for the input.
struct SeedGrad(Tensor);

impl candle::CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle::CpuStorage,
        _: &candle::Layout,
    ) -> candle::Result<(candle::CpuStorage, candle::Shape)> {
        Ok((candle::CpuStorage::F32(vec![0.0]), candle::Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        _: &candle::Layout,
    ) -> candle::Result<(candle::CudaStorage, candle::Shape)> {
        use candle::backend::{BackendDevice, BackendStorage};
        let zero = s
            .device()
            .zeros_impl(&candle::Shape::from(()), DType::F32)?;
        Ok((zero, candle::Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// Timing of forward + backward (B=4, H=48, D=64, bf16, k=256, window=256) beside the dense
/// `flash_attn`, at 8k/16k/32k, with the GPU memory in use at the end of the backward. Two
/// backward seeds: the loss `(out·g).sum()` through candle autograd (a multiply, a full reduction
/// and their backward on `(b, h, t, d)` tensors, the same for both ops), and the gradient `g`
/// handed to the output directly ([`SeedGrad`]: the op's own time). Run with
/// `--ignored --nocapture` on a GPU.
#[test]
#[ignore]
fn cuda_bench() -> R<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    // SPARSEK_BENCH_KEEP_POOL: keep freed device memory in the pool (what train_char_lm and
    // bench_attention --keep-pool do) instead of unmapping it at every synchronisation.
    let keep_pool = std::env::var("SPARSEK_BENCH_KEEP_POOL").is_ok();
    if keep_pool {
        candle_sparse_attn::keep_memory_pool(&dev)?;
    }
    println!("BENCH memory pool kept: {keep_pool}");
    // SPARSEK_BENCH_HEADS: q and kv heads (default 48; the char-LM GPT has 6).
    let h = match std::env::var("SPARSEK_BENCH_HEADS") {
        Ok(s) => s.trim().parse()?,
        Err(_) => 48,
    };
    let (b, d) = (4, 64);
    println!("BENCH shape B{b} H{h} D{d}");
    let cfg = SparseKConfig::new(256, 256);
    let sync = |dev: &Device| dev.synchronize();
    // SPARSEK_BENCH_SEQ: comma-separated lengths (default 8k, 16k, 32k); the dense op runs up to 32k.
    let seqs: Vec<usize> = match std::env::var("SPARSEK_BENCH_SEQ") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![8192, 16384, 32768],
    };
    for t in seqs {
        let q =
            Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(DType::BF16)?)?;
        let k =
            Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(DType::BF16)?)?;
        let v =
            Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(DType::BF16)?)?;
        let pos = Tensor::arange(0f32, t as f32, &dev)?.affine(1e-3, 0.)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t), &dev)?.broadcast_add(&pos)?)?;
        let go = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(DType::BF16)?;
        let time = |name: &str, f: &dyn Fn() -> candle::Result<Tensor>| -> R<(f64, f64)> {
            let run = |seeded: bool| -> R<usize> {
                let out = f()?;
                let g = if seeded {
                    out.apply_op1(SeedGrad(go.clone()))?.backward()?
                } else {
                    out.mul(&go)?.sum_all()?.backward()?
                };
                sync(&dev)?;
                let used = device_memory_in_use();
                drop(g);
                Ok(used)
            };
            let mut ms = [0f64; 2];
            let mut used = 0;
            for (seeded, ms) in [false, true].into_iter().zip(&mut ms) {
                run(seeded)?;
                let iters = 3;
                let t0 = std::time::Instant::now();
                for _ in 0..iters {
                    used = run(seeded)?;
                }
                *ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
            }
            println!(
                "BENCH t={t} {name}: fwd+bwd {:.2} ms (loss), {:.2} ms (seeded), device memory in use {:.2} GiB",
                ms[0],
                ms[1],
                used as f64 / (1u64 << 30) as f64
            );
            Ok((ms[0], ms[1]))
        };
        // The op's kernels alone: the taped forward and `grads`, without autograd's zero fill and
        // add per input gradient (see `candle_sparse_attn::tape`).
        let taped =
            |name: &str,
             f: &dyn Fn() -> candle::Result<(Tensor, candle_sparse_attn::tape::AttentionTape)>|
             -> R<f64> {
                let run = || -> R<()> {
                    let (_, tape) = f()?;
                    let grads = tape.grads(&go)?;
                    sync(&dev)?;
                    drop(grads);
                    Ok(())
                };
                run()?;
                let iters = 3;
                let t0 = std::time::Instant::now();
                for _ in 0..iters {
                    run()?;
                }
                let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
                println!("BENCH t={t} {name}: fwd+bwd {ms:.2} ms (taped)");
                Ok(ms)
            };
        let sk = time("sparsek", &|| sparsek_attn(&q, &k, &v, &u, &cfg))?;
        let sk_taped = taped("sparsek", &|| {
            candle_sparse_attn::sparsek_attn_taped(&q, &k, &v, &u, &cfg)
        })?;
        // Forward only, for the breakdown.
        let t0 = std::time::Instant::now();
        for _ in 0..3 {
            sparsek_attn(&q, &k, &v, &u, &cfg)?;
        }
        sync(&dev)?;
        println!(
            "BENCH t={t} sparsek fwd only {:.2} ms",
            t0.elapsed().as_secs_f64() * 1e3 / 3.0
        );
        if t > 32768 {
            continue;
        }
        let dense = time("dense flash_attn", &|| {
            candle_sparse_attn::flash_attn(&q, &k, &v, &candle_sparse_attn::AttnParams::default())
        })?;
        let dense_taped = taped("dense flash_attn", &|| {
            candle_sparse_attn::flash_attn_taped(
                &q,
                &k,
                &v,
                &candle_sparse_attn::AttnParams::default(),
            )
        })?;
        println!(
            "BENCH t={t} speedup dense/sparsek = {:.2}x (loss), {:.2}x (seeded), {:.2}x (taped)",
            dense.0 / sk.0,
            dense.1 / sk.1,
            dense_taped / sk_taped
        );
    }
    Ok(())
}
