//! Shared plumbing of the `cuda/scfa_prep.cu` launches: module loading, launch shapes and typed
//! views of contiguous storages. Every kernel runs on the device's own stream.

use candle::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle::cuda_backend::CudaDType;
use candle::{CudaStorage, Layout, Result};

use crate::cuda_launch::{contiguous_view, launch_config};

/// Module name of `cuda/scfa_prep.cu` (unique: no other PTX is loaded under it). Kernels are
/// loaded with `dev.get_or_load_custom_func(name, MODULE, PTX)`.
pub(crate) const MODULE: &str = "scfa_prep";
/// PTX of `cuda/scfa_prep.cu`.
pub(crate) const PTX: &str = crate::kernels::SCFA_PREP;

/// A 1-D grid-stride launch over `total` items with 256-thread blocks.
pub(crate) fn elementwise(total: usize) -> LaunchConfig {
    const BLOCK: usize = 256;
    let blocks = total.div_ceil(BLOCK).clamp(1, 1 << 20);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` threads per row.
pub(crate) fn block_per_row(
    rows: usize,
    threads: u32,
    shared_mem_bytes: u32,
) -> Result<LaunchConfig> {
    launch_config(
        "scfa",
        (rows, 1),
        threads as usize,
        shared_mem_bytes as usize,
    )
}

/// The contiguous typed view of a storage behind a layout.
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    name: &str,
) -> Result<CudaView<'a, T>> {
    contiguous_view(s, l, "scfa", name)
}
