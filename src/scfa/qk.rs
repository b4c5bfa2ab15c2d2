//! Query/key dropping: stream compaction of keep masks into time-ordered row positions.

use candle::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::RowKind;

/// Compacts a keep mask into the original positions of the kept rows, in time order.
///
/// - `keep`: `(batch, heads, t)` u8, non-zero = keep.
/// - Returns `(batch, heads, t)` i32: row `r < kept` of each `(batch, head)` holds the time
///   index of the `r`-th kept step (increasing), rows `r >= kept` hold the padding position of
///   `kind` ([`QUERY_PAD_POS`](crate::mask::QUERY_PAD_POS) or
///   [`KEY_PAD_POS`](crate::mask::KEY_PAD_POS)).
///
/// An exclusive prefix sum over the mask (O(t), stable, no sort, no host sync); on CUDA one warp
/// per `(batch, head)` ballots 32 steps at a time.
pub fn compact_kept(keep: &Tensor, kind: RowKind) -> Result<Tensor> {
    if keep.dtype() != DType::U8 {
        bail!(
            "compact_kept: keep mask must be u8, got {:?} with shape {:?}",
            keep.dtype(),
            keep.dims()
        )
    }
    if keep.rank() != 3 {
        bail!(
            "compact_kept: keep mask must have shape (batch, heads, t), got {:?}",
            keep.dims()
        )
    }
    if keep.dim(2)? >= i32::MAX as usize {
        bail!(
            "compact_kept: sequence length of {:?} does not fit i32 positions",
            keep.dims()
        )
    }
    keep.contiguous()?.apply_op1_no_bwd(&Compact {
        pad_pos: kind.pad_pos(),
    })
}

/// The op behind [`compact_kept`].
struct Compact {
    pad_pos: i32,
}

impl CustomOp1 for Compact {
    fn name(&self) -> &'static str {
        "scfa-compact-kept"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let keep = match (s, l.contiguous_offsets()) {
            (CpuStorage::U8(v), Some((start, end))) => &v[start..end],
            _ => bail!("compact_kept: keep mask must be contiguous u8, got {l:?}"),
        };
        let t = l.shape().dims3()?.2;
        let mut pos = vec![self.pad_pos; keep.len()];
        if t > 0 {
            pos.par_chunks_mut(t)
                .zip(keep.par_chunks(t))
                .for_each(|(pos, keep)| {
                    let kept = keep.iter().enumerate().filter(|(_, &k)| k != 0);
                    for (p, (i, _)) in pos.iter_mut().zip(kept) {
                        *p = i as i32;
                    }
                });
        }
        Ok((CpuStorage::I32(pos), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use super::launch::{self, view};
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;

        let (b, h, t) = l.shape().dims3()?;
        let dev = &s.device;
        let keep = view::<u8>(s, l, "keep mask")?;
        let rows = b * h;
        let mut pos = unsafe { dev.alloc::<i32>(rows * t) }?;
        if rows > 0 && t > 0 {
            let f = dev.get_or_load_custom_func("compact_kept", launch::MODULE, launch::PTX)?;
            let mut builder = f.builder();
            builder.arg(&keep);
            builder.arg(&mut pos);
            candle::builder_arg!(builder, rows as u32, t as u32, self.pad_pos);
            unsafe { builder.launch(launch::warp_per_row(rows, 0)?) }.w()?;
        }
        Ok((
            candle::CudaStorage::wrap_cuda_slice(pos, dev.clone()),
            l.shape().clone(),
        ))
    }
}
