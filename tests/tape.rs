//! The `_taped` entry points (`candle_sparse_attn::tape`) against their differentiable ops: the
//! same output and the same `(dq, dk, dv)` (and SparseK's `dscores`) as autograd, on every
//! device, f32 and bf16, GQA, lengths that are not multiples of the tile; and a clear error for a
//! gradient of the wrong shape.

mod common;

use candle::{DType, Device, Result, Tensor, Var};
use candle_sparse_attn::scfa::random_keep;
use candle_sparse_attn::tape::{AttentionGrads, AttentionTape};
use candle_sparse_attn::{
    flash_attn, flash_attn_taped, hash_sparse_attn, hash_sparse_attn_taped, qk_sparse_attn,
    qk_sparse_attn_taped, sparsek_attn, sparsek_attn_taped, AttnParams, HashConfig, ScfaParams,
    SparseKConfig,
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

/// `got` equals `want` (same shape and dtype): the same kernels on the same inputs, equal up to
/// the f32 accumulation order of the bf16 autograd product that seeds `want`.
fn assert_same(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}");
    assert_eq!(got.dtype(), want.dtype(), "{what}");
    let err = rel_err(got, want)?;
    let bar = if got.dtype() == DType::F32 {
        1e-6
    } else {
        1e-2
    };
    assert!(err <= bar, "{what}: rel err {err}");
    Ok(())
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
                    assert_same(&format!("{name} {what} {dtype:?} {dev:?}"), &got, &want)?;
                    assert_eq!(got.dtype(), dtype, "{name} {what} {dtype:?} {dev:?}");
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

/// A SparseK configuration that selects (t = 150 > window + k) over random scores.
fn sparsek_config() -> SparseKConfig {
    SparseKConfig::new(8, 16)
}

/// [`sparsek_attn_taped`] against [`sparsek_attn`] under autograd: the same output and
/// `dq`, `dk`, `dv`, `dscores`.
#[test]
fn sparsek_taped_matches_autograd() -> Result<()> {
    let cfg = sparsek_config();
    for dev in devices() {
        for dtype in [DType::F32, DType::BF16] {
            let (b, hq, hkv, t, d) = (2, 4, 2, 150, 64);
            let draw = |shape: &[usize], seed: u64| -> Result<Tensor> {
                let n = shape.iter().product();
                let data = common::normal(&mut StdRng::seed_from_u64(seed), n);
                Tensor::from_vec(data, shape, &dev)
            };
            let (q, k, v) = (
                draw(&[b, hq, t, d], 1)?.to_dtype(dtype)?,
                draw(&[b, hkv, t, d], 2)?.to_dtype(dtype)?,
                draw(&[b, hkv, t, d], 3)?.to_dtype(dtype)?,
            );
            let scores = draw(&[b, hkv, t], 5)?;
            let dy = draw(&[b, hq, t, d], 4)?.to_dtype(dtype)?;
            let vars = [&q, &k, &v, &scores].map(|x| Var::from_tensor(x).unwrap());
            let [qv, kv, vv, sv] = vars.each_ref().map(|x| x.as_tensor());
            let y = sparsek_attn(qv, kv, vv, sv, &cfg)?;
            let grads = (y.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?
                .sum_all()?
                .backward()?;
            let (y_t, tape) = sparsek_attn_taped(&q, &k, &v, &scores, &cfg)?;
            let AttentionGrads {
                dq,
                dk,
                dv,
                dscores,
            } = tape.grads(&dy)?;
            let dscores = dscores.expect("a sparsek tape gives the scores' gradient");
            let pairs = [
                ("out", y_t, y),
                ("dq", dq, grads.get(qv).unwrap().clone()),
                ("dk", dk, grads.get(kv).unwrap().clone()),
                ("dv", dv, grads.get(vv).unwrap().clone()),
                ("dscores", dscores, grads.get(sv).unwrap().clone()),
            ];
            for (what, got, want) in pairs {
                assert_same(&format!("sparsek {what} {dtype:?} {dev:?}"), &got, &want)?;
            }
        }
    }
    Ok(())
}

/// A SparseK tape refuses an output gradient of the wrong shape, and refuses `backward`, which
/// would drop the scores' gradient.
#[test]
fn sparsek_tape_rejects_a_wrong_gradient_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 2, 40, 64), &dev)?;
    let (k, v) = (q.narrow(1, 0, 1)?, q.narrow(1, 1, 1)?);
    let scores = Tensor::randn(0f32, 1., (1, 1, 40), &dev)?;
    let (_, tape) = sparsek_attn_taped(&q, &k, &v, &scores, &sparsek_config())?;
    let wrong = Tensor::zeros((1, 2, 39, 64), DType::F32, &dev)?;
    let err = tape.grads(&wrong).expect_err("wrong dy").to_string();
    assert!(err.contains("must match the output"), "{err}");
    assert!(err.contains("[1, 2, 39, 64]"), "{err}");
    let dy = Tensor::zeros((1, 2, 40, 64), DType::F32, &dev)?;
    let err = tape.backward(&dy).expect_err("backward").to_string();
    assert!(err.contains("call grads"), "{err}");
    Ok(())
}
