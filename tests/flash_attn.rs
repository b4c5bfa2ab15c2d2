//! The flash-attention suite: values and gradients of the op against the f64 reference, on every
//! available device (CPU always, CUDA with `--features cuda` and a GPU), plus input validation.

mod common;

use candle::{DType, Device, Tensor};
use candle_sparse_attn::Visibility;
use candle_sparse_attn::{flash_attn, flash_attn_with_visibility, AttnParams, SparseLayout};
use common::{devices, run_cases, Buckets, Case, Pattern, Seeds};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

fn case(
    (b, hq, hkv, nq, nk, d): (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    pattern: Pattern,
    seeds: &mut Seeds,
) -> Case {
    Case {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dtype,
        pattern,
        scale: None,
        seed: seeds.next_seed(),
    }
}

/// Hand-picked dense shapes: odd lengths, GQA groups 1/2/3/8, decoding (q_len 1, q_len < kv_len),
/// q_len > kv_len (stranded causal rows), every head dim; every dtype, causal and full.
#[test]
fn dense_shapes() {
    let shapes = [
        (1, 1, 1, 1, 1, 64),
        (2, 4, 2, 37, 53, 64),
        (1, 8, 1, 65, 129, 32),
        (1, 6, 2, 100, 100, 96),
        (1, 2, 2, 1, 77, 128),
        (1, 3, 1, 130, 47, 256),
        (2, 2, 1, 128, 128, 64),
        (1, 4, 4, 71, 257, 32),
    ];
    let mut seeds = Seeds::new(1_000);
    let mut cases = vec![];
    for shape in shapes {
        for dtype in DTYPES {
            for pattern in [Pattern::Causal, Pattern::Full] {
                cases.push(case(shape, dtype, pattern, &mut seeds));
            }
        }
    }
    run_cases(&cases);
}

/// Random dense shapes and scales.
#[test]
fn dense_random() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut seeds = Seeds::new(2_000);
    let cases: Vec<Case> = (0..24)
        .map(|i| {
            let hkv = rng.random_range(1..=3);
            let group = [1, 2, 3, 8][rng.random_range(0..4)];
            let nq = rng.random_range(1..=150);
            let nk = if rng.random_bool(0.3) {
                nq
            } else {
                rng.random_range(1..=150)
            };
            let shape = (
                rng.random_range(1..=2),
                hkv * group,
                hkv,
                nq,
                nk,
                HEAD_DIMS[rng.random_range(0..HEAD_DIMS.len())],
            );
            let pattern = if i % 2 == 0 {
                Pattern::Causal
            } else {
                Pattern::Full
            };
            let mut c = case(shape, DTYPES[i % 3], pattern, &mut seeds);
            c.scale = rng.random_bool(0.5).then(|| rng.random_range(0.05..0.5));
            c
        })
        .collect();
    run_cases(&cases);
}

/// QK dropping: compacted kept rows with padding, all-dropped heads, strict mode, GQA.
#[test]
fn sparse_dropped() {
    let mut seeds = Seeds::new(3_000);
    let mut cases = vec![];
    let shapes = [
        (1, 2, 1, 90, 90, 64),
        (2, 4, 2, 67, 131, 32),
        (1, 3, 1, 150, 60, 128),
        (1, 8, 1, 1, 40, 96),
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        for (j, dtype) in DTYPES.into_iter().enumerate() {
            let pattern = Pattern::Dropped {
                keep_q: [0.5, 0.3, 0.8][j],
                keep_k: [0.6, 0.2, 0.9][(i + j) % 3],
                dropped_head: (i + j) % 2 == 0,
                strict: i % 2 == 1,
            };
            cases.push(case(shape, dtype, pattern, &mut seeds));
        }
    }
    // Everything dropped.
    let none = Pattern::Dropped {
        keep_q: 0.0,
        keep_k: 0.0,
        dropped_head: false,
        strict: false,
    };
    cases.push(case((1, 2, 1, 33, 33, 64), DType::F32, none, &mut seeds));
    run_cases(&cases);
}

/// Hash buckets sorted by (bucket, position): random and shared buckets, one bucket per row,
/// strict mode, padding rows, q_len ≠ kv_len, GQA.
#[test]
fn sparse_hashed() {
    let mut seeds = Seeds::new(4_000);
    let mut cases = vec![];
    let shapes = [
        (1, 2, 1, 100, 100, 64),
        (2, 4, 2, 77, 77, 32),
        (1, 3, 3, 140, 129, 128),
        (1, 6, 2, 50, 97, 96),
    ];
    let buckets = [
        Buckets::Random(4),
        Buckets::Shared(3),
        Buckets::Random(1),
        Buckets::PerRow,
        Buckets::Random(16),
        Buckets::Shared(8),
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        for (j, dtype) in DTYPES.into_iter().enumerate() {
            let pattern = Pattern::Hashed {
                buckets: buckets[(i + j) % buckets.len()],
                strict: (i + j) % 2 == 1,
            };
            cases.push(case(shape, dtype, pattern, &mut seeds));
        }
    }
    for strict in [false, true] {
        let pattern = Pattern::Hashed {
            buckets: Buckets::PerRow,
            strict,
        };
        cases.push(case((1, 2, 1, 45, 45, 64), DType::F32, pattern, &mut seeds));
    }
    run_cases(&cases);
}

/// Random shapes and patterns (small case count; failures shrink to a minimal shape).
#[test]
fn proptest_shapes() {
    let config = ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let strategy = (
        1..=2usize,
        1..=2usize,
        1..=4usize,
        1..=96usize,
        1..=96usize,
        0..HEAD_DIMS.len(),
        0..3usize,
        0..4usize,
        any::<u64>(),
    );
    proptest!(config, |((b, hkv, group, nq, nk, di, dti, pi, seed) in strategy)| {
        let pattern = match pi {
            0 => Pattern::Full,
            1 => Pattern::Causal,
            2 => Pattern::Dropped { keep_q: 0.6, keep_k: 0.6, dropped_head: false, strict: false },
            _ => Pattern::Hashed { buckets: Buckets::Random(3), strict: true },
        };
        let c = Case {
            b, hq: hkv * group, hkv, nq, nk, d: HEAD_DIMS[di], dtype: DTYPES[dti],
            pattern, scale: None, seed,
        };
        run_cases(&[c]);
    });
}

fn zeros(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::zeros(shape, dtype, dev).unwrap()
}

/// Asserts that `result` is an error whose message contains every one of `needles`.
fn assert_err(result: candle::Result<Tensor>, needles: &[&str]) {
    match result {
        Ok(t) => panic!("expected an error mentioning {needles:?}, got a tensor {t:?}"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
            }
        }
    }
}

/// Bad input returns errors naming the problem and the shapes, never panics.
#[test]
fn invalid_inputs() {
    let causal = AttnParams::default();
    for dev in devices() {
        let f32z = |s: &[usize]| zeros(s, DType::F32, &dev);
        let (q, kv) = (f32z(&[1, 4, 8, 64]), f32z(&[1, 2, 8, 64]));
        assert_err(
            flash_attn(&f32z(&[4, 8, 64]), &kv, &kv, &causal),
            &["rank 4", "[4, 8, 64]"],
        );
        assert_err(
            flash_attn(&q, &f32z(&[2, 2, 8, 64]), &f32z(&[2, 2, 8, 64]), &causal),
            &["batch", "[1, 4, 8, 64]", "[2, 2, 8, 64]"],
        );
        assert_err(
            flash_attn(&q, &f32z(&[1, 2, 8, 32]), &f32z(&[1, 2, 8, 32]), &causal),
            &["head_dim", "[1, 4, 8, 64]", "[1, 2, 8, 32]"],
        );
        assert_err(
            flash_attn(&q, &kv, &f32z(&[1, 2, 9, 64]), &causal),
            &["same shape", "[1, 2, 8, 64]", "[1, 2, 9, 64]"],
        );
        assert_err(
            flash_attn(&q, &f32z(&[1, 3, 8, 64]), &f32z(&[1, 3, 8, 64]), &causal),
            &[
                "kv heads must divide q heads",
                "[1, 4, 8, 64]",
                "[1, 3, 8, 64]",
            ],
        );
        assert_err(
            flash_attn(&q, &zeros(&[1, 2, 8, 64], DType::BF16, &dev), &kv, &causal),
            &["share a dtype", "BF16"],
        );
        let q80 = f32z(&[1, 4, 8, 80]);
        let kv80 = f32z(&[1, 2, 8, 80]);
        assert_err(
            flash_attn(&q80, &kv80, &kv80, &causal),
            &["head_dim 80", "not supported", "[1, 4, 8, 80]"],
        );
        assert_err(
            flash_attn(&f32z(&[1, 4, 0, 64]), &kv, &kv, &causal),
            &["empty", "[1, 4, 0, 64]"],
        );
        assert_err(
            flash_attn(&q, &f32z(&[1, 2, 0, 64]), &f32z(&[1, 2, 0, 64]), &causal),
            &["empty", "[1, 2, 0, 64]"],
        );
        assert_err(
            flash_attn(
                &f32z(&[0, 4, 8, 64]),
                &f32z(&[0, 2, 8, 64]),
                &f32z(&[0, 2, 8, 64]),
                &causal,
            ),
            &["empty", "[0, 4, 8, 64]"],
        );
        for dtype in [DType::U32, DType::F64] {
            let (q, kv) = (
                zeros(&[1, 4, 8, 64], dtype, &dev),
                zeros(&[1, 2, 8, 64], dtype, &dev),
            );
            assert_err(
                flash_attn(&q, &kv, &kv, &causal),
                &["not supported", &format!("{dtype:?}")],
            );
        }
        for scale in [f32::NAN, f32::INFINITY] {
            let params = AttnParams {
                softmax_scale: Some(scale),
                causal: true,
            };
            assert_err(flash_attn(&q, &kv, &kv, &params), &["scale", "finite"]);
        }

        let pos = |s: &[usize], dtype: DType| zeros(s, dtype, &dev);
        let layout = |q_pos: Tensor, k_pos: Tensor, buckets: Option<(Tensor, Tensor)>| {
            Visibility::Sparse(SparseLayout {
                q_pos,
                k_pos,
                buckets,
                strict: false,
            })
        };
        let sparse = |vis| flash_attn_with_visibility(&q, &kv, &kv, 0.125, vis);
        assert_err(
            sparse(layout(
                pos(&[1, 2, 8], DType::I32),
                pos(&[1, 2, 8], DType::I32),
                None,
            )),
            &["q_pos", "[1, 4, 8]", "[1, 2, 8]"],
        );
        assert_err(
            sparse(layout(
                pos(&[1, 4, 8], DType::I32),
                pos(&[1, 2, 7], DType::I32),
                None,
            )),
            &["k_pos", "[1, 2, 8]", "[1, 2, 7]"],
        );
        assert_err(
            sparse(layout(
                pos(&[1, 4, 8], DType::U32),
                pos(&[1, 2, 8], DType::I32),
                None,
            )),
            &["q_pos", "i32", "U32"],
        );
        let buckets = Some((pos(&[1, 4, 8], DType::I32), pos(&[1, 4, 8], DType::I32)));
        assert_err(
            sparse(layout(
                pos(&[1, 4, 8], DType::I32),
                pos(&[1, 2, 8], DType::I32),
                buckets,
            )),
            &["k_bucket", "[1, 2, 8]", "[1, 4, 8]"],
        );
        let buckets = Some((pos(&[1, 4, 8], DType::F32), pos(&[1, 2, 8], DType::I32)));
        assert_err(
            sparse(layout(
                pos(&[1, 4, 8], DType::I32),
                pos(&[1, 2, 8], DType::I32),
                buckets,
            )),
            &["q_bucket", "i32", "F32"],
        );
    }
    // Mixed devices: only with a GPU.
    for dev in devices().iter().filter(|d| d.is_cuda()) {
        let q = zeros(&[1, 4, 8, 64], DType::F32, dev);
        let kv = zeros(&[1, 2, 8, 64], DType::F32, &Device::Cpu);
        assert_err(
            flash_attn(&q, &kv, &kv, &AttnParams::default()),
            &["one device"],
        );
        let kv = zeros(&[1, 2, 8, 64], DType::F32, dev);
        let cpu = |s: &[usize]| zeros(s, DType::I32, &Device::Cpu);
        let vis = Visibility::Sparse(SparseLayout {
            q_pos: cpu(&[1, 4, 8]),
            k_pos: cpu(&[1, 2, 8]),
            buckets: None,
            strict: false,
        });
        assert_err(
            flash_attn_with_visibility(&q, &kv, &kv, 0.125, vis),
            &["device"],
        );
    }
}
