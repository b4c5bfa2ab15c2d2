//! CUDA launch side of the fused ops (kernels in `cuda/fused.cu`), all on candle's stream.

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use candle::cuda_backend::WrapErr;
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::{rows_cols, AdamWUpdate, Heads};
use crate::cuda_launch::{contiguous_view, dtype_suffix, launch_config, load_kernel};
use crate::kernels;

/// Module name of `cuda/fused.cu`'s PTX in candle's custom-module cache.
const MODULE: &str = "candle_sparse_attn::fused";
/// Threads per block; the row kernels run one warp per row.
const THREADS: usize = 256;
/// Blocks of the grid-stride element-wise kernels (enough to fill an H100 several times).
const MAX_BLOCKS: usize = 4096;
/// Blocks of the LayerNorm gain-gradient kernel (each writes one row of f32 partial sums).
const DGAIN_BLOCKS: usize = 264;

/// Runs `$body` with `$T` bound to the Rust type of float dtype `$dtype`.
macro_rules! by_dtype {
    ($what:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            other => bail!("{} (cuda): dtype {other:?} is not supported", $what),
        }
    };
}

/// A grid-stride launch over `n` elements.
fn elementwise(what: &str, n: usize) -> Result<candle::cuda_backend::cudarc::driver::LaunchConfig> {
    launch_config(
        what,
        (n.div_ceil(THREADS).clamp(1, MAX_BLOCKS), 1),
        THREADS,
        0,
    )
}

/// A launch of one warp per row.
fn per_row(what: &str, rows: usize) -> Result<candle::cuda_backend::cudarc::driver::LaunchConfig> {
    launch_config(what, (rows.div_ceil(THREADS / 32).max(1), 1), THREADS, 0)
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // Every element is written by the kernels below.
    unsafe { dev.alloc::<T>(n) }
}

fn i32_arg(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle::Error::Msg(format!("{what} (cuda): size {v} too large")))
}

pub(super) fn ln_fwd(
    (sx, lx): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    let what = "layer_norm";
    let dev = sx.device().clone();
    let (rows, c) = rows_cols(lx);
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    by_dtype!(what, sx.dtype(), T => {
        let x = contiguous_view::<T>(sx, lx, what, "x")?;
        let g = contiguous_view::<T>(sg, lg, what, "gain")?;
        let mut y = alloc::<T>(&dev, rows * c)?;
        let name = format!("ln_fwd_{}", dtype_suffix(sx.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&x).arg(&g).arg(&mut y).arg(&rows_i).arg(&c_i).arg(&eps);
        unsafe { b.launch(per_row(what, rows)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

pub(super) fn ln_bwd_dx(
    (sx, lx): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    (sd, ld): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    let what = "layer_norm backward";
    let dev = sx.device().clone();
    let (rows, c) = rows_cols(lx);
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    by_dtype!(what, sx.dtype(), T => {
        let x = contiguous_view::<T>(sx, lx, what, "x")?;
        let g = contiguous_view::<T>(sg, lg, what, "gain")?;
        let dy = contiguous_view::<T>(sd, ld, what, "dy")?;
        let mut dx = alloc::<T>(&dev, rows * c)?;
        let name = format!("ln_bwd_dx_{}", dtype_suffix(sx.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&x).arg(&g).arg(&dy).arg(&mut dx).arg(&rows_i).arg(&c_i).arg(&eps);
        unsafe { b.launch(per_row(what, rows)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    })
}

/// Partial sums of the gain gradient, `(blocks, c)` f32, and the number of blocks.
pub(super) fn ln_bwd_dgain(
    (sx, lx): (&CudaStorage, &Layout),
    (sd, ld): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, usize)> {
    let what = "layer_norm backward";
    let dev = sx.device().clone();
    let (rows, c) = rows_cols(lx);
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    let blocks = rows.div_ceil(THREADS / 32).clamp(1, DGAIN_BLOCKS);
    let smem = c * 4;
    by_dtype!(what, sx.dtype(), T => {
        let x = contiguous_view::<T>(sx, lx, what, "x")?;
        let dy = contiguous_view::<T>(sd, ld, what, "dy")?;
        let mut partial = alloc::<f32>(&dev, blocks * c)?;
        let name = format!("ln_bwd_dgain_{}", dtype_suffix(sx.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, smem);
        let mut b = f.builder();
        b.arg(&x).arg(&dy).arg(&mut partial).arg(&rows_i).arg(&c_i).arg(&eps);
        unsafe { b.launch(launch_config(what, (blocks, 1), THREADS, smem)?) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(partial, dev), blocks))
    })
}

pub(super) fn gelu_fwd((s, l): (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let what = "gelu";
    let dev = s.device().clone();
    let n = l.shape().elem_count();
    by_dtype!(what, s.dtype(), T => {
        let x = contiguous_view::<T>(s, l, what, "x")?;
        let mut y = alloc::<T>(&dev, n)?;
        let name = format!("gelu_fwd_{}", dtype_suffix(s.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&x).arg(&mut y).arg(&n);
        unsafe { b.launch(elementwise(what, n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

pub(super) fn gelu_bwd(
    (sx, lx): (&CudaStorage, &Layout),
    (sd, ld): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let what = "gelu backward";
    let dev = sx.device().clone();
    let n = lx.shape().elem_count();
    by_dtype!(what, sx.dtype(), T => {
        let x = contiguous_view::<T>(sx, lx, what, "x")?;
        let dy = contiguous_view::<T>(sd, ld, what, "dy")?;
        let mut dx = alloc::<T>(&dev, n)?;
        let name = format!("gelu_bwd_{}", dtype_suffix(sx.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&x).arg(&dy).arg(&mut dx).arg(&n);
        unsafe { b.launch(elementwise(what, n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    })
}

/// The `(vocab, c)` f32 table gradient.
pub(super) fn emb_bwd(
    (sd, ld): (&CudaStorage, &Layout),
    (si, li): (&CudaStorage, &Layout),
    vocab: usize,
) -> Result<CudaStorage> {
    let what = "embedding backward";
    let dev = sd.device().clone();
    let (rows, c) = rows_cols(ld);
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    let vocab_u = u32::try_from(vocab)
        .map_err(|_| candle::Error::Msg(format!("{what} (cuda): vocab {vocab} too large")))?;
    let ids = contiguous_view::<u32>(si, li, what, "ids")?;
    let mut table = dev.alloc_zeros::<f32>(vocab * c)?;
    by_dtype!(what, sd.dtype(), T => {
        let dy = contiguous_view::<T>(sd, ld, what, "dy")?;
        let name = format!("emb_bwd_{}", dtype_suffix(sd.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&dy).arg(&ids).arg(&mut table).arg(&rows_i).arg(&c_i).arg(&vocab_u);
        unsafe { b.launch(elementwise(what, rows * c)?) }.w()?;
        Ok::<(), candle::Error>(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(table, dev))
}

/// The `i32` sizes `(b, h, t, d, parts, part)` of a heads launch.
fn heads_args(what: &str, n: Heads) -> Result<[i32; 6]> {
    Ok([
        i32_arg(what, n.b)?,
        i32_arg(what, n.h)?,
        i32_arg(what, n.t)?,
        i32_arg(what, n.d)?,
        i32_arg(what, n.parts)?,
        i32_arg(what, n.part)?,
    ])
}

/// `kernel` (`heads_split` or `heads_merge`) from `(s, l)` into `out_len` elements.
fn heads(
    what: &str,
    kernel: &str,
    (s, l): (&CudaStorage, &Layout),
    n: Heads,
    out_len: usize,
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let args = heads_args(what, n)?;
    by_dtype!(what, s.dtype(), T => {
        let src = contiguous_view::<T>(s, l, what, "input")?;
        let mut out = alloc::<T>(&dev, out_len)?;
        let name = format!("{kernel}_{}", dtype_suffix(s.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&src).arg(&mut out);
        for a in &args {
            b.arg(a);
        }
        unsafe { b.launch(elementwise(what, out_len)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

pub(super) fn heads_split(input: (&CudaStorage, &Layout), n: Heads) -> Result<CudaStorage> {
    heads(
        "heads split",
        "heads_split",
        input,
        n,
        n.b * n.h * n.t * n.d,
    )
}

pub(super) fn heads_merge(input: (&CudaStorage, &Layout), n: Heads) -> Result<CudaStorage> {
    let len = n.b * n.t * n.parts * n.h * n.d;
    heads("heads merge", "heads_merge", input, n, len)
}

/// `[param | m | v]` after one AdamW step, `(3, n)` f32.
pub(super) fn adamw(
    (sp, lp): (&CudaStorage, &Layout),
    (ss, ls): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    hp: &AdamWUpdate,
) -> Result<CudaStorage> {
    let what = "adamw";
    let dev = sp.device().clone();
    let n = lp.shape().elem_count();
    let p = contiguous_view::<f32>(sp, lp, what, "param")?;
    let s = contiguous_view::<f32>(ss, ls, what, "state")?;
    let g = contiguous_view::<f32>(sg, lg, what, "grad")?;
    let mut out = alloc::<f32>(&dev, 3 * n)?;
    let f = load_kernel!(dev, "adamw_step", MODULE, kernels::FUSED, 0);
    let mut b = f.builder();
    b.arg(&p).arg(&s).arg(&g).arg(&mut out).arg(&n);
    let scalars = [
        hp.lr,
        hp.beta1,
        hp.beta2,
        hp.eps,
        hp.weight_decay,
        hp.scale_m,
        hp.scale_v,
        hp.grad_scale,
    ];
    for x in &scalars {
        b.arg(x);
    }
    unsafe { b.launch(elementwise(what, n)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// A scalar f32 zero.
pub(super) fn scalar_zero(dev: &CudaDevice) -> Result<CudaStorage> {
    let z = dev.alloc_zeros::<f32>(1)?;
    Ok(CudaStorage::wrap_cuda_slice(z, dev.clone()))
}

/// Per-row losses `(n,)` f32 and the logit gradient `(n, v)` of
/// [`super::cross_entropy_with_grad`], one warp per row.
pub(super) fn xent(
    (sl, ll): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    grad_scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    let what = "cross_entropy_with_grad";
    let dev = sl.device().clone();
    let (rows, v) = rows_cols(ll);
    let (rows_i, v_i) = (i32_arg(what, rows)?, i32_arg(what, v)?);
    let targets = contiguous_view::<u32>(st, lt, what, "targets")?;
    let mut losses = alloc::<f32>(&dev, rows)?;
    by_dtype!(what, sl.dtype(), T => {
        let logits = contiguous_view::<T>(sl, ll, what, "logits")?;
        let mut grad = alloc::<T>(&dev, rows * v)?;
        let name = format!("xent_{}", dtype_suffix(sl.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&logits).arg(&targets).arg(&mut losses).arg(&mut grad);
        b.arg(&rows_i).arg(&v_i).arg(&grad_scale);
        unsafe { b.launch(per_row(what, rows)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(losses, dev.clone()),
            CudaStorage::wrap_cuda_slice(grad, dev),
        ))
    })
}
