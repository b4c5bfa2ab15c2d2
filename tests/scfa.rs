//! Sparse causal flash attention: the core op, query/key dropping and hash-bucket attention,
//! against the f64 dense reference with the equivalent explicit mask in original order (outputs
//! and gradients), plus the pre-processing building blocks against brute force, and bad input.
//! Runs on the CPU always and on CUDA when built with `--features cuda` and a GPU is present.

mod common;

use candle::{DType, Device, Result, Tensor, Var};
use candle_sparse_attn::scfa::{
    self, compact_kept, gather_rows, lsh_buckets, random_keep, random_rotations, scatter_rows,
    sort_by_bucket, RowKind,
};
use candle_sparse_attn::{
    hash_sparse_attn, hash_sparse_attn_with_buckets, qk_sparse_attn, reference, sparse_causal_attn,
    HashConfig, ScfaParams, SparseLayout, Visibility,
};
use common::devices;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

// ----------------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------------

fn randn(rng: &mut StdRng, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A `(b, h, t)` u8 keep mask with keep probability `p`.
fn keep_mask(rng: &mut StdRng, (b, h, t): (usize, usize, usize), p: f64) -> Vec<u8> {
    (0..b * h * t).map(|_| rng.random_bool(p) as u8).collect()
}

/// Tolerance on relative error for a dtype on a device.
fn tolerance(dtype: DType, dev: &Device) -> f64 {
    match (dtype, dev.is_cpu()) {
        (DType::F32, true) => 1e-4,
        (DType::F32, false) => 1e-3,
        _ => 1e-2,
    }
}

/// Shapes of one test problem.
#[derive(Clone, Copy, Debug)]
struct Problem {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
}

/// Random q, k, v (f32, CPU) and an upstream gradient for a problem.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
}

impl Inputs {
    fn new(p: Problem, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        Ok(Self {
            q: randn(&mut rng, &[p.b, p.hq, p.t, p.d])?,
            k: randn(&mut rng, &[p.b, p.hkv, p.t, p.d])?,
            v: randn(&mut rng, &[p.b, p.hkv, p.t, p.d])?,
            g: randn(&mut rng, &[p.b, p.hq, p.t, p.d])?,
        })
    }
}

/// Runs `op` on `dev` in `dtype` with autograd and compares output and dq/dk/dv with the f64
/// reference under `mask` (`(b, hq, t, t)` u8, original order). Queries whose mask row is
/// empty must output exactly 0.
fn check_vs_reference(
    what: &str,
    inputs: &Inputs,
    mask: &Tensor,
    scale: f64,
    dev: &Device,
    dtype: DType,
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    // Round through the test dtype so the reference sees exactly the op's inputs.
    let rounded = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F64);
    let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?);
    let (q, k, v) = (var(&inputs.q)?, var(&inputs.k)?, var(&inputs.v)?);
    let out = op(&q, &k, &v)?;
    let g = inputs.g.to_device(dev)?;
    let grads = (out.to_dtype(DType::F32)? * &g)?.sum_all()?.backward()?;

    let fvar = |t: &Tensor| Var::from_tensor(&rounded(t)?);
    let (rq, rk, rv) = (fvar(&inputs.q)?, fvar(&inputs.k)?, fvar(&inputs.v)?);
    let r = reference::attention(&rq, &rk, &rv, scale, Some(mask))?;
    let rgrads = (&r * inputs.g.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;

    let tol = tolerance(dtype, dev);
    let grad = |g: &candle::backprop::GradStore, v: &Var, name: &str| {
        g.get(v)
            .cloned()
            .ok_or_else(|| candle::Error::Msg(format!("{what}: no gradient for {name}")))
    };
    let pairs = [
        ("out", out.clone(), r.clone()),
        ("dq", grad(&grads, &q, "q")?, grad(&rgrads, &rq, "q")?),
        ("dk", grad(&grads, &k, "k")?, grad(&rgrads, &rk, "k")?),
        ("dv", grad(&grads, &v, "v")?, grad(&rgrads, &rv, "v")?),
    ];
    for (name, a, b) in pairs {
        assert_eq!(a.dims(), b.dims(), "{what}: {name} shape");
        let err = reference::rel_err(&a, &b)?;
        assert!(
            err <= tol,
            "{what} on {:?} {dtype:?}: {name} rel err {err:e} > {tol:e}",
            dev.location()
        );
    }
    // Stranded queries: exactly zero output rows.
    let visible = mask
        .to_dtype(DType::U32)?
        .sum(3)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let out_rows = out
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_to(2)?
        .abs()?
        .max(1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (row, (&n, &m)) in visible.iter().zip(&out_rows).enumerate() {
        if n == 0 {
            assert_eq!(m, 0.0, "{what}: stranded query row {row} is not exactly 0");
        }
    }
    Ok(())
}

/// The original-order mask of query/key dropping.
fn qk_mask(p: Problem, q_keep: &[u8], k_keep: &[u8], strict: bool) -> Result<Tensor> {
    let Problem { b, hq, hkv, t, .. } = p;
    let group = hq / hkv;
    let mut m = vec![0u8; b * hq * t * t];
    for bh in 0..b * hq {
        let kh = bh / hq * hkv + bh % hq / group;
        for i in 0..t {
            for j in 0..t {
                let causal = if strict { i > j } else { i >= j };
                m[(bh * t + i) * t + j] =
                    (causal && q_keep[bh * t + i] != 0 && k_keep[kh * t + j] != 0) as u8;
            }
        }
    }
    Tensor::from_vec(m, (b, hq, t, t), &Device::Cpu)
}

/// The original-order mask of bucket attention; ids outside `[0, n_buckets)` match nothing.
fn bucket_mask(p: Problem, q_ids: &[i64], k_ids: &[i64], strict: bool) -> Result<Tensor> {
    let Problem { b, hq, hkv, t, .. } = p;
    let group = hq / hkv;
    let mut m = vec![0u8; b * hq * t * t];
    for bh in 0..b * hq {
        let kh = bh / hq * hkv + bh % hq / group;
        for i in 0..t {
            for j in 0..t {
                let causal = if strict { i > j } else { i >= j };
                m[(bh * t + i) * t + j] = (causal && q_ids[bh * t + i] == k_ids[kh * t + j]) as u8;
            }
        }
    }
    Tensor::from_vec(m, (b, hq, t, t), &Device::Cpu)
}

fn scale(p: Problem) -> f64 {
    1.0 / (p.d as f64).sqrt()
}

const GQA: Problem = Problem {
    b: 2,
    hq: 4,
    hkv: 2,
    t: 133,
    d: 32,
};

// ----------------------------------------------------------------------------------------------
// Query/key dropping
// ----------------------------------------------------------------------------------------------

fn run_qk(p: Problem, q_keep: &[u8], k_keep: &[u8], strict: bool, what: &str) -> Result<()> {
    let inputs = Inputs::new(p, 7)?;
    let mask = qk_mask(p, q_keep, k_keep, strict)?;
    let params = ScfaParams {
        softmax_scale: None,
        strict,
    };
    for dev in devices() {
        let qk = Tensor::from_vec(q_keep.to_vec(), (p.b, p.hq, p.t), &dev)?;
        let kk = Tensor::from_vec(k_keep.to_vec(), (p.b, p.hkv, p.t), &dev)?;
        for dtype in [DType::F32, DType::BF16] {
            check_vs_reference(what, &inputs, &mask, scale(p), &dev, dtype, |q, k, v| {
                qk_sparse_attn(q, k, v, &qk, &kk, &params)
            })?;
        }
    }
    Ok(())
}

#[test]
fn qk_random_masks_with_dropped_heads_and_rows() -> Result<()> {
    let p = GQA;
    let mut rng = StdRng::seed_from_u64(1);
    let mut q_keep = keep_mask(&mut rng, (p.b, p.hq, p.t), 0.5);
    let mut k_keep = keep_mask(&mut rng, (p.b, p.hkv, p.t), 0.5);
    // Batch 0: q head 1 fully dropped; batch 1: kv head 0 fully dropped (its q heads 0 and 1
    // see nothing); batch 1, q head 3 keeps everything (different kept counts per head).
    q_keep[p.t..2 * p.t].fill(0);
    k_keep[2 * p.t..3 * p.t].fill(0);
    q_keep[7 * p.t..8 * p.t].fill(1);
    for strict in [false, true] {
        run_qk(
            p,
            &q_keep,
            &k_keep,
            strict,
            &format!("qk random strict={strict}"),
        )?;
    }
    Ok(())
}

#[test]
fn qk_keep_all_is_dense_causal() -> Result<()> {
    let p = Problem {
        b: 1,
        hq: 2,
        hkv: 1,
        t: 200,
        d: 64,
    };
    let q_keep = vec![1u8; p.b * p.hq * p.t];
    let k_keep = vec![1u8; p.b * p.hkv * p.t];
    run_qk(p, &q_keep, &k_keep, false, "qk keep-all")
}

#[test]
fn qk_heavy_dropping_mha() -> Result<()> {
    let p = Problem {
        b: 3,
        hq: 2,
        hkv: 2,
        t: 97,
        d: 32,
    };
    let mut rng = StdRng::seed_from_u64(2);
    let q_keep = keep_mask(&mut rng, (p.b, p.hq, p.t), 0.3);
    let k_keep = keep_mask(&mut rng, (p.b, p.hkv, p.t), 0.3);
    run_qk(p, &q_keep, &k_keep, false, "qk 70% dropped")
}

// ----------------------------------------------------------------------------------------------
// Hash buckets
// ----------------------------------------------------------------------------------------------

fn run_buckets(
    p: Problem,
    q_ids: &[i64],
    k_ids: &[i64],
    n_buckets: usize,
    strict: bool,
    what: &str,
) -> Result<()> {
    let inputs = Inputs::new(p, 11)?;
    let mask = bucket_mask(p, q_ids, k_ids, strict)?;
    let params = ScfaParams {
        softmax_scale: None,
        strict,
    };
    for dev in devices() {
        let qb = Tensor::from_vec(q_ids.to_vec(), (p.b, p.hq, p.t), &dev)?;
        // Key ids as u32, to exercise the conversion.
        let kb = Tensor::from_vec(
            k_ids.iter().map(|&x| x as u32).collect::<Vec<_>>(),
            (p.b, p.hkv, p.t),
            &dev,
        )?;
        for dtype in [DType::F32, DType::BF16] {
            check_vs_reference(what, &inputs, &mask, scale(p), &dev, dtype, |q, k, v| {
                hash_sparse_attn_with_buckets(q, k, v, &qb, &kb, n_buckets, &params)
            })?;
        }
    }
    Ok(())
}

#[test]
fn buckets_one_bucket_is_dense_causal() -> Result<()> {
    let p = GQA;
    let q = vec![0i64; p.b * p.hq * p.t];
    let k = vec![0i64; p.b * p.hkv * p.t];
    run_buckets(p, &q, &k, 1, false, "one bucket")?;
    run_buckets(p, &q, &k, 1, true, "one bucket strict")
}

#[test]
fn buckets_one_per_row() -> Result<()> {
    let p = GQA;
    let q: Vec<i64> = (0..p.b * p.hq * p.t).map(|i| (i % p.t) as i64).collect();
    let k: Vec<i64> = (0..p.b * p.hkv * p.t).map(|i| (i % p.t) as i64).collect();
    // Every query sees only its own key; strict: nothing at all.
    run_buckets(p, &q, &k, p.t, false, "bucket per row")?;
    run_buckets(p, &q, &k, p.t, true, "bucket per row strict")
}

#[test]
fn buckets_random_with_empty_and_query_heavy_buckets() -> Result<()> {
    let p = Problem {
        b: 2,
        hq: 4,
        hkv: 2,
        t: 300,
        d: 32,
    };
    let nb = 6;
    let mut rng = StdRng::seed_from_u64(3);
    let mut q: Vec<i64> = (0..p.b * p.hq * p.t)
        .map(|_| rng.random_range(0..nb as i64 - 1))
        .collect();
    let k: Vec<i64> = (0..p.b * p.hkv * p.t)
        .map(|_| rng.random_range(0..nb as i64 - 1))
        .collect();
    // Bucket nb-1 is empty everywhere except a run of queries (none of its keys exist), and a
    // long query-heavy stretch of bucket 0 in batch 0, q head 0.
    q[10..150].fill(0);
    q[p.t + 50..p.t + 80].fill(nb as i64 - 1);
    for strict in [false, true] {
        run_buckets(
            p,
            &q,
            &k,
            nb,
            strict,
            &format!("random buckets strict={strict}"),
        )?;
    }
    Ok(())
}

#[test]
fn lsh_hash_attention_matches_reference_and_is_reproducible() -> Result<()> {
    let p = Problem {
        b: 2,
        hq: 4,
        hkv: 2,
        t: 150,
        d: 64,
    };
    let inputs = Inputs::new(p, 13)?;
    for dev in devices() {
        for (nb, strict, per_head) in [(2, false, true), (8, true, true), (4, false, false)] {
            let mut config = HashConfig::new(nb, 42);
            config.strict = strict;
            config.per_head = per_head;
            let heads = if per_head { p.hkv } else { 1 };
            let rot = random_rotations(heads, p.d, nb, 42, &dev)?;
            for dtype in [DType::F32, DType::BF16] {
                // The ids the op computes, from the same rounded inputs and rotations.
                let ids = |x: &Tensor| -> Result<Vec<i64>> {
                    // (candle has no i32 -> i64 cast on CUDA: cast on the host)
                    lsh_buckets(&x.to_dtype(dtype)?.to_device(&dev)?, &rot)?
                        .to_device(&Device::Cpu)?
                        .to_dtype(DType::I64)?
                        .flatten_all()?
                        .to_vec1::<i64>()
                };
                let (qi, ki) = (ids(&inputs.q)?, ids(&inputs.k)?);
                let mask = bucket_mask(p, &qi, &ki, strict)?;
                let what = format!("lsh nb={nb} strict={strict} per_head={per_head}");
                check_vs_reference(&what, &inputs, &mask, scale(p), &dev, dtype, |q, k, v| {
                    hash_sparse_attn(q, k, v, &config)
                })?;
            }
            // Same seed, same result; explicit rotations equal to the seeded ones, same result.
            let q = inputs.q.to_device(&dev)?;
            let (k, v) = (inputs.k.to_device(&dev)?, inputs.v.to_device(&dev)?);
            let a = hash_sparse_attn(&q, &k, &v, &config)?;
            let b = hash_sparse_attn(&q, &k, &v, &config)?;
            let mut explicit = config.clone();
            explicit.rotations = Some(rot.clone());
            explicit.seed = 0;
            let c = hash_sparse_attn(&q, &k, &v, &explicit)?;
            assert_eq!(reference::rel_err(&a, &b)?, 0.0, "lsh not reproducible");
            assert_eq!(
                reference::rel_err(&a, &c)?,
                0.0,
                "explicit rotations differ"
            );
        }
    }
    // Different seeds give different rotations.
    let r1 = random_rotations(2, 64, 16, 1, &Device::Cpu)?;
    let r2 = random_rotations(2, 64, 16, 2, &Device::Cpu)?;
    assert!(reference::rel_err(&r1, &r2)? > 0.1);
    // Columns are unit vectors.
    let norms = r1.sqr()?.sum(1)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// The core op on caller-arranged rows
// ----------------------------------------------------------------------------------------------

#[test]
fn device_random_draws_are_seeded_and_agree_across_devices() -> Result<()> {
    let host_u8 = |t: &Tensor| -> Result<Vec<u8>> {
        t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()
    };
    let shape = (2, 3, 5000);
    let cpu = host_u8(&random_keep(shape, 0.3, 9, &Device::Cpu)?)?;
    let kept = cpu.iter().filter(|&&k| k == 1).count() as f64 / cpu.len() as f64;
    assert!((kept - 0.7).abs() < 0.02, "kept fraction {kept}");
    assert!(cpu.iter().all(|&k| k <= 1));
    assert_ne!(cpu, host_u8(&random_keep(shape, 0.3, 10, &Device::Cpu)?)?);
    assert!(host_u8(&random_keep(shape, 0.0, 9, &Device::Cpu)?)?
        .iter()
        .all(|&k| k == 1));
    let r_cpu = random_rotations(3, 64, 16, 5, &Device::Cpu)?;
    for dev in devices() {
        // Keep masks are bit-identical on every device, rotations equal to f32 rounding.
        assert_eq!(host_u8(&random_keep(shape, 0.3, 9, &dev)?)?, cpu, "{dev:?}");
        let r = random_rotations(3, 64, 16, 5, &dev)?;
        assert_eq!(r.dims(), [3, 64, 8]);
        let err = reference::rel_err(&r.to_device(&Device::Cpu)?, &r_cpu)?;
        assert!(
            err < 1e-6,
            "rotations on {dev:?} differ from the CPU's: {err}"
        );
        let e = random_keep(shape, 1.0, 0, &dev).unwrap_err().to_string();
        assert!(e.contains("drop") && e.contains("[0, 1)"), "{e}");
    }
    Ok(())
}

#[test]
fn core_op_on_arranged_rows_with_any_index_dtype() -> Result<()> {
    let p = Problem {
        b: 2,
        hq: 2,
        hkv: 1,
        t: 90,
        d: 32,
    };
    let mut rng = StdRng::seed_from_u64(5);
    let q_keep = keep_mask(&mut rng, (p.b, p.hq, p.t), 0.6);
    let k_keep = keep_mask(&mut rng, (p.b, p.hkv, p.t), 0.6);
    let inputs = Inputs::new(p, 17)?;
    let cpu = Device::Cpu;
    let q_pos = compact_kept(
        &Tensor::from_vec(q_keep, (p.b, p.hq, p.t), &cpu)?,
        RowKind::Query,
    )?
    .pos;
    let k_pos = compact_kept(
        &Tensor::from_vec(k_keep, (p.b, p.hkv, p.t), &cpu)?,
        RowKind::Key,
    )?
    .pos;
    // The reference runs on the arranged rows with the layout's own mask.
    let arranged = Inputs {
        q: gather_rows(&inputs.q, &q_pos)?,
        k: gather_rows(&inputs.k, &k_pos)?,
        v: gather_rows(&inputs.v, &k_pos)?,
        g: inputs.g.clone(),
    };
    for strict in [false, true] {
        let layout = SparseLayout {
            q_pos: q_pos.clone(),
            k_pos: k_pos.clone(),
            buckets: None,
            strict,
        };
        let mask = reference::mask(&Visibility::Sparse(layout), (p.b, p.hq, p.hkv, p.t, p.t))?;
        let params = ScfaParams {
            softmax_scale: Some(0.3),
            strict,
        };
        for dev in devices() {
            // Queries as i64 (padding -1), keys as u32 (padding i32::MAX fits).
            let qp = q_pos.to_dtype(DType::I64)?.to_device(&dev)?;
            let kp = k_pos
                .to_dtype(DType::I64)?
                .to_dtype(DType::U32)?
                .to_device(&dev)?;
            for dtype in [DType::F32, DType::BF16] {
                check_vs_reference("core op", &arranged, &mask, 0.3, &dev, dtype, |q, k, v| {
                    sparse_causal_attn(q, k, v, &qp, &kp, None, &params)
                })?;
            }
        }
    }
    Ok(())
}

#[test]
fn core_op_with_buckets() -> Result<()> {
    let p = Problem {
        b: 1,
        hq: 2,
        hkv: 2,
        t: 70,
        d: 32,
    };
    let nb = 4;
    let mut rng = StdRng::seed_from_u64(6);
    let cpu = Device::Cpu;
    let ids = |h: usize, rng: &mut StdRng| -> Result<Tensor> {
        let v: Vec<i32> = (0..p.b * h * p.t)
            .map(|_| rng.random_range(0..nb))
            .collect();
        Tensor::from_vec(v, (p.b, h, p.t), &cpu)
    };
    let q_order = sort_by_bucket(&ids(p.hq, &mut rng)?, nb as usize, RowKind::Query)?;
    let k_order = sort_by_bucket(&ids(p.hkv, &mut rng)?, nb as usize, RowKind::Key)?;
    let inputs = Inputs::new(p, 19)?;
    let arranged = Inputs {
        q: q_order.gather(&inputs.q)?,
        k: k_order.gather(&inputs.k)?,
        v: k_order.gather(&inputs.v)?,
        g: inputs.g.clone(),
    };
    let (q_pos, k_pos) = (q_order.pos, k_order.pos);
    let (q_b, k_b) = (
        q_order.bucket.expect("q buckets"),
        k_order.bucket.expect("k buckets"),
    );
    let layout = SparseLayout {
        q_pos: q_pos.clone(),
        k_pos: k_pos.clone(),
        buckets: Some((q_b.clone(), k_b.clone())),
        strict: false,
    };
    let mask = reference::mask(&Visibility::Sparse(layout), (p.b, p.hq, p.hkv, p.t, p.t))?;
    for dev in devices() {
        let on = |t: &Tensor| t.to_device(&dev);
        let (qp, kp, qb, kb) = (on(&q_pos)?, on(&k_pos)?, on(&q_b)?, on(&k_b)?);
        check_vs_reference(
            "core op buckets",
            &arranged,
            &mask,
            scale(p),
            &dev,
            DType::F32,
            |q, k, v| {
                sparse_causal_attn(q, k, v, &qp, &kp, Some((&qb, &kb)), &ScfaParams::default())
            },
        )?;
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Building blocks against brute force
// ----------------------------------------------------------------------------------------------

#[test]
fn compaction_is_stable_and_padded_long_rows() -> Result<()> {
    let (b, h, t) = (2, 3, 9000);
    let mut rng = StdRng::seed_from_u64(8);
    let mut keep = keep_mask(&mut rng, (b, h, t), 0.4);
    keep[t..2 * t].fill(0); // an all-dropped row
    keep[2 * t..3 * t].fill(1); // an all-kept row
    for dev in devices() {
        let mask = Tensor::from_vec(keep.clone(), (b, h, t), &dev)?;
        for kind in [RowKind::Query, RowKind::Key] {
            let order = compact_kept(&mask, kind)?;
            assert!(order.bucket.is_none());
            let got = order.pos.flatten_all()?.to_vec1::<i32>()?;
            let inv = order.inv.flatten_all()?.to_vec1::<i32>()?;
            for row in 0..b * h {
                let mut want: Vec<i32> = (0..t)
                    .filter(|&i| keep[row * t + i] != 0)
                    .map(|i| i as i32)
                    .collect();
                let mut want_inv = vec![-1; t];
                for (r, &i) in want.iter().enumerate() {
                    want_inv[i as usize] = r as i32;
                }
                want.resize(t, kind.pad_pos());
                let span = row * t..(row + 1) * t;
                assert_eq!(&got[span.clone()], &want[..], "row {row} on {dev:?}");
                assert_eq!(&inv[span], &want_inv[..], "inverse row {row} on {dev:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn counting_sort_is_stable_long_rows() -> Result<()> {
    let (b, h) = (2, 2);
    let mut rng = StdRng::seed_from_u64(9);
    // Long rows split over 32 warp segments (the last one partial), and short rows that leave
    // most warps without steps.
    let cases = [1usize, 3, 16, 64, 8192]
        .map(|nb| (nb, 10_000))
        .into_iter()
        .chain([(16, 37), (5, 13)]);
    for (nb, t) in cases {
        let mut ids: Vec<i32> = (0..b * h * t)
            .map(|_| rng.random_range(0..nb as i32))
            .collect();
        // Out-of-range ids are dropped as padding.
        ids[5] = -7;
        ids[t + 9] = nb as i32;
        ids[3 * t - 1] = i32::MAX;
        for dev in devices() {
            let x = Tensor::from_vec(ids.clone(), (b, h, t), &dev)?;
            for kind in [RowKind::Query, RowKind::Key] {
                let order = sort_by_bucket(&x, nb, kind)?;
                let pos = order.pos.flatten_all()?.to_vec1::<i32>()?;
                let inv = order.inv.flatten_all()?.to_vec1::<i32>()?;
                let sorted = order
                    .bucket
                    .expect("sorted ids")
                    .flatten_all()?
                    .to_vec1::<i32>()?;
                for row in 0..b * h {
                    let r = &ids[row * t..(row + 1) * t];
                    let mut order: Vec<usize> =
                        (0..t).filter(|&i| (0..nb as i32).contains(&r[i])).collect();
                    order.sort_by_key(|&i| (r[i], i)); // brute force: unique composite key
                    let mut want_inv = vec![-1; t];
                    for (row, &i) in order.iter().enumerate() {
                        want_inv[i] = row as i32;
                    }
                    let mut want_pos: Vec<i32> = order.iter().map(|&i| i as i32).collect();
                    let mut want_ids: Vec<i32> = order.iter().map(|&i| r[i]).collect();
                    want_pos.resize(t, kind.pad_pos());
                    want_ids.resize(t, kind.pad_bucket());
                    let span = row * t..(row + 1) * t;
                    assert_eq!(
                        &pos[span.clone()],
                        &want_pos[..],
                        "nb={nb} row {row} {dev:?}"
                    );
                    assert_eq!(
                        &sorted[span.clone()],
                        &want_ids[..],
                        "nb={nb} row {row} {dev:?}"
                    );
                    assert_eq!(&inv[span], &want_inv[..], "nb={nb} inverse {row} {dev:?}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn lsh_buckets_match_brute_force() -> Result<()> {
    let (b, h, hr) = (2, 4, 2);
    let mut rng = StdRng::seed_from_u64(10);
    // Head dims 64 and 128 take CUDA's thread-per-row kernel (blocks of 256 rows inside one
    // sequence: t = 300 and 257 give partial tiles), 48 the warp-per-row one; 6 buckets leave a
    // partial column chunk, 40 a full chunk plus a partial one, 30 scalar rotation reads, 1024
    // (d = 64) a rotation too large for shared memory; f32, bf16 and f16 rows.
    let cases = [
        (64, 16, 50, DType::F32),
        (128, 6, 50, DType::F32),
        (48, 40, 50, DType::F32),
        (64, 40, 50, DType::F32),
        (64, 16, 300, DType::BF16),
        (128, 64, 257, DType::BF16),
        (64, 30, 300, DType::F16),
        (128, 40, 50, DType::F16),
        (64, 1024, 20, DType::BF16),
    ];
    for (d, nb, t, dtype) in cases {
        let x = randn(&mut rng, &[b, h, t, d])?.to_dtype(dtype)?;
        let rot = random_rotations(hr, d, nb, 3, &Device::Cpu)?;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let rs = rot.flatten_all()?.to_vec1::<f32>()?;
        let half = nb / 2;
        for dev in devices() {
            let got = lsh_buckets(&x.to_device(&dev)?, &rot.to_device(&dev)?)?
                .flatten_all()?
                .to_vec1::<i32>()?;
            for row in 0..b * h * t {
                let rh = (row / t) % h / (h / hr);
                let scores: Vec<f64> = (0..nb)
                    .map(|c| {
                        let s: f64 = (0..d)
                            .map(|k| {
                                xs[row * d + k] as f64 * rs[(rh * d + k) * half + c % half] as f64
                            })
                            .sum();
                        if c < half {
                            s
                        } else {
                            -s
                        }
                    })
                    .collect();
                let best = (0..nb).fold(0, |bi, c| if scores[c] > scores[bi] { c } else { bi });
                let got_c = got[row] as usize;
                assert!(got_c < nb, "bucket {got_c} out of range");
                // Accept a different argmax only on a numerical tie.
                assert!(
                    got_c == best || (scores[best] - scores[got_c]).abs() < 1e-4,
                    "d={d} nb={nb} t={t} {dtype:?} row {row}: bucket {got_c} vs {best} on {dev:?}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn row_permutations_and_their_gradients() -> Result<()> {
    let (b, h, n, d) = (2, 3, 40, 8);
    let mut rng = StdRng::seed_from_u64(12);
    let x = randn(&mut rng, &[b, h, n, d])?;
    let g = randn(&mut rng, &[b, h, n, d])?;
    // A permutation per (b, h) with the last 5 destinations out of range (padding).
    let mut idx = Vec::new();
    for _ in 0..b * h {
        let mut p: Vec<i32> = (0..n as i32).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.random_range(0..=i));
        }
        p[n - 5..].copy_from_slice(&[-1, i32::MAX, -1, n as i32, i32::MIN]);
        idx.extend(p);
    }
    for dev in devices() {
        let index = Tensor::from_vec(idx.clone(), (b, h, n), &dev)?;
        let xv = Var::from_tensor(&x.to_device(&dev)?)?;
        let gathered = gather_rows(&xv, &index)?;
        let back = scatter_rows(&gathered, &index, n)?;
        let gd = g.to_device(&dev)?;
        let grads = (&back * &gd)?.sum_all()?.backward()?;
        // Brute force on the host.
        let (xs, gs) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            g.flatten_all()?.to_vec1::<f32>()?,
        );
        let gathered = gathered.flatten_all()?.to_vec1::<f32>()?;
        let back = back.flatten_all()?.to_vec1::<f32>()?;
        let dx = grads
            .get(&xv)
            .expect("dx")
            .flatten_all()?
            .to_vec1::<f32>()?;
        for bh in 0..b * h {
            for r in 0..n {
                let src = idx[bh * n + r];
                let valid = (0..n as i32).contains(&src);
                for c in 0..d {
                    let o = (bh * n + r) * d + c;
                    let want = if valid {
                        xs[(bh * n + src as usize) * d + c]
                    } else {
                        0.0
                    };
                    assert_eq!(gathered[o], want, "gather {dev:?}");
                }
            }
            // scatter(gather(x)) keeps exactly the gathered rows; the gradient passes there only.
            for s in 0..n {
                let hit = (0..n).any(|r| idx[bh * n + r] == s as i32);
                for c in 0..d {
                    let o = (bh * n + s) * d + c;
                    assert_eq!(back[o], if hit { xs[o] } else { 0.0 }, "round trip {dev:?}");
                    assert_eq!(dx[o], if hit { gs[o] } else { 0.0 }, "gradient {dev:?}");
                }
            }
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Bad input: clear errors, never panics
// ----------------------------------------------------------------------------------------------

fn expect_err(r: Result<Tensor>, needles: &[&str]) {
    match r {
        Ok(t) => panic!(
            "expected an error mentioning {needles:?}, got a tensor {:?}",
            t.dims()
        ),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
            }
        }
    }
}

#[test]
fn bad_input_gives_clear_errors() -> Result<()> {
    let p = Problem {
        b: 1,
        hq: 2,
        hkv: 1,
        t: 16,
        d: 32,
    };
    let inputs = Inputs::new(p, 1)?;
    let (q, k, v) = (&inputs.q, &inputs.k, &inputs.v);
    let cpu = Device::Cpu;
    let ones = |h: usize| Tensor::ones((p.b, h, p.t), DType::U8, &cpu);

    // Bucket counts.
    for nb in [0, 3, 9, scfa::MAX_BUCKETS + 2] {
        expect_err(
            hash_sparse_attn(q, k, v, &HashConfig::new(nb, 0)),
            &["n_buckets", &nb.to_string()],
        );
    }
    expect_err(
        hash_sparse_attn_with_buckets(q, k, v, &ones(2)?, &ones(1)?, 0, &ScfaParams::default()),
        &["n_buckets"],
    );
    // Bucket ids out of range (CPU).
    expect_err(
        hash_sparse_attn_with_buckets(q, k, v, &ones(2)?, &ones(1)?, 1, &ScfaParams::default()),
        &["q_bucket", "outside", "[1, 2, 16]"],
    );
    // Rotations of the wrong shape or device-less mismatch.
    let mut cfg = HashConfig::new(4, 0);
    cfg.rotations = Some(Tensor::zeros((1, 32, 3), DType::F32, &cpu)?);
    expect_err(
        hash_sparse_attn(q, k, v, &cfg),
        &["rotations", "[1, 32, 3]"],
    );

    // Masks: wrong shape, wrong dtype.
    let params = ScfaParams::default();
    expect_err(
        qk_sparse_attn(q, k, v, &ones(1)?, &ones(1)?, &params),
        &["q_keep", "[1, 2, 16]", "[1, 1, 16]"],
    );
    expect_err(
        qk_sparse_attn(q, k, v, &ones(2)?, &ones(1)?.to_dtype(DType::F32)?, &params),
        &["k_keep", "u8", "F32"],
    );
    // Lengths that differ.
    expect_err(
        qk_sparse_attn(&q.narrow(2, 0, 8)?, k, v, &ones(2)?, &ones(1)?, &params),
        &["one length"],
    );

    // Positions: out of range, wrong dtype, not arranged.
    let qpos = Tensor::arange(0i64, p.t as i64, &cpu)?.broadcast_as((p.b, p.hq, p.t))?;
    let kpos = Tensor::arange(0i64, p.t as i64, &cpu)?.broadcast_as((p.b, p.hkv, p.t))?;
    let core = |qp: &Tensor, kp: &Tensor| sparse_causal_attn(q, k, v, qp, kp, None, &params);
    let big = (qpos.clone() + i32::MAX as f64)?;
    expect_err(core(&big, &kpos), &["q_pos", "outside", "[1, 2, 16]"]);
    expect_err(
        core(&qpos, &(kpos.clone() - 3.0)?),
        &["k_pos", "-3", "outside"],
    );
    expect_err(core(&qpos.to_dtype(DType::F32)?, &kpos), &["q_pos", "F32"]);
    expect_err(
        core(&qpos.contiguous()?.flip(&[2])?, &kpos),
        &["not arranged"],
    );
    expect_err(core(&qpos.narrow(2, 0, 8)?, &kpos), &["q_pos", "shape"]);
    // A padding query row before a real one.
    let mut holes: Vec<i64> = (0..p.t as i64).collect();
    holes[3] = -1;
    let holes = Tensor::from_vec(holes, p.t, &cpu)?.broadcast_as((p.b, p.hq, p.t))?;
    expect_err(core(&holes, &kpos), &["not arranged", "padding"]);

    // Mismatched devices.
    for dev in devices().into_iter().filter(|d| d.is_cuda()) {
        let (qd, kd, vd) = (q.to_device(&dev)?, k.to_device(&dev)?, v.to_device(&dev)?);
        expect_err(
            qk_sparse_attn(&qd, &kd, &vd, &ones(2)?, &ones(1)?, &params),
            &["q_keep", "Cpu"],
        );
        expect_err(
            sparse_causal_attn(&qd, &kd, &vd, &qpos, &kpos, None, &params),
            &["q_pos", "Cpu"],
        );
        let mut cfg = HashConfig::new(4, 0);
        cfg.rotations = Some(random_rotations(1, p.d, 4, 0, &cpu)?);
        expect_err(hash_sparse_attn(&qd, &kd, &vd, &cfg), &["rotations"]);
        expect_err(
            gather_rows(&qd, &qpos.to_dtype(DType::I32)?),
            &["index", "Cpu"],
        );
    }
    Ok(())
}
