//! MoA prefill attention ([`moa_attn`]): values and gradients against the f64 reference with the
//! equivalent sink + band mask on every available device, the mask itself, bad inputs, and the
//! plan file (JSON round trip, bad plans).

mod common;

use candle::{DType, Device, Tensor};
use candle_sparse_attn::moa::{self, HeadSpan, MoaLayerPlan, MoaPlan, SpanRule};
use candle_sparse_attn::{flash_attn_with_visibility, moa_attn, reference, Visibility};
use common::{devices, run_cases, Case, Pattern, Seeds};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A span of `sink` tokens and `band_blocks` blocks of 64.
const fn span(sink: usize, band_blocks: usize) -> HeadSpan {
    HeadSpan {
        sink,
        band: band_blocks * 64,
    }
}

// Per-kv-head spans (in blocks of 64 after the sink).
const ONE: &[HeadSpan] = &[span(64, 2)];
const BAND_1: &[HeadSpan] = &[span(64, 1), span(64, 1)];
const MIXED_2: &[HeadSpan] = &[span(64, 1), span(64, 3)];
const MIXED_3: &[HeadSpan] = &[span(64, 2), span(0, 1), span(64, 0)];
const MIXED_4: &[HeadSpan] = &[span(64, 1), span(64, 4), span(64, 7), span(64, 2)];
/// Longer than any tested sequence: dense causal.
const ALL_1: &[HeadSpan] = &[span(64, 64)];
const ALL_2: &[HeadSpan] = &[span(64, 64), span(64, 64)];

fn case(
    (b, hq, n, d): (usize, usize, usize, usize),
    spans: &'static [HeadSpan],
    dtype: DType,
    seeds: &mut Seeds,
) -> Case {
    Case {
        b,
        hq,
        hkv: spans.len(),
        nq: n,
        nk: n,
        d,
        dtype,
        pattern: Pattern::SinkBand(spans),
        scale: None,
        seed: seeds.next_seed(),
    }
}

/// Lengths around the 64-token blocks (and the 128-row CUDA query tiles), per-head different
/// spans, GQA groups 1 and 3, sink-only and band-only heads, one block of band, every dtype.
#[test]
fn moa_matches_reference() {
    let mut seeds = Seeds::new(60_000);
    let mut cases = vec![];
    for n in [1, 63, 64, 65, 127, 128, 129, 200] {
        for dtype in DTYPES {
            cases.push(case((1, 2, n, 64), MIXED_2, dtype, &mut seeds));
            cases.push(case((2, 9, n, 64), MIXED_3, dtype, &mut seeds));
        }
    }
    for (shape, spans) in [
        ((1, 4, 300, 128), MIXED_4),
        ((1, 6, 257, 32), BAND_1),
        ((2, 2, 190, 96), ONE),
        ((1, 2, 140, 256), MIXED_2),
        ((1, 3, 333, 128), ALL_1),
    ] {
        for dtype in DTYPES {
            cases.push(case(shape, spans, dtype, &mut seeds));
        }
    }
    run_cases(&cases);
}

/// A long sequence (many band tiles, a gap between sink and band on every query tile), GQA 3.
#[test]
fn moa_long() {
    let mut seeds = Seeds::new(61_000);
    let cases: Vec<Case> = [DType::F32, DType::BF16]
        .into_iter()
        .map(|dtype| case((1, 12, 1000, 64), MIXED_4, dtype, &mut seeds))
        .collect();
    run_cases(&cases);
}

/// Spans covering the whole sequence give dense causal attention, with the same outputs as the
/// causal op; the sink-band mask is then the causal mask.
#[test]
fn full_span_is_causal() -> candle::Result<()> {
    let mut seeds = Seeds::new(62_000);
    let mut cases = vec![];
    for n in [65, 129, 200] {
        cases.push(case((1, 4, n, 64), ALL_2, DType::F32, &mut seeds));
    }
    run_cases(&cases);
    let plan = MoaLayerPlan {
        spans: ALL_2.to_vec(),
    };
    let dims = (2, 4, 2, 200, 200);
    let sink_band = reference::mask(&moa::sink_band(&plan, &Device::Cpu)?, dims)?;
    let causal = reference::mask(&Visibility::Causal, dims)?;
    assert_eq!(
        sink_band.flatten_all()?.to_vec1::<u8>()?,
        causal.flatten_all()?.to_vec1::<u8>()?
    );
    for dev in devices() {
        let x = |h| Tensor::randn(0f32, 1., (1, h, 200, 64), &dev);
        let (q, k, v) = (x(4)?, x(2)?, x(2)?);
        let a = moa_attn(&q, &k, &v, &plan, Some(0.3))?;
        let b = flash_attn_with_visibility(&q, &k, &v, 0.3, Visibility::Causal)?;
        let err = reference::rel_err(&a, &b)?;
        assert!(err < 1e-5, "{dev:?}: full span vs causal: {err:e}");
    }
    Ok(())
}

/// The mask of the spec's rule: query block qb sees {0} ∪ [qb − band + 1, qb], causal inside.
#[test]
fn mask_follows_the_block_rule() -> candle::Result<()> {
    let plan = MoaLayerPlan {
        spans: vec![span(64, 2), span(0, 1)],
    };
    let n = 300;
    let m = reference::mask(&moa::sink_band(&plan, &Device::Cpu)?, (1, 2, 2, n, n))?
        .flatten_all()?
        .to_vec1::<u8>()?;
    for (h, (sink, band)) in [(1usize, 2usize), (0, 1)].into_iter().enumerate() {
        for i in 0..n {
            for j in 0..n {
                let (qb, kb) = (i / 64, j / 64);
                let want = j <= i && ((kb == 0 && sink == 1) || (kb + band > qb));
                assert_eq!(m[(h * n + i) * n + j] == 1, want, "head {h} i {i} j {j}");
            }
        }
    }
    Ok(())
}

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

/// Bad input: plan head count, invalid spans, unequal lengths, a wrong block table.
#[test]
fn invalid_inputs() -> candle::Result<()> {
    for dev in devices() {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev);
        let (q, kv) = (z(&[1, 4, 80, 64])?, z(&[1, 2, 80, 64])?);
        let plan = |spans: Vec<HeadSpan>| MoaLayerPlan { spans };
        assert_err(
            moa_attn(&q, &kv, &kv, &plan(vec![span(64, 1); 3]), None),
            &["3 kv heads", "[1, 2, 80, 64]"],
        );
        assert_err(moa_attn(&q, &kv, &kv, &plan(vec![]), None), &["0 kv heads"]);
        assert_err(
            moa_attn(&q, &kv, &kv, &plan(vec![span(64, 1), span(32, 1)]), None),
            &["head 1", "sink 32"],
        );
        let odd = HeadSpan {
            sink: 64,
            band: 100,
        };
        assert_err(
            moa_attn(&q, &kv, &kv, &plan(vec![odd, odd]), None),
            &["head 0", "band 100", "multiple of 64"],
        );
        assert_err(
            moa_attn(&q, &kv, &kv, &plan(vec![span(0, 0), span(64, 1)]), None),
            &["head 0", "empty span"],
        );
        let kv90 = z(&[1, 2, 90, 64])?;
        assert_err(
            moa_attn(&q, &kv90, &kv90, &plan(vec![span(64, 1); 2]), None),
            &["one length", "[1, 4, 80, 64]", "[1, 2, 90, 64]"],
        );
        assert_err(
            moa_attn(
                &z(&[1, 4, 80])?,
                &kv,
                &kv,
                &plan(vec![span(64, 1); 2]),
                None,
            ),
            &["rank 4"],
        );
        let bad_table = Visibility::SinkBand(candle_sparse_attn::SinkBand {
            blocks: Tensor::zeros((3, 2), DType::I32, &dev)?,
        });
        assert_err(
            flash_attn_with_visibility(&q, &kv, &kv, 0.125, bad_table),
            &["[2, 2]", "[3, 2]"],
        );
    }
    Ok(())
}

/// JSON round trip of a plan (with metadata) and resolution to spans.
#[test]
fn plan_json_round_trip() -> candle::Result<()> {
    let rules = vec![
        vec![
            SpanRule {
                alpha: 1024.0,
                beta: 0.125,
            },
            SpanRule {
                alpha: -1024.0,
                beta: 0.5,
            },
        ],
        vec![
            SpanRule {
                alpha: 0.0,
                beta: 1.0,
            },
            SpanRule {
                alpha: 8192.0,
                beta: 0.0,
            },
        ],
    ];
    let plan = MoaPlan::from_rules(&rules);
    let back = MoaPlan::from_json(&plan.to_json()?)?;
    assert_eq!(back, plan);
    let dir = std::env::temp_dir().join(format!("moa-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("plan.json");
    plan.save(&path)?;
    assert_eq!(MoaPlan::load(&path)?, plan);
    std::fs::remove_dir_all(&dir)?;
    // The reference's format: no metadata.
    let bare = MoaPlan::from_json(r#"{"alphas": [[1024, 0]], "betas": [[0.125, 0.5]]}"#)?;
    assert_eq!(bare.sink_size, None);
    let layers = bare.resolve(9216, 1, 2, 1, false)?;
    // Head 0: 2176 tokens; head 1: 4608; the group takes the max.
    assert_eq!(layers[0].spans, vec![HeadSpan::from_size(4608)]);
    let layers = bare.resolve(9216, 1, 2, 2, false)?;
    assert_eq!(layers[0].spans[0], span(64, 33));
    Ok(())
}

fn plan_err(json: &str, needles: &[&str]) {
    match MoaPlan::from_json(json) {
        Ok(p) => panic!("expected an error mentioning {needles:?}, got {p:?}"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
            }
        }
    }
}

/// Bad plans are rejected with clear errors.
#[test]
fn bad_plans() -> candle::Result<()> {
    plan_err(r#"{"alphas": [[0]]}"#, &["invalid JSON", "betas"]);
    plan_err(r#"{"alphas": [], "betas": []}"#, &["no layers"]);
    plan_err(
        r#"{"alphas": [[0], [0]], "betas": [[0.5]]}"#,
        &["2 layers of alphas", "1 of betas"],
    );
    plan_err(
        r#"{"alphas": [[0, 0], [0]], "betas": [[0.5, 0.5], [0.5]]}"#,
        &["layer 1", "expected 2 heads"],
    );
    plan_err(
        r#"{"alphas": [[0, 0]], "betas": [[0.5, 1.5]]}"#,
        &["layer 0 head 1", "[0, 1]", "1.5"],
    );
    plan_err(
        r#"{"alphas": [[0, 0]], "betas": [[-0.25, 0.5]]}"#,
        &["layer 0 head 0", "-0.25"],
    );
    plan_err(
        r#"{"alphas": [[-64, 0]], "betas": [[0, 0.5]]}"#,
        &["layer 0 head 0", "span ≤ 0"],
    );
    plan_err(
        r#"{"alphas": [[0, 0]], "betas": [[0.5, "x"]]}"#,
        &["invalid JSON"],
    );
    // NaN is not JSON; a plan built in code with NaN is rejected by its check.
    let nan = MoaPlan::from_rules(&[vec![SpanRule {
        alpha: f64::NAN,
        beta: 0.5,
    }]]);
    let e = nan.validate_values().unwrap_err().to_string();
    assert!(e.contains("finite"), "{e}");
    // Wrong model shape.
    let plan = MoaPlan::from_json(r#"{"alphas": [[0, 0]], "betas": [[0.5, 0.5]]}"#)?;
    let e = plan.resolve(4096, 2, 2, 1, false).unwrap_err().to_string();
    assert!(
        e.contains("1 layers × 2 heads") && e.contains("2 layers"),
        "{e}"
    );
    let e = plan.resolve(4096, 1, 4, 1, false).unwrap_err().to_string();
    assert!(e.contains("4 query heads"), "{e}");
    let e = plan.resolve(4096, 1, 2, 3, false).unwrap_err().to_string();
    assert!(e.contains("kv heads 3"), "{e}");
    // Strict GQA: query heads of a group with different spans.
    let plan = MoaPlan::from_json(r#"{"alphas": [[0, 1024]], "betas": [[0.5, 0.5]]}"#)?;
    let e = plan.resolve(4096, 1, 2, 1, true).unwrap_err().to_string();
    assert!(e.contains("strict"), "{e}");
    Ok(())
}
