//! MoA influence profiling against brute force: the closed form `E = A/(1−A)·(Delta − G)` vs a
//! materialised `A` and `G = ∂L/∂A` from candle's autograd, the first-order estimate vs actually
//! masking an entry and renormalising, and the profiled attention op (gradients unchanged,
//! influence accumulated into its tap, GQA max reduction).

mod common;

use candle::{DType, Device, Result, Tensor, Var, D};
use candle_sparse_attn::moa::profile::{block_influence, entry_influence, INFLUENCE_EPS};
use candle_sparse_attn::moa::{profiled_attention, InfluenceTap, MoaInfluence};
use candle_sparse_attn::{flash_attn, reference, AttnParams};
use common::normal;
use rand::{rngs::StdRng, SeedableRng};

fn randn(rng: &mut StdRng, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(normal(rng, n), shape, &Device::Cpu)?.to_dtype(DType::F64)
}

/// Causal softmax `A` `(b, hq, n, n)` in f64 (kv heads repeated for GQA).
fn attention_matrix(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, hq, n, _) = q.dims4()?;
    let k = reference::repeat_kv(k, hq / k.dim(1)?)?;
    let s = (q.matmul(&k.t()?)? * scale)?;
    let mask = reference::mask(&candle_sparse_attn::Visibility::Causal, (b, hq, hq, n, n))?;
    let s = mask.where_cond(
        &s,
        &Tensor::full(f64::NEG_INFINITY, s.shape(), &Device::Cpu)?,
    )?;
    candle_nn::ops::softmax(&s, D::Minus1)
}

/// The nonlinear test loss `Σ sin(O) ⊙ W` and its `dO = cos(O) ⊙ W`.
fn loss_and_grad(o: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok(((o.sin()? * w)?.sum_all()?, (o.cos()? * w)?))
}

#[test]
fn closed_form_matches_materialised_a_and_g() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let (b, hq, hkv, n, d) = (2, 4, 2, 150, 16);
    let (q, k, v) = (
        randn(&mut rng, (b, hq, n, d))?,
        randn(&mut rng, (b, hkv, n, d))?,
        randn(&mut rng, (b, hkv, n, d))?,
    );
    let w = randn(&mut rng, (b, hq, n, d))?;
    let scale = 0.3;
    let a = Var::from_tensor(&attention_matrix(&q, &k, scale)?)?;
    let o = a.matmul(&reference::repeat_kv(&v, hq / hkv)?)?;
    let (loss, d_o) = loss_and_grad(&o, &w)?;
    let g = loss.backward()?.get(&a).expect("grad of A").clone();
    // effect = −A·(G − rowsum(G⊙A)) / (eps + 1 − A), row 0: −G⊙A.
    let a = a.as_tensor();
    let delta = (&g * a)?.sum_keepdim(D::Minus1)?;
    let e = (a * delta.broadcast_sub(&g)?)?.div(&((1.0 + INFLUENCE_EPS as f64) - a)?)?;
    let row0 = (&g * a)?.neg()?.narrow(2, 0, 1)?;
    let e = Tensor::cat(&[row0, e.narrow(2, 1, n - 1)?], 2)?;
    let ours = entry_influence(&q, &k, &v, &d_o, scale as f32)?;
    let err = reference::rel_err(&ours, &e)?;
    assert!(err < 1e-4, "entry influence rel err {err:.3e}");
    // Block sums of |E| over the batch, causal blocks only (the upper triangle of E is 0).
    let nb = n.div_ceil(64);
    let abs = e
        .abs()?
        .pad_with_zeros(2, 0, nb * 64 - n)?
        .pad_with_zeros(3, 0, nb * 64 - n)?;
    let want = abs
        .reshape((b, hq, nb, 64, nb, 64))?
        .sum(5)?
        .sum(3)?
        .sum(0)?;
    let blocks = block_influence(&q, &k, &v, &d_o, scale as f32)?;
    let err = reference::rel_err(&blocks, &want)?;
    assert!(err < 1e-4, "block influence rel err {err:.3e}");
    Ok(())
}

#[test]
fn first_order_estimate_matches_masking_an_entry() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let (n, d) = (96, 8);
    let (q, k, v) = (
        randn(&mut rng, (1, 1, n, d))?,
        randn(&mut rng, (1, 1, n, d))?,
        randn(&mut rng, (1, 1, n, d))?,
    );
    let w = randn(&mut rng, (1, 1, n, d))?;
    let scale = 0.5;
    let a = attention_matrix(&q, &k, scale)?;
    let (loss, d_o) = loss_and_grad(&a.matmul(&v)?, &w)?;
    let e = entry_influence(&q, &k, &v, &d_o, scale as f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let a_host = a.flatten_all()?.to_vec1::<f64>()?;
    let loss = loss.to_scalar::<f64>()?;
    let mut checked = 0;
    for (i, j) in [
        (5, 2),
        (40, 0),
        (40, 39),
        (70, 12),
        (95, 60),
        (95, 95),
        (63, 64 - 1),
        (80, 64),
    ] {
        let aij = a_host[i * n + j];
        // Mask entry (i, j) and renormalise row i.
        let mut masked = a_host.clone();
        for x in &mut masked[i * n..(i + 1) * n] {
            *x /= 1.0 - aij;
        }
        masked[i * n + j] = 0.0;
        let am = Tensor::from_vec(masked, (1, 1, n, n), &Device::Cpu)?;
        let (lm, _) = loss_and_grad(&am.matmul(&v)?, &w)?;
        let exact = lm.to_scalar::<f64>()? - loss;
        let est = e[i * n + j] as f64;
        // First order: the remainder is second order in the change of the row.
        let tol = 1e-6 + exact.abs().max(est.abs()) * (0.05 + 2.0 * aij / (1.0 - aij));
        assert!(
            (exact - est).abs() <= tol,
            "entry ({i}, {j}) A={aij:.4}: masked ΔL {exact:.6e} vs estimate {est:.6e}"
        );
        checked += 1;
    }
    assert_eq!(checked, 8);
    Ok(())
}

#[test]
fn profiled_attention_keeps_gradients_and_fills_the_tap() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, hq, hkv, n, d) = (2, 6, 2, 130, 32);
    let f32v = |t: Tensor| -> Result<Var> { Var::from_tensor(&t.to_dtype(DType::F32)?) };
    let (q, k, v) = (
        f32v(randn(&mut rng, (b, hq, n, d))?)?,
        f32v(randn(&mut rng, (b, hkv, n, d))?)?,
        f32v(randn(&mut rng, (b, hkv, n, d))?)?,
    );
    let w = randn(&mut rng, (b, hq, n, d))?.to_dtype(DType::F32)?;
    let scale = 1.0 / (d as f32).sqrt();
    let tap = InfluenceTap::new();
    let loss = (profiled_attention(&q, &k, &v, scale, &tap)? * &w)?.sum_all()?;
    let grads = loss.backward()?;
    let plain = (flash_attn(&q, &k, &v, &AttnParams::default())? * &w)?.sum_all()?;
    let plain_grads = plain.backward()?;
    for x in [&q, &k, &v] {
        let err = reference::rel_err(grads.get(x).unwrap(), plain_grads.get(x).unwrap())?;
        assert!(err < 1e-6, "gradient changed by the tap: rel err {err:.3e}");
    }
    // dO of Σ o ⊙ w is w; the tap holds the batch mean of the block influence.
    let (mean, items) = tap.mean()?;
    assert_eq!(items, b);
    let want = (block_influence(&q, &k, &v, &w, scale)? / b as f64)?;
    let err = reference::rel_err(&mean, &want)?;
    assert!(err < 1e-5, "tap mean rel err {err:.3e}");
    // GQA: the max over each group's query heads.
    let inf = MoaInfluence::from_taps(&[tap.clone(), tap], n)?;
    let red = inf.reduce_gqa(hkv)?;
    assert_eq!(red.dims(), &[2, hkv, 3, 3]);
    let m = mean.to_vec3::<f32>()?;
    let r = red.get(1)?.to_vec3::<f32>()?;
    for g in 0..hkv {
        for qb in 0..3 {
            for kb in 0..3 {
                let want = (0..hq / hkv)
                    .map(|h| m[g * 3 + h][qb][kb])
                    .fold(f32::MIN, f32::max);
                assert_eq!(r[g][qb][kb], want);
            }
        }
    }
    // Round trip through the file.
    let dir = tempfile::tempdir().map_err(candle::Error::wrap)?;
    let path = dir.path().join("influence.safetensors");
    inf.save(&path)?;
    let back = MoaInfluence::load(&path)?;
    assert_eq!((back.length, back.items), (n, b));
    assert_eq!(reference::rel_err(&back.blocks, &inf.blocks)?, 0.0);
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let z = |s: (usize, usize, usize, usize)| Tensor::zeros(s, DType::F32, &Device::Cpu);
    let e = block_influence(
        &z((1, 3, 8, 4))?,
        &z((1, 2, 8, 4))?,
        &z((1, 2, 8, 4))?,
        &z((1, 3, 8, 4))?,
        1.0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("[1, 3, 8, 4]"), "{e}");
    let e = block_influence(
        &z((1, 2, 8, 4))?,
        &z((1, 2, 8, 4))?,
        &z((1, 2, 8, 4))?,
        &z((1, 2, 9, 4))?,
        1.0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("[1, 2, 9, 4]"), "{e}");
    assert!(InfluenceTap::new().mean().is_err());
    Ok(())
}
