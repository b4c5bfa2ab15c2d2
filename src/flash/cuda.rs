//! CUDA launch side of [`super::FlashAttn`] and [`super::FlashAttnBwd`] (kernels in
//! `cuda/flash_attn.cu`). Everything runs on candle's stream, with no host round trip.
//!
//! - f16 / bf16: tensor-core kernels (`mma.sync` m16n8k16, f32 accumulation; any sm_80+ GPU), one
//!   kernel per visibility mode. Forward tiles are 128 queries × 64 keys, 4 warps of 32 query rows (64 × 64,
//!   4 warps of 16 rows at head dim 256). The backward is one fused kernel per key tile of 128 keys
//!   owning dK, dV, looping over query tiles; dQ is accumulated with f32 atomics (not bitwise
//!   deterministic) and converted by a small kernel. Head dims 32 and 64: 1-D warp tiles over the
//!   keys (4 warps of 32 keys with K/V fragments in registers and query steps of 32 rows at 64;
//!   8 warps of 16 keys, steps of 64 at 32). Head dims 96 and 128: FlashAttention-2's 2-D warp
//!   tiles (8 warps; S and dP per warp 32 keys × 32 queries of a 64-row step, P and dS through
//!   shared memory, dK/dV per warp 32 keys × D/2 columns).
//! - Hopper forward (compute capability 9.0, PTX built for sm_90a, f16 / bf16, head dims 64 and
//!   128): `wgmma` kernels (`fwd_wgmma`), warp-specialised like FlashAttention-3: per CTA one
//!   producer warpgroup streams K / V tiles with cp.async into a ring of 128-byte-swizzled shared
//!   stages (mbarriers), 2–3 consumer warpgroups of 64 query rows (registers reallocated with
//!   `setmaxnreg`) run S = Q Kᵀ and O += P V through wgmma descriptors with P from registers, in a
//!   software pipeline (the next key tile's S = Q Kᵀ and softmax overlap this tile's O += P V).
//!   Every visibility mode; [`HOPPER_FWD_VARIANTS`] lists the tile variants per head dim,
//!   [`FWD_KERNEL_ENV`] picks one (or the `mma.sync` kernel) for benchmarks and tests.
//! - Hopper backward (same conditions): `wgmma` kernels (`bwd_wgmma` in cuda/flash_bwd_wgmma.cuh),
//!   FlashAttention-3's layout without warp specialisation: a CTA of 2 warpgroups owns dK, dV of
//!   128 keys and loops over query tiles (128 rows at head dim 64, 64 at 128); S^T = K Q^T and
//!   dP^T = V dO^T from swizzled shared memory, P^T and dS^T as the register A operand of
//!   dV += P^T dO and dK += dS^T Q, dS^T through shared memory for dQ = dS K, dQ by f32 atomics
//!   as in the `mma.sync` backward. [`HOPPER_BWD_VARIANTS`] lists the variants, [`BWD_KERNEL_ENV`]
//!   picks one (or the `mma.sync` kernel). Bucketed sparse visibility runs the Hopper kernels too
//!   (faster on a training model's uneven buckets).
//! - Performance (H100, bf16, causal, 8k–32k, see BENCHMARKS.md): forward with the Hopper kernel
//!   1.35–1.47× PyTorch SDPA-flash and 0.97–1.00× cuDNN at D = 64, 1.22–1.41× SDPA-flash and
//!   0.67–0.79× cuDNN at D = 128 (the `mma.sync` forward: 0.83–0.97× and 0.79–0.95× SDPA-flash);
//!   forward+backward with the Hopper backward (measured beside the previous Hopper forward)
//!   0.85–0.90× at D = 64 and 0.92–0.98× at D = 128 (0.80–0.86× with the `mma.sync` backward).
//! - f32 (exact f32 arithmetic is required), head dim 256 in the backward and inputs not aligned
//!   to 16 bytes: simple CUDA-core kernels, one warp per row.
//! - Sink-band visibility (MoA): per query tile the sink tiles then the band tiles (per key tile in
//!   the backward: the query tiles of its band, or all later ones for a sink tile); the others are
//!   never loaded.
//! - Sparse visibility: per-tile min/max of positions and buckets are reduced on the device first;
//!   the kernels skip every key (query) tile that cannot hold a visible pair and apply no element
//!   mask to tile pairs that are fully visible (one bucket, no padding, all keys before all queries).
//!   The backward reads the query tiles' metadata 32 at a time into warp ballots (visible, fully
//!   visible), and its CTAs whose key tile no query sees write zero dK, dV and exit.

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use super::{Dims, FlashAttnBwd};
use crate::cuda_launch::{contiguous_view, has_wgmma, launch_config, load_kernel};
use crate::kernels;
use crate::mask::Visibility;

/// Module name of `cuda/flash_attn.cu`'s PTX in candle's custom-module cache.
const MODULE: &str = "candle_sparse_attn::flash_attn";
/// Keys per tile of the tensor-core forward.
const BT: usize = 64;
/// Warps per block of the simple kernels (one warp per row).
const SIMPLE_WARPS: usize = 8;

/// Kernel-name suffix of a dtype.
fn tname(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("flash attention (cuda): unsupported dtype {other:?}"),
    })
}

/// Forward tiles of the tensor-core kernels (`FWD_ALL` in flash_attn.cu): (query rows per CTA,
/// threads per CTA); 4 warps of 32 query rows each, of 16 at head dim 256.
fn fwd_tiles(d: usize) -> (usize, usize) {
    if d == 256 {
        (64, 128)
    } else {
        (128, 128)
    }
}

/// A Hopper forward kernel variant (`FWD_WG_ALL` in flash_attn.cu).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct HopperFwd {
    /// Head dim.
    pub d: usize,
    /// Consumer warpgroups of 64 query rows per CTA (plus one producer warpgroup).
    pub warpgroups: usize,
    /// Keys per tile.
    pub keys: usize,
    /// K / V pipeline stages in shared memory.
    pub stages: usize,
}

impl HopperFwd {
    const fn new(d: usize, warpgroups: usize, keys: usize, stages: usize) -> Self {
        HopperFwd {
            d,
            warpgroups,
            keys,
            stages,
        }
    }

    /// The variant's name in kernel names and in [`FWD_KERNEL_ENV`], e.g. `w3_n64_s2`.
    pub fn tag(&self) -> String {
        format!("w{}_n{}_s{}", self.warpgroups, self.keys, self.stages)
    }

    /// Query rows per CTA.
    fn rows(&self) -> usize {
        64 * self.warpgroups
    }

    /// Threads per CTA: the consumer warpgroups and the producer.
    fn threads(&self) -> usize {
        128 * (self.warpgroups + 1)
    }

    /// Dynamic shared memory for elements of `es` bytes: the Q tile and the K, V stages, 1 KB to
    /// align them to the 1024-byte swizzle atoms, four mbarriers per stage and, per stage, the
    /// keys' positions and buckets (i32, sparse mode).
    fn smem(&self, es: usize) -> usize {
        (self.rows() + 2 * self.stages * self.keys) * self.d * es
            + 1024
            + 32 * self.stages
            + 8 * self.stages * self.keys
    }
}

/// Hopper forward variants compiled in `FWD_WG_ALL` (flash_attn.cu); the first one of a head dim
/// is its default, [`FWD_KERNEL_ENV`] picks another.
///
/// Every compiled kernel costs JIT time on a process's first launch with an empty driver cache
/// (several seconds per variant, dtype and visibility mode), so only the winners of the sweep in
/// BENCHMARKS.md stay, plus the runner-up at D = 128 (faster than the default on dense causal at
/// 8k, equal at 16k–32k, slower on MoA's sink + band).
pub(crate) const HOPPER_FWD_VARIANTS: [HopperFwd; 3] = [
    HopperFwd::new(64, 3, 128, 2),
    HopperFwd::new(128, 3, 64, 2),
    HopperFwd::new(128, 2, 128, 2),
];

/// Environment variable choosing the forward kernel of f16 / bf16 at head dims 64 and 128 on the
/// H100 (for benchmarks and tests): unset picks the head dim's default Hopper variant, a
/// [`HopperFwd::tag`] of the head dim (e.g. `w2_n128_s2`) that variant, any other value (e.g.
/// `mma`) the `mma.sync` kernel.
pub(crate) const FWD_KERNEL_ENV: &str = "CANDLE_SPARSE_ATTN_FWD";

/// The Hopper forward variant for head dim `d`, or `None` where none applies (other head dims, or
/// [`FWD_KERNEL_ENV`] asks for another kernel). Bucketed (LSH) visibility runs it too: on random
/// inputs both kernels measure the same (hash 16 at B4 H6 8k: 0.47 vs 0.45–0.47 ms, BENCHMARKS.md),
/// on a training model's uneven buckets the Hopper kernel is faster (char-LM step at 16k × 2:
/// forward 7.6–7.8 vs 8.5–8.7 ms; equal at 8k × 4; EXPERIMENTS.md).
fn hopper_fwd(d: usize) -> Option<HopperFwd> {
    let mut of_d = HOPPER_FWD_VARIANTS.into_iter().filter(|v| v.d == d);
    match std::env::var(FWD_KERNEL_ENV) {
        Ok(tag) => of_d.find(|v| v.tag() == tag),
        Err(_) => of_d.next(),
    }
}

/// Backward kernel and tiles of the tensor-core path (`BWD_ALL` / `BWD2_ALL` in flash_attn.cu):
/// (kernel name prefix, keys per CTA, query rows per step, threads per CTA). Head dims up to 64 run
/// `flash_bwd` (1-D warp tiles over keys, K/V fragments in registers); 96 and 128 run `flash_bwd2`
/// (2-D warp tiles, P and dS through shared memory), 11–16% faster there and 15% slower at 64.
fn bwd_tiles(d: usize) -> (&'static str, usize, usize, usize) {
    match d {
        32 => ("flash_bwd", 128, 64, 256),
        64 => ("flash_bwd", 128, 32, 128),
        _ => ("flash_bwd2", 128, 64, 256),
    }
}

/// A Hopper backward kernel variant (`BWD_WG_ALL` in flash_attn.cu).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct HopperBwd {
    /// Head dim.
    pub d: usize,
    /// Warpgroups of 64 keys per CTA.
    pub warpgroups: usize,
    /// Query rows per step.
    pub rows: usize,
    /// A step's dQ product is issued at the start of the next step and its atomics overlap that
    /// step's S^T and dP^T (dS^T double-buffered).
    pub pipelined: bool,
}

impl HopperBwd {
    const fn new(d: usize, warpgroups: usize, rows: usize, pipelined: bool) -> Self {
        HopperBwd {
            d,
            warpgroups,
            rows,
            pipelined,
        }
    }

    /// The variant's name in kernel names and in [`BWD_KERNEL_ENV`], e.g. `w2_q128_p1`.
    pub fn tag(&self) -> String {
        format!(
            "w{}_q{}_p{}",
            self.warpgroups, self.rows, self.pipelined as u8
        )
    }

    /// Keys per CTA.
    fn keys(&self) -> usize {
        64 * self.warpgroups
    }

    /// Shared memory in bytes for elements of `es` bytes: K, V, double-buffered Q, dO, lse,
    /// delta and query positions and buckets (i32, sparse mode), one or two dS^T tiles, plus 1 KB
    /// to align the tiles to the 1024-byte swizzle atoms.
    fn smem(&self, es: usize) -> usize {
        let (bk, bq) = (self.keys(), self.rows);
        let ds_tiles = 1 + self.pipelined as usize;
        (2 * bk * self.d + 4 * bq * self.d + ds_tiles * bk * bq) * es + 8 * bq * 4 + 1024
    }
}

/// Hopper backward variants compiled in `BWD_WG_ALL` (flash_attn.cu); the first one of a head dim
/// is its default.
pub(crate) const HOPPER_BWD_VARIANTS: [HopperBwd; 4] = [
    HopperBwd::new(64, 2, 128, true),
    HopperBwd::new(128, 2, 64, true),
    HopperBwd::new(64, 2, 128, false),
    HopperBwd::new(128, 2, 64, false),
];

/// Environment variable choosing the backward kernel of f16 / bf16 at head dims 64 and 128 on the
/// H100 (for benchmarks and tests): unset picks the head dim's default Hopper variant, a
/// comma-separated list of [`HopperBwd::tag`]s (e.g. `w2_q128_p1,w2_q64_p1`) the listed variant of
/// the head dim, any other value (e.g. `mma`) the `mma.sync` kernel.
pub(crate) const BWD_KERNEL_ENV: &str = "CANDLE_SPARSE_ATTN_BWD";

/// The Hopper backward variant for head dim `d`, or `None` where none applies (other head dims, or
/// [`BWD_KERNEL_ENV`] asks for the `mma.sync` kernel). Bucketed (LSH) visibility runs it too: on
/// random inputs the `mma.sync` kernel was faster at head dim 64 (hash 16 fwd+bwd, B4 H6 8k: 1.72
/// vs 1.93 ms), but on a training model's queries and keys, whose buckets are uneven, the Hopper
/// kernel is (char-LM step at 8k × 4: backward 12.2 vs 13.5 ms; at 16k × 2: 15.7 vs 19.2 ms;
/// EXPERIMENTS.md).
fn hopper_bwd(d: usize) -> Option<HopperBwd> {
    let mut variants = HOPPER_BWD_VARIANTS.into_iter().filter(|v| v.d == d);
    match std::env::var(BWD_KERNEL_ENV) {
        Ok(tags) => variants.find(|v| tags.split(',').any(|t| t == v.tag())),
        Err(_) => variants.next(),
    }
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Loads a kernel of `cuda/flash_attn.cu`, opting in to `$smem` bytes of shared memory.
macro_rules! func {
    ($dev:expr, $name:expr, $smem:expr) => {
        load_kernel!($dev, $name, MODULE, kernels::FLASH_ATTN, $smem)
    };
}

fn cfg(grid: (usize, usize), threads: usize, smem: usize) -> Result<LaunchConfig> {
    launch_config("flash attention", grid, threads, smem)
}

/// Debug builds fill outputs with NaN (0xFF bytes) first, so unwritten elements show in tests.
#[cfg(debug_assertions)]
fn poison<T>(dev: &CudaDevice, buf: &mut CudaSlice<T>) -> Result<()> {
    let bytes = (buf.len() * std::mem::size_of::<T>()) as u64;
    let f = func!(dev, "flash_poison", 0);
    let mut b = f.builder();
    b.arg(buf);
    b.arg(&bytes);
    unsafe { b.launch(cfg((1024, 1), 256, 0)?) }.w()?;
    Ok(())
}

#[cfg(not(debug_assertions))]
fn poison<T>(_: &CudaDevice, _: &mut CudaSlice<T>) -> Result<()> {
    Ok(())
}

/// The contiguous typed view of a storage behind a layout.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, name: &str) -> Result<CudaView<'a, T>> {
    contiguous_view(s, l, "flash attention", name)
}

/// Whether a layout starts on a 16-byte boundary (the tensor-core kernels' `cp.async` needs it).
fn aligned(l: &Layout, elem_bytes: usize) -> bool {
    (l.start_offset() * elem_bytes).is_multiple_of(16)
}

/// Visibility as kernel arguments: mode, flags and the side tensors (or a dummy in dense modes).
struct VisArgs<'a> {
    mode: i32,
    strict: i32,
    has_bkt: i32,
    q_pos: CudaView<'a, i32>,
    k_pos: CudaView<'a, i32>,
    q_bkt: CudaView<'a, i32>,
    k_bkt: CudaView<'a, i32>,
    /// Sink-band: `(hkv, 2)` sink and band blocks per kv head.
    spans: CudaView<'a, i32>,
}

/// Read guards of the side tensors (sparse: q_pos, k_pos, then the buckets; sink-band: blocks).
type Guards<'a> = Vec<(candle::StorageRef<'a>, &'a Layout)>;

fn guards(vis: &Visibility) -> Guards<'_> {
    match vis {
        Visibility::Sparse(l) => l
            .tensors()
            .into_iter()
            .map(|t| t.storage_and_layout())
            .collect(),
        Visibility::SinkBand(sb) => vec![sb.blocks.storage_and_layout()],
        _ => Vec::new(),
    }
}

fn vis_args<'a>(
    vis: &Visibility,
    g: &'a Guards<'_>,
    dummy: &'a CudaSlice<i32>,
) -> Result<VisArgs<'a>> {
    let side = |i: usize, name: &str| -> Result<CudaView<'a, i32>> {
        match &*g[i].0 {
            Storage::Cuda(c) => view::<i32>(c, g[i].1, name),
            _ => bail!("flash attention (cuda): visibility tensor {name} is not on the GPU"),
        }
    };
    Ok(match vis {
        Visibility::Full | Visibility::Causal => VisArgs {
            mode: if matches!(vis, Visibility::Full) {
                0
            } else {
                1
            },
            strict: 0,
            has_bkt: 0,
            q_pos: dummy.slice(..),
            k_pos: dummy.slice(..),
            q_bkt: dummy.slice(..),
            k_bkt: dummy.slice(..),
            spans: dummy.slice(..),
        },
        Visibility::SinkBand(_) => VisArgs {
            mode: 3,
            strict: 0,
            has_bkt: 0,
            q_pos: dummy.slice(..),
            k_pos: dummy.slice(..),
            q_bkt: dummy.slice(..),
            k_bkt: dummy.slice(..),
            spans: side(0, "sink-band blocks")?,
        },
        Visibility::Sparse(l) => {
            let has_bkt = l.buckets.is_some();
            VisArgs {
                mode: 2,
                strict: l.strict as i32,
                has_bkt: has_bkt as i32,
                q_pos: side(0, "q_pos")?,
                k_pos: side(1, "k_pos")?,
                q_bkt: if has_bkt {
                    side(2, "q_bucket")?
                } else {
                    dummy.slice(..)
                },
                k_bkt: if has_bkt {
                    side(3, "k_bucket")?
                } else {
                    dummy.slice(..)
                },
                spans: dummy.slice(..),
            }
        }
    })
}

/// Per-tile metadata (int4 per tile) of query tiles of `tq` rows and key tiles of `tk` rows;
/// only built in sparse mode (a dummy otherwise).
fn tile_meta(
    dev: &CudaDevice,
    va: &VisArgs,
    dims: Dims,
    tq: usize,
    tk: usize,
) -> Result<(CudaSlice<i32>, CudaSlice<i32>)> {
    if va.mode != 2 {
        return Ok((dev.alloc_zeros::<i32>(4)?, dev.alloc_zeros::<i32>(4)?));
    }
    let f = func!(dev, "flash_tile_meta", 0);
    let build = |pos: &CudaView<i32>,
                 bkt: &CudaView<i32>,
                 rows: usize,
                 n: usize,
                 tile: usize,
                 is_q: i32| {
        let total = rows * ceil_div(n, tile);
        let mut meta = unsafe { dev.alloc::<i32>(4 * total) }?;
        let mut b = f.builder();
        b.arg(pos);
        b.arg(bkt);
        b.arg(&mut meta);
        candle::builder_arg!(b, rows as i32, n as i32, tile as i32, is_q, va.has_bkt);
        // One warp per tile.
        unsafe { b.launch(cfg((ceil_div(total, 8), 1), 256, 0)?) }.w()?;
        Ok::<_, candle::Error>(meta)
    };
    let qm = build(&va.q_pos, &va.q_bkt, dims.b * dims.hq, dims.nq, tq, 1)?;
    let km = build(&va.k_pos, &va.k_bkt, dims.b * dims.hkv, dims.nk, tk, 0)?;
    Ok((qm, km))
}

/// Scalars shared by every attention kernel, kept alive for the builder.
struct Scalars([i32; 8], f32);

impl Scalars {
    fn new(dims: Dims, va: &VisArgs, scale: f32) -> Self {
        let i = |x: usize| x as i32;
        Scalars(
            [
                i(dims.b),
                i(dims.hq),
                i(dims.hkv),
                i(dims.nq),
                i(dims.nk),
                va.mode,
                va.strict,
                va.has_bkt,
            ],
            scale,
        )
    }
}

/// Pushes the kernels' common trailing parameters (`VIS_PARAMS` in the .cu file).
fn push_vis<'a>(
    b: &mut LaunchArgs<'a>,
    va: &'a VisArgs,
    meta: &'a (CudaSlice<i32>, CudaSlice<i32>),
    sc: &'a Scalars,
) {
    b.arg(&va.q_pos);
    b.arg(&va.k_pos);
    b.arg(&va.q_bkt);
    b.arg(&va.k_bkt);
    b.arg(&meta.0);
    b.arg(&meta.1);
    b.arg(&va.spans);
    for x in &sc.0 {
        b.arg(x);
    }
    b.arg(&sc.1);
}

fn check_dims(dims: Dims) -> Result<()> {
    if dims.b * dims.hq > 65535 || dims.b * dims.hq * dims.nq * dims.d > i64::MAX as usize {
        bail!("flash attention (cuda): batch × heads must be at most 65535, got {dims:?}")
    }
    if dims.nq > i32::MAX as usize / 2 || dims.nk > i32::MAX as usize / 2 {
        bail!("flash attention (cuda): sequence too long, {dims:?}")
    }
    if !super::SUPPORTED_HEAD_DIMS.contains(&dims.d) {
        bail!(
            "flash attention (cuda): head_dim {} is not supported (supported: {:?})",
            dims.d,
            super::SUPPORTED_HEAD_DIMS
        )
    }
    Ok(())
}

/// Forward: output `(b, hq, nq, d)` in the input dtype and the f32 LSE `(b, hq, nq)`.
pub(crate) fn forward(
    (sq, lq): (&CudaStorage, &Layout),
    (sk, lk): (&CudaStorage, &Layout),
    (sv, lv): (&CudaStorage, &Layout),
    dims: Dims,
    scale: f32,
    visibility: &Visibility,
) -> Result<(CudaStorage, CudaStorage)> {
    match sq.dtype() {
        DType::F32 => fwd_t::<f32>((sq, lq), (sk, lk), (sv, lv), dims, scale, visibility),
        DType::F16 => fwd_t::<f16>((sq, lq), (sk, lk), (sv, lv), dims, scale, visibility),
        DType::BF16 => fwd_t::<bf16>((sq, lq), (sk, lk), (sv, lv), dims, scale, visibility),
        other => bail!("flash attention (cuda): unsupported dtype {other:?}"),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    (sq, lq): (&CudaStorage, &Layout),
    (sk, lk): (&CudaStorage, &Layout),
    (sv, lv): (&CudaStorage, &Layout),
    dims: Dims,
    scale: f32,
    visibility: &Visibility,
) -> Result<(CudaStorage, CudaStorage)> {
    check_dims(dims)?;
    let dev = sq.device().clone();
    let tn = tname(sq.dtype())?;
    let es = sq.dtype().size_in_bytes();
    let (q, k, v) = (
        view::<T>(sq, lq, "q")?,
        view::<T>(sk, lk, "k")?,
        view::<T>(sv, lv, "v")?,
    );
    let rows = dims.b * dims.hq * dims.nq;
    let mut out = unsafe { dev.alloc::<T>(rows * dims.d) }?;
    let mut lse = unsafe { dev.alloc::<f32>(rows) }?;
    poison(&dev, &mut out)?;
    poison(&dev, &mut lse)?;

    let g = guards(visibility);
    let dummy = dev.alloc_zeros::<i32>(4)?;
    let va = vis_args(visibility, &g, &dummy)?;
    let sc = Scalars::new(dims, &va, scale);
    let fast = sq.dtype() != DType::F32 && [lq, lk, lv].iter().all(|l| aligned(l, es));
    let d = dims.d;
    let hopper = if fast && has_wgmma(&dev) {
        hopper_fwd(d)
    } else {
        None
    };
    // Kernel, tile metadata, grid, threads and shared memory: the Hopper kernel where it applies,
    // else the mma.sync kernel, else the simple one (one warp per query row).
    let (name, meta, grid, threads, smem) = if let Some(hv) = hopper {
        let name = format!("flash_fwd_wg_{tn}_d{d}_{}_m{}", hv.tag(), va.mode);
        let meta = tile_meta(&dev, &va, dims, hv.rows(), hv.keys)?;
        let grid = (ceil_div(dims.nq, hv.rows()), dims.b * dims.hq);
        (name, meta, grid, hv.threads(), hv.smem(es))
    } else if fast {
        let (bm, threads) = fwd_tiles(d);
        let name = format!("flash_fwd_{tn}_d{d}_m{}", va.mode);
        let meta = tile_meta(&dev, &va, dims, bm, BT)?;
        let grid = (ceil_div(dims.nq, bm), dims.b * dims.hq);
        // Q, two K and V buffers, two buffers of key positions and buckets (i32, sparse mode).
        let smem = (bm + 4 * BT) * (d + 8) * es + 16 * BT;
        (name, meta, grid, threads, smem)
    } else {
        let name = format!("flash_fwd_simple_{tn}_d{d}");
        let meta = (dummy.clone(), dummy.clone());
        (
            name,
            meta,
            (ceil_div(rows, SIMPLE_WARPS), 1),
            32 * SIMPLE_WARPS,
            0,
        )
    };
    let f = func!(dev, &name, smem);
    let mut b = f.builder();
    b.arg(&q);
    b.arg(&k);
    b.arg(&v);
    b.arg(&mut out);
    b.arg(&mut lse);
    push_vis(&mut b, &va, &meta, &sc);
    unsafe { b.launch(cfg(grid, threads, smem)?) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev),
    ))
}

/// Backward: `[dq | dk | dv]` flattened, in the input dtype.
pub(crate) fn backward(
    (sq, lq): (&CudaStorage, &Layout),
    (sk, lk): (&CudaStorage, &Layout),
    (sv, lv): (&CudaStorage, &Layout),
    dims: Dims,
    op: &FlashAttnBwd,
) -> Result<CudaStorage> {
    match sq.dtype() {
        DType::F32 => bwd_t::<f32>((sq, lq), (sk, lk), (sv, lv), dims, op),
        DType::F16 => bwd_t::<f16>((sq, lq), (sk, lk), (sv, lv), dims, op),
        DType::BF16 => bwd_t::<bf16>((sq, lq), (sk, lk), (sv, lv), dims, op),
        other => bail!("flash attention (cuda): unsupported dtype {other:?}"),
    }
}

/// The CUDA storage of a tensor the backward op carries.
fn cuda_of<'a>(g: &'a (candle::StorageRef<'_>, &Layout), name: &str) -> Result<&'a CudaStorage> {
    match &*g.0 {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("flash attention (cuda): {name} is not on the GPU"),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    (sq, lq): (&CudaStorage, &Layout),
    (sk, lk): (&CudaStorage, &Layout),
    (sv, lv): (&CudaStorage, &Layout),
    dims: Dims,
    op: &FlashAttnBwd,
) -> Result<CudaStorage> {
    check_dims(dims)?;
    let dev = sq.device().clone();
    let dtype = sq.dtype();
    let tn = tname(dtype)?;
    let es = dtype.size_in_bytes();
    for (t, name) in [(&op.out, "out"), (&op.grad_out, "grad_out")] {
        if t.dtype() != dtype || t.dims() != lq.dims() {
            bail!(
                "flash attention (cuda): {name} must be {dtype:?} {:?}, got {:?} {:?}",
                lq.dims(),
                t.dtype(),
                t.dims()
            )
        }
    }
    let lse_t: &Tensor = &op.lse;
    if lse_t.dtype() != DType::F32 || lse_t.dims() != [dims.b, dims.hq, dims.nq] {
        bail!(
            "flash attention (cuda): lse must be f32 {:?}, got {:?} {:?}",
            [dims.b, dims.hq, dims.nq],
            lse_t.dtype(),
            lse_t.dims()
        )
    }
    let (go_g, o_g, lse_g) = (
        op.grad_out.storage_and_layout(),
        op.out.storage_and_layout(),
        lse_t.storage_and_layout(),
    );
    let (q, k, v) = (
        view::<T>(sq, lq, "q")?,
        view::<T>(sk, lk, "k")?,
        view::<T>(sv, lv, "v")?,
    );
    let go = view::<T>(cuda_of(&go_g, "grad_out")?, go_g.1, "grad_out")?;
    let o = view::<T>(cuda_of(&o_g, "out")?, o_g.1, "out")?;
    let lse = view::<f32>(cuda_of(&lse_g, "lse")?, lse_g.1, "lse")?;

    let rows = dims.b * dims.hq * dims.nq;
    let (nq_el, nk_el) = (rows * dims.d, dims.b * dims.hkv * dims.nk * dims.d);
    let d = dims.d;

    // Delta = rowsum(dO ∘ O), f32: 16-byte loads, 8 lanes per row, where rows and both
    // tensors are 16-byte aligned; otherwise one warp per row.
    let mut delta = unsafe { dev.alloc::<f32>(rows) }?;
    {
        let vec = (d * es).is_multiple_of(16) && aligned(go_g.1, es) && aligned(o_g.1, es);
        let (name, grid) = if vec {
            ("flash_bwd_delta_vec", ceil_div(rows, 32))
        } else {
            ("flash_bwd_delta", ceil_div(rows, SIMPLE_WARPS))
        };
        let f = func!(dev, &format!("{name}_{tn}"), 0);
        let mut b = f.builder();
        b.arg(&o);
        b.arg(&go);
        b.arg(&mut delta);
        candle::builder_arg!(b, rows as i64, d as i32);
        unsafe { b.launch(cfg((grid, 1), 32 * SIMPLE_WARPS, 0)?) }.w()?;
    }

    let mut packed = unsafe { dev.alloc::<T>(nq_el + 2 * nk_el) }?;
    poison(&dev, &mut packed)?;
    let g = guards(&op.visibility);
    let dummy = dev.alloc_zeros::<i32>(4)?;
    let va = vis_args(&op.visibility, &g, &dummy)?;
    let sc = Scalars::new(dims, &va, op.scale);
    let fast = dtype != DType::F32
        && d <= 128
        && [lq, lk, lv, go_g.1, o_g.1].iter().all(|l| aligned(l, es));
    let (mut dq, mut dkv) = packed.split_at_mut(nq_el);
    let (mut dk, mut dv) = dkv.split_at_mut(nk_el);
    if fast {
        // One fused kernel: dK, dV per key tile, dQ by f32 atomics, then dQ to the input dtype.
        // The Hopper kernel where it applies (see `hopper_bwd`), else the mma.sync one.
        let hopper = if has_wgmma(&dev) { hopper_bwd(d) } else { None };
        let (name, bk, bq, threads, smem) = if let Some(hv) = hopper {
            let name = format!("flash_bwd_wg_{tn}_d{d}_{}_m{}", hv.tag(), va.mode);
            (name, hv.keys(), hv.rows, 128 * hv.warpgroups, hv.smem(es))
        } else {
            let (kname, bk, bq, threads) = bwd_tiles(d);
            // K, V, two Q and dO tiles, two dS^T tiles, two lse and delta rows, two rows of query
            // positions and buckets (i32, sparse mode; `flash_bwd` only).
            let smem = (2 * bk + 4 * bq) * (d + 8) * es + 2 * bk * (bq + 8) * es + 8 * bq * 4;
            (
                format!("{kname}_{tn}_d{d}_m{}", va.mode),
                bk,
                bq,
                threads,
                smem,
            )
        };
        let meta = tile_meta(&dev, &va, dims, bq, bk)?;
        let mut dq_acc = dev.alloc_zeros::<f32>(nq_el)?;
        let f = func!(dev, &name, smem);
        let mut b = f.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&go);
        b.arg(&lse);
        b.arg(&delta);
        b.arg(&mut dk);
        b.arg(&mut dv);
        b.arg(&mut dq_acc);
        push_vis(&mut b, &va, &meta, &sc);
        let grid = (ceil_div(dims.nk, bk), dims.b * dims.hkv);
        unsafe { b.launch(cfg(grid, threads, smem)?) }.w()?;

        let f = func!(dev, &format!("flash_bwd_dq_convert_{tn}"), 0);
        let mut b = f.builder();
        b.arg(&dq_acc);
        b.arg(&mut dq);
        candle::builder_arg!(b, nq_el as i64, op.scale);
        let blocks = ceil_div(nq_el, 4 * 256).min(132 * 16);
        unsafe { b.launch(cfg((blocks, 1), 256, 0)?) }.w()?;
    } else {
        let meta = (dummy.clone(), dummy.clone());
        let threads = 32 * SIMPLE_WARPS;
        // dK, dV: one warp per key row.
        let f = func!(dev, &format!("flash_bwd_simple_dkv_{tn}_d{d}"), 0);
        let mut b = f.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&go);
        b.arg(&lse);
        b.arg(&delta);
        b.arg(&mut dk);
        b.arg(&mut dv);
        push_vis(&mut b, &va, &meta, &sc);
        let grid = (ceil_div(dims.b * dims.hkv * dims.nk, SIMPLE_WARPS), 1);
        unsafe { b.launch(cfg(grid, threads, 0)?) }.w()?;

        // dQ: one warp per query row.
        let f = func!(dev, &format!("flash_bwd_simple_dq_{tn}_d{d}"), 0);
        let mut b = f.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&go);
        b.arg(&lse);
        b.arg(&delta);
        b.arg(&mut dq);
        push_vis(&mut b, &va, &meta, &sc);
        let grid = (ceil_div(rows, SIMPLE_WARPS), 1);
        unsafe { b.launch(cfg(grid, threads, 0)?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(packed, dev))
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
