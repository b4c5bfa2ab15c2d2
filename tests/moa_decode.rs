//! MoA decode: the cache (static sink + ring per kv head) and the decode attention against the
//! dense reference over exactly the sink and the newest band tokens of every head. CPU always;
//! CUDA too when built with `--features cuda` on a GPU machine (a visible SKIP line otherwise).

mod common;

use candle::{DType, Device, Result, Tensor};
use candle_sparse_attn::moa::{moa_decode, HeadSpan, MoaCache, MoaLayerPlan, MOA_SINK};
use candle_sparse_attn::reference;
use common::{devices, normal, tolerance, Seeds};
use rand::{rngs::StdRng, SeedableRng};

/// One decode scenario: a prompt written at once, then single-token steps.
struct Scenario {
    b: usize,
    hq: usize,
    /// Span (sink + band) of each kv head, multiples of 64.
    sizes: Vec<usize>,
    d: usize,
    prompt: usize,
    steps: usize,
    /// Check the output every `every` steps (and after the prompt and the last step).
    every: usize,
}

fn random(
    rng: &mut StdRng,
    shape: (usize, usize, usize, usize),
    dev: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(normal(rng, n), shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// The `(b, hq, 1, t + 1)` mask of the query at position `t`: the sink positions and the newest
/// `band_h` positions of its kv head.
fn visible_mask(s: &Scenario, t: usize) -> Result<Tensor> {
    let (hkv, n) = (s.sizes.len(), t + 1);
    let group = s.hq / hkv;
    let mut m = vec![0u8; s.b * s.hq * n];
    for (r, row) in m.chunks_mut(n).enumerate() {
        let band = s.sizes[r % s.hq / group] - MOA_SINK;
        for (p, x) in row.iter_mut().enumerate() {
            *x = (p < MOA_SINK || p + band > t) as u8;
        }
    }
    Tensor::from_vec(m, (s.b, s.hq, 1, n), &Device::Cpu)
}

/// Runs a scenario on `dev` in `dtype`, comparing every checked step with the f64 reference over
/// the full history under the visibility mask.
fn run(s: &Scenario, dev: &Device, dtype: DType, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let hkv = s.sizes.len();
    let total = s.prompt + s.steps;
    let plan = MoaLayerPlan {
        spans: s.sizes.iter().map(|&n| HeadSpan::from_size(n)).collect(),
    };
    let mut cache = MoaCache::new(&plan, s.b, s.d, dtype, dev)?;
    let k = random(&mut rng, (s.b, hkv, total, s.d), dev, dtype)?;
    let v = random(&mut rng, (s.b, hkv, total, s.d), dev, dtype)?;
    let (k64, v64) = (
        k.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
        v.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
    );
    let scale = 1.0 / (s.d as f64).sqrt();
    let check = |cache: &MoaCache, rng: &mut StdRng, t: usize| -> Result<()> {
        let q = random(rng, (s.b, s.hq, 1, s.d), dev, dtype)?;
        let out = moa_decode(&q, cache)?;
        assert_eq!(out.dims(), &[s.b, s.hq, 1, s.d]);
        let q64 = q.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let (kt, vt) = (k64.narrow(2, 0, t + 1)?, v64.narrow(2, 0, t + 1)?);
        let want = reference::attention(&q64, &kt, &vt, scale, Some(&visible_mask(s, t)?))?;
        let err = reference::rel_err(&out, &want)?;
        let tol = tolerance(dtype, dev);
        assert!(
            err <= tol,
            "{:?} {dtype:?} b={} hq={} sizes={:?} d={} prompt={} at position {t}: rel err {err:.3e} > {tol:.0e}",
            dev.location(), s.b, s.hq, s.sizes, s.d, s.prompt
        );
        Ok(())
    };
    cache.append(&k.narrow(2, 0, s.prompt)?, &v.narrow(2, 0, s.prompt)?)?;
    assert_eq!(cache.len(), s.prompt);
    check(&cache, &mut rng, s.prompt - 1)?;
    for t in s.prompt..total {
        cache.append(&k.narrow(2, t, 1)?, &v.narrow(2, t, 1)?)?;
        if (t - s.prompt).is_multiple_of(s.every) || t + 1 == total {
            check(&cache, &mut rng, t)?;
        }
    }
    let valid = cache.valid();
    for (h, &n) in s.sizes.iter().enumerate() {
        assert_eq!(valid[h], n.min(total));
    }
    Ok(())
}

fn run_all(s: &Scenario, base: u64) {
    let mut seeds = Seeds::new(base);
    for dev in devices() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            run(s, &dev, dtype, seeds.next_seed()).unwrap();
        }
    }
}

#[test]
fn per_head_spans_with_gqa_and_ring_wrap_around() {
    // Bands 64..256 slots, 400 steps: every ring wraps several times.
    run_all(
        &Scenario {
            b: 2,
            hq: 8,
            sizes: vec![128, 320, 192, 256],
            d: 64,
            prompt: 300,
            steps: 400,
            every: 37,
        },
        100,
    );
}

#[test]
fn prompt_shorter_than_the_sink() {
    run_all(
        &Scenario {
            b: 2,
            hq: 6,
            sizes: vec![128, 192, 128],
            d: 32,
            prompt: 10,
            steps: 220,
            every: 23,
        },
        200,
    );
}

#[test]
fn single_token_prompt_and_sink_only_head() {
    // A head of 64 slots keeps only its sink (no band).
    run_all(
        &Scenario {
            b: 1,
            hq: 9,
            sizes: vec![64, 128, 256],
            d: 64,
            prompt: 1,
            steps: 300,
            every: 29,
        },
        300,
    );
}

#[test]
fn long_spans_split_into_several_chunks() {
    // Spans of 1024..2048 slots at batch 1: several split-KV work items per head on CUDA.
    run_all(
        &Scenario {
            b: 1,
            hq: 4,
            sizes: vec![2048, 1024],
            d: 128,
            prompt: 2100,
            steps: 40,
            every: 13,
        },
        400,
    );
}

#[test]
fn every_split_kv_chunk_gives_the_same_output() -> Result<()> {
    let plan = MoaLayerPlan {
        spans: vec![HeadSpan::from_size(1024), HeadSpan::from_size(320)],
    };
    let mut rng = StdRng::seed_from_u64(700);
    for dev in devices() {
        let (k, v) = (
            random(&mut rng, (2, 2, 1500, 64), &dev, DType::F32)?,
            random(&mut rng, (2, 2, 1500, 64), &dev, DType::F32)?,
        );
        let q = random(&mut rng, (2, 4, 1, 64), &dev, DType::F32)?;
        let mut cache = MoaCache::new(&plan, 2, 64, DType::F32, &dev)?;
        cache.append(&k, &v)?;
        let want = moa_decode(&q, &cache)?;
        for chunk in [64, 192, 256, 1024, 4096] {
            let c = cache.clone().with_chunk(chunk)?;
            assert_eq!(
                c.item_offsets().last(),
                Some(&(1024usize.div_ceil(chunk) + 320usize.div_ceil(chunk)))
            );
            let err = reference::rel_err(&moa_decode(&q, &c)?, &want)?;
            assert!(
                err < 1e-5,
                "{:?} chunk {chunk}: rel err {err:.3e}",
                dev.location()
            );
        }
        assert!(cache.with_chunk(100).is_err());
    }
    Ok(())
}

#[test]
fn every_head_dim() {
    let mut seeds = Seeds::new(500);
    for d in [32, 64, 96, 128, 256] {
        let s = Scenario {
            b: 2,
            hq: 4,
            sizes: vec![192, 128],
            d,
            prompt: 150,
            steps: 90,
            every: 31,
        };
        for dev in devices() {
            run(&s, &dev, DType::F32, seeds.next_seed()).unwrap();
            run(&s, &dev, DType::BF16, seeds.next_seed()).unwrap();
        }
    }
}

#[test]
fn chunked_prompt_writes_match_one_prompt() -> Result<()> {
    // A prompt appended in pieces stores the same slots as the whole prompt at once.
    let plan = MoaLayerPlan {
        spans: vec![HeadSpan::from_size(192), HeadSpan::from_size(256)],
    };
    let mut rng = StdRng::seed_from_u64(600);
    for dev in devices() {
        let k = random(&mut rng, (2, 2, 700, 32), &dev, DType::F32)?;
        let mut whole = MoaCache::new(&plan, 2, 32, DType::F32, &dev)?;
        whole.append(&k, &k)?;
        let mut pieces = MoaCache::new(&plan, 2, 32, DType::F32, &dev)?;
        for (from, n) in [(0, 30), (30, 1), (31, 200), (231, 469)] {
            pieces.append(&k.narrow(2, from, n)?, &k.narrow(2, from, n)?)?;
        }
        let diff = (whole.k_buffer() - pieces.k_buffer())?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{:?}", dev.location());
    }
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let dev = Device::Cpu;
    let plan = MoaLayerPlan {
        spans: vec![HeadSpan::from_size(128), HeadSpan::from_size(192)],
    };
    let err = |r: Result<()>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(what), "error {e:?} should mention {what:?}");
    };
    // Plans and cache shapes.
    let bad = MoaLayerPlan {
        spans: vec![HeadSpan {
            sink: 64,
            band: 100,
        }],
    };
    err(
        MoaCache::new(&bad, 1, 64, DType::F32, &dev).map(|_| ()),
        "multiple of 64",
    );
    err(
        MoaCache::new(&plan, 1, 48, DType::F32, &dev).map(|_| ()),
        "head_dim 48",
    );
    err(
        MoaCache::new(&plan, 1, 64, DType::U8, &dev).map(|_| ()),
        "dtype",
    );
    err(
        MoaCache::new(&plan, 0, 64, DType::F32, &dev).map(|_| ()),
        "batch",
    );
    let mut cache = MoaCache::new(&plan, 2, 64, DType::F32, &dev)?;
    let q = Tensor::zeros((2, 4, 1, 64), DType::F32, &dev)?;
    err(moa_decode(&q, &cache).map(|_| ()), "empty");
    // Appends.
    let kv = |b, h, n, d, dt| Tensor::zeros((b, h, n, d), dt, &dev);
    err(
        cache.append(&kv(2, 3, 1, 64, DType::F32)?, &kv(2, 3, 1, 64, DType::F32)?),
        "(2, 2, n > 0, 64)",
    );
    err(
        cache.append(&kv(2, 2, 1, 64, DType::F16)?, &kv(2, 2, 1, 64, DType::F16)?),
        "dtype",
    );
    err(
        cache.append(&kv(2, 2, 1, 64, DType::F32)?, &kv(2, 2, 2, 64, DType::F32)?),
        "differ",
    );
    err(
        cache.append(&kv(2, 2, 0, 64, DType::F32)?, &kv(2, 2, 0, 64, DType::F32)?),
        "n > 0",
    );
    cache.append(&kv(2, 2, 5, 64, DType::F32)?, &kv(2, 2, 5, 64, DType::F32)?)?;
    // Queries.
    err(
        moa_decode(&Tensor::zeros((2, 3, 1, 64), DType::F32, &dev)?, &cache).map(|_| ()),
        "[2, 3, 1, 64]",
    );
    err(
        moa_decode(&Tensor::zeros((2, 4, 2, 64), DType::F32, &dev)?, &cache).map(|_| ()),
        "[2, 4, 2, 64]",
    );
    err(
        moa_decode(&Tensor::zeros((1, 4, 1, 64), DType::F32, &dev)?, &cache).map(|_| ()),
        "[1, 4, 1, 64]",
    );
    err(
        moa_decode(&Tensor::zeros((2, 4, 1, 64), DType::BF16, &dev)?, &cache).map(|_| ()),
        "BF16",
    );
    err(
        moa_decode(&Tensor::zeros((2, 4, 64), DType::F32, &dev)?, &cache).map(|_| ()),
        "[2, 4, 64]",
    );
    Ok(())
}
