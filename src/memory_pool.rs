//! The CUDA memory pool setting that keeps freed device memory for reuse.

use candle::{Device, Result};

/// Keeps device memory freed by dropped tensors in the CUDA device's default memory pool instead
/// of returning it to the driver at every synchronisation: sets the pool's release threshold to
/// its maximum, the behaviour of PyTorch's caching allocator. candle allocates stream-ordered from
/// that pool, so without this each step that synchronises (a loss read back, a sampled token)
/// unmaps its buffers and maps them again on the next allocation: about 0.5–0.8 ms per 400 MB on
/// the H100, 20–30% of the sparse attention methods' forward+backward time at 16k tokens
/// (BENCHMARKS.md, `bench_attention --keep-pool`). The memory stays reserved by the process until
/// it exits. A no-op on CPU devices (and on every device in builds without feature `cuda`).
pub fn keep_memory_pool(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle::cuda_backend::cudarc::driver::sys;
        let cu_device = cuda.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: the pool handle comes from the driver for a device of a live context, and the
        // attribute value is a u64 as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD requires.
        let (got, set) = unsafe {
            let got = sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device);
            let set = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
            (got, set)
        };
        if got != sys::CUresult::CUDA_SUCCESS || set != sys::CUresult::CUDA_SUCCESS {
            candle::bail!(
                "keep_memory_pool: cuDeviceGetDefaultMemPool {got:?}, cuMemPoolSetAttribute {set:?}"
            )
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}
