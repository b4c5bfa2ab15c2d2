//! `CudaGraph`: a recorded sequence of candle ops replays with inputs refilled in place and
//! gives what the ops give when run directly; capture refuses other devices, and a capture that
//! fails (the closure's error, a read of the device, an uncached parameter upload) ends with an
//! error and leaves the stream usable.

mod common;

use candle::{DType, Device, Result, Tensor};
use candle_sparse_attn::fused::{layer_norm, linear};
use candle_sparse_attn::reference::rel_err;
use candle_sparse_attn::CudaGraph;
use common::{devices, normal};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn randn(rng: &mut StdRng, shape: (usize, usize), dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(normal(rng, shape.0 * shape.1), shape, &Device::Cpu)?.to_device(dev)
}

/// The recorded work: LayerNorm, a linear layer (bf16, cuBLASLt), a sum of squares.
fn work(x: &Tensor, gain: &Tensor, w: &Tensor) -> Result<Tensor> {
    let h = layer_norm(
        &x.to_dtype(DType::BF16)?,
        &gain.to_dtype(DType::BF16)?,
        1e-5,
    )?;
    let y = linear(&h, &w.to_dtype(DType::BF16)?)?.to_dtype(DType::F32)?;
    y.sqr()?.sum_keepdim(1)
}

#[test]
fn replays_match_direct_runs() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(41);
    for dev in devices() {
        let (gain, w) = (
            randn(&mut rng, (1, 96), &dev)?.squeeze(0)?,
            randn(&mut rng, (72, 96), &dev)?,
        );
        if !dev.is_cuda() {
            let e = CudaGraph::capture(&dev, || Ok(())).unwrap_err().to_string();
            assert!(e.contains("needs a CUDA device"), "{e}");
            continue;
        }
        let input = randn(&mut rng, (40, 96), &dev)?;
        let output = Tensor::zeros((40, 1), DType::F32, &dev)?;
        // One direct run first: kernels loaded, GEMM algorithms chosen and candle's shape
        // parameters cached outside the capture.
        CudaGraph::warm_up(&dev, || work(&input, &gain, &w))?;
        let (graph, ()) =
            CudaGraph::capture(&dev, || output.slice_set(&work(&input, &gain, &w)?, 0, 0))?;
        for round in 0..3 {
            let x = randn(&mut rng, (40, 96), &dev)?;
            input.slice_set(&x, 0, 0)?;
            graph.launch()?;
            let want = work(&x, &gain, &w)?;
            let err = rel_err(&output, &want)?;
            assert!(
                err <= 1e-6,
                "round {round}: replay vs direct rel err {err:.2e}"
            );
        }
    }
    Ok(())
}

#[test]
fn failed_captures_end_and_leave_the_stream_usable() -> Result<()> {
    for dev in devices().into_iter().filter(|d| d.is_cuda()) {
        let x = Tensor::ones((8, 8), DType::F32, &dev)?;
        // The closure's own error is returned.
        let e = CudaGraph::capture(&dev, || -> Result<()> {
            let _ = (&x * 2.0)?;
            candle::bail!("stop here")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("stop here"), "{e}");
        // Reading the device while recording cannot be captured, nor can candle's shape
        // parameters that no warm-up cached (a sum over a strided view).
        let read = CudaGraph::capture(&dev, || (&x + 1.0)?.to_vec2::<f32>());
        assert!(read.is_err(), "a read of the device was captured");
        let strided = CudaGraph::capture(&dev, || x.t()?.sum_keepdim(0));
        assert!(strided.is_err(), "a parameter upload was captured");
        // The stream runs work again.
        assert_eq!((&x * 3.0)?.sum_all()?.to_scalar::<f32>()?, 192.0);
    }
    Ok(())
}
