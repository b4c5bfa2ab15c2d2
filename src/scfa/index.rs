//! Caller-supplied integer tensors (positions, bucket ids) to the i32 the kernels read, with
//! range validation on the CPU and a sync-free clamp-to-padding on CUDA.

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Converts `t` (u8, u32, i32 or i64) to a contiguous i32 tensor of the same shape on its device.
///
/// On the CPU every value must lie in `[lo, hi]`, otherwise the error names `name`, the shape,
/// the offending value and its flat index. On CUDA, checking would need a device-to-host sync,
/// so out-of-range values become `invalid` instead (callers pick a padding value there).
pub(crate) fn to_i32(
    t: &Tensor,
    name: &'static str,
    lo: i64,
    hi: i64,
    invalid: i32,
) -> Result<Tensor> {
    if !matches!(t.dtype(), DType::U8 | DType::U32 | DType::I32 | DType::I64) {
        bail!(
            "{name} must be u8, u32, i32 or i64, got {:?} with shape {:?}",
            t.dtype(),
            t.dims()
        )
    }
    t.contiguous()?.apply_op1_no_bwd(&ToI32 {
        name,
        lo,
        hi,
        invalid,
    })
}

/// The op behind [`to_i32`].
struct ToI32 {
    name: &'static str,
    lo: i64,
    hi: i64,
    /// What out-of-range values become on CUDA (the CPU rejects them instead).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    invalid: i32,
}

impl ToI32 {
    fn cpu<T: Copy + Into<i64>>(&self, v: &[T], shape: &Shape) -> Result<Vec<i32>> {
        let mut out = Vec::with_capacity(v.len());
        for (i, &x) in v.iter().enumerate() {
            let x: i64 = x.into();
            if x < self.lo || x > self.hi {
                bail!(
                    "{} with shape {:?}: value {x} at flat index {i} is outside [{}, {}]",
                    self.name,
                    shape.dims(),
                    self.lo,
                    self.hi
                )
            }
            out.push(x as i32);
        }
        Ok(out)
    }
}

impl CustomOp1 for ToI32 {
    fn name(&self) -> &'static str {
        "scfa-to-i32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = match l.contiguous_offsets() {
            Some(o) => o,
            None => bail!("{} must be contiguous, got layout {l:?}", self.name),
        };
        let shape = l.shape();
        let out = match s {
            CpuStorage::U8(v) => self.cpu(&v[start..end], shape)?,
            CpuStorage::U32(v) => self.cpu(&v[start..end], shape)?,
            CpuStorage::I32(v) => self.cpu(&v[start..end], shape)?,
            CpuStorage::I64(v) => self.cpu(&v[start..end], shape)?,
            other => bail!("{} has unsupported dtype {:?}", self.name, other.dtype()),
        };
        Ok((CpuStorage::I32(out), shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use super::launch::view;
        use candle::cuda_backend::CudaStorageSlice as S;

        let out = match &s.slice {
            S::U8(_) => self.cuda(s, &view::<u8>(s, l, self.name)?, "to_i32_u8")?,
            S::U32(_) => self.cuda(s, &view::<u32>(s, l, self.name)?, "to_i32_u32")?,
            S::I32(_) => self.cuda(s, &view::<i32>(s, l, self.name)?, "to_i32_i32")?,
            S::I64(_) => self.cuda(s, &view::<i64>(s, l, self.name)?, "to_i32_i64")?,
            _ => bail!("{} has unsupported dtype {:?}", self.name, s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
impl ToI32 {
    fn cuda<T>(
        &self,
        s: &candle::CudaStorage,
        input: &candle::cuda_backend::cudarc::driver::CudaView<'_, T>,
        kernel: &str,
    ) -> Result<candle::CudaStorage> {
        use super::launch;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;

        let dev = &s.device;
        let n = input.len();
        let mut out = unsafe { dev.alloc::<i32>(n) }?;
        if n > 0 {
            let f = dev.get_or_load_custom_func(kernel, launch::MODULE, launch::PTX)?;
            let mut b = f.builder();
            b.arg(input);
            b.arg(&mut out);
            candle::builder_arg!(b, n as u64, self.lo, self.hi, self.invalid);
            unsafe { b.launch(launch::elementwise(n)) }.w()?;
        }
        Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
