//! GPU checks of the CUDA kernels against the f64 reference (outputs, LSE, gradients) for every
//! visibility mode, dtype and head dim, plus an ignored timing test. Skipped without a GPU.

use std::sync::{Arc, Mutex};

use candle::{DType, Device, Tensor, Var, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::super::{FlashAttn, FlashAttnBwd};
use super::{BWD_KERNEL_ENV, FWD_KERNEL_ENV, HOPPER_BWD_VARIANTS, HOPPER_FWD_VARIANTS};
use crate::mask::{
    SinkBand, SparseLayout, Visibility, KEY_PAD_BUCKET, KEY_PAD_POS, QUERY_PAD_BUCKET,
    QUERY_PAD_POS,
};
use crate::reference;

fn gpu() -> Option<Device> {
    Device::new_cuda(0).ok()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Full,
    Causal,
    /// Query/key dropping: kept rows compacted in time order, padding at the end.
    Drop,
    /// Hash buckets (independent for q and k), sorted by (bucket, position), some padding.
    Hash {
        strict: bool,
    },
    /// MoA sink + band: per kv head a sink of 0 or 1 block and a band of 1..=4 blocks.
    SinkBand,
}

/// Positions (and buckets) of one sparse row set of `n` rows over `t` time steps.
fn sparse_rows(
    rng: &mut StdRng,
    n: usize,
    t: usize,
    kind: Kind,
    is_q: bool,
) -> (Vec<i32>, Vec<i32>) {
    let (pad_pos, pad_b) = if is_q {
        (QUERY_PAD_POS, QUERY_PAD_BUCKET)
    } else {
        (KEY_PAD_POS, KEY_PAD_BUCKET)
    };
    let mut rows: Vec<(i32, i32)> = match kind {
        Kind::Drop => (0..t as i32)
            .filter(|_| rng.random::<f32>() < 0.6)
            .map(|p| (0, p))
            .collect(),
        _ => (0..t as i32).map(|p| (rng.random_range(0..4), p)).collect(),
    };
    rows.sort();
    rows.truncate(n);
    let mut pos: Vec<i32> = rows.iter().map(|r| r.1).collect();
    let mut bkt: Vec<i32> = rows.iter().map(|r| r.0).collect();
    pos.resize(n, pad_pos);
    bkt.resize(n, pad_b);
    (pos, bkt)
}

fn visibility(
    kind: Kind,
    dims: (usize, usize, usize, usize, usize),
    dev: &Device,
    seed: u64,
) -> candle::Result<Visibility> {
    let (b, hq, hkv, nq, nk) = dims;
    let mut rng = StdRng::seed_from_u64(seed);
    let t = nq.min(nk) * 9 / 10 + 1;
    let side = |rng: &mut StdRng,
                heads: usize,
                n: usize,
                is_q: bool|
     -> candle::Result<(Tensor, Tensor)> {
        let (mut p, mut bk) = (Vec::new(), Vec::new());
        for _ in 0..b * heads {
            let (x, y) = sparse_rows(rng, n, t, kind, is_q);
            p.extend(x);
            bk.extend(y);
        }
        Ok((
            Tensor::from_vec(p, (b, heads, n), dev)?,
            Tensor::from_vec(bk, (b, heads, n), dev)?,
        ))
    };
    Ok(match kind {
        Kind::Full => Visibility::Full,
        Kind::Causal => Visibility::Causal,
        Kind::SinkBand => {
            let blocks: Vec<i32> = (0..hkv)
                .flat_map(|_| [rng.random_range(0..2), rng.random_range(1..5)])
                .collect();
            Visibility::SinkBand(SinkBand {
                blocks: Tensor::from_vec(blocks, (hkv, 2), dev)?,
            })
        }
        Kind::Drop | Kind::Hash { .. } => {
            let (qp, qb) = side(&mut rng, hq, nq, true)?;
            let (kp, kb) = side(&mut rng, hkv, nk, false)?;
            Visibility::Sparse(SparseLayout {
                q_pos: qp,
                k_pos: kp,
                buckets: matches!(kind, Kind::Hash { .. }).then_some((qb, kb)),
                strict: matches!(kind, Kind::Hash { strict: true }),
            })
        }
    })
}

fn to_cpu(vis: &Visibility) -> candle::Result<Visibility> {
    Ok(match vis {
        Visibility::SinkBand(sb) => Visibility::SinkBand(SinkBand {
            blocks: sb.blocks.to_device(&Device::Cpu)?,
        }),
        Visibility::Sparse(l) => Visibility::Sparse(SparseLayout {
            q_pos: l.q_pos.to_device(&Device::Cpu)?,
            k_pos: l.k_pos.to_device(&Device::Cpu)?,
            buckets: match &l.buckets {
                Some((a, b)) => Some((a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?)),
                None => None,
            },
            strict: l.strict,
        }),
        other => other.clone(),
    })
}

/// Max relative errors (out, lse, dq, dk, dv) of one case against the f64 reference.
fn case(
    dev: &Device,
    dtype: DType,
    dims: (usize, usize, usize, usize, usize, usize),
    kind: Kind,
    seed: u64,
) -> candle::Result<[f64; 5]> {
    let (b, hq, hkv, nq, nk, d) = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let vis = visibility(kind, (b, hq, hkv, nq, nk), dev, seed)?;
    let cpu = Device::Cpu;
    let qf = Tensor::randn(0f64, 1., (b, hq, nq, d), &cpu)?;
    let kf = Tensor::randn(0f64, 1., (b, hkv, nk, d), &cpu)?;
    let vf = Tensor::randn(0f64, 1., (b, hkv, nk, d), &cpu)?;
    let g = Tensor::randn(0f64, 1., (b, hq, nq, d), &cpu)?;
    // The reference sees the inputs rounded to the tested dtype.
    let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F64);
    let (qr, kr, vr) = (
        Var::from_tensor(&round(&qf)?)?,
        Var::from_tensor(&round(&kf)?)?,
        Var::from_tensor(&round(&vf)?)?,
    );
    let mask = reference::mask(&to_cpu(&vis)?, (b, hq, hkv, nq, nk))?;
    let r = reference::attention(&qr, &kr, &vr, scale as f64, Some(&mask))?;
    let rg = (&r * &g)?.sum_all()?.backward()?;
    // Reference LSE: -inf on rows with no visible key.
    let s = (qr.matmul(&reference::repeat_kv(&kr, hq / hkv)?.t()?)? * scale as f64)?;
    let ninf = Tensor::full(f64::NEG_INFINITY, s.shape(), &cpu)?;
    let s = mask.where_cond(&s, &ninf)?;
    let mx = s.max_keepdim(D::Minus1)?;
    let mx0 = mx
        .eq(f64::NEG_INFINITY)?
        .where_cond(&mx.zeros_like()?, &mx)?;
    let lse_ref = (s
        .broadcast_sub(&mx0)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + mx0)?
        .squeeze(D::Minus1)?;

    let on = |t: &Tensor| -> candle::Result<Var> {
        Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)
    };
    let (q, k, v) = (on(&qf)?, on(&kf)?, on(&vf)?);
    let op = FlashAttn {
        scale,
        visibility: vis.clone(),
        lse: Arc::new(Mutex::new(None)),
    };
    let out = q.apply_op3_no_bwd(&k, &v, &op)?;
    let lse = op.lse.lock().unwrap().clone().expect("lse stashed");
    let bwd = FlashAttnBwd {
        scale,
        visibility: vis,
        out: out.clone(),
        grad_out: g.to_dtype(dtype)?.to_device(dev)?,
        lse: lse.clone(),
    };
    let packed = q.apply_op3_no_bwd(&k, &v, &bwd)?;
    let (ne_q, ne_k) = (q.elem_count(), k.elem_count());
    let dq = packed.narrow(0, 0, ne_q)?.reshape(q.shape())?;
    let dk = packed.narrow(0, ne_q, ne_k)?.reshape(k.shape())?;
    let dv = packed.narrow(0, ne_q + ne_k, ne_k)?.reshape(k.shape())?;

    // LSE: same -inf pattern, finite values close.
    let lse_h = lse.to_device(&cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let lse_r = lse_ref.flatten_all()?.to_vec1::<f64>()?;
    let mut lse_err = 0f64;
    for (a, b) in lse_h.iter().zip(&lse_r) {
        let e = if b.is_finite() {
            (*a as f64 - b).abs() / b.abs().max(1.0)
        } else if *a == f32::NEG_INFINITY {
            0.0
        } else {
            f64::NAN
        };
        lse_err = if e.is_nan() || lse_err.is_nan() {
            f64::NAN
        } else {
            lse_err.max(e)
        };
    }
    Ok([
        reference::rel_err(&out, &r)?,
        lse_err,
        reference::rel_err(&dq, rg.get(&qr).unwrap())?,
        reference::rel_err(&dk, rg.get(&kr).unwrap())?,
        reference::rel_err(&dv, rg.get(&vr).unwrap())?,
    ])
}

#[test]
fn cuda_matches_reference() -> candle::Result<()> {
    let Some(dev) = gpu() else {
        eprintln!("no GPU: skipped");
        return Ok(());
    };
    let kinds = [
        Kind::Full,
        Kind::Causal,
        Kind::Drop,
        Kind::Hash { strict: false },
        Kind::Hash { strict: true },
        Kind::SinkBand,
    ];
    // Sink-band runs on the shapes with q_len == kv_len (the last one has a band gap).
    let sink_band_shape = (1, 3, 1, 450, 450, 64);
    let shapes = [
        (2, 4, 2, 77, 77, 64),
        (1, 2, 1, 130, 200, 128),
        (1, 3, 3, 200, 131, 64),
        (1, 2, 2, 257, 257, 32),
        (1, 2, 1, 100, 190, 96),
        (1, 2, 2, 70, 140, 256),
        (1, 1, 1, 1, 1, 64),
        (1, 2, 2, 300, 300, 128),
        sink_band_shape,
    ];
    // FLASH_QUICK=1 (for the sanitizers): two shapes, f32 and bf16.
    let quick = std::env::var("FLASH_QUICK").is_ok();
    let (shapes, dtypes) = if quick {
        (
            vec![shapes[0], shapes[1], sink_band_shape],
            &[DType::F32, DType::BF16][..],
        )
    } else {
        (shapes.to_vec(), &[DType::F32, DType::BF16, DType::F16][..])
    };
    // Default kernels first; then (full runs) bf16 at the Hopper kernels' head dims again with the
    // mma.sync forward and backward (`FWD_KERNEL_ENV`, `BWD_KERNEL_ENV`; on GPUs without wgmma both
    // passes run the mma.sync kernels), and with each other Hopper forward and backward variant.
    // A pass: (forward kernel, backward kernel, dtypes, head dims); `None` = default.
    type Pass = (Option<String>, Option<String>, Vec<DType>, Vec<usize>);
    let mut passes: Vec<Pass> = vec![(None, None, dtypes.to_vec(), vec![])];
    if !quick {
        let dims = HOPPER_FWD_VARIANTS.iter().map(|v| v.d).collect();
        let mma = Some("mma".to_string());
        passes.push((mma.clone(), mma, vec![DType::BF16], dims));
        for (i, v) in HOPPER_FWD_VARIANTS.iter().enumerate() {
            if HOPPER_FWD_VARIANTS[..i].iter().any(|w| w.d == v.d) {
                passes.push((Some(v.tag()), None, vec![DType::BF16], vec![v.d]));
            }
        }
        for (i, v) in HOPPER_BWD_VARIANTS.iter().enumerate() {
            if HOPPER_BWD_VARIANTS[..i].iter().any(|w| w.d == v.d) {
                passes.push((None, Some(v.tag()), vec![DType::BF16], vec![v.d]));
            }
        }
    }
    let mut failed = 0;
    let mut seed = 0;
    for (fwd_kernel, bwd_kernel, dtypes, dims) in passes {
        for (env, kernel) in [(FWD_KERNEL_ENV, &fwd_kernel), (BWD_KERNEL_ENV, &bwd_kernel)] {
            match kernel {
                Some(v) => std::env::set_var(env, v),
                None => std::env::remove_var(env),
            }
        }
        let label = format!(
            "fwd {} bwd {}",
            fwd_kernel.as_deref().unwrap_or("default"),
            bwd_kernel.as_deref().unwrap_or("default")
        );
        let shapes: Vec<_> = shapes
            .iter()
            .copied()
            .filter(|s| dims.is_empty() || dims.contains(&s.5))
            .collect();
        for &dtype in &dtypes {
            let tol = match dtype {
                DType::F32 => 1e-3,
                DType::BF16 => 1e-2,
                _ => 5e-3,
            };
            for &shape in &shapes {
                for kind in kinds {
                    if matches!(kind, Kind::SinkBand) && shape.3 != shape.4 {
                        continue;
                    }
                    seed += 1;
                    let e = case(&dev, dtype, shape, kind, seed)?;
                    let ok = e.iter().all(|x| x.is_finite() && *x <= tol);
                    if !ok {
                        failed += 1;
                    }
                    println!(
                        "{} {dtype:?} {shape:?} {kind:?} {label}: out {:.2e} lse {:.2e} dq {:.2e} dk {:.2e} dv {:.2e}",
                        if ok { "ok  " } else { "FAIL" },
                        e[0], e[1], e[2], e[3], e[4]
                    );
                }
            }
        }
        std::env::remove_var(FWD_KERNEL_ENV);
        std::env::remove_var(BWD_KERNEL_ENV);
    }
    assert_eq!(failed, 0, "{failed} cases over tolerance");
    Ok(())
}

/// Times forward and forward+backward (bf16, causal); prints ms and dense-causal TFLOP/s.
#[test]
#[ignore]
fn cuda_timing() -> candle::Result<()> {
    let Some(dev) = gpu() else {
        return Ok(());
    };
    let shapes = [
        (4, 48, 64, 8192),
        (4, 48, 64, 16384),
        (2, 16, 128, 8192),
        (2, 16, 128, 16384),
        (1, 16, 128, 32768),
    ];
    for (b, h, d, n) in shapes {
        let mk = || Tensor::randn(0f32, 1., (b, h, n, d), &dev)?.to_dtype(DType::BF16);
        let (q, k, v, g) = (mk()?, mk()?, mk()?, mk()?);
        let scale = 1.0 / (d as f32).sqrt();
        let op = FlashAttn {
            scale,
            visibility: Visibility::Causal,
            lse: Arc::new(Mutex::new(None)),
        };
        let time = |f: &dyn Fn() -> candle::Result<()>| -> candle::Result<f64> {
            f()?;
            dev.synchronize()?;
            let mut ts = Vec::new();
            for _ in 0..5 {
                let t0 = std::time::Instant::now();
                f()?;
                dev.synchronize()?;
                ts.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            Ok(ts[2])
        };
        let fwd = time(&|| q.apply_op3_no_bwd(&k, &v, &op).map(|_| ()))?;
        let out = q.apply_op3_no_bwd(&k, &v, &op)?;
        let lse = op.lse.lock().unwrap().clone().unwrap();
        let bwd_op = FlashAttnBwd {
            scale,
            visibility: Visibility::Causal,
            out,
            grad_out: g.clone(),
            lse,
        };
        let bwd = time(&|| q.apply_op3_no_bwd(&k, &v, &bwd_op).map(|_| ()))?;
        let flops = 4.0 * (n * n * d * h * b) as f64 / 2.0;
        println!(
            "TIMING b={b} h={h} d={d} n={n}: fwd {fwd:.2} ms ({:.0} TFLOP/s), bwd {bwd:.2} ms, fwd+bwd {:.2} ms ({:.0} TFLOP/s)",
            flops / fwd / 1e9,
            fwd + bwd,
            3.5 * flops / (fwd + bwd) / 1e9
        );
    }
    Ok(())
}
