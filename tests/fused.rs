//! The fused training ops against plain candle compositions evaluated in f64 on the CPU: outputs
//! and gradients, f32 / bf16 / f16, widths and row counts that are not multiples of the kernels'
//! tiles, on every device of `common::devices()`; and their errors on bad input.

mod common;

use candle::{DType, Device, Result, Tensor, Var, D};
use candle_sparse_attn::fused::{
    adamw_update, adamw_update_many, add_layer_norm, backward_from, batch_sum_f32, cast_concat,
    cross_entropy_with_grad, embedding, embedding_backward, gelu, gelu_backward,
    gelu_linear_backward, layer_norm, layer_norm_backward, layer_norm_backward_add, linear,
    linear_backward, linear_gelu, merge_heads, merge_qkv, merge_qkv_with, norm_clip_factor,
    split_heads, split_qkv, sum_of_squares, to_heads, AdamWUpdate,
};
use candle_sparse_attn::reference::rel_err;
use common::{devices, normal, tolerance};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// A random f32 CPU tensor.
fn randn(rng: &mut StdRng, shape: &[usize], scale: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = normal(rng, n).into_iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `f` on `inputs` (cast to `dtype`, moved to `dev`) and the gradients of `(f(..) · r).sum()`
/// with respect to every input, all as f64 CPU tensors.
fn run(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    r: &Tensor,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?))
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let loss = (out.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?;
    let store = loss.backward()?;
    let grads = vars
        .iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => g.to_device(&Device::Cpu)?.to_dtype(DType::F64),
            None => candle::bail!("no gradient for an input of shape {:?}", v.dims()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out.to_device(&Device::Cpu)?.to_dtype(DType::F64)?, grads))
}

/// Compares `fused` with `reference` (evaluated in f64 on the CPU from the inputs rounded to each
/// dtype) on every device and dtype.
fn compare(
    what: &str,
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    r: &Tensor,
) -> Result<()> {
    for dev in devices() {
        for dtype in DTYPES {
            let rounded = inputs
                .iter()
                .map(|t| t.to_dtype(dtype)?.to_dtype(DType::F32))
                .collect::<Result<Vec<_>>>()?;
            let (out, grads) = run(fused, &rounded, r, dtype, &dev)?;
            let (ref_out, ref_grads) = run(reference, &rounded, r, DType::F64, &Device::Cpu)?;
            let tol = tolerance(dtype, &dev);
            let err = rel_err(&out, &ref_out)?;
            assert!(err <= tol, "{what} {dtype:?} {dev:?}: output rel err {err}");
            for (i, (g, rg)) in grads.iter().zip(&ref_grads).enumerate() {
                let err = rel_err(g, rg)?;
                assert!(
                    err <= tol,
                    "{what} {dtype:?} {dev:?}: grad {i} rel err {err}"
                );
            }
        }
    }
    Ok(())
}

fn composite_layer_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(gain)
}

#[test]
fn layer_norm_matches_composite() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    // CUDA picks a kernel per width: 16-byte chunks held in registers (384, 96, 1000, 2048 with
    // 1 to 8 chunks per lane), single elements in registers (45, 385, 1), or rows re-read from
    // memory (2100: too wide for registers without 16-byte chunks for bf16 / f16, too many chunks
    // for f32).
    let shapes = [
        vec![3, 5, 45],
        vec![37, 384],
        vec![2, 9, 1000],
        vec![1, 1],
        vec![11, 385],
        vec![2, 7, 96],
        vec![3, 2048],
        vec![5, 2100],
    ];
    for shape in shapes {
        let c = *shape.last().unwrap();
        let x = (randn(&mut rng, &shape, 2.0)? + 0.5)?;
        let gain = (randn(&mut rng, &[c], 0.2)? + 1.0)?;
        let r = randn(&mut rng, &shape, 1.0)?;
        compare(
            &format!("layer_norm {shape:?}"),
            &|t| layer_norm(&t[0], &t[1], 1e-5),
            &|t| composite_layer_norm(&t[0], &t[1], 1e-5),
            &[x, gain],
            &r,
        )?;
    }
    Ok(())
}

#[test]
fn gelu_matches_candle() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    for shape in [vec![3, 7, 33], vec![1000], vec![2, 4, 1536]] {
        let x = randn(&mut rng, &shape, 3.0)?;
        let r = randn(&mut rng, &shape, 1.0)?;
        compare(
            &format!("gelu {shape:?}"),
            &|t| gelu(&t[0]),
            &|t| t[0].gelu(),
            &[x],
            &r,
        )?;
    }
    Ok(())
}

#[test]
fn embedding_matches_index_select() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for (vocab, c, n) in [(65, 384, 1000), (7, 33, 257), (300, 8, 5)] {
        let table = randn(&mut rng, &[vocab, c], 1.0)?;
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let ids = Tensor::from_vec(ids, n, &Device::Cpu)?;
        let r = randn(&mut rng, &[n, c], 1.0)?;
        compare(
            &format!("embedding {vocab}x{c} n {n}"),
            &|t| embedding(&t[0], &ids.to_device(t[0].device())?),
            &|t| t[0].index_select(&ids, 0),
            &[table],
            &r,
        )?;
    }
    Ok(())
}

#[test]
fn split_heads_matches_transpose() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    for (b, t, h, d) in [(2, 37, 3, 16), (1, 5, 6, 64), (3, 1, 1, 8)] {
        let qkv = randn(&mut rng, &[b, t, 3 * h * d], 1.0)?;
        for part in 0..3 {
            let r = randn(&mut rng, &[b, h, t, d], 1.0)?;
            compare(
                &format!("split_heads {b}x{t}x{h}x{d} part {part}"),
                &|x| split_heads(&x[0], h, part),
                &|x| {
                    x[0].reshape((b, t, 3 * h, d))?
                        .transpose(1, 2)?
                        .narrow(1, part * h, h)?
                        .contiguous()
                },
                std::slice::from_ref(&qkv),
                &r,
            )?;
        }
    }
    Ok(())
}

#[test]
fn split_qkv_and_merge_qkv_match_transpose() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(16);
    // d = 64: 16-byte units in every dtype; 6 (f32) and 3: 4- and 2-byte units. Extra columns
    // after q, k, v (a projection with more outputs): 8 keep the units, 3 narrow them.
    for (b, t, h, d) in [
        (2, 37, 3, 16),
        (1, 5, 6, 64),
        (3, 1, 1, 8),
        (2, 9, 2, 6),
        (1, 4, 5, 3),
    ] {
        for e in [0, 8, 3] {
            let qkv = randn(&mut rng, &[b, t, 3 * h * d + e], 1.0)?;
            let parts = randn(&mut rng, &[3, b, h, t, d], 1.0)?;
            let extra = (e > 0)
                .then(|| randn(&mut rng, &[b, t, e], 1.0))
                .transpose()?;
            for dev in devices() {
                for dtype in DTYPES {
                    let tol = tolerance(dtype, &dev);
                    let case = format!("{b}x{t}x{h}x{d} + {e} {dtype:?} {dev:?}");
                    // A view of the first 3·h·d columns when there are extra ones.
                    let x = qkv
                        .to_dtype(dtype)?
                        .to_device(&dev)?
                        .narrow(2, 0, 3 * h * d)?;
                    let vars = split_qkv(&x, h)?;
                    let heads = qkv
                        .narrow(2, 0, 3 * h * d)?
                        .to_dtype(dtype)?
                        .reshape((b, t, 3, h, d))?
                        .permute((2, 0, 3, 1, 4))?;
                    for (i, var) in vars.iter().enumerate() {
                        assert!(var.as_tensor().is_variable() && var.dims() == [b, h, t, d]);
                        let want = heads.get(i)?.to_dtype(DType::F64)?;
                        let got = var
                            .as_tensor()
                            .to_device(&Device::Cpu)?
                            .to_dtype(DType::F64)?;
                        let err = rel_err(&got, &want)?;
                        assert!(err <= tol, "split_qkv {case} part {i}: {err}");
                    }
                    let p = parts.to_dtype(dtype)?.to_device(&dev)?;
                    let (q, k, v) = (p.get(0)?, p.get(1)?, p.get(2)?);
                    let mut want = parts.to_dtype(dtype)?.permute((1, 3, 0, 2, 4))?.reshape((
                        b,
                        t,
                        3 * h * d,
                    ))?;
                    let merged = match &extra {
                        None => merge_qkv(&q, &k, &v)?,
                        Some(x) => {
                            let x = x.to_dtype(dtype)?;
                            want = Tensor::cat(&[&want, &x], 2)?;
                            merge_qkv_with(&q, &k, &v, &x.to_device(&dev)?)?
                        }
                    };
                    let got = merged.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
                    let err = rel_err(&got, &want.to_dtype(DType::F64)?)?;
                    assert!(err <= tol, "merge_qkv {case}: {err}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn layer_norm_backward_add_matches_sum() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let shapes = [
        vec![3, 5, 45],
        vec![37, 384],
        vec![2, 9, 1000],
        vec![11, 385],
        vec![2, 7, 96],
        vec![3, 2048],
        vec![5, 2100],
        vec![9001, 40],
    ];
    for shape in shapes {
        let c = *shape.last().unwrap();
        let x = (randn(&mut rng, &shape, 2.0)? + 0.5)?;
        let gain = (randn(&mut rng, &[c], 0.2)? + 1.0)?;
        let dy = randn(&mut rng, &shape, 1.0)?;
        let acc = randn(&mut rng, &shape, 1.0)?;
        let f64s = |t: &Tensor| t.to_dtype(DType::F64);
        // The reference: candle's autograd of the composite LayerNorm in f64.
        let xv = Var::from_tensor(&f64s(&x)?)?;
        let gv = Var::from_tensor(&f64s(&gain)?)?;
        let y = composite_layer_norm(xv.as_tensor(), gv.as_tensor(), 1e-5)?;
        let store = (y * f64s(&dy)?)?.sum_all()?.backward()?;
        let grad = |v: &Var| store.get(v.as_tensor()).cloned().expect("gradient");
        let (ref_dx, ref_dgain) = (grad(&xv), grad(&gv));
        let want = (ref_dx + f64s(&acc)?)?;
        for dev in devices() {
            for dtype in DTYPES {
                let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(&dev);
                let (dx, dgain) =
                    layer_norm_backward_add(&on(&x)?, &on(&gain)?, &on(&dy)?, &on(&acc)?, 1e-5)?;
                assert_eq!(dgain.dtype(), DType::F32);
                let tol = tolerance(dtype, &dev);
                let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
                let err = rel_err(&back(&dx)?, &want)?;
                assert!(
                    err <= tol,
                    "ln backward add {shape:?} {dtype:?} {dev:?}: dx {err}"
                );
                let err = rel_err(&back(&dgain)?, &ref_dgain)?;
                assert!(
                    err <= tol,
                    "ln backward add {shape:?} {dtype:?} {dev:?}: dgain {err}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn add_layer_norm_matches_add_then_layer_norm() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(19);
    // (x shape, delta shape): same shape, and a delta broadcast over the batch.
    let cases: [(&[usize], &[usize]); 6] = [
        (&[3, 5, 45], &[3, 5, 45]),
        (&[2, 37, 384], &[37, 384]),
        (&[2, 9, 1000], &[2, 9, 1000]),
        (&[3, 385], &[3, 385]),
        (&[2, 5, 96], &[5, 96]),
        (&[3, 2100], &[3, 2100]),
    ];
    for (xs, ds) in cases {
        let c = *xs.last().unwrap();
        let x = (randn(&mut rng, xs, 2.0)? + 0.5)?;
        let delta = randn(&mut rng, ds, 1.0)?;
        let gain = (randn(&mut rng, &[c], 0.2)? + 1.0)?;
        for dev in devices() {
            for dtype in DTYPES {
                let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(&dev);
                let (sum, y) = add_layer_norm(&on(&x)?, &on(&delta)?, &on(&gain)?, 1e-5)?;
                // The reference: candle's add in the dtype, then the LayerNorm in f64.
                let want_sum = on(&x)?
                    .to_device(&Device::Cpu)?
                    .broadcast_add(&on(&delta)?.to_device(&Device::Cpu)?)?
                    .to_dtype(DType::F64)?;
                let gain64 = on(&gain)?.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
                let want_y = composite_layer_norm(&want_sum, &gain64, 1e-5)?;
                let tol = tolerance(dtype, &dev);
                let err = rel_err(&sum, &want_sum)?;
                assert!(
                    err <= tol,
                    "add_layer_norm {xs:?}+{ds:?} {dtype:?} {dev:?}: sum {err}"
                );
                let err = rel_err(&y, &want_y)?;
                assert!(
                    err <= tol,
                    "add_layer_norm {xs:?}+{ds:?} {dtype:?} {dev:?}: y {err}"
                );
            }
        }
    }
    let x = Tensor::zeros((2, 4, 8), DType::F32, &Device::Cpu)?;
    let gain = Tensor::ones(8, DType::F32, &Device::Cpu)?;
    let e = message(add_layer_norm(
        &x,
        &Tensor::zeros((3, 8), DType::F32, &Device::Cpu)?,
        &gain,
        1e-5,
    ));
    assert!(e.contains("trailing part") && e.contains("[3, 8]"), "{e}");
    Ok(())
}

/// The LayerNorm ops on views that start one element into their buffer (no 16-byte alignment, so
/// CUDA takes its single-element kernels) equal the same ops on contiguous copies.
#[test]
fn layer_norm_ops_on_unaligned_views() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(23);
    let (rows, c) = (37, 384);
    // A (rows, c) view at element offset 1 of a longer buffer.
    let view = |rng: &mut StdRng, scale: f32, shift: f64| -> Result<Tensor> {
        (randn(rng, &[rows * c + 1], scale)? + shift)?
            .narrow(0, 1, rows * c)?
            .reshape((rows, c))
    };
    let (x, delta, dy, acc) = (
        view(&mut rng, 2.0, 0.5)?,
        view(&mut rng, 1.0, 0.0)?,
        view(&mut rng, 1.0, 0.0)?,
        view(&mut rng, 1.0, 0.0)?,
    );
    let gain = (randn(&mut rng, &[c + 1], 0.2)? + 1.0)?.narrow(0, 1, c)?;
    for dev in devices() {
        for dtype in DTYPES {
            // Casting keeps the layout (a contiguous view at offset 1) on either device.
            let on = |t: &Tensor| -> Result<Tensor> {
                let flat = t.to_device(&dev)?.flatten_all()?;
                let pad = Tensor::zeros(1, DType::F32, &dev)?;
                Tensor::cat(&[&pad, &flat], 0)?
                    .to_dtype(dtype)?
                    .narrow(0, 1, flat.dim(0)?)?
                    .reshape(t.shape())
            };
            let (xv, dv, yv, av, gv) = (on(&x)?, on(&delta)?, on(&dy)?, on(&acc)?, on(&gain)?);
            assert_eq!(xv.layout().start_offset(), 1);
            let copy = |t: &Tensor| t.copy();
            let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
            let tol = tolerance(dtype, &dev);
            let check = |what: &str, a: &Tensor, b: &Tensor| -> Result<()> {
                let err = rel_err(&back(a)?, &back(b)?)?;
                assert!(err <= tol, "{what} {dtype:?} {dev:?}: rel err {err}");
                Ok(())
            };
            let y = layer_norm(&xv, &gv, 1e-5)?;
            check(
                "layer_norm",
                &y,
                &layer_norm(&copy(&xv)?, &copy(&gv)?, 1e-5)?,
            )?;
            let (s1, y1) = add_layer_norm(&xv, &dv, &gv, 1e-5)?;
            let (s2, y2) = add_layer_norm(&copy(&xv)?, &copy(&dv)?, &copy(&gv)?, 1e-5)?;
            check("add_layer_norm sum", &s1, &s2)?;
            check("add_layer_norm y", &y1, &y2)?;
            let (dx1, dg1) = layer_norm_backward_add(&xv, &gv, &yv, &av, 1e-5)?;
            let (dx2, dg2) =
                layer_norm_backward_add(&copy(&xv)?, &copy(&gv)?, &copy(&yv)?, &copy(&av)?, 1e-5)?;
            check("ln backward add dx", &dx1, &dx2)?;
            check("ln backward add dgain", &dg1, &dg2)?;
        }
    }
    Ok(())
}

#[test]
fn sum_of_squares_matches_sum_all() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(18);
    // Five shapes, then enough small tensors to need two launches on CUDA (240 per table).
    let mut shapes: Vec<Vec<usize>> = vec![vec![3, 45], vec![1], vec![8192, 384], vec![1001]];
    shapes.push(vec![2, 3, 4]);
    shapes.extend((0..250).map(|i| vec![1 + i % 17]));
    let tensors = shapes
        .iter()
        .map(|s| randn(&mut rng, s, 1.0))
        .collect::<Result<Vec<_>>>()?;
    let want: f64 = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>())
        .sum::<Result<f64>>()?;
    for dev in devices() {
        let on_dev = tensors
            .iter()
            .map(|t| t.to_device(&dev))
            .collect::<Result<Vec<_>>>()?;
        let got = sum_of_squares(&on_dev)?.to_scalar::<f32>()? as f64;
        assert!(
            ((got - want) / want).abs() <= 1e-5,
            "sum_of_squares {dev:?}: {got} vs {want}"
        );
        // A view with an offset (the second half of a tensor).
        let half = on_dev[2].narrow(0, 4096, 4096)?;
        let got = sum_of_squares(std::slice::from_ref(&half))?.to_scalar::<f32>()? as f64;
        let want = half
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert!(
            ((got - want) / want).abs() <= 1e-5,
            "sum_of_squares view {dev:?}"
        );
        let e = message(sum_of_squares(&[on_dev[0].to_dtype(DType::BF16)?]));
        assert!(e.contains("must be f32"), "{e}");
    }
    assert_eq!(sum_of_squares(&[])?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn linear_matches_matmul() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(15);
    for (x_shape, out) in [(vec![2, 37, 24], 40), (vec![5, 64], 3), (vec![7], 9)] {
        let k = *x_shape.last().unwrap();
        let x = randn(&mut rng, &x_shape, 1.0)?;
        let w = randn(&mut rng, &[out, k], 0.3)?;
        let mut y_shape = x_shape.clone();
        *y_shape.last_mut().unwrap() = out;
        let r = randn(&mut rng, &y_shape, 1.0)?;
        compare(
            &format!("linear {x_shape:?} x ({out}, {k})"),
            &|t| linear(&t[0], &t[1]),
            &|t| {
                let rows = t[0].elem_count() / k;
                t[0].reshape((rows, k))?
                    .matmul(&t[1].t()?)?
                    .reshape(y_shape.as_slice())
            },
            &[x.clone(), w],
            &r,
        )?;
    }
    Ok(())
}

/// `linear` and `linear_backward` on views that start one element into their storage (pointers
/// only 2-byte aligned for f16 / bf16: the cuBLASLt algorithms must allow it), against f64.
#[test]
fn linear_on_unaligned_views() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let (rows, n, k) = (77, 40, 24);
    let skewed = |t: &Tensor| -> Result<Tensor> {
        let flat = Tensor::cat(&[&t.flatten_all()?.narrow(0, 0, 1)?, &t.flatten_all()?], 0)?;
        flat.narrow(0, 1, t.elem_count())?.reshape(t.shape())
    };
    for dev in devices() {
        for dtype in DTYPES {
            let x = randn(&mut rng, &[rows, k], 1.0)?.to_dtype(dtype)?;
            let w = randn(&mut rng, &[n, k], 0.3)?.to_dtype(dtype)?;
            let dy = randn(&mut rng, &[rows, n], 1.0)?.to_dtype(dtype)?;
            let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
            let want_y = f64_of(&x)?.matmul(&f64_of(&w)?.t()?)?;
            let want_dx = f64_of(&dy)?.matmul(&f64_of(&w)?)?;
            let want_dw = f64_of(&dy)?.t()?.matmul(&f64_of(&x)?)?;
            let on = |t: &Tensor| skewed(&t.to_device(&dev)?);
            let (xs, ws, dys) = (on(&x)?, on(&w)?, on(&dy)?);
            assert_eq!(xs.layout().start_offset(), 1);
            let y = linear(&xs, &ws)?;
            let (dx, dw) = linear_backward(&xs, &ws, &dys)?;
            let tol = tolerance(dtype, &dev);
            for (name, got, want) in [
                ("y", &y, &want_y),
                ("dx", &dx, &want_dx),
                ("dw", &dw, &want_dw),
            ] {
                let err = rel_err(&got.to_dtype(DType::F64)?.to_device(&Device::Cpu)?, want)?;
                assert!(err <= tol, "{name} {dtype:?} {dev:?}: rel err {err}");
            }
        }
    }
    Ok(())
}

/// `linear_backward`'s weight gradient is f32 for every input dtype (one GEMM with an f32 output
/// on CUDA for f16 / bf16) and equals `dyᵀ · x` of the rounded inputs in f64; `dx` keeps the
/// input dtype. Rows not a multiple of any tile, a wide and a narrow output.
#[test]
fn linear_backward_weight_grad_is_f32() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(16);
    for dev in devices() {
        for dtype in DTYPES {
            for (rows, n, k) in [(301, 40, 24), (1000, 7, 64)] {
                let x = randn(&mut rng, &[3, rows, k], 1.0)?.to_dtype(dtype)?;
                let w = randn(&mut rng, &[n, k], 0.3)?.to_dtype(dtype)?;
                let dy = randn(&mut rng, &[3, rows, n], 1.0)?.to_dtype(dtype)?;
                let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
                let want_dw = f64_of(&dy)?
                    .reshape((3 * rows, n))?
                    .t()?
                    .matmul(&f64_of(&x)?.reshape((3 * rows, k))?)?;
                let want_dx = f64_of(&dy)?.broadcast_matmul(&f64_of(&w)?)?;
                let (dx, dw) = linear_backward(
                    &x.to_device(&dev)?,
                    &w.to_device(&dev)?,
                    &dy.to_device(&dev)?,
                )?;
                assert_eq!((dw.dtype(), dw.dims()), (DType::F32, &[n, k][..]));
                assert_eq!((dx.dtype(), dx.dims()), (dtype, x.dims()));
                let tol = tolerance(dtype, &dev);
                for (name, got, want) in [("dw", &dw, &want_dw), ("dx", &dx, &want_dx)] {
                    let err = rel_err(&got.to_dtype(DType::F64)?.to_device(&Device::Cpu)?, want)?;
                    assert!(
                        err <= tol,
                        "{name} {dtype:?} {dev:?} {rows}x{n}x{k}: rel err {err}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// `linear_gelu` and `gelu_linear_backward` (an MLP: `gelu(x · w1ᵀ) · w2ᵀ`) against candle's
/// tanh GELU, matmuls and autograd in f64: the pre-activation, the activation, `dpre` and the
/// second weight's f32 gradient; widths that take cuBLASLt's epilogues on CUDA (multiples of 8)
/// and one that does not (36), rows not a multiple of any tile.
#[test]
fn linear_gelu_and_its_backward_match_autograd() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(18);
    for dev in devices() {
        for dtype in DTYPES {
            for (rows, k, n, m) in [(301, 24, 40, 16), (1000, 64, 36, 8), (77, 16, 1536, 24)] {
                let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(&dev);
                let f64_of = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
                let x = on(&randn(&mut rng, &[3, rows, k], 1.0)?)?;
                let w1 = on(&randn(&mut rng, &[n, k], 0.5)?)?;
                let w2 = on(&randn(&mut rng, &[m, n], 0.3)?)?;
                let dy = on(&randn(&mut rng, &[3, rows, m], 1.0)?)?;
                let pre_ref = f64_of(&x)?.broadcast_matmul(&f64_of(&w1)?.t()?)?;
                let act_ref = pre_ref.gelu()?;
                let pre_var = Var::from_tensor(&pre_ref)?;
                let y = pre_var
                    .as_tensor()
                    .gelu()?
                    .broadcast_matmul(&f64_of(&w2)?.t()?)?;
                let store = (y * f64_of(&dy)?)?.sum_all()?.backward()?;
                let dpre_ref = store.get(pre_var.as_tensor()).expect("dpre").clone();
                let dw2_ref = f64_of(&dy)?
                    .reshape((3 * rows, m))?
                    .t()?
                    .matmul(&act_ref.reshape((3 * rows, n))?)?;

                let (pre, act) = linear_gelu(&x, &w1)?;
                let (dpre, dw2) = gelu_linear_backward(&pre, &act, &w2, &dy)?;
                assert_eq!((pre.dtype(), pre.dims()), (dtype, &[3, rows, n][..]));
                assert_eq!((act.dtype(), act.dims()), (dtype, &[3, rows, n][..]));
                assert_eq!((dpre.dtype(), dpre.dims()), (dtype, &[3, rows, n][..]));
                assert_eq!((dw2.dtype(), dw2.dims()), (DType::F32, &[m, n][..]));
                let tol = tolerance(dtype, &dev);
                for (name, got, want) in [
                    ("pre", &pre, &pre_ref),
                    ("act", &act, &act_ref),
                    ("dpre", &dpre, &dpre_ref),
                    ("dw2", &dw2, &dw2_ref),
                ] {
                    let err = rel_err(&f64_of(got)?, want)?;
                    assert!(
                        err <= tol,
                        "{name} {dtype:?} {dev:?} {rows}x{k}x{n}x{m}: rel err {err}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// `cast_concat` equals `to_dtype` of each tensor, flattened and concatenated (shapes of odd
/// sizes, a non-contiguous view, a zero-element tensor), and refuses non-f32 input.
#[test]
fn cast_concat_matches_to_dtype_and_cat() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    for dev in devices() {
        let on = |t: Tensor| t.to_device(&dev);
        let mut tensors = vec![
            on(randn(&mut rng, &[3, 45], 1.0)?)?,
            on(randn(&mut rng, &[1], 1.0)?)?,
            on(randn(&mut rng, &[7, 5], 1.0)?.t()?)?,
            on(Tensor::zeros((0, 4), DType::F32, &Device::Cpu)?)?,
            on(randn(&mut rng, &[1001], 100.0)?)?,
        ];
        // Enough small tensors to need two launches on CUDA (160 per table).
        for i in 0..170 {
            tensors.push(on(randn(&mut rng, &[1 + i % 13], 1.0)?)?);
        }
        let total: usize = tensors.iter().map(|t| t.elem_count()).sum();
        for dtype in DTYPES {
            let got = cast_concat(&tensors, dtype)?;
            assert_eq!((got.dtype(), got.dims()), (dtype, &[total][..]));
            // The reference on the host (candle's own CUDA cast launches an empty grid for the
            // zero-element tensor).
            let flat = tensors
                .iter()
                .map(|t| t.to_device(&Device::Cpu)?.flatten_all()?.to_dtype(dtype))
                .collect::<Result<Vec<_>>>()?;
            let want = Tensor::cat(&flat, 0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let got = got.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            assert_eq!(got, want, "cast_concat {dtype:?} {dev:?}");
        }
        assert_eq!(cast_concat(&[], DType::BF16)?.dims(), &[0]);
        let half = tensors[0].to_dtype(DType::BF16)?;
        let e = message(cast_concat(&[tensors[1].clone(), half], DType::F16));
        assert!(e.contains("tensor 1") && e.contains("BF16"), "{e}");
    }
    Ok(())
}

#[test]
fn to_heads_and_merge_heads_match_transpose() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(14);
    for (b, t, h, d) in [(2, 37, 3, 16), (1, 5, 6, 64), (3, 1, 1, 8)] {
        let x = randn(&mut rng, &[b, t, h * d], 1.0)?;
        let r = randn(&mut rng, &[b, h, t, d], 1.0)?;
        compare(
            &format!("to_heads {b}x{t}x{h}x{d}"),
            &|x| to_heads(&x[0], h),
            &|x| x[0].reshape((b, t, h, d))?.transpose(1, 2)?.contiguous(),
            std::slice::from_ref(&x),
            &r,
        )?;
        let y = randn(&mut rng, &[b, h, t, d], 1.0)?;
        let r = randn(&mut rng, &[b, t, h * d], 1.0)?;
        compare(
            &format!("merge_heads {b}x{t}x{h}x{d}"),
            &|x| merge_heads(&x[0]),
            &|x| x[0].transpose(1, 2)?.reshape((b, t, h * d)),
            std::slice::from_ref(&y),
            &r,
        )?;
    }
    Ok(())
}

#[test]
fn adamw_update_matches_formula() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let hp = AdamWUpdate {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        scale_m: 1.0 / (1.0 - 0.9f32.powi(3)),
        scale_v: 1.0 / (1.0 - 0.95f32.powi(3)),
        grad_scale: 0.5,
    };
    for shape in [vec![3, 45], vec![1001]] {
        let n: usize = shape.iter().product();
        let p = randn(&mut rng, &shape, 1.0)?;
        let g = randn(&mut rng, &shape, 1.0)?;
        let m = randn(&mut rng, &[n], 0.1)?;
        let v = randn(&mut rng, &[n], 0.1)?.sqr()?;
        let state = Tensor::stack(&[&m, &v], 0)?;
        // The same update in f64 tensor ops.
        let f64s = |t: &Tensor| t.to_dtype(DType::F64);
        let (p64, g64) = (f64s(&p)?.flatten_all()?, (f64s(&g)?.flatten_all()? * 0.5)?);
        let m1 = ((f64s(&m)? * 0.9)? + (&g64 * 0.1)?)?;
        let v1 = ((f64s(&v)? * 0.95)? + (g64.sqr()? * 0.05)?)?;
        let update = ((&m1 * hp.scale_m as f64)? / ((&v1 * hp.scale_v as f64)?.sqrt()? + 1e-8)?)?;
        let p1 = ((&p64 * (1.0 - 1e-3))? - (update * 1e-2)?)?;
        for dev in devices() {
            let on = |t: &Tensor| t.to_device(&dev);
            let (np, ns) = adamw_update(&on(&p)?, &on(&state)?, &on(&g)?, &hp)?;
            assert_eq!(np.dims(), p.dims());
            assert_eq!(ns.dims(), [2, n]);
            let tol = tolerance(DType::F32, &dev);
            for (name, got, want) in [
                ("param", np.flatten_all()?, p1.clone()),
                ("m", ns.get(0)?, m1.clone()),
                ("v", ns.get(1)?, v1.clone()),
            ] {
                let err = rel_err(&got, &want)?;
                assert!(err <= tol, "adamw {shape:?} {dev:?}: {name} rel err {err}");
            }
        }
    }
    Ok(())
}

#[test]
fn adamw_update_many_matches_one_at_a_time() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(20);
    let hp = AdamWUpdate {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        scale_m: 1.0 / (1.0 - 0.9f32.powi(2)),
        scale_v: 1.0 / (1.0 - 0.95f32.powi(2)),
        grad_scale: 0.7,
    };
    // Four shapes, then enough small tensors to need two launches on CUDA (120 per table).
    let mut shapes: Vec<Vec<usize>> = vec![vec![3, 45], vec![1], vec![8192, 384], vec![1001]];
    shapes.extend((0..126).map(|i| vec![1 + i % 11]));
    for dev in devices() {
        let mut params = vec![];
        let mut states = vec![];
        let mut grads = vec![];
        let mut want = vec![];
        for shape in &shapes {
            let n: usize = shape.iter().product();
            let p = randn(&mut rng, shape, 1.0)?.to_device(&dev)?;
            let g = randn(&mut rng, shape, 1.0)?.to_device(&dev)?;
            let m = randn(&mut rng, &[n], 0.1)?;
            let v = randn(&mut rng, &[n], 0.1)?.sqr()?;
            let state = Tensor::stack(&[&m, &v], 0)?.to_device(&dev)?;
            want.push(adamw_update(&p, &state, &g, &hp)?);
            params.push(Var::from_tensor(&p)?);
            states.push(Var::from_tensor(&state)?);
            grads.push(g);
        }
        let param_refs: Vec<&Var> = params.iter().collect();
        let state_refs: Vec<&Var> = states.iter().collect();
        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        // grad_scale 0.7 as 1.4 on the host times a device factor 0.5 (a clipping factor), and
        // the schedule from the device (the host's lr and bias corrections are wrong).
        let factor = Tensor::new(0.5f32, &dev)?;
        let schedule = Tensor::new(&[hp.lr, hp.scale_m, hp.scale_v], &dev)?;
        let split = AdamWUpdate {
            grad_scale: 1.4,
            lr: 0.5,
            scale_m: 3.0,
            scale_v: 0.0,
            ..hp
        };
        adamw_update_many(
            &param_refs,
            &state_refs,
            &grad_refs,
            Some(&factor),
            Some(&schedule),
            &split,
        )?;
        let tol = tolerance(DType::F32, &dev);
        for (i, (wp, ws)) in want.iter().enumerate() {
            let err = rel_err(params[i].as_tensor(), wp)?;
            assert!(
                err <= tol,
                "adamw_update_many {dev:?} param {i}: rel err {err}"
            );
            let err = rel_err(states[i].as_tensor(), ws)?;
            assert!(
                err <= tol,
                "adamw_update_many {dev:?} state {i}: rel err {err}"
            );
        }
        let short = Var::zeros((2, 3), DType::F32, &dev)?;
        let e = message(adamw_update_many(
            &[&params[0]],
            &[&short],
            &[&grads[0]],
            None,
            None,
            &hp,
        ));
        assert!(e.contains("item 0") && e.contains("state [2, 3]"), "{e}");
        let two = Tensor::new(&[0.5f32, 0.5], &dev)?;
        let e = message(adamw_update_many(
            &[&params[0]],
            &[&states[0]],
            &[&grads[0]],
            Some(&two),
            None,
            &hp,
        ));
        assert!(e.contains("grad_factor") && e.contains("[2]"), "{e}");
        let e = message(adamw_update_many(
            &[&params[0]],
            &[&states[0]],
            &[&grads[0]],
            None,
            Some(&two),
            &hp,
        ));
        assert!(e.contains("schedule") && e.contains("[2]"), "{e}");
    }
    Ok(())
}

/// Per-row losses and logit gradients of softmax cross-entropy in f64 tensor ops.
fn reference_cross_entropy(
    logits: &Tensor,
    targets: &[u32],
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let l = logits.to_dtype(DType::F64)?;
    let v = l.dim(1)?;
    let max = l.max_keepdim(1)?;
    let e = l.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(1)?;
    let onehot: Vec<f64> = targets
        .iter()
        .flat_map(|&t| (0..v).map(move |j| f64::from(u8::from(j == t as usize))))
        .collect();
    let onehot = Tensor::from_vec(onehot, l.shape(), &Device::Cpu)?;
    let picked = (&l * &onehot)?.sum(1)?;
    let losses = ((sum.log()? + max)?.squeeze(1)? - picked)?;
    let grad = ((e.broadcast_div(&sum)? - onehot)? * scale)?;
    Ok((losses, grad))
}

#[test]
fn cross_entropy_with_grad_matches_log_softmax() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    // Vocabularies below, at and above a warp's width; row counts that fill no block evenly.
    for (n, v) in [(1, 1), (7, 31), (45, 65), (130, 100), (3, 257)] {
        let logits = randn(&mut rng, &[n, v], 3.0)?;
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let scale = 1.0 / n as f32;
        for dev in devices() {
            let t = Tensor::new(targets.as_slice(), &dev)?;
            for dtype in DTYPES {
                let rounded = logits.to_dtype(dtype)?;
                let (want_loss, want_grad) =
                    reference_cross_entropy(&rounded, &targets, scale as f64)?;
                let (loss, grad) = cross_entropy_with_grad(&rounded.to_device(&dev)?, &t, scale)?;
                assert_eq!((loss.dims(), loss.dtype()), (&[n][..], DType::F32));
                assert_eq!((grad.dims(), grad.dtype()), (&[n, v][..], dtype));
                let tol = tolerance(dtype, &dev);
                let err = rel_err(&loss, &want_loss)?;
                assert!(
                    err <= tol,
                    "xent ({n}, {v}) {dtype:?} {dev:?}: loss rel err {err}"
                );
                // Gradients of rows of one class are all zero: compare them absolutely.
                let err = rel_err(&grad, &want_grad)?;
                assert!(
                    err <= tol || (v == 1 && err < 1e-6),
                    "xent ({n}, {v}) {dtype:?} {dev:?}: grad rel err {err}"
                );
            }
        }
    }
    Ok(())
}

/// The public backward functions equal the gradients candle's autograd takes through the ops.
#[test]
fn backward_functions_match_autograd() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for dev in devices() {
        let on = |t: Tensor| -> Result<Var> { Var::from_tensor(&t.to_device(&dev)?) };
        let x = on(randn(&mut rng, &[3, 5, 40], 1.0)?)?;
        let gain = on(randn(&mut rng, &[40], 1.0)?)?;
        let w = on(randn(&mut rng, &[24, 40], 0.3)?)?;
        let ids = Tensor::new(&[2u32, 0, 2, 5, 1], &dev)?;
        let table = on(randn(&mut rng, &[6, 40], 1.0)?)?;
        let ln = layer_norm(x.as_tensor(), gain.as_tensor(), 1e-5)?;
        let lin = linear(x.as_tensor(), w.as_tensor())?;
        let act = gelu(x.as_tensor())?;
        let emb = embedding(table.as_tensor(), &ids)?;
        let tol = tolerance(DType::F32, &dev);
        let close = |what: &str, a: &Tensor, b: Option<&Tensor>| -> Result<()> {
            let err = rel_err(a, b.expect("autograd gradient"))?;
            assert!(err <= tol, "{what} {dev:?}: rel err {err}");
            Ok(())
        };
        for (y, n) in [(&ln, 0), (&lin, 1), (&act, 2), (&emb, 3)] {
            let dy = randn(&mut rng, y.dims(), 1.0)?.to_device(&dev)?;
            let store = backward_from(y, &dy)?;
            // backward_from equals the backward of (y · dy).sum().
            let product = (y * &dy)?.sum_all()?.backward()?;
            match n {
                0 => {
                    let (dx, dgain) =
                        layer_norm_backward(x.as_tensor(), gain.as_tensor(), &dy, 1e-5)?;
                    close("layer_norm dx", &dx, store.get(x.as_tensor()))?;
                    close("layer_norm dgain", &dgain, store.get(gain.as_tensor()))?;
                    close("backward_from", &dx, product.get(x.as_tensor()))?;
                }
                1 => {
                    let (dx, dw) = linear_backward(x.as_tensor(), w.as_tensor(), &dy)?;
                    close("linear dx", &dx, store.get(x.as_tensor()))?;
                    close("linear dw", &dw, store.get(w.as_tensor()))?;
                }
                2 => {
                    let dx = gelu_backward(x.as_tensor(), &dy)?;
                    close("gelu dx", &dx, store.get(x.as_tensor()))?;
                }
                _ => {
                    let dt = embedding_backward(&dy, &ids, 6)?;
                    close("embedding dtable", &dt, store.get(table.as_tensor()))?;
                }
            }
        }
    }
    Ok(())
}

/// The message of an error, or a panic if there is none.
fn message<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    for dev in devices() {
        let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
        let e = message(layer_norm(&x, &Tensor::ones(7, DType::F32, &dev)?, 1e-5));
        assert!(e.contains("gain must be (8,)") && e.contains("[7]"), "{e}");
        let e = message(layer_norm(&x, &Tensor::ones(8, DType::BF16, &dev)?, 1e-5));
        assert!(e.contains("gain"), "{e}");
        let e = message(layer_norm(&x, &Tensor::ones(8, DType::F32, &dev)?, 0.0));
        assert!(e.contains("eps"), "{e}");
        let e = message(gelu(&Tensor::zeros(4, DType::U32, &dev)?));
        assert!(e.contains("U32"), "{e}");
        let ids = Tensor::zeros(3, DType::U32, &dev)?;
        let e = message(embedding(&Tensor::zeros(8, DType::F32, &dev)?, &ids));
        assert!(e.contains("(vocab, c)") && e.contains("[8]"), "{e}");
        let e = message(embedding(&x, &ids.to_dtype(DType::I64)?));
        assert!(e.contains("u32"), "{e}");
        let e = message(split_heads(
            &Tensor::zeros((1, 4, 10), DType::F32, &dev)?,
            2,
            0,
        ));
        assert!(e.contains("width 10") && e.contains("[1, 4, 10]"), "{e}");
        let e = message(split_heads(
            &Tensor::zeros((1, 4, 12), DType::F32, &dev)?,
            2,
            3,
        ));
        assert!(e.contains("part (3)"), "{e}");
        let e = message(linear(
            &Tensor::zeros((2, 5), DType::F32, &dev)?,
            &Tensor::zeros((3, 4), DType::F32, &dev)?,
        ));
        assert!(e.contains("[2, 5]") && e.contains("[3, 4]"), "{e}");
        let e = message(linear(
            &Tensor::zeros((2, 4), DType::F32, &dev)?,
            &Tensor::zeros((3, 4), DType::BF16, &dev)?,
        ));
        assert!(e.contains("BF16"), "{e}");
        let e = message(to_heads(&Tensor::zeros((1, 4, 10), DType::F32, &dev)?, 3));
        assert!(e.contains("width 10") && e.contains("[1, 4, 10]"), "{e}");
        let e = message(to_heads(&Tensor::zeros((4, 10), DType::F32, &dev)?, 2));
        assert!(e.contains("(b, t, h·d)") && e.contains("[4, 10]"), "{e}");
        let e = message(merge_heads(&Tensor::zeros((1, 4, 10), DType::F32, &dev)?));
        assert!(
            e.contains("(b, h, t, d)") && e.contains("[1, 4, 10]"),
            "{e}"
        );
        let hp = AdamWUpdate {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            scale_m: 1.0,
            scale_v: 1.0,
            grad_scale: 1.0,
        };
        let state = Tensor::zeros((2, 16), DType::F32, &dev)?;
        let e = message(adamw_update(&x, &state, &x.to_dtype(DType::BF16)?, &hp));
        assert!(e.contains("BF16"), "{e}");
        let e = message(adamw_update(&x, &state.narrow(1, 0, 8)?, &x, &hp));
        assert!(e.contains("state [2, 8]"), "{e}");
    }
    for dev in devices() {
        let logits = Tensor::zeros((4, 5), DType::F32, &dev)?;
        let targets = Tensor::zeros(4, DType::U32, &dev)?;
        let e = message(cross_entropy_with_grad(
            &logits,
            &targets.narrow(0, 0, 3)?,
            1.0,
        ));
        assert!(e.contains("(4,) u32") && e.contains("[3]"), "{e}");
        let e = message(cross_entropy_with_grad(
            &logits,
            &targets.to_dtype(DType::I64)?,
            1.0,
        ));
        assert!(e.contains("I64"), "{e}");
        let e = message(cross_entropy_with_grad(
            &logits.flatten_all()?,
            &targets,
            1.0,
        ));
        assert!(e.contains("(n, v)") && e.contains("[20]"), "{e}");
        let e = message(cross_entropy_with_grad(&logits, &targets, f32::NAN));
        assert!(e.contains("grad_scale"), "{e}");
        let e = message(backward_from(&logits, &logits.to_dtype(DType::BF16)?));
        assert!(e.contains("[4, 5]") && e.contains("BF16"), "{e}");
        let gain = Tensor::ones(5, DType::F32, &dev)?;
        let e = message(layer_norm_backward(&logits, &gain, &targets, 1e-5));
        assert!(e.contains("dy [4]"), "{e}");
        let e = message(gelu_backward(&logits, &logits.narrow(0, 0, 2)?));
        assert!(e.contains("[2, 5]") && e.contains("[4, 5]"), "{e}");
        let e = message(embedding_backward(&logits, &targets.narrow(0, 0, 2)?, 3));
        assert!(e.contains("ids [2]"), "{e}");
        let e = message(linear_backward(&logits, &gain.reshape((1, 5))?, &logits));
        assert!(e.contains("dy [4, 5]"), "{e}");
        let e = message(linear_gelu(&logits, &gain.reshape((5, 1))?));
        assert!(e.contains("[4, 5]") && e.contains("[5, 1]"), "{e}");
        let w2 = Tensor::zeros((3, 5), DType::F32, &dev)?;
        let e = message(gelu_linear_backward(&logits, &logits, &w2, &logits));
        assert!(e.contains("dy [4, 5]") && e.contains("w [3, 5]"), "{e}");
        let e = message(gelu_linear_backward(
            &logits,
            &logits.narrow(0, 0, 2)?,
            &w2,
            &logits,
        ));
        assert!(e.contains("act [2, 5]"), "{e}");
    }
    // Targets outside the classes (CPU; a NaN loss on CUDA).
    let logits = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
    let e = message(cross_entropy_with_grad(
        &logits,
        &Tensor::new(&[0u32, 3], &Device::Cpu)?,
        1.0,
    ));
    assert!(e.contains("target 3"), "{e}");
    // Out-of-vocabulary ids: an error on the CPU, rows of NaN on CUDA (16-byte and element-wise
    // rows).
    for dev in devices() {
        for c in [8, 5] {
            let table = Tensor::zeros((4, c), DType::BF16, &dev)?;
            let ids = Tensor::new(&[1u32, 4], &dev)?;
            match dev {
                Device::Cpu => assert!(embedding(&table, &ids).is_err()),
                _ => {
                    let rows = embedding(&table, &ids)?
                        .to_dtype(DType::F32)?
                        .to_vec2::<f32>()?;
                    assert!(rows[0].iter().all(|&v| v == 0.0), "{rows:?}");
                    assert!(rows[1].iter().all(|v| v.is_nan()), "{rows:?}");
                }
            }
        }
    }
    Ok(())
}

/// `norm_clip_factor`: the norm `√sumsq·|scale|` and its clip factor, where the norm exceeds the
/// bound, where it does not, and where it is not finite (factor 1); a bad `sumsq` is an error.
#[test]
fn norm_clip_factor_matches_formula() -> Result<()> {
    for dev in devices() {
        for (sumsq, scale, max_norm, norm, factor) in [
            (16f32, -0.5, 1.0, 2f32, 1.0 / (2.0 + 1e-6)),
            (16.0, 0.5, 3.0, 2.0, 1.0),
            (f32::INFINITY, 1.0, 1.0, f32::INFINITY, 1.0),
        ] {
            let s = Tensor::new(sumsq, &dev)?;
            let (n, f) = norm_clip_factor(&s, scale, max_norm)?;
            let (n, f) = (n.to_scalar::<f32>()?, f.to_scalar::<f32>()?);
            assert_eq!(n, norm, "{dev:?} sumsq {sumsq}");
            assert!(
                (f - factor).abs() <= 1e-6 * factor,
                "{dev:?} sumsq {sumsq}: {f} vs {factor}"
            );
        }
        let (n, f) = norm_clip_factor(&Tensor::new(f32::NAN, &dev)?, 1.0, 1.0)?;
        assert!(n.to_scalar::<f32>()?.is_nan() && f.to_scalar::<f32>()? == 1.0);
        let e = message(norm_clip_factor(
            &Tensor::zeros(2, DType::F32, &dev)?,
            1.0,
            1.0,
        ));
        assert!(e.contains("one f32") && e.contains("[2]"), "{e}");
    }
    Ok(())
}

/// `batch_sum_f32` equals `sum(0)` in f64 of the rounded input, for rows that take the 16-byte
/// path on CUDA and rows that do not; a scalar is an error.
#[test]
fn batch_sum_f32_matches_sum() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(19);
    for dev in devices() {
        for dtype in DTYPES {
            for shape in [vec![4, 37, 24], vec![3, 5, 7], vec![1, 16], vec![6, 1]] {
                let x = randn(&mut rng, &shape, 1.0)?.to_dtype(dtype)?;
                let want = x.to_dtype(DType::F64)?.sum(0)?;
                let got = batch_sum_f32(&x.to_device(&dev)?)?;
                assert_eq!((got.dtype(), got.dims()), (DType::F32, &shape[1..]));
                let err = rel_err(&got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?, &want)?;
                assert!(err <= 1e-6, "{shape:?} {dtype:?} {dev:?}: rel err {err}");
            }
        }
        let e = message(batch_sum_f32(&Tensor::new(1f32, &dev)?));
        assert!(e.contains("scalar"), "{e}");
    }
    Ok(())
}
