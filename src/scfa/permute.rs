//! Row gathers along the sequence axis of `(batch, heads, len, dim)` tensors, as differentiable
//! custom ops. A scatter is a gather by the inverse index, so every move writes each output row
//! exactly once (zero rows included, no separate zero fill), and the backward of a move is the
//! gather by the other index of the pair. They replace candle's `index_select`/`index_add`,
//! whose CUDA backward loops serially over the indexed axis.

use candle::backend::BackendStorage;
use candle::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Gathers rows within each `(batch, head)`: `out[b, h, r, :] = x[b, h, index[b, h, r], :]`.
///
/// - `x`: `(batch, heads, n_in, dim)`, f32, f16, bf16 or f64.
/// - `index`: `(batch, heads, n_out)` i32 on the device of `x`. Entries outside `[0, n_in)`
///   (for example the padding sentinels `-1` and `i32::MAX`) produce zero rows.
/// - Returns `(batch, heads, n_out, dim)` in the dtype of `x`.
///
/// Differentiable in `x`; the backward scatters the gradient back (a gather by the inverse of
/// `index`, built on the device), exact when the in-range entries of each `(batch, head)` are
/// distinct (a permutation or compaction). [`super::RowOrder::gather`] skips building the inverse.
pub fn gather_rows(x: &Tensor, index: &Tensor) -> Result<Tensor> {
    check("gather_rows", x, index)?;
    let inverse = invert_rows(index, x.dim(2)?)?;
    permute_rows(x, index, &inverse)
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
/// Differentiable in `x`; the backward is the gather by `index`.
pub fn scatter_rows(x: &Tensor, index: &Tensor, len: usize) -> Result<Tensor> {
    check("scatter_rows", x, index)?;
    if index.dim(2)? != x.dim(2)? {
        bail!(
            "scatter_rows: index {:?} must have one entry per row of x {:?}",
            index.dims(),
            x.dims()
        )
    }
    let inverse = invert_rows(index, len)?;
    permute_rows(x, &inverse, index)
}

/// `out = gather(x, index)` (see [`gather_rows`]) whose backward is `dx = gather(grad, inverse)`.
///
/// - `index`: `(batch, heads, n_out)` i32, `inverse`: `(batch, heads, n_in)` i32 with
///   `n_in = x.dim(2)`; the gradient is exact when `inverse[s] = r` iff `index[r] = s` for the
///   in-range entries (and `inverse` is out of range for rows nothing was gathered from).
pub(crate) fn permute_rows(x: &Tensor, index: &Tensor, inverse: &Tensor) -> Result<Tensor> {
    check("permute_rows", x, index)?;
    check("permute_rows", x, inverse)?;
    if inverse.dim(2)? != x.dim(2)? {
        bail!(
            "permute_rows: inverse index {:?} must have one entry per row of x {:?}",
            inverse.dims(),
            x.dims()
        )
    }
    let n_out = index.dim(2)?;
    x.contiguous()?.apply_op3(
        &index.contiguous()?,
        &inverse.contiguous()?,
        RowGather { n_out },
    )
}

/// `gather(x, index)` (see [`gather_rows`]) outside autograd: `(batch, heads, index.dim(2), dim)`.
pub(crate) fn gather_detached(x: &Tensor, index: &Tensor) -> Result<Tensor> {
    check("gather_rows", x, index)?;
    let op = RowGather {
        n_out: index.dim(2)?,
    };
    x.contiguous()?.apply_op2_no_bwd(&index.contiguous()?, &op)
}

/// [`gather_detached`] on the CPU storages of two contiguous tensors, for the forward of an op
/// that holds them.
pub(crate) fn gather_storage_cpu(x: &Tensor, index: &Tensor) -> Result<(CpuStorage, Shape)> {
    let op = RowGather {
        n_out: index.dim(2)?,
    };
    let ((sx, lx), (si, li)) = (x.storage_and_layout(), index.storage_and_layout());
    match (&*sx, &*si) {
        (candle::Storage::Cpu(sx), candle::Storage::Cpu(si)) => op.cpu_gather(sx, lx, si, li),
        _ => bail!(
            "scfa row move: x {:?} and index {:?} must be on the CPU, got {:?} and {:?}",
            x.dims(),
            index.dims(),
            x.device().location(),
            index.device().location()
        ),
    }
}

/// [`gather_detached`] on the CUDA storages of two contiguous tensors, for the forward of an op
/// that holds them.
#[cfg(feature = "cuda")]
pub(crate) fn gather_storage_cuda(
    x: &Tensor,
    index: &Tensor,
) -> Result<(candle::CudaStorage, Shape)> {
    let op = RowGather {
        n_out: index.dim(2)?,
    };
    let ((sx, lx), (si, li)) = (x.storage_and_layout(), index.storage_and_layout());
    match (&*sx, &*si) {
        (candle::Storage::Cuda(sx), candle::Storage::Cuda(si)) => op.cuda_gather(sx, lx, si, li),
        _ => bail!(
            "scfa row move: x {:?} and index {:?} must be on the GPU, got {:?} and {:?}",
            x.dims(),
            index.dims(),
            x.device().location(),
            index.device().location()
        ),
    }
}

/// The inverse of a row index: `(batch, heads, len)` i32 with `inv[s] = r` where
/// `index[r] = s`, `-1` where no entry lands; out-of-range entries are skipped.
fn invert_rows(index: &Tensor, len: usize) -> Result<Tensor> {
    if len > i32::MAX as usize || index.dim(2)? > i32::MAX as usize {
        bail!(
            "invert_rows: index {:?} or length {len} exceed i32",
            index.dims()
        )
    }
    index.contiguous()?.apply_op1_no_bwd(&InvertRows { len })
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

/// The contiguous slice of a CPU storage behind a layout.
fn slice<'a, T>(s: &'a [T], l: &Layout, name: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s[start..end]),
        None => bail!("scfa: {name} must be contiguous, got layout {l:?}"),
    }
}

/// The op behind the row moves: inputs `x` and the i32 gather index (and, for the
/// differentiable [`CustomOp3`], the inverse index used by the backward), output
/// `(batch, heads, n_out, dim)`.
struct RowGather {
    n_out: usize,
}

impl RowGather {
    /// CPU gather over `bh` independent `(batch, head)` blocks.
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
        out.par_chunks_mut(n_out * d)
            .enumerate()
            .for_each(|(blk, out)| {
                let x = &x[blk * n_in * d..(blk + 1) * n_in * d];
                let index = &index[blk * n_out..(blk + 1) * n_out];
                for (o, &i) in out.chunks_mut(d).zip(index) {
                    if let Some(src) = usize::try_from(i).ok().filter(|&i| i < n_in) {
                        o.copy_from_slice(&x[src * d..(src + 1) * d]);
                    }
                }
            });
        out
    }

    fn cpu_gather(
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
    fn cuda_gather(
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
        use crate::cuda_launch::launch_config;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;

        const THREADS: usize = 256;
        let n_out = self.n_out;
        let rows = bh * n_out;
        let len = rows * d;
        if len == 0 || n_in == 0 {
            // Nothing to gather from: every row is a zero row.
            return Ok(candle::CudaStorage::wrap_cuda_slice(
                dev.alloc_zeros::<T>(len)?,
                dev.clone(),
            ));
        }
        if n_in > i32::MAX as usize || rows > u32::MAX as usize {
            bail!("scfa row move: {bh} x {n_in} -> {n_out} rows exceed the kernel's index range")
        }
        let mut out = unsafe { dev.alloc::<T>(len) }?;
        // Widest copy unit dividing the row size and the source offset (in bytes).
        let elem = std::mem::size_of::<T>();
        let (row_bytes, offset_bytes) = (d * elem, x_offset * elem);
        let unit = [16usize, 8, 4, 2]
            .into_iter()
            .find(|u| row_bytes % u == 0 && offset_bytes % u == 0)
            .unwrap_or(elem);
        let units = row_bytes / unit;
        let rows_per_block = THREADS / units.min(THREADS);
        let f = dev.get_or_load_custom_func(
            &format!("gather_rows_u{}", unit * 8),
            launch::MODULE,
            launch::PTX,
        )?;
        let mut b = f.builder();
        b.arg(x);
        b.arg(index);
        b.arg(&mut out);
        candle::builder_arg!(b, rows as u32, n_out as u32, n_in as u32, units as u32);
        let cfg = launch_config(
            "scfa row move",
            (rows.div_ceil(rows_per_block), 1),
            THREADS,
            0,
        )?;
        unsafe { b.launch(cfg) }.w()?;
        Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// The non-differentiable gather (used for the backward of the differentiable one).
impl CustomOp2 for RowGather {
    fn name(&self) -> &'static str {
        "scfa-gather-rows"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        si: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_gather(sx, lx, si, li)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        si: &candle::CudaStorage,
        li: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda_gather(sx, lx, si, li)
    }
}

/// The differentiable gather: inputs `(x, index, inverse)`; the backward gathers the output
/// gradient by `inverse`.
impl CustomOp3 for RowGather {
    fn name(&self) -> &'static str {
        "scfa-permute-rows"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        si: &CpuStorage,
        li: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_gather(sx, lx, si, li)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        si: &candle::CudaStorage,
        li: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda_gather(sx, lx, si, li)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _index: &Tensor,
        inverse: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = RowGather { n_out: x.dim(2)? };
        let dx = grad_res.contiguous()?.apply_op2_no_bwd(inverse, &back)?;
        Ok((Some(dx), None, None))
    }
}

/// The op behind [`invert_rows`].
struct InvertRows {
    len: usize,
}

impl CustomOp1 for InvertRows {
    fn name(&self) -> &'static str {
        "scfa-invert-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, n) = l.shape().dims3()?;
        let index = match s {
            CpuStorage::I32(v) => slice(v, l, "index")?,
            other => bail!("invert_rows: index must be i32, got {:?}", other.dtype()),
        };
        let len = self.len;
        let mut inv = vec![-1i32; b * h * len];
        if len > 0 && n > 0 {
            inv.par_chunks_mut(len)
                .zip(index.par_chunks(n))
                .for_each(|(inv, index)| {
                    for (r, &s) in index.iter().enumerate() {
                        if let Some(s) = usize::try_from(s).ok().filter(|&s| s < len) {
                            inv[s] = r as i32;
                        }
                    }
                });
        }
        Ok((CpuStorage::I32(inv), Shape::from((b, h, len))))
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

        let (b, h, n) = l.shape().dims3()?;
        let dev = &s.device;
        let index = view::<i32>(s, l, "index")?;
        let rows = b * h;
        let len = self.len;
        let mut inv = unsafe { dev.alloc::<i32>(rows * len) }?;
        if rows > 0 && len > 0 {
            let f = dev.get_or_load_custom_func("invert_rows", launch::MODULE, launch::PTX)?;
            let mut builder = f.builder();
            builder.arg(&index);
            builder.arg(&mut inv);
            candle::builder_arg!(builder, n as u32, len as u32);
            unsafe { builder.launch(launch::block_per_row(rows, 256, 0)?) }.w()?;
        }
        Ok((
            candle::CudaStorage::wrap_cuda_slice(inv, dev.clone()),
            Shape::from((b, h, len)),
        ))
    }
}
