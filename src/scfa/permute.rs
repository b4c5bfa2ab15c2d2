//! Row gather and scatter along the sequence axis of `(batch, heads, len, dim)` tensors, as
//! differentiable custom ops: the backward of a gather is the scatter with the same index and the
//! backward of a scatter is the gather (exact for the injective indices SCFA uses). They replace
//! candle's `index_select`/`index_add`, whose CUDA backward loops serially over the indexed axis.

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Gathers rows within each `(batch, head)`: `out[b, h, r, :] = x[b, h, index[b, h, r], :]`.
///
/// - `x`: `(batch, heads, n_in, dim)`, f32, f16, bf16 or f64.
/// - `index`: `(batch, heads, n_out)` i32 on the device of `x`. Entries outside `[0, n_in)`
///   (for example the padding sentinels `-1` and `i32::MAX`) produce zero rows.
/// - Returns `(batch, heads, n_out, dim)` in the dtype of `x`.
///
/// Differentiable in `x`; the backward is [`scatter_rows`] with the same index, which is exact
/// when the in-range entries of each `(batch, head)` are distinct (a permutation or compaction).
pub fn gather_rows(x: &Tensor, index: &Tensor) -> Result<Tensor> {
    check("gather_rows", x, index)?;
    let n_out = index.dim(2)?;
    x.contiguous()?.apply_op2(
        &index.contiguous()?,
        RowMove {
            direction: Direction::Gather,
            n_out,
        },
    )
}

/// Scatters rows within each `(batch, head)`: `out[b, h, index[b, h, r], :] = x[b, h, r, :]`,
/// zero rows where nothing lands.
///
/// - `x`: `(batch, heads, n_in, dim)`, f32, f16, bf16 or f64.
/// - `index`: `(batch, heads, n_in)` i32 on the device of `x`; rows whose entry is outside
///   `[0, len)` are dropped. In-range entries of one `(batch, head)` must be distinct (otherwise
///   which row lands is unspecified on CUDA).
/// - Returns `(batch, heads, len, dim)` in the dtype of `x`.
///
/// Differentiable in `x`; the backward is [`gather_rows`] with the same index.
pub fn scatter_rows(x: &Tensor, index: &Tensor, len: usize) -> Result<Tensor> {
    check("scatter_rows", x, index)?;
    if index.dim(2)? != x.dim(2)? {
        bail!(
            "scatter_rows: index {:?} must have one entry per row of x {:?}",
            index.dims(),
            x.dims()
        )
    }
    x.contiguous()?.apply_op2(
        &index.contiguous()?,
        RowMove {
            direction: Direction::Scatter,
            n_out: len,
        },
    )
}

/// Validates ranks, dtypes, leading dims and devices of a row move.
fn check(op: &str, x: &Tensor, index: &Tensor) -> Result<()> {
    if x.rank() != 4 {
        bail!(
            "{op}: x must have rank 4 (batch, heads, len, dim), got {:?}",
            x.dims()
        )
    }
    if !matches!(
        x.dtype(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64
    ) {
        bail!(
            "{op}: x has unsupported dtype {:?} (f32, f16, bf16, f64)",
            x.dtype()
        )
    }
    if index.rank() != 3 || index.dims()[..2] != x.dims()[..2] {
        bail!(
            "{op}: index must have shape (batch, heads, n) matching x {:?}, got {:?}",
            x.dims(),
            index.dims()
        )
    }
    if index.dtype() != DType::I32 {
        bail!("{op}: index must be i32, got {:?}", index.dtype())
    }
    if !index.device().same_device(x.device()) {
        bail!(
            "{op}: index is on {:?} but x is on {:?}",
            index.device().location(),
            x.device().location()
        )
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Gather,
    Scatter,
}

impl Direction {
    fn inverse(self) -> Self {
        match self {
            Self::Gather => Self::Scatter,
            Self::Scatter => Self::Gather,
        }
    }
}

/// The op behind [`gather_rows`] and [`scatter_rows`]: inputs `x` and the i32 index, output
/// `(batch, heads, n_out, dim)`.
struct RowMove {
    direction: Direction,
    n_out: usize,
}

/// The contiguous slice of a CPU storage behind a layout.
fn slice<'a, T>(s: &'a [T], l: &Layout, name: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s[start..end]),
        None => bail!("scfa: {name} must be contiguous, got layout {l:?}"),
    }
}

impl RowMove {
    /// CPU row move over `bh` independent `(batch, head)` blocks.
    fn cpu<T: Copy + Default + Send + Sync>(
        &self,
        x: &[T],
        index: &[i32],
        (bh, n_in, d): (usize, usize, usize),
    ) -> Vec<T> {
        let n_out = self.n_out;
        let mut out = vec![T::default(); bh * n_out * d];
        if d == 0 || n_out == 0 {
            return out;
        }
        let in_range = |i: i32, n: usize| usize::try_from(i).ok().filter(|&i| i < n);
        match self.direction {
            Direction::Gather => {
                out.par_chunks_mut(n_out * d)
                    .enumerate()
                    .for_each(|(blk, out)| {
                        let x = &x[blk * n_in * d..(blk + 1) * n_in * d];
                        let index = &index[blk * n_out..(blk + 1) * n_out];
                        for (o, &i) in out.chunks_mut(d).zip(index) {
                            if let Some(src) = in_range(i, n_in) {
                                o.copy_from_slice(&x[src * d..(src + 1) * d]);
                            }
                        }
                    })
            }
            Direction::Scatter => {
                out.par_chunks_mut(n_out * d)
                    .enumerate()
                    .for_each(|(blk, out)| {
                        let x = &x[blk * n_in * d..(blk + 1) * n_in * d];
                        let index = &index[blk * n_in..(blk + 1) * n_in];
                        for (xr, &i) in x.chunks(d).zip(index) {
                            if let Some(dst) = in_range(i, n_out) {
                                out[dst * d..(dst + 1) * d].copy_from_slice(xr);
                            }
                        }
                    })
            }
        }
        out
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(
        &self,
        dev: &candle::CudaDevice,
        x: &candle::cuda_backend::cudarc::driver::CudaView<'_, T>,
        x_offset: usize,
        index: &candle::cuda_backend::cudarc::driver::CudaView<'_, i32>,
        (bh, n_in, d): (usize, usize, usize),
    ) -> Result<candle::CudaStorage>
    where
        T: candle::cuda_backend::CudaDType
            + candle::cuda_backend::cudarc::driver::DeviceRepr
            + candle::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        use super::launch;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;

        let n_out = self.n_out;
        let len = bh * n_out * d;
        // A gather writes every output element unless there is nothing to gather from.
        let mut out = if self.direction == Direction::Gather && n_in > 0 {
            unsafe { dev.alloc::<T>(len) }?
        } else {
            dev.alloc_zeros::<T>(len)?
        };
        if len == 0 || n_in == 0 {
            return Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        if n_in > i32::MAX as usize || n_out > i32::MAX as usize {
            bail!("scfa row move: lengths {n_in} -> {n_out} exceed i32")
        }
        // Widest copy unit dividing the row size and the source offset (in bytes).
        let elem = std::mem::size_of::<T>();
        let (row_bytes, offset_bytes) = (d * elem, x_offset * elem);
        let unit = [16usize, 8, 4, 2]
            .into_iter()
            .find(|u| row_bytes % u == 0 && offset_bytes % u == 0)
            .unwrap_or(elem);
        let units = row_bytes / unit;
        let name = match self.direction {
            Direction::Gather => format!("gather_rows_u{}", unit * 8),
            Direction::Scatter => format!("scatter_rows_u{}", unit * 8),
        };
        let rows = match self.direction {
            Direction::Gather => bh * n_out,
            Direction::Scatter => bh * n_in,
        };
        let f = dev.get_or_load_custom_func(&name, launch::MODULE, launch::PTX)?;
        let mut b = f.builder();
        b.arg(x);
        b.arg(index);
        b.arg(&mut out);
        candle::builder_arg!(b, rows as u64, n_out as u32, n_in as u32, units as u32);
        unsafe { b.launch(launch::elementwise(rows * units)) }.w()?;
        Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp2 for RowMove {
    fn name(&self) -> &'static str {
        match self.direction {
            Direction::Gather => "scfa-gather-rows",
            Direction::Scatter => "scfa-scatter-rows",
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        si: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, n_in, d) = lx.shape().dims4()?;
        let index = match si {
            CpuStorage::I32(v) => slice(v, li, "index")?,
            other => bail!("scfa row move: index must be i32, got {:?}", other.dtype()),
        };
        let dims = (b * h, n_in, d);
        let out = match sx {
            CpuStorage::F32(v) => CpuStorage::F32(self.cpu(slice(v, lx, "x")?, index, dims)),
            CpuStorage::F16(v) => CpuStorage::F16(self.cpu(slice(v, lx, "x")?, index, dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.cpu(slice(v, lx, "x")?, index, dims)),
            CpuStorage::F64(v) => CpuStorage::F64(self.cpu(slice(v, lx, "x")?, index, dims)),
            other => bail!("scfa row move: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b, h, self.n_out, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        si: &candle::CudaStorage,
        li: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use super::launch::view;
        use candle::cuda_backend::CudaStorageSlice as S;
        use half::{bf16, f16};

        let (b, h, n_in, d) = lx.shape().dims4()?;
        let index = view::<i32>(si, li, "index")?;
        let dims = (b * h, n_in, d);
        let dev = &sx.device;
        let off = lx.start_offset();
        let out = match &sx.slice {
            S::F32(_) => self.cuda(dev, &view::<f32>(sx, lx, "x")?, off, &index, dims)?,
            S::F16(_) => self.cuda(dev, &view::<f16>(sx, lx, "x")?, off, &index, dims)?,
            S::BF16(_) => self.cuda(dev, &view::<bf16>(sx, lx, "x")?, off, &index, dims)?,
            S::F64(_) => self.cuda(dev, &view::<f64>(sx, lx, "x")?, off, &index, dims)?,
            _ => bail!("scfa row move: unsupported dtype {:?}", sx.dtype()),
        };
        Ok((out, Shape::from((b, h, self.n_out, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        index: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let inverse = RowMove {
            direction: self.direction.inverse(),
            n_out: x.dim(2)?,
        };
        let dx = grad_res.contiguous()?.apply_op2_no_bwd(index, &inverse)?;
        Ok((Some(dx), None))
    }
}
