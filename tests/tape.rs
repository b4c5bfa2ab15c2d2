//! The `_taped` entry points (`candle_sparse_attn::tape`) against their differentiable ops: the
//! same output and the same `(dq, dk, dv)` as autograd, on every device, f32 and bf16, GQA,
//! lengths that are not multiples of the tile; and a clear error for a gradient of the wrong
//! shape.

mod common;

use candle::{DType, Device, Result, Tensor, Var};
use candle_sparse_attn::scfa::random_keep;
use candle_sparse_attn::tape::AttentionTape;
use candle_sparse_attn::{
    flash_attn, flash_attn_taped, hash_sparse_attn, hash_sparse_attn_taped, qk_sparse_attn,
    qk_sparse_attn_taped, AttnParams, HashConfig, ScfaParams,
};
use common::devices;
use rand::rngs::StdRng;
use rand::SeedableRng;

type Differentiable = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>>;
type Taped = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, AttentionTape)>>;

/// The three attention kinds as (name, differentiable op, taped op) for inputs of `shape`.
fn kinds(
    b: usize,
    hq: usize,
    t: usize,
    dev: &Device,
) -> Result<Vec<(&'static str, Differentiable, Taped)>> {
    let params = AttnParams::default();
    let hash = HashConfig::new(4, 7);
    let (q_keep, k_keep) = (
        random_keep((b, hq, t), 0.4, 11, dev)?,
        random_keep((b, hq / 2, t), 0.3, 12, dev)?,
    );
    let scfa = ScfaParams::default();
    let (hash2, qk2, qk3) = (hash.clone(), q_keep.clone(), k_keep.clone());
    Ok(vec![
        (
            "dense",
            Box::new(move |q, k, v| flash_attn(q, k, v, &params)),
            Box::new(move |q, k, v| flash_attn_taped(q, k, v, &params)),
        ),
        (
            "hash",
            Box::new(move |q, k, v| hash_sparse_attn(q, k, v, &hash)),
            Box::new(move |q, k, v| hash_sparse_attn_taped(q, k, v, &hash2)),
        ),
        (
            "qk",
            Box::new(move |q, k, v| qk_sparse_attn(q, k, v, &q_keep, &k_keep, &scfa)),
            Box::new(move |q, k, v| qk_sparse_attn_taped(q, k, v, &qk2, &qk3, &scfa)),
        ),
    ])
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(diff / norm.max(1e-30))
}

#[test]
fn taped_matches_autograd() -> Result<()> {
    for dev in devices() {
        for dtype in [DType::F32, DType::BF16] {
            // GQA (4 query heads over 2 kv heads), a length that is not a multiple of the tile.
            let (b, hq, hkv, t, d) = (2, 4, 2, 150, 64);
            let draw = |h: usize, seed: u64| -> Result<Tensor> {
                let data = common::normal(&mut StdRng::seed_from_u64(seed), b * h * t * d);
                Tensor::from_vec(data, (b, h, t, d), &dev)?.to_dtype(dtype)
            };
            let (q, k, v) = (draw(hq, 1)?, draw(hkv, 2)?, draw(hkv, 3)?);
            let dy = draw(hq, 4)?;
            for (name, plain, taped) in kinds(b, hq, t, &dev)? {
                let (qv, kv, vv) = (
                    Var::from_tensor(&q)?,
                    Var::from_tensor(&k)?,
                    Var::from_tensor(&v)?,
                );
                let y = plain(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
                let grads = (y.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?
                    .sum_all()?
                    .backward()?;
                let (y_t, tape) = taped(&q, &k, &v)?;
                let (dq, dk, dv) = tape.backward(&dy)?;
                let pairs = [
                    ("out", y_t, y),
                    ("dq", dq, grads.get(qv.as_tensor()).unwrap().clone()),
                    ("dk", dk, grads.get(kv.as_tensor()).unwrap().clone()),
                    ("dv", dv, grads.get(vv.as_tensor()).unwrap().clone()),
                ];
                for (what, got, want) in pairs {
                    assert_eq!(got.dims(), want.dims(), "{name} {what} {dtype:?} {dev:?}");
                    assert_eq!(got.dtype(), dtype, "{name} {what} {dtype:?} {dev:?}");
                    let err = rel_err(&got, &want)?;
                    // The same kernels on the same inputs: equal up to the f32 accumulation
                    // order of the bf16 autograd product above.
                    let bar = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                    assert!(err <= bar, "{name} {what} {dtype:?} {dev:?}: rel err {err}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn taped_backward_rejects_a_wrong_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 2, 40, 64), &dev)?;
    for (name, _, taped) in kinds(1, 2, 40, &dev)? {
        let (k, v) = (q.narrow(1, 0, 1)?, q.narrow(1, 1, 1)?);
        let (_, tape) = taped(&q, &k, &v)?;
        let wrong = Tensor::zeros((1, 2, 39, 64), DType::F32, &dev)?;
        let err = tape.backward(&wrong).expect_err(name).to_string();
        assert!(err.contains("must match the output"), "{name}: {err}");
    }
    Ok(())
}
