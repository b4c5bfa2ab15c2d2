//! Query/key dropping: stream compaction of keep masks into time-ordered row positions and their
//! inverse.

use candle::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{RowKind, RowOrder};

/// Compacts a keep mask into the kept rows in time order.
///
/// - `keep`: `(batch, heads, t)` u8, non-zero = keep.
/// - Returns a [`RowOrder`] without buckets: `pos` `(batch, heads, t)` i32, row `r < kept` of
///   each `(batch, head)` holding the time index of the `r`-th kept step (increasing) and rows
///   `r >= kept` the padding position of `kind`
///   ([`QUERY_PAD_POS`](crate::mask::QUERY_PAD_POS) or [`KEY_PAD_POS`](crate::mask::KEY_PAD_POS));
///   `inv` `(batch, heads, t)` i32, the compacted row of every step, `-1` for dropped steps.
///
/// An exclusive prefix sum over the mask (O(t), stable, no sort, no host sync); on CUDA one block
/// per `(batch, head)`, 16 steps per thread and a block-wide scan.
pub fn compact_kept(keep: &Tensor, kind: RowKind) -> Result<RowOrder> {
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
    let packed = keep.contiguous()?.apply_op1_no_bwd(&Compact {
        pad_pos: kind.pad_pos(),
    })?;
    Ok(RowOrder {
        pos: packed.get(0)?,
        inv: packed.get(1)?,
        bucket: None,
    })
}

/// The op behind [`compact_kept`]: output `(2, batch, heads, t)`, positions then the inverse.
struct Compact {
    pad_pos: i32,
}

/// Threads per block of the CUDA compaction (16 steps each).
#[cfg(feature = "cuda")]
const COMPACT_THREADS: u32 = 512;

impl CustomOp1 for Compact {
    fn name(&self) -> &'static str {
        "scfa-compact-kept"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let keep = match (s, l.contiguous_offsets()) {
            (CpuStorage::U8(v), Some((start, end))) => &v[start..end],
            _ => bail!("compact_kept: keep mask must be contiguous u8, got {l:?}"),
        };
        let (b, h, t) = l.shape().dims3()?;
        let mut out = vec![self.pad_pos; 2 * keep.len()];
        if t > 0 {
            let (pos, inv) = out.split_at_mut(keep.len());
            pos.par_chunks_mut(t)
                .zip(inv.par_chunks_mut(t))
                .zip(keep.par_chunks(t))
                .for_each(|((pos, inv), keep)| {
                    let mut r = 0;
                    for (i, (&k, inv)) in keep.iter().zip(inv.iter_mut()).enumerate() {
                        *inv = if k != 0 {
                            pos[r] = i as i32;
                            r += 1;
                            r as i32 - 1
                        } else {
                            -1
                        };
                    }
                });
        }
        Ok((CpuStorage::I32(out), Shape::from((2, b, h, t))))
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
        let mut out = unsafe { dev.alloc::<i32>(2 * rows * t) }?;
        if rows > 0 && t > 0 {
            let f = dev.get_or_load_custom_func("compact_kept", launch::MODULE, launch::PTX)?;
            let mut builder = f.builder();
            builder.arg(&keep);
            builder.arg(&mut out);
            candle::builder_arg!(builder, rows as u32, t as u32, self.pad_pos);
            let cfg = launch::block_per_row(rows, COMPACT_THREADS, 0)?;
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, b, h, t)),
        ))
    }
}
