use candle::{DType, Device, Tensor, Var};
use candle_sparse_attn::{flash_attn, reference, AttnParams, Visibility};

#[test]
fn smoke() -> candle::Result<()> {
    let dev = Device::Cpu;
    let (b, hq, hkv, nq, nk, d) = (2, 4, 2, 37, 53, 64);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b, hq, nq, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b, hkv, nk, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b, hkv, nk, d), &dev)?)?;
    let out = flash_attn(&q, &k, &v, &AttnParams::default())?;
    let g = Tensor::randn(0f32, 1., out.shape(), &dev)?;
    let grads = (&out * &g)?.sum_all()?.backward()?;
    let f64v = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
    let (q2, k2, v2) = (f64v(&q), f64v(&k), f64v(&v));
    let mask = reference::mask(&Visibility::Causal, (b, hq, hkv, nq, nk))?;
    let r = reference::attention(&q2, &k2, &v2, 1.0 / 8.0, Some(&mask))?;
    let rg = (&r * g.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    println!("out {}", reference::rel_err(&out, &r)?);
    for (a, b) in [(&q, &q2), (&k, &k2), (&v, &v2)] {
        println!(
            "grad {}",
            reference::rel_err(grads.get(a).unwrap(), rg.get(b).unwrap())?
        );
    }
    Ok(())
}
