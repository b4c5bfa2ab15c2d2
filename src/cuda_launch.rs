//! Launch helpers shared by every method's CUDA side (feature `cuda`).

use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle::cuda_backend::CudaDType;
use candle::op::BackpropOp;
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// Loads kernel `$name` of PTX module `$module` (source `$ptx`) on `$dev` and opts it in to
/// `$smem` bytes of dynamic shared memory when that is above 48 KB. A macro because the loaded
/// function's type (`CudaFunc`) is not exported by candle.
macro_rules! load_kernel {
    ($dev:expr, $name:expr, $module:expr, $ptx:expr, $smem:expr $(,)?) => {{
        let f = $dev.get_or_load_custom_func(&$name, $module, $ptx)?;
        if $smem > 48 * 1024 {
            candle::cuda_backend::WrapErr::w(f.set_attribute(
                candle::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                $smem as i32,
            ))?;
        }
        f
    }};
}
pub(crate) use load_kernel;

/// Whether this device runs the Hopper (`wgmma`) kernels: compute capability 9.0 and PTX built for
/// sm_90a (`CUDA_COMPUTE_CAP=90`, which cudaforge turns into `compute_90a`; every `cuda/*.cu` file
/// is built for the same target, so flash_attn.cu's PTX answers for all of them).
pub(crate) fn has_wgmma(dev: &CudaDevice) -> bool {
    static PTX_HAS_WGMMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PTX_HAS_WGMMA.get_or_init(|| crate::kernels::FLASH_ATTN.contains("wgmma.mma_async"))
        && dev.cuda_stream().context().compute_capability().ok() == Some((9, 0))
}

/// A 2-D grid of 1-D blocks, checked against the device limits (`what` names the caller).
pub(crate) fn launch_config(
    what: &str,
    grid: (usize, usize),
    threads: usize,
    smem: usize,
) -> Result<LaunchConfig> {
    if grid.0 == 0 || grid.1 == 0 {
        bail!("{what} (cuda): empty launch grid {grid:?}")
    }
    if grid.0 > i32::MAX as usize || grid.1 > 65535 || smem > 227 * 1024 {
        bail!(
            "{what} (cuda): launch {grid:?} with {smem} B shared memory is too large \
             (grid.1 at most 65535)"
        )
    }
    Ok(LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// The contiguous typed view of a storage behind a layout (`what` names the caller, `name` the
/// tensor).
pub(crate) fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
    name: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{what} (cuda): {name} must be contiguous, got {l:?}"),
    }
}

/// The kernel-name suffix of a float dtype (`f32`, `f16`, `bf16`); other dtypes are an error
/// naming the caller `what`.
pub(crate) fn dtype_suffix(dtype: DType, what: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{what} (cuda): dtype {other:?} is not supported (f32, f16, bf16)"),
    })
}

/// Wraps a device buffer as a contiguous tensor of `shape`, outside autograd.
pub(crate) fn wrap_slice<T: CudaDType>(
    buf: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    wrap_storage(CudaStorage::wrap_cuda_slice(buf, dev.clone()), shape)
}

/// Wraps a device storage as a contiguous tensor of `shape`, outside autograd.
pub(crate) fn wrap_storage(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}
