//! CUDA launch side of SparseK (kernels in `cuda/sparsek.cu`). Everything runs on candle's
//! stream with no host round trip.
//!
//! - Selection: the top-`K′` list of the prefix before every block of 64 queries, by merging
//!   sorted lists (`O(T·K′/64)` memory); the blocks of a `(batch, kv_head)` row are cut into
//!   groups, each starting from the merged lists of the earlier groups, so the groups run in
//!   parallel. Where all its CTAs fit the GPU, one cooperative launch does it (`scan_group`:
//!   groups of at least 4 blocks, the earlier groups' lists merged by a log-step scan between
//!   per-row barriers); otherwise groups of about `sqrt(2·blocks)` blocks (`list_group`) start
//!   from the earlier groups' lists built by a first kernel. Then per query the cut
//!   (its `K′`-th largest candidate) and τ (safeguarded Newton steps on the piecewise-linear
//!   budget, f32, one thread per query; each step `O(log K′)` on the sorted list through f64
//!   prefix sums of its scores).
//! - f16 / bf16 with head_dim ≤ 128 (`skt_*`): blocked tensor-core kernels, one CTA of 4 warps per
//!   (block of 64 queries, batch × query head) walking the block's list prefix and its band of
//!   newer candidates and window keys in tiles of 64 gathered keys: forward; dQ (in the input
//!   dtype) with `r_i` and `|S_i|`, zeroing the key side's f32 accumulator on the way. On compute
//!   capability 9.0 at head_dim 64 and 128 the forward and dQ run as Hopper kernels instead
//!   (`skw_*`: a producer warpgroup gathers the K / V rows into a ring of 128-byte-swizzled
//!   stages, a consumer warpgroup runs warpgroup MMA; variants in [`HOPPER_FWD`] /
//!   [`HOPPER_DQ`], [`KERNEL_ENV`] picks one or the `mma.sync` kernels). dK, dV, dScores: the
//!   list part with vector atomics into the f32 accumulator (one CTA per query block, or on
//!   compute capability 9.0 one warpgroup per pair of query blocks walking the union of their
//!   lists once: half the atomics), then the band part key-major (one CTA per block of 64 keys
//!   and kv head, over the query blocks whose band holds them, in registers), which adds the
//!   accumulator's rows to its own and writes dK, dV in the input dtype (every row; on Hopper
//!   also a folded scorer's gradient, [`ScorerColumns`]). On
//!   compute capability 9.0 at head_dim 64 and 128 both key-side kernels run on warpgroup MMA
//!   (`skw_bwd_dkv_band`, `skw_bwd_dkv_list`; [`KERNEL_ENV`] `mma` keeps the `mma.sync` ones).
//!   The `mma.sync` kernels are compiled for 3 resident CTAs per SM at head_dim ≤ 64 (the
//!   kernels are latency-bound), 2 above; so are the Hopper key-side kernels at head_dim 64.
//! - f32 and head_dim 256 (`sk_*`): forward and dQ one warp per query row over window ∪
//!   selected keys; dK, dV, dScores one warp per key row over the interval `[j, e_j)` of queries
//!   attending it (τ_i and the cut are non-decreasing in i), found by binary search; the key
//!   accumulates its gradients in registers (no atomics, deterministic).

use std::sync::Arc;

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::sys::{self, CUdevice_attribute};
use candle::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::attn::{Dims, ScorerColumns};
use super::scorer::ScoreDims;
use super::SparseKConfig;
use crate::cuda_launch::{
    contiguous_view, dtype_suffix, has_wgmma, launch_config, load_kernel, wrap_slice,
};
use crate::kernels;

/// Module name of `cuda/sparsek.cu`'s PTX in candle's custom-module cache.
const MODULE: &str = "candle_sparse_attn::sparsek";
/// Queries per selection block (`BQ` in the .cu file).
const BQ: usize = 64;
/// Warps per block of the row kernels.
const WARPS: usize = 8;

/// Device-side selection of one forward, kept for the backward.
#[derive(Clone)]
pub(crate) struct Selection {
    /// Top-`K′` lists `(b·hkv, blocks, K′)`: scores and positions (padding `-inf`, `-1`).
    list_u: Arc<CudaSlice<f32>>,
    list_j: Arc<CudaSlice<i32>>,
    /// Per block `(b·hkv, blocks)`: the length of the list prefix its queries attend.
    list_len: Arc<CudaSlice<i32>>,
    /// Per query `(b·hkv, t)`: the length of the prefix of its block's list that it attends.
    nattend: Arc<CudaSlice<i32>>,
    /// Per query `(b·hkv, t)`: τ (`-inf` when every candidate has p = 1) and the cut key.
    tau: Arc<CudaSlice<f32>>,
    cut_u: Arc<CudaSlice<f32>>,
    cut_j: Arc<CudaSlice<i32>>,
    blocks: usize,
}

/// Loads a kernel of `cuda/sparsek.cu`, opting in to `$smem` bytes of shared memory.
macro_rules! func {
    ($dev:expr, $name:expr, $smem:expr $(,)?) => {
        load_kernel!($dev, $name, MODULE, kernels::SPARSEK, $smem)
    };
}

fn cfg(grid: (usize, usize), threads: usize, smem: usize) -> Result<LaunchConfig> {
    launch_config("sparsek", grid, threads, smem)
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, name: &str) -> Result<CudaView<'a, T>> {
    contiguous_view(s, l, "sparsek", name)
}

/// SPARSEK projection of every row (last dim) of f32 scores; one warp per row.
pub(crate) fn project(s: &CudaStorage, l: &Layout, k: f64) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let z = view::<f32>(s, l, "scores")?;
    let m = l.dims()[l.dims().len() - 1];
    let rows = l.shape().elem_count() / m;
    let mut p = unsafe { dev.alloc::<f32>(rows * m) }?;
    let f = func!(dev, "sk_project_f32", 0);
    let mut b = f.builder();
    b.arg(&z);
    b.arg(&mut p);
    candle::builder_arg!(b, rows as i64, m as i32, k as f32);
    unsafe { b.launch(cfg((rows.div_ceil(WARPS), 1), 32 * WARPS, 0)?) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(p, dev), l.shape().clone()))
}

fn check_dims(dims: Dims, cfg: &SparseKConfig) -> Result<()> {
    let cap = cfg.cap();
    if dims.b * dims.hkv > 65535 || dims.t > i32::MAX as usize / 2 || cap > 8192 {
        bail!("sparsek (cuda): too large: {dims:?}, K′ = {cap} (at most 65535 batch × kv heads, K′ ≤ 8192)")
    }
    if !crate::SUPPORTED_HEAD_DIMS.contains(&dims.d) {
        bail!(
            "sparsek (cuda): head_dim {} is not supported (supported: {:?})",
            dims.d,
            crate::SUPPORTED_HEAD_DIMS
        )
    }
    Ok(())
}

/// Runs the selection over scores `(b, hkv, t)` f32.
pub(crate) fn select(
    (su, lu): (&CudaStorage, &Layout),
    dims: Dims,
    scfg: &SparseKConfig,
) -> Result<Selection> {
    check_dims(dims, scfg)?;
    let dev = su.device().clone();
    let u = view::<f32>(su, lu, "scores")?;
    let (rows, t, cap) = (dims.b * dims.hkv, dims.t, scfg.cap());
    let blocks = t.div_ceil(BQ);
    let mut list_u = unsafe { dev.alloc::<f32>(rows * blocks * cap) }?;
    let mut list_j = unsafe { dev.alloc::<i32>(rows * blocks * cap) }?;
    let (t_i, w_i, cap_i, nb_i) = (t as i32, scfg.window as i32, cap as i32, blocks as i32);
    let ctx = dev.cuda_stream().context().clone();
    let sms = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let group = list_group(blocks, rows, sms.max(1) as usize);
    // The running list, the merge target, a list to merge in, a block's keys.
    let smem = (2 * cap + cap.max(BQ) + BQ) * 8;
    let scan = func!(dev, "sk_scan_block_lists", smem);
    match scan_group(&scan, blocks, rows, smem, sms.max(1) as usize, group)? {
        Some(group) => {
            let groups = blocks.div_ceil(group);
            // Two buffers of every group's running list, their lengths, the rows' barriers.
            let n = 2 * rows * groups * cap;
            let mut glist_u = unsafe { dev.alloc::<f32>(n) }?;
            let mut glist_j = unsafe { dev.alloc::<i32>(n) }?;
            let mut glen = unsafe { dev.alloc::<i32>(2 * rows * groups) }?;
            let mut bar = dev.alloc_zeros::<i32>(rows)?;
            let g_i = group as i32;
            let mut b = scan.builder();
            b.arg(&u);
            b.arg(&mut glist_u);
            b.arg(&mut glist_j);
            b.arg(&mut glen);
            b.arg(&mut bar);
            b.arg(&mut list_u);
            b.arg(&mut list_j);
            b.arg(&t_i);
            b.arg(&w_i);
            b.arg(&cap_i);
            b.arg(&nb_i);
            b.arg(&g_i);
            // SAFETY: the arguments match the kernel's; scan_group checked that every CTA is
            // resident, which the barriers need.
            unsafe { b.launch_cooperative(cfg((groups, rows), LIST_THREADS, smem)?) }.w()?;
        }
        None => list_groups_then_blocks(
            &dev,
            &u,
            (&mut list_u, &mut list_j),
            (rows, group, smem),
            (t_i, w_i, cap_i, nb_i),
        )?,
    }
    let mut tau = unsafe { dev.alloc::<f32>(rows * t) }?;
    let mut cut_u = unsafe { dev.alloc::<f32>(rows * t) }?;
    let mut cut_j = unsafe { dev.alloc::<i32>(rows * t) }?;
    let mut list_len = unsafe { dev.alloc::<i32>(rows * blocks) }?;
    let mut nattend = unsafe { dev.alloc::<i32>(rows * t) }?;
    {
        // The list (score, position) and its f64 prefix sums at every fourth index.
        let smem = cap * 8 + (cap / 4 + 1) * 8;
        let f = func!(dev, "sk_select", smem);
        let mut b = f.builder();
        let k = scfg.k as f32;
        b.arg(&u);
        b.arg(&list_u);
        b.arg(&list_j);
        b.arg(&mut tau);
        b.arg(&mut cut_u);
        b.arg(&mut cut_j);
        b.arg(&mut list_len);
        b.arg(&mut nattend);
        b.arg(&t_i);
        b.arg(&w_i);
        b.arg(&cap_i);
        b.arg(&k);
        b.arg(&nb_i);
        // One thread per query of the block.
        unsafe { b.launch(cfg((blocks, rows), BQ, smem)?) }.w()?;
    }
    Ok(Selection {
        list_u: Arc::new(list_u),
        list_j: Arc::new(list_j),
        list_len: Arc::new(list_len),
        nattend: Arc::new(nattend),
        tau: Arc::new(tau),
        cut_u: Arc::new(cut_u),
        cut_j: Arc::new(cut_j),
        blocks,
    })
}

/// The two-kernel list construction (`sk_group_lists`, then `sk_block_lists`) into `(lu, lj)`,
/// for `rows` score rows `u` cut into groups of `group` blocks; `smem` the lists' shared bytes
/// without the prefetch buffer; `(t, window, cap, blocks)` the kernels' scalars.
fn list_groups_then_blocks(
    dev: &CudaDevice,
    u: &CudaView<'_, f32>,
    (lu, lj): (&mut CudaSlice<f32>, &mut CudaSlice<i32>),
    (rows, group, smem): (usize, usize, usize),
    (t_i, w_i, cap_i, nb_i): (i32, i32, i32, i32),
) -> Result<()> {
    let (blocks, cap) = (nb_i as usize, cap_i as usize);
    let groups = blocks.div_ceil(group);
    let g_i = group as i32;
    // Each earlier group's own top-`K′` list (the last group's is never needed).
    let nglist = rows * groups * cap;
    let mut glist_u = unsafe { dev.alloc::<f32>(nglist.max(1)) }?;
    let mut glist_j = unsafe { dev.alloc::<i32>(nglist.max(1)) }?;
    let mut glen = unsafe { dev.alloc::<i32>((rows * groups).max(1)) }?;
    if groups > 1 {
        let f = func!(dev, "sk_group_lists", smem);
        let mut b = f.builder();
        b.arg(u);
        b.arg(&mut glist_u);
        b.arg(&mut glist_j);
        b.arg(&mut glen);
        b.arg(&t_i);
        b.arg(&w_i);
        b.arg(&cap_i);
        b.arg(&nb_i);
        b.arg(&g_i);
        unsafe { b.launch(cfg((groups - 1, rows), LIST_THREADS, smem)?) }.w()?;
    }
    // The next group's list copied in while one merges, where shared memory allows.
    let max_smem = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    let prefetch = smem + cap.max(BQ) * 8 <= max_smem.max(0) as usize;
    let smem = if prefetch {
        smem + cap.max(BQ) * 8
    } else {
        smem
    };
    let prefetch_i = prefetch as i32;
    let f = func!(dev, "sk_block_lists", smem);
    let mut b = f.builder();
    b.arg(u);
    b.arg(&glist_u);
    b.arg(&glist_j);
    b.arg(&glen);
    b.arg(lu);
    b.arg(lj);
    b.arg(&t_i);
    b.arg(&w_i);
    b.arg(&cap_i);
    b.arg(&nb_i);
    b.arg(&g_i);
    b.arg(&prefetch_i);
    unsafe { b.launch(cfg((groups, rows), LIST_THREADS, smem)?) }.w()?;
    Ok(())
}

/// Environment switch of the one-launch list construction: `0` keeps the two-kernel path
/// everywhere (for comparisons and its tests).
pub(crate) const LIST_SCAN_ENV: &str = "SPARSEK_LIST_SCAN";

/// Fewest blocks per group of `sk_scan_block_lists`: a group's own merges are cheaper than
/// scan rounds (a barrier and lists through L2 each), so smaller groups stop paying.
const SCAN_MIN_GROUP: usize = 4;

/// Blocks per group of the one-launch list construction (`sk_scan_block_lists`, kernel `scan`
/// with `smem` shared bytes), or `None` where the two-kernel path is the one to run: the scan's
/// barriers need all `groups × rows` CTAs resident (a cooperative launch), so its group holds at
/// least `blocks × rows / resident CTAs` blocks, and it runs while that is at most the two-kernel
/// path's `group` (whose CTAs do about twice as many merges in sequence at the same group size).
fn scan_group(
    scan: &CudaFunction,
    blocks: usize,
    rows: usize,
    smem: usize,
    sms: usize,
    group: usize,
) -> Result<Option<usize>> {
    if blocks < 2 || std::env::var(LIST_SCAN_ENV).is_ok_and(|v| v == "0") {
        return Ok(None);
    }
    let per_sm = scan
        .occupancy_max_active_blocks_per_multiprocessor(LIST_THREADS as u32, smem, None)
        .w()? as usize;
    let per_row = per_sm * sms / rows.max(1);
    if per_row == 0 {
        return Ok(None);
    }
    let scan_group = blocks.div_ceil(per_row).max(SCAN_MIN_GROUP.min(group));
    Ok((scan_group <= group).then_some(scan_group))
}

/// Threads per CTA of the list construction (`sk_group_lists` / `sk_block_lists` /
/// `sk_scan_block_lists`; a multiple of `BQ`, at most `32·BQ`). On the H100 at the GPT's 24 rows
/// × 128 blocks, 512 and 1024 were slower (EXPERIMENTS.md, "SparseK at 8k", session 14).
const LIST_THREADS: usize = 256;

/// Environment variable setting the number of query blocks per group of the list construction
/// (`sk_group_lists` / `sk_block_lists`); a value ≥ the number of blocks gives the single
/// sequential pass per `(batch, kv head)` (for comparisons).
pub(crate) const LIST_GROUP_ENV: &str = "SPARSEK_LIST_GROUP";

/// Query blocks per group of the list construction. By default `ceil(sqrt(2·blocks))`, which
/// balances the longest CTA's work (the earlier groups' lists merged, each about twice a block's
/// merge, plus its own blocks), scaled by `sqrt(rows / sms)` clamped to `[0.5, 1.5]`: with few
/// `(batch, kv head)` rows per SM, more and shorter groups fill the GPU; with many, fewer groups
/// do less merge work in all (measured on the H100: best 8 at 24 rows × 128 blocks, 32 at 192
/// rows × 256 blocks; EXPERIMENTS.md, "SparseK at 8k").
fn list_group(blocks: usize, rows: usize, sms: usize) -> usize {
    let scale = (rows as f64 / sms.max(1) as f64).sqrt().clamp(0.5, 1.5);
    let default = (((2 * blocks) as f64).sqrt() * scale).ceil() as usize;
    std::env::var(LIST_GROUP_ENV)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(default)
        .clamp(1, blocks.max(1))
}

/// Whether the blocked tensor-core kernels (`skt_*`: f16 / bf16, head_dim ≤ 128) run; otherwise
/// the row kernels (`sk_*`, f32 arithmetic: the f32 path and head_dim 256).
fn tensor_cores(dtype: DType, d: usize) -> bool {
    dtype != DType::F32 && d <= 128
}

/// Environment switch of the tensor-core kernels: `mma` runs the `mma.sync` kernels (`skt_*`)
/// where the Hopper ones (`skw_*`: forward, dQ, band and list dK / dV) would run; a
/// comma-separated list of `fwd:TAG` / `dq:TAG` ([`HopperVariant::tag`]) picks those variants,
/// e.g. `fwd:s4_m2,dq:s3_m3`.
pub(crate) const KERNEL_ENV: &str = "CANDLE_SPARSE_ATTN_SPARSEK";

/// A compiled Hopper forward or dQ variant (`SKW_ALL` in the .cu file).
#[derive(Clone, Copy, Debug)]
struct HopperVariant {
    d: usize,
    /// K / V pipeline stages.
    stages: usize,
    /// Resident CTAs per SM the kernel is compiled for.
    ctas: usize,
}

const fn variant(d: usize, stages: usize, ctas: usize) -> HopperVariant {
    HopperVariant { d, stages, ctas }
}

/// The Hopper forward variants, the default of each head dim first. B4 H48 16k bf16 (H100,
/// BENCHMARKS.md, "SparseK: Hopper forward and dQ"), forward with selection: 4.96 ms at 3 CTAs
/// per SM, 5.52 ms at 2 (the `mma.sync` forward: 8.28 ms).
const HOPPER_FWD: [HopperVariant; 3] = [variant(64, 3, 3), variant(64, 4, 2), variant(128, 4, 1)];

/// The Hopper dQ variants, the default of each head dim first (at B4 H48 16k the two head-dim-64
/// variants measure the same within 0.1 ms).
const HOPPER_DQ: [HopperVariant; 3] = [variant(64, 4, 2), variant(64, 3, 3), variant(128, 4, 1)];

impl HopperVariant {
    /// The variant's name: `s{stages}_m{ctas}`.
    fn tag(&self) -> String {
        format!("s{}_m{}", self.stages, self.ctas)
    }

    /// The variant of head dim `d` in `list` that [`KERNEL_ENV`] (`env`) names with `prefix`
    /// (`fwd:` or `dq:`), else the default; `None` when it asks for the `mma.sync` kernels.
    fn pick(
        list: &[HopperVariant],
        d: usize,
        prefix: &str,
        env: Option<&str>,
    ) -> Option<HopperVariant> {
        let mut of_d = list.iter().copied().filter(|v| v.d == d);
        match env {
            Some("mma") => None,
            Some(tags) => {
                let named = |v: &HopperVariant| {
                    let tag = format!("{prefix}{}", v.tag());
                    tags.split(',').any(|t| t == tag)
                };
                of_d.clone().find(named).or_else(|| of_d.next())
            }
            None => of_d.next(),
        }
    }

    /// Dynamic shared memory (`SkwSmem`): 1 KB alignment slack, `nq` query tiles, the K / V
    /// stages, the stages' scores, 4 mbarriers per stage, the block's `cap` list positions.
    fn smem(&self, nq: usize, cap: usize) -> usize {
        let (d, s) = (self.d, self.stages);
        1024 + (nq * BQ * d + 2 * s * BQ * d) * 2
            + s * BQ * 4
            + 4 * s * 8
            + cap.next_multiple_of(4) * 4
    }
}

/// The query-major kernels (forward, dQ) of one call.
struct QueryMajor {
    /// Names of the forward and dQ kernels.
    fwd: String,
    dq: String,
    /// Grid and threads per block of both: one block per (query block, batch × q head) for the
    /// tensor-core kernels, `WARPS` query rows per block for the row kernels.
    grid: (usize, usize),
    threads: usize,
    /// Dynamic shared memory of the forward and of dQ.
    smem_fwd: usize,
    smem_dq: usize,
    /// Whether these are the Hopper kernels (which take [`RowStrides`]).
    hopper: bool,
}

/// The query-major kernels of a call: the row kernels (`sk_*`) for f32 and head_dim 256, the
/// Hopper kernels (`skw_*`: warpgroup MMA, a producer warpgroup gathering K / V) on compute
/// capability 9.0 for f16 / bf16 at head_dim 64 and 128 unless [`KERNEL_ENV`] is `mma`, else the
/// `mma.sync` kernels (`skt_*`), for a call of `dims` with `blocks` query blocks; K′ sizes the
/// Hopper kernels' list buffer.
fn query_major(
    dev: &CudaDevice,
    dtype: DType,
    dims: Dims,
    scfg: &SparseKConfig,
    blocks: usize,
) -> Result<QueryMajor> {
    let (d, cap) = (dims.d, scfg.cap());
    let tn = dtype_suffix(dtype, "sparsek")?;
    if !tensor_cores(dtype, d) {
        return Ok(QueryMajor {
            fwd: format!("sk_fwd_{tn}_d{d}"),
            dq: format!("sk_bwd_dq_{tn}_d{d}"),
            grid: ((dims.b * dims.hq * dims.t).div_ceil(WARPS), 1),
            threads: 32 * WARPS,
            smem_fwd: 0,
            smem_dq: 0,
            hopper: false,
        });
    }
    let env = std::env::var(KERNEL_ENV).ok();
    let hopper = if has_wgmma(dev) {
        let fwd = HopperVariant::pick(&HOPPER_FWD, d, "fwd:", env.as_deref());
        fwd.zip(HopperVariant::pick(&HOPPER_DQ, d, "dq:", env.as_deref()))
    } else {
        None
    };
    let grid = (blocks, dims.b * dims.hq);
    Ok(match hopper {
        Some((f, q)) => QueryMajor {
            fwd: format!("skw_fwd_{tn}_d{d}_{}", f.tag()),
            dq: format!("skw_bwd_dq_{tn}_d{d}_{}", q.tag()),
            grid,
            threads: 256,
            smem_fwd: f.smem(1, cap),
            smem_dq: q.smem(2, cap),
            hopper: true,
        },
        None => QueryMajor {
            fwd: format!("skt_fwd_{tn}_d{d}"),
            dq: format!("skt_bwd_dq_{tn}_d{d}"),
            grid,
            threads: 128,
            smem_fwd: tc_smem(d, 1),
            smem_dq: tc_smem(d, 2),
            hopper: false,
        },
    })
}

/// Dynamic shared memory of a tensor-core kernel with `nq` query-side tiles (`SkSmem` in the .cu
/// file): `nq` tiles of 64 query rows plus double-buffered K and V tiles of 64 keys, rows padded by
/// 8 elements, plus the tiles' scores and positions.
fn tc_smem(d: usize, nq: usize) -> usize {
    (nq * BQ + 4 * BQ) * (d + 8) * 2 + 2 * BQ * 8
}

/// A key-side kernel (dK, dV, dScores for f16 / bf16 at head_dim ≤ 128): name, grid, threads per
/// block and dynamic shared memory.
struct KeySideKernel {
    name: String,
    grid: (usize, usize),
    threads: usize,
    smem: usize,
    /// Whether this is a Hopper kernel (which takes [`RowStrides`]).
    hopper: bool,
}

/// Largest dynamic shared memory of one block on compute capability 9.0.
const MAX_SMEM_SM90: usize = 227 * 1024;

/// Whether the Hopper key-side kernels run: compute capability 9.0, head_dim 64 or 128, and
/// [`KERNEL_ENV`] not `mma`.
fn hopper_key_side(dev: &CudaDevice, d: usize) -> bool {
    has_wgmma(dev)
        && (d == 64 || d == 128)
        && std::env::var(KERNEL_ENV).ok().as_deref() != Some("mma")
}

/// The band dK / dV kernel of a call (one CTA per block of 64 keys and batch × kv head): the
/// Hopper kernel `skw_bwd_dkv_band` (warpgroup MMA; Q and dO tiles double-buffered, 2 KB of
/// statistics per buffer, the list's f32 dK rows staged for the finish) where
/// [`hopper_key_side`], else `skt_bwd_dkv_band`.
fn band_dkv(dev: &CudaDevice, dtype: DType, dims: Dims, blocks: usize) -> Result<KeySideKernel> {
    let (d, tn) = (dims.d, dtype_suffix(dtype, "sparsek")?);
    let grid = (blocks, dims.b * dims.hkv);
    Ok(if hopper_key_side(dev, d) {
        KeySideKernel {
            name: format!("skw_bwd_dkv_band_{tn}_d{d}"),
            grid,
            threads: 128,
            smem: 1024 + 6 * BQ * d * 2 + 2 * 2048 + BQ * d * 4,
            hopper: true,
        }
    } else {
        KeySideKernel {
            name: format!("skt_bwd_dkv_band_{tn}_d{d}"),
            grid,
            threads: 128,
            smem: tc_smem(d, 2),
            hopper: false,
        }
    })
}

/// The list dK / dV kernel of a call: where [`hopper_key_side`], the Hopper kernel
/// `skw_bwd_dkv_list` (one warpgroup per group of 2 query blocks: the union of their lists
/// walked once, half the atomics) when K′ leaves its shared memory within
/// the limit; else `skt_bwd_dkv` (one CTA per query block).
fn list_dkv(
    dev: &CudaDevice,
    dtype: DType,
    dims: Dims,
    cap: usize,
    blocks: usize,
) -> Result<KeySideKernel> {
    let (d, tn) = (dims.d, dtype_suffix(dtype, "sparsek")?);
    let hopper = hopper_key_side(dev, d);
    // Query blocks per CTA, resident CTAs per SM, software-pipelined (`SKW_LIST` in the .cu
    // file). At head_dim 64 three resident CTAs of 2 blocks beat two of 4 blocks, pipelined or
    // not (B4 H48 16k: 4.72 ms against 5.51 and 5.78).
    let (g, ctas, pipe) = if d == 64 { (2, 3, false) } else { (2, 1, true) };
    // Union slots, the union construction's scratch (block 0's list and the slot masks, in the
    // K / V buffers), then the layout of the .cu file: 1 KB alignment slack, G query tiles of Q
    // and dO, 2 K / V buffers, G SkQStats (2 KB), the union (position, score, mask per slot), the
    // tile masks and the steps.
    let slots = cap + (g - 1) * BQ;
    let scratch = (2 * cap + slots) * 4;
    let tiles = slots / BQ + 1;
    let smem = 1024
        + (2 * g * BQ * d + 4 * BQ * d) * 2
        + g * 2048
        + slots * 9
        + tiles.next_multiple_of(2)
        + tiles * g * 2;
    if hopper && scratch <= 4 * BQ * d * 2 && smem <= MAX_SMEM_SM90 {
        return Ok(KeySideKernel {
            name: format!(
                "skw_bwd_dkv_list_{tn}_d{d}_g{g}_m{ctas}{}",
                if pipe { "_p" } else { "" }
            ),
            grid: (blocks.div_ceil(g), dims.b * dims.hq),
            threads: 128,
            smem,
            hopper: true,
        });
    }
    Ok(KeySideKernel {
        name: format!("skt_bwd_dkv_{tn}_d{d}"),
        grid: (blocks, dims.b * dims.hq),
        threads: 128,
        smem: tc_smem(d, 2),
        hopper: false,
    })
}

/// The trailing scalars of every attention kernel (`SK_PARAMS` after the pointers).
struct Scalars([i32; 7], f32);

impl Scalars {
    fn new(dims: Dims, scfg: &SparseKConfig, blocks: usize, scale: f32) -> Self {
        let i = |x: usize| x as i32;
        Scalars(
            [
                i(dims.b),
                i(dims.hq),
                i(dims.hkv),
                i(dims.t),
                i(scfg.window),
                i(scfg.cap()),
                i(blocks),
            ],
            scale,
        )
    }
}

/// Pushes `SK_PARAMS`: scores, selection, then the scalars.
fn push_params<'a>(
    b: &mut candle::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    u: &'a CudaView<'a, f32>,
    sel: &'a Selection,
    sc: &'a Scalars,
) {
    b.arg(u);
    b.arg(sel.list_u.as_ref());
    b.arg(sel.list_j.as_ref());
    b.arg(sel.list_len.as_ref());
    b.arg(sel.nattend.as_ref());
    b.arg(sel.tau.as_ref());
    b.arg(sel.cut_u.as_ref());
    b.arg(sel.cut_j.as_ref());
    for x in &sc.0 {
        b.arg(x);
    }
    b.arg(&sc.1);
}

/// The CUDA device of a tensor, or an error naming it.
fn cuda_device(t: &Tensor, name: &str) -> Result<CudaDevice> {
    match t.device() {
        candle::Device::Cuda(d) => Ok(d.clone()),
        other => bail!("sparsek (cuda): {name} is on {:?}", other.location()),
    }
}

/// The CUDA storage behind a tensor, as a contiguous view.
fn carried<'a, T: CudaDType>(
    g: &'a (candle::StorageRef<'_>, &Layout),
    name: &str,
) -> Result<CudaView<'a, T>> {
    match &*g.0 {
        Storage::Cuda(c) => view::<T>(c, g.1, name),
        _ => bail!("sparsek (cuda): {name} is not on the GPU"),
    }
}

/// Where the rows of a call's element tensors lie (`SkwStrides` in the .cu file): row `t` of
/// `(batch b, head h)` starts `b·s[0] + h·s[1] + t·s[2]` elements after the tensor's start, with
/// `s = q` for q and dq, `kv` for k, v, dk and dv, `o` for the output and its gradient. Only the
/// Hopper kernels take them; every other kernel reads contiguous `(b, h, t, d)` tensors.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RowStrides {
    q: [i64; 3],
    kv: [i64; 3],
    o: [i64; 3],
}

// SAFETY: a plain `#[repr(C)]` struct of integers, the layout of `SkwStrides`.
unsafe impl DeviceRepr for RowStrides {}

/// `SkScorerFold` of the .cu file: the band kernel's view of [`ScorerColumns`] (`lin` = 0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ScorerFold {
    lin: u64,
    rho: u64,
    drho: u64,
    width: i32,
    offset: i32,
}

// SAFETY: a plain `#[repr(C)]` struct of integers, the layout of `SkScorerFold`.
unsafe impl DeviceRepr for ScorerFold {}

impl ScorerFold {
    const NONE: Self = Self {
        lin: 0,
        rho: 0,
        drho: 0,
        width: 0,
        offset: 0,
    };
}

impl RowStrides {
    /// Contiguous `(b, h, t, d)` tensors.
    fn contiguous(dims: Dims) -> Self {
        let (t, d) = (dims.t as i64, dims.d as i64);
        let heads = |h: usize| [h as i64 * t * d, t * d, d];
        Self {
            q: heads(dims.hq),
            kv: heads(dims.hkv),
            o: heads(dims.hq),
        }
    }

    /// q, k, v (and their gradients) as head columns of `(b, t, width)` projection rows, the
    /// output and its gradient as `(b, t, hq·d)` (heads merged).
    fn packed(dims: Dims, width: usize) -> Self {
        let (t, d, w) = (dims.t as i64, dims.d as i64, width as i64);
        let o = (dims.hq * dims.d) as i64;
        Self {
            q: [t * w, d, w],
            kv: [t * w, d, w],
            o: [t * o, d, o],
        }
    }
}

/// The element tensors of one call: device pointers of q, k, v (row 0 of batch 0, head 0) and
/// where their rows lie.
struct Operands {
    q: u64,
    k: u64,
    v: u64,
    strides: RowStrides,
}

/// A device pointer `elems` elements of `T` past `ptr`.
fn offset<T>(ptr: u64, elems: usize) -> u64 {
    ptr + (elems * std::mem::size_of::<T>()) as u64
}

/// Whether a call of `dims` runs the Hopper kernels only (forward, dQ, list and band dK / dV),
/// the kernels that read q, k, v from projection rows in place
/// ([`super::sparsek_attn_qkvpacked_taped`]); the others need contiguous heads.
pub(crate) fn reads_rows_in_place(
    dev: &CudaDevice,
    dtype: DType,
    dims: Dims,
    scfg: &SparseKConfig,
) -> Result<bool> {
    if !tensor_cores(dtype, dims.d) {
        return Ok(false);
    }
    let blocks = dims.t.div_ceil(BQ);
    Ok(query_major(dev, dtype, dims, scfg, blocks)?.hopper
        && band_dkv(dev, dtype, dims, blocks)?.hopper
        && list_dkv(dev, dtype, dims, scfg.cap(), blocks)?.hopper)
}

/// Forward: output `(b, hq, t, d)` in the input dtype and the f32 LSE `(b, hq, t)`; `k`, `v`
/// `(b, hkv, t, d)` contiguous, the dtype of q.
pub(crate) fn forward(
    (sq, lq): (&CudaStorage, &Layout),
    (k, v): (&Tensor, &Tensor),
    (su, lu): (&CudaStorage, &Layout),
    sel: &Selection,
    dims: Dims,
    scfg: &SparseKConfig,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = sq.device().clone();
    let stream = dev.cuda_stream();
    let (kg, vg) = (k.storage_and_layout(), v.storage_and_layout());
    macro_rules! run {
        ($t:ty) => {{
            let (q, k, v) = (
                view::<$t>(sq, lq, "q")?,
                carried::<$t>(&kg, "k")?,
                carried::<$t>(&vg, "v")?,
            );
            let ((q, _gq), (k, _gk), (v, _gv)) = (
                q.device_ptr(&stream),
                k.device_ptr(&stream),
                v.device_ptr(&stream),
            );
            let ops = Operands {
                q,
                k,
                v,
                strides: RowStrides::contiguous(dims),
            };
            fwd_t::<$t>(&dev, &ops, (su, lu), sel, dims, scfg, scale)
        }};
    }
    match sq.dtype() {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => bail!("sparsek (cuda): unsupported dtype {other:?}"),
    }
}

/// Forward on q, k, v packed in projection rows `qkv` `(b, t, width)` (contiguous; columns
/// `[0, hq·d)` q, then k, then v), run in place by the Hopper kernels (the caller checked
/// [`reads_rows_in_place`]): output `(b, t, hq·d)` in the dtype of qkv and the f32 LSE
/// `(b, hq, t)`.
pub(crate) fn forward_packed(
    qkv: &Tensor,
    (su, lu): (&CudaStorage, &Layout),
    sel: &Selection,
    dims: Dims,
    scfg: &SparseKConfig,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = cuda_device(qkv, "qkv")?;
    let stream = dev.cuda_stream();
    let width = qkv.dim(2)?;
    let g = qkv.storage_and_layout();
    let (qd, kd) = (dims.hq * dims.d, dims.hkv * dims.d);
    macro_rules! run {
        ($t:ty) => {{
            let rows = carried::<$t>(&g, "qkv")?;
            let (ptr, _guard) = rows.device_ptr(&stream);
            let ops = Operands {
                q: ptr,
                k: offset::<$t>(ptr, qd),
                v: offset::<$t>(ptr, qd + kd),
                strides: RowStrides::packed(dims, width),
            };
            fwd_t::<$t>(&dev, &ops, (su, lu), sel, dims, scfg, scale)
        }};
    }
    match qkv.dtype() {
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => bail!("sparsek (cuda): packed rows take f16 / bf16, got {other:?}"),
    }
}

/// The forward kernel on `ops`: output (`b·hq·t·d` elements laid out by `ops.strides.o`) and LSE.
fn fwd_t<T: CudaDType + DeviceRepr + candle::WithDType>(
    dev: &CudaDevice,
    ops: &Operands,
    (su, lu): (&CudaStorage, &Layout),
    sel: &Selection,
    dims: Dims,
    scfg: &SparseKConfig,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    check_dims(dims, scfg)?;
    let u = view::<f32>(su, lu, "scores")?;
    let rows = dims.b * dims.hq * dims.t;
    let mut out = unsafe { dev.alloc::<T>(rows * dims.d) }?;
    let mut lse = unsafe { dev.alloc::<f32>(rows) }?;
    let sc = Scalars::new(dims, scfg, sel.blocks, scale);
    let qm = query_major(dev, T::DTYPE, dims, scfg, sel.blocks)?;
    let f = func!(dev, &qm.fwd, qm.smem_fwd);
    let mut b = f.builder();
    b.arg(&ops.q);
    b.arg(&ops.k);
    b.arg(&ops.v);
    b.arg(&mut out);
    b.arg(&mut lse);
    if qm.hopper {
        b.arg(&ops.strides);
    }
    push_params(&mut b, &u, sel, &sc);
    unsafe { b.launch(cfg(qm.grid, qm.threads, qm.smem_fwd)?) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev.clone()),
    ))
}

/// Backward: `(dq, dk, dv, du)`, the first three in the input dtype, du f32. Inputs q, k, v, u
/// (contiguous), the forward's selection, and the output, its gradient and the LSE.
pub(crate) fn backward(
    (q, k, v, u): (&Tensor, &Tensor, &Tensor, &Tensor),
    sel: &Selection,
    dims: Dims,
    scfg: &SparseKConfig,
    scale: f32,
    (out, grad_out, lse): (&Tensor, &Tensor, &Tensor),
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let dtype = q.dtype();
    for (t, name) in [(out, "out"), (grad_out, "grad_out")] {
        if t.dtype() != dtype || t.dims() != q.dims() {
            bail!(
                "sparsek (cuda): {name} must be {dtype:?} {:?}, got {:?} {:?}",
                q.dims(),
                t.dtype(),
                t.dims()
            )
        }
    }
    let dev = cuda_device(q, "q")?;
    let stream = dev.cuda_stream();
    let call = BackwardCall {
        u,
        sel,
        dims,
        scfg,
        scale,
        lse,
    };
    let guards = [q, k, v, out, grad_out].map(|t| t.storage_and_layout());
    let nq = dims.b * dims.hq * dims.t * dims.d;
    let nk = dims.b * dims.hkv * dims.t * dims.d;
    macro_rules! run {
        ($t:ty) => {{
            let views = [
                carried::<$t>(&guards[0], "q")?,
                carried::<$t>(&guards[1], "k")?,
                carried::<$t>(&guards[2], "v")?,
                carried::<$t>(&guards[3], "out")?,
                carried::<$t>(&guards[4], "grad_out")?,
            ];
            let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
            let ops = Operands {
                q: ptrs[0].0,
                k: ptrs[1].0,
                v: ptrs[2].0,
                strides: RowStrides::contiguous(dims),
            };
            // dq, dk, dv in one allocation, every element written by the kernels.
            let mut grads = unsafe { dev.alloc::<$t>(nq + 2 * nk) }?;
            let (g, _gg) = grads.device_ptr_mut(&stream);
            let outs = [g, offset::<$t>(g, nq), offset::<$t>(g, nq + nk)];
            let du = bwd_t::<$t>(
                &dev,
                &ops,
                (ptrs[3].0, ptrs[4].0),
                outs,
                &call,
                ScorerFold::NONE,
            )?;
            drop((_gg, ptrs));
            let all = wrap_slice(grads, &dev, nq + 2 * nk);
            let k_shape = (dims.b, dims.hkv, dims.t, dims.d);
            Ok((
                all.narrow(0, 0, nq)?
                    .reshape((dims.b, dims.hq, dims.t, dims.d))?,
                all.narrow(0, nq, nk)?.reshape(k_shape)?,
                all.narrow(0, nq + nk, nk)?.reshape(k_shape)?,
                du,
            ))
        }};
    }
    match dtype {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => bail!("sparsek (cuda): unsupported dtype {other:?}"),
    }
}

/// Backward of [`forward_packed`]: `dqkv` `(b, t, width)` in the dtype of qkv (q, k, v's columns
/// written by the kernels in place, the columns past them zero) and du f32 `(b, hkv, t)`, for the
/// output `out` and its gradient `grad_out` (`(b, t, hq·d)`, contiguous) and the LSE.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_packed(
    qkv: &Tensor,
    u: &Tensor,
    sel: &Selection,
    dims: Dims,
    scfg: &SparseKConfig,
    scale: f32,
    (out, grad_out, lse): (&Tensor, &Tensor, &Tensor),
    scorer: Option<&ScorerColumns>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dev = cuda_device(qkv, "qkv")?;
    let stream = dev.cuda_stream();
    let (b, t, width) = qkv.dims3()?;
    let (qd, kd) = (dims.hq * dims.d, dims.hkv * dims.d);
    // The scorer's gradient is written by the Hopper band kernel, when that one runs.
    let scorer = match scorer {
        Some(s)
            if tensor_cores(qkv.dtype(), dims.d)
                && band_dkv(&dev, qkv.dtype(), dims, sel.blocks)?.hopper =>
        {
            if s.col + dims.hkv > width || s.col < qd + 2 * kd {
                bail!(
                    "sparsek (cuda): scorer columns from {} ({} heads) must lie after q, k, v's {} \
                     columns of the {width}-wide rows",
                    s.col,
                    dims.hkv,
                    qd + 2 * kd
                )
            }
            Some(s)
        }
        _ => None,
    };
    let rho = scorer.map(|s| s.rho.storage_and_layout());
    let rho = rho.as_ref().map(|g| carried::<f32>(g, "rho")).transpose()?;
    let mut drho = scorer
        .map(|_| dev.alloc_zeros::<f32>(dims.hkv))
        .transpose()?;
    let call = BackwardCall {
        u,
        sel,
        dims,
        scfg,
        scale,
        lse,
    };
    let guards = [qkv, out, grad_out].map(|t| t.storage_and_layout());
    macro_rules! run {
        ($t:ty) => {{
            let views = [
                carried::<$t>(&guards[0], "qkv")?,
                carried::<$t>(&guards[1], "out")?,
                carried::<$t>(&guards[2], "grad_out")?,
            ];
            let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
            let p = ptrs[0].0;
            let ops = Operands {
                q: p,
                k: offset::<$t>(p, qd),
                v: offset::<$t>(p, qd + kd),
                strides: RowStrides::packed(dims, width),
            };
            // The kernels write q, k, v's columns (and the folded scorer's columns to the rows'
            // end); the columns past them are zeroed here.
            let used = match scorer {
                Some(_) => width,
                None => qd + 2 * kd,
            };
            let mut grads = unsafe { dev.alloc::<$t>(b * t * width) }?;
            let (g, _gg) = grads.device_ptr_mut(&stream);
            if used < width {
                let size = std::mem::size_of::<$t>();
                // SAFETY: b·t rows of `width` elements at g; the region written is each row's
                // last width - used elements, on the stream the kernels run on.
                unsafe {
                    sys::cuMemsetD2D8Async(
                        offset::<$t>(g, used),
                        width * size,
                        0,
                        (width - used) * size,
                        b * t,
                        stream.cu_stream(),
                    )
                }
                .result()
                .w()?;
            }
            let outs = [g, offset::<$t>(g, qd), offset::<$t>(g, qd + kd)];
            let fold = match (scorer, &rho, &mut drho) {
                (Some(s), Some(rho), Some(drho)) => ScorerFold {
                    lin: offset::<$t>(g, s.col),
                    rho: rho.device_ptr(&stream).0,
                    drho: drho.device_ptr_mut(&stream).0,
                    width: (width - s.col) as i32,
                    offset: s.offset as i32,
                },
                _ => ScorerFold::NONE,
            };
            let du = bwd_t::<$t>(&dev, &ops, (ptrs[1].0, ptrs[2].0), outs, &call, fold)?;
            drop((_gg, ptrs));
            let drho = drho.map(|d| wrap_slice(d, &dev, dims.hkv));
            Ok((wrap_slice(grads, &dev, (b, t, width)), du, drho))
        }};
    }
    match qkv.dtype() {
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => bail!("sparsek (cuda): packed rows take f16 / bf16, got {other:?}"),
    }
}

/// What the backward kernels of a call read besides its element tensors: the scores, the
/// forward's selection and f32 LSE, the sizes, the config and the softmax scale.
struct BackwardCall<'a> {
    u: &'a Tensor,
    sel: &'a Selection,
    dims: Dims,
    scfg: &'a SparseKConfig,
    scale: f32,
    lse: &'a Tensor,
}

/// The backward kernels on `ops` (the output and its gradient at `(o, go)`, laid out like the
/// output), writing dq, dk, dv at `outs` (laid out like q, k, v); returns du `(b, hkv, t)` f32.
fn bwd_t<T: CudaDType + DeviceRepr + candle::WithDType>(
    dev: &CudaDevice,
    ops: &Operands,
    (o, go): (u64, u64),
    [dq, dk, dv]: [u64; 3],
    call: &BackwardCall,
    fold: ScorerFold,
) -> Result<Tensor> {
    let BackwardCall {
        u,
        sel,
        dims,
        scfg,
        scale,
        lse,
    } = *call;
    check_dims(dims, scfg)?;
    let dtype = T::DTYPE;
    let (ug, lg) = (u.storage_and_layout(), lse.storage_and_layout());
    let (u, lse) = (carried::<f32>(&ug, "scores")?, carried::<f32>(&lg, "lse")?);
    let rows_q = dims.b * dims.hq * dims.t;
    let rows_k = dims.b * dims.hkv * dims.t;
    let tc = tensor_cores(dtype, dims.d);
    let qm = query_major(dev, dtype, dims, scfg, sel.blocks)?;
    let nk = rows_k * dims.d;
    // The tensor-core path's f32 accumulator [dK | dV] is zeroed by its dQ kernel, and du is added
    // to by its list kernel.
    let (mut dacc, mut du) = if tc {
        let dacc = unsafe { dev.alloc::<f32>(2 * nk) }?;
        (Some(dacc), dev.alloc_zeros::<f32>(rows_k)?)
    } else {
        (None, unsafe { dev.alloc::<f32>(rows_k) }?)
    };
    let mut delta = unsafe { dev.alloc::<f32>(rows_q) }?;
    let mut rmean = unsafe { dev.alloc::<f32>(rows_q) }?;
    let sc = Scalars::new(dims, scfg, sel.blocks, scale);
    let tn = dtype_suffix(dtype, "sparsek")?;
    let nacc = 2 * nk as i64;
    {
        let f = func!(dev, &qm.dq, qm.smem_dq);
        let mut b = f.builder();
        b.arg(&ops.q);
        b.arg(&ops.k);
        b.arg(&ops.v);
        b.arg(&o);
        b.arg(&go);
        b.arg(&lse);
        b.arg(&dq);
        b.arg(&mut delta);
        b.arg(&mut rmean);
        if let Some(dacc) = dacc.as_mut() {
            b.arg(dacc);
            b.arg(&nacc);
        }
        if qm.hopper {
            b.arg(&ops.strides);
        }
        push_params(&mut b, &u, sel, &sc);
        unsafe { b.launch(cfg(qm.grid, qm.threads, qm.smem_dq)?) }.w()?;
    }
    if let Some(dacc) = dacc.as_mut() {
        // The list kernel adds its keys' parts to the accumulator and du, then the band kernel adds
        // its own and writes dK and dV (the Hopper one also the folded scorer's gradient).
        let list = list_dkv(dev, dtype, dims, scfg.cap(), sel.blocks)?;
        let band = band_dkv(dev, dtype, dims, sel.blocks)?;
        for (kernel, is_band) in [(list, false), (band, true)] {
            let f = func!(dev, &kernel.name, kernel.smem);
            let mut b = f.builder();
            b.arg(&ops.q);
            b.arg(&ops.k);
            b.arg(&ops.v);
            b.arg(&go);
            b.arg(&lse);
            b.arg(&delta);
            b.arg(&rmean);
            b.arg(&mut *dacc);
            b.arg(&mut du);
            b.arg(&dk);
            b.arg(&dv);
            if kernel.hopper {
                b.arg(&ops.strides);
            }
            push_params(&mut b, &u, sel, &sc);
            if is_band && kernel.hopper {
                b.arg(&fold);
            }
            unsafe { b.launch(cfg(kernel.grid, kernel.threads, kernel.smem)?) }.w()?;
        }
    } else {
        let f = func!(dev, &format!("sk_bwd_dkv_{tn}_d{}", dims.d), 0);
        let mut b = f.builder();
        b.arg(&ops.q);
        b.arg(&ops.k);
        b.arg(&ops.v);
        b.arg(&go);
        b.arg(&lse);
        b.arg(&delta);
        b.arg(&rmean);
        b.arg(&dk);
        b.arg(&dv);
        b.arg(&mut du);
        push_params(&mut b, &u, sel, &sc);
        unsafe { b.launch(cfg((rows_k.div_ceil(WARPS), 1), 32 * WARPS, 0)?) }.w()?;
    }
    Ok(wrap_slice(du, dev, (dims.b, dims.hkv, dims.t)))
}

/// Rows of x per CTA of the scorer kernels (`SK_SCORE_ROWS` in the .cu file).
const SCORE_ROWS: usize = 64;
/// Bytes of `w` that `sk_score_fwd` and `sk_score_bwd_dx` keep in shared memory (`SK_SCORE_W_SMEM`);
/// a larger `w` is read through the L1 cache.
const SCORE_W_SMEM: usize = 32 * 1024;

/// Shared memory the scorer kernels take for `w`: all of it when it fits in [`SCORE_W_SMEM`].
fn score_w_smem(d: ScoreDims) -> usize {
    let bytes = d.h * d.c * 4;
    if bytes <= SCORE_W_SMEM {
        bytes
    } else {
        0
    }
}

/// Key scorer forward (`sk_score_fwd`, one CTA per [`SCORE_ROWS`] rows of `x`, a warp per row):
/// `x` `(b·t, c)` f32 / f16 / bf16, `w` `(h, c)` and `δ` `(h)` f32 → `u` `(b, h, t)` f32.
pub(crate) fn score_forward(
    (sx, lx): (&CudaStorage, &Layout),
    (sw, lw): (&CudaStorage, &Layout),
    (sd, ld): (&CudaStorage, &Layout),
    d: ScoreDims,
) -> Result<CudaStorage> {
    let (w, delta) = (view::<f32>(sw, lw, "w")?, view::<f32>(sd, ld, "delta")?);
    let x = (sx.device(), sx.dtype());
    match sx.dtype() {
        DType::F32 => score_fwd_t(x, view::<f32>(sx, lx, "x")?, w, delta, d),
        DType::F16 => score_fwd_t(x, view::<f16>(sx, lx, "x")?, w, delta, d),
        DType::BF16 => score_fwd_t(x, view::<bf16>(sx, lx, "x")?, w, delta, d),
        other => bail!("sparsek scorer (cuda): unsupported dtype {other:?}"),
    }
}

fn score_fwd_t<T: CudaDType>(
    (dev, dtype): (&CudaDevice, DType),
    x: CudaView<'_, T>,
    w: CudaView<'_, f32>,
    delta: CudaView<'_, f32>,
    d: ScoreDims,
) -> Result<CudaStorage> {
    let tn = dtype_suffix(dtype, "sparsek scorer")?;
    let mut u = unsafe { dev.alloc::<f32>(d.b * d.h * d.t) }?;
    let smem = score_w_smem(d);
    let f = func!(dev, &format!("sk_score_fwd_{tn}"), smem);
    let mut b = f.builder();
    b.arg(&x);
    b.arg(&w);
    b.arg(&delta);
    b.arg(&mut u);
    candle::builder_arg!(
        b,
        d.b as i32,
        d.t as i32,
        d.c as i32,
        d.h as i32,
        d.offset as i32
    );
    let rows = d.b * d.t;
    unsafe { b.launch(cfg((rows.div_ceil(SCORE_ROWS), 1), 32 * WARPS, smem)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(u, dev.clone()))
}

/// Key scorer backward for `du` `(b, h, t)` f32: `dx` `(b, t, c)` in the dtype of `x` (plus
/// `dx_add`, same shape and dtype, when given) and `dw` `(h, c)`, `dδ` `(h)` f32, each kernel
/// (`sk_score_bwd_dx`, `sk_score_bwd_dw`) one CTA per [`SCORE_ROWS`] rows of `x`.
pub(crate) fn score_backward(
    x: &Tensor,
    w: &Tensor,
    du: &Tensor,
    dx_add: Option<&Tensor>,
    d: ScoreDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let inputs = (x, w, du);
    match x.dtype() {
        DType::F32 => score_bwd_t::<f32>(inputs, dx_add, d),
        DType::F16 => score_bwd_t::<f16>(inputs, dx_add, d),
        DType::BF16 => score_bwd_t::<bf16>(inputs, dx_add, d),
        other => bail!("sparsek scorer (cuda): unsupported dtype {other:?}"),
    }
}

fn score_bwd_t<T: CudaDType + candle::cuda_backend::cudarc::driver::DeviceRepr>(
    (x, w, du): (&Tensor, &Tensor, &Tensor),
    dx_add: Option<&Tensor>,
    d: ScoreDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(x, "x")?;
    let tn = dtype_suffix(x.dtype(), "sparsek scorer")?;
    let guards = [x, w, du].map(|t| t.storage_and_layout());
    let add_guard = dx_add.map(|t| t.storage_and_layout());
    let x = carried::<T>(&guards[0], "x")?;
    let (w, du) = (
        carried::<f32>(&guards[1], "w")?,
        carried::<f32>(&guards[2], "du")?,
    );
    let add = add_guard
        .as_ref()
        .map(|g| carried::<T>(g, "dx_add"))
        .transpose()?;
    let (rows, n) = (d.b * d.t, d.b * d.t * d.c);
    let dims = [d.b, d.t, d.c, d.h].map(|x| x as i32);
    let mut dx = unsafe { dev.alloc::<T>(n) }?;
    {
        let smem = SCORE_ROWS * d.h * 4 + score_w_smem(d);
        let f = func!(dev, &format!("sk_score_bwd_dx_{tn}"), smem);
        let mut b = f.builder();
        let null = 0u64;
        b.arg(&w);
        b.arg(&du);
        match &add {
            Some(a) => b.arg(a),
            None => b.arg(&null),
        };
        b.arg(&mut dx);
        for x in &dims {
            b.arg(x);
        }
        unsafe { b.launch(cfg((rows.div_ceil(SCORE_ROWS), 1), 256, smem)?) }.w()?;
    }
    let mut dw = dev.alloc_zeros::<f32>(d.h * d.c)?;
    let mut dpos = dev.alloc_zeros::<f32>(d.h)?;
    {
        let smem = SCORE_ROWS * d.h * 4;
        let f = func!(dev, &format!("sk_score_bwd_dw_{tn}"), smem);
        let mut b = f.builder();
        b.arg(&x);
        b.arg(&du);
        b.arg(&mut dw);
        b.arg(&mut dpos);
        for x in &dims {
            b.arg(x);
        }
        let offset = d.offset as i32;
        b.arg(&offset);
        unsafe { b.launch(cfg((rows.div_ceil(SCORE_ROWS), 1), 128, smem)?) }.w()?;
    }
    Ok((
        wrap_slice(dx, &dev, (d.b, d.t, d.c)),
        wrap_slice(dw, &dev, (d.h, d.c)),
        wrap_slice(dpos, &dev, d.h),
    ))
}

/// Scores from their linear part (`sk_score_cols`): `lin` `b·t` rows `row` elements apart (f32 /
/// f16 / bf16, each row's first `h` columns used, read from the layout's start offset) and the
/// raw slopes `ρ` `(h)` f32 (`δ = softplus(ρ)` in the kernel) → `u` `(b, h, t)` f32.
pub(crate) fn score_cols_forward(
    lin: &Tensor,
    rho: &Tensor,
    row: usize,
    d: ScoreDims,
) -> Result<Tensor> {
    match lin.dtype() {
        DType::F32 => score_cols_fwd_t::<f32>((lin, rho), "f32", row, d),
        DType::F16 => score_cols_fwd_t::<f16>((lin, rho), "f16", row, d),
        DType::BF16 => score_cols_fwd_t::<bf16>((lin, rho), "bf16", row, d),
        other => bail!("sparsek scorer (cuda): unsupported dtype {other:?}"),
    }
}

fn score_cols_fwd_t<T: CudaDType>(
    (lin, rho): (&Tensor, &Tensor),
    tn: &str,
    row: usize,
    d: ScoreDims,
) -> Result<Tensor> {
    let dev = cuda_device(lin, "lin")?;
    let (gl, gr) = (lin.storage_and_layout(), rho.storage_and_layout());
    let rho = carried::<f32>(&gr, "rho")?;
    let Storage::Cuda(sl) = &*gl.0 else {
        bail!("sparsek scorer (cuda): lin is not on the GPU")
    };
    let lin = sl.as_cuda_slice::<T>()?.slice(gl.1.start_offset()..);
    let n = d.b * d.h * d.t;
    let mut u = unsafe { dev.alloc::<f32>(n) }?;
    let f = func!(dev, &format!("sk_score_cols_{tn}"), 0);
    let mut b = f.builder();
    b.arg(&lin);
    b.arg(&rho);
    b.arg(&mut u);
    candle::builder_arg!(
        b,
        d.b as i32,
        d.t as i32,
        d.h as i32,
        row as i32,
        d.offset as i32
    );
    unsafe { b.launch(cfg((n.div_ceil(256), 1), 256, 0)?) }.w()?;
    Ok(wrap_slice(u, &dev, (d.b, d.h, d.t)))
}

/// Gradients of [`score_cols_forward`] for `du` `(b, h, t)` f32 (`sk_score_cols_bwd`, one CTA per
/// [`SCORE_ROWS`] rows): the linear part's `(b, t, width)` in `dtype` (`du` transposed, zeros
/// after column `h`) and the raw slopes' `(h)` f32.
pub(crate) fn score_cols_backward(
    du: &Tensor,
    rho: &Tensor,
    dtype: DType,
    width: usize,
    d: ScoreDims,
) -> Result<(Tensor, Tensor)> {
    match dtype {
        DType::F32 => score_cols_bwd_t::<f32>((du, rho), "f32", width, d),
        DType::F16 => score_cols_bwd_t::<f16>((du, rho), "f16", width, d),
        DType::BF16 => score_cols_bwd_t::<bf16>((du, rho), "bf16", width, d),
        other => bail!("sparsek scorer (cuda): unsupported dtype {other:?}"),
    }
}

fn score_cols_bwd_t<T: CudaDType + DeviceRepr>(
    (du, rho): (&Tensor, &Tensor),
    tn: &str,
    width: usize,
    d: ScoreDims,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(du, "du")?;
    let guards = [du, rho].map(|t| t.storage_and_layout());
    let (du, rho) = (
        carried::<f32>(&guards[0], "du")?,
        carried::<f32>(&guards[1], "rho")?,
    );
    let mut dlin = unsafe { dev.alloc::<T>(d.b * d.t * width) }?;
    let drho = score_cols_bwd_launch(&dev, tn, (&du, &rho), dlin.slice_mut(..), (width, width), d)?;
    Ok((
        wrap_slice(dlin, &dev, (d.b, d.t, width)),
        wrap_slice(drho, &dev, d.h),
    ))
}

/// `sk_score_cols_bwd`: `du` transposed into `width` columns of `dlin`'s rows, `ld` elements
/// apart (zeros after column `h`); returns the raw slopes' gradient `(h)` f32.
fn score_cols_bwd_launch<T: DeviceRepr>(
    dev: &CudaDevice,
    tn: &str,
    (du, rho): (&CudaView<f32>, &CudaView<f32>),
    mut dlin: CudaViewMut<T>,
    (width, ld): (usize, usize),
    d: ScoreDims,
) -> Result<CudaSlice<f32>> {
    let rows = d.b * d.t;
    if dlin.len() < (rows.max(1) - 1) * ld + width {
        bail!("sparsek scorer (cuda): {} elements cannot hold {rows} rows of {width} columns {ld} apart", dlin.len())
    }
    let mut drho = dev.alloc_zeros::<f32>(d.h)?;
    let f = func!(dev, &format!("sk_score_cols_bwd_{tn}"), 0);
    let mut b = f.builder();
    b.arg(du);
    b.arg(rho);
    b.arg(&mut dlin);
    b.arg(&mut drho);
    candle::builder_arg!(
        b,
        d.b as i32,
        d.t as i32,
        d.h as i32,
        width as i32,
        ld as i32,
        d.offset as i32
    );
    unsafe { b.launch(cfg((rows.div_ceil(SCORE_ROWS), 1), 256, 0)?) }.w()?;
    Ok(drho)
}

/// [`score_cols_backward`] writing the linear part's gradient in place, into columns
/// `[col, col + h)` of a contiguous `(b, t, width)` tensor (a folded projection's output
/// gradient): candle's in-place op over that tensor, the raw slopes' gradient kept for the caller.
pub(crate) struct ScoreColsInto {
    pub(crate) rho: Tensor,
    pub(crate) col: usize,
    pub(crate) d: ScoreDims,
    pub(crate) drho: std::sync::Mutex<Option<Tensor>>,
}

impl candle::InplaceOp2 for ScoreColsInto {
    fn name(&self) -> &'static str {
        "sparsek-score-cols-bwd-into"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle::CpuStorage,
        _: &Layout,
        _: &candle::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("sparsek scorer: the in-place score gradient is CUDA only")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        ld: &Layout,
        du: &CudaStorage,
        lu: &Layout,
    ) -> Result<()> {
        let (d, col) = (self.d, self.col);
        let width = *ld.dims().last().unwrap_or(&0);
        if !ld.is_contiguous() || ld.dims() != [d.b, d.t, width] || col + d.h > width {
            bail!(
                "sparsek scorer: the gradient's destination {:?} must be a contiguous (b, t, width) \
                 = ({}, {}, >= {}) tensor",
                ld.dims(),
                d.b,
                d.t,
                col + d.h
            )
        }
        let dev = dst.device().clone();
        let du = view::<f32>(du, lu, "du")?;
        let rho_g = self.rho.storage_and_layout();
        let rho = carried::<f32>(&rho_g, "rho")?;
        let off = ld.start_offset() + col;
        macro_rules! launch {
            ($t:ty, $tn:literal) => {{
                let s = dst.as_cuda_slice_mut::<$t>()?;
                let into = s.slice_mut(off..);
                score_cols_bwd_launch(&dev, $tn, (&du, &rho), into, (d.h, width), d)?
            }};
        }
        let drho = match dst.dtype() {
            DType::F32 => launch!(f32, "f32"),
            DType::F16 => launch!(f16, "f16"),
            DType::BF16 => launch!(bf16, "bf16"),
            other => bail!("sparsek scorer (cuda): unsupported dtype {other:?}"),
        };
        *self
            .drho
            .lock()
            .map_err(|_| candle::Error::Msg("sparsek scorer: poisoned".into()))? =
            Some(wrap_slice(drho, &dev, d.h));
        Ok(())
    }
}
