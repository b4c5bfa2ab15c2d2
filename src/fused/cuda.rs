//! CUDA launch side of the fused ops (kernels in `cuda/fused.cu`), all on candle's stream.

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, PushKernelArg,
};
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
/// Most blocks of the LayerNorm backward (each writes one row of f32 gain-gradient partial sums;
/// fewer when one wave of resident blocks is smaller).
const LN_BWD_BLOCKS: usize = 1056;
/// Shared memory of the LayerNorm backward's per-warp gain accumulators, at most.
const LN_BWD_SMEM: usize = 96 * 1024;
/// Blocks of the sum-of-squares kernel per tensor.
const SUMSQ_BLOCKS: usize = 64;
/// Words of a [`WordTable`] (`TABLE_WORDS` in `cuda/fused.cu`).
const TABLE_WORDS: usize = 480;

/// A table of 64-bit words (pointers and lengths) passed by value as one kernel parameter
/// (`WordTable` in `cuda/fused.cu`): 3,840 bytes, under the 4 KB parameter limit. Nothing is
/// copied to the device before the launch, so a captured CUDA graph holds the table itself.
#[repr(C)]
struct WordTable([u64; TABLE_WORDS]);

// SAFETY: a plain array of u64, laid out as the kernels' `WordTable`.
unsafe impl DeviceRepr for WordTable {}

impl WordTable {
    /// Tables of `rows` (each `row_words` long), as many rows per table as fit: the launches of a
    /// long list, with the index of each table's first row.
    fn chunks(rows: &[u64], row_words: usize) -> impl Iterator<Item = (usize, usize, Self)> + '_ {
        let per_table = TABLE_WORDS / row_words;
        rows.chunks(per_table * row_words)
            .enumerate()
            .map(move |(i, words)| {
                let mut table = [0u64; TABLE_WORDS];
                table[..words.len()].copy_from_slice(words);
                (i * per_table, words.len() / row_words, Self(table))
            })
    }
}

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

/// The name of the LayerNorm kernel `base` (`ln_fwd`, `add_ln_fwd`, `ln_bwd`) for rows of `c`
/// elements of `dtype` whose tensors start at element `offsets`: a register-resident variant
/// `{base}_{dtype}_v{V}n{N}` (16-byte chunks of V elements when c is a multiple of V and every
/// start is 16-byte aligned, else single elements; N chunks per lane, the smallest of the compiled
/// counts holding the row), or the plain `{base}_{dtype}` kernel for wider rows.
fn ln_kernel(base: &str, dtype: DType, c: usize, offsets: &[usize], what: &str) -> Result<String> {
    let suffix = dtype_suffix(dtype, what)?;
    let size = dtype.size_in_bytes();
    let vec = 16 / size;
    let aligned = offsets.iter().all(|o| (o * size).is_multiple_of(16));
    let pick = |v: usize, max_n: usize| {
        let n = c.div_ceil(32 * v).next_power_of_two();
        (n <= max_n).then_some((v, n))
    };
    let variant = if c.is_multiple_of(vec) && aligned {
        pick(vec, 8)
    } else {
        None
    }
    .or_else(|| pick(1, 16));
    Ok(match variant {
        Some((v, n)) => format!("{base}_{suffix}_v{v}n{n}"),
        None => format!("{base}_{suffix}"),
    })
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
        let offsets = [lx.start_offset(), lg.start_offset()];
        let name = ln_kernel("ln_fwd", sx.dtype(), c, &offsets, what)?;
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&x).arg(&g).arg(&mut y).arg(&rows_i).arg(&c_i).arg(&eps);
        unsafe { b.launch(per_row(what, rows)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// `(x + delta, LayerNorm(x + delta) · gain)`, one warp per row.
pub(super) fn add_ln_fwd(
    (sx, lx): (&CudaStorage, &Layout),
    (sd, ld): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    let what = "add_layer_norm";
    let dev = sx.device().clone();
    let (rows, c) = rows_cols(lx);
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    let delta_rows = i32_arg(what, rows_cols(ld).0)?;
    by_dtype!(what, sx.dtype(), T => {
        let x = contiguous_view::<T>(sx, lx, what, "x")?;
        let d = contiguous_view::<T>(sd, ld, what, "delta")?;
        let g = contiguous_view::<T>(sg, lg, what, "gain")?;
        let mut sum = alloc::<T>(&dev, rows * c)?;
        let mut y = alloc::<T>(&dev, rows * c)?;
        let offsets = [lx.start_offset(), ld.start_offset(), lg.start_offset()];
        let name = ln_kernel("add_ln_fwd", sx.dtype(), c, &offsets, what)?;
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&x).arg(&d).arg(&g).arg(&mut sum).arg(&mut y);
        b.arg(&rows_i).arg(&delta_rows).arg(&c_i).arg(&eps);
        unsafe { b.launch(per_row(what, rows)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(sum, dev.clone()),
            CudaStorage::wrap_cuda_slice(y, dev),
        ))
    })
}

/// The input gradient of the LayerNorm (plus `acc` when given, same shape and dtype as `x`) and
/// the partial sums of the gain gradient, `(blocks, c)` f32, with the number of blocks.
pub(super) fn ln_bwd(
    (sx, lx): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    (sd, ld): (&CudaStorage, &Layout),
    acc: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<(CudaStorage, CudaStorage, usize)> {
    let what = "layer_norm backward";
    let dev = sx.device().clone();
    let (rows, c) = rows_cols(lx);
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    // One row of c f32 accumulators per warp in shared memory: fewer warps for wide rows.
    let warps = (LN_BWD_SMEM / (4 * c)).clamp(1, THREADS / 32);
    let smem = warps * c * 4;
    let mut offsets = vec![lx.start_offset(), lg.start_offset(), ld.start_offset()];
    offsets.extend(acc.map(|(_, l)| l.start_offset()));
    let name = ln_kernel("ln_bwd", sx.dtype(), c, &offsets, what)?;
    let f = load_kernel!(dev, name, MODULE, kernels::FUSED, smem);
    // One wave of blocks striding over the rows (as many as fit on every SM at once, at most
    // LN_BWD_BLOCKS): fewer blocks also mean fewer gain-gradient partials to sum.
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor((warps * 32) as u32, smem, None)
        .w()?;
    let wave = (sms.max(1) as usize) * (per_sm.max(1) as usize);
    let blocks = rows.div_ceil(warps).clamp(1, wave.min(LN_BWD_BLOCKS));
    by_dtype!(what, sx.dtype(), T => {
        let x = contiguous_view::<T>(sx, lx, what, "x")?;
        let g = contiguous_view::<T>(sg, lg, what, "gain")?;
        let dy = contiguous_view::<T>(sd, ld, what, "dy")?;
        let acc = acc
            .map(|(s, l)| contiguous_view::<T>(s, l, what, "residual"))
            .transpose()?;
        let mut dx = alloc::<T>(&dev, rows * c)?;
        let mut partial = alloc::<f32>(&dev, blocks * c)?;
        let null: u64 = 0;
        let mut b = f.builder();
        b.arg(&x).arg(&g).arg(&dy);
        match &acc {
            Some(acc) => b.arg(acc),
            None => b.arg(&null),
        };
        b.arg(&mut dx).arg(&mut partial).arg(&rows_i).arg(&c_i).arg(&eps);
        unsafe { b.launch(launch_config(what, (blocks, 1), warps * 32, smem)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            CudaStorage::wrap_cuda_slice(partial, dev),
            blocks,
        ))
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

/// Rows of the `(vocab, c)` table picked by `ids` `(n,)`: `(n, c)` in the table's dtype (NaN rows
/// for ids outside the vocabulary).
pub(super) fn emb_fwd(
    (st, lt): (&CudaStorage, &Layout),
    (si, li): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let what = "embedding";
    let dev = st.device().clone();
    let (vocab, c) = rows_cols(lt);
    let rows = li.shape().elem_count();
    let (rows_i, c_i) = (i32_arg(what, rows)?, i32_arg(what, c)?);
    let vocab_u = u32::try_from(vocab)
        .map_err(|_| candle::Error::Msg(format!("{what} (cuda): vocab {vocab} too large")))?;
    let ids = contiguous_view::<u32>(si, li, what, "ids")?;
    by_dtype!(what, st.dtype(), T => {
        let table = contiguous_view::<T>(st, lt, what, "table")?;
        let mut out = alloc::<T>(&dev, rows * c)?;
        let name = format!("emb_fwd_{}", dtype_suffix(st.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&table).arg(&ids).arg(&mut out).arg(&rows_i).arg(&c_i).arg(&vocab_u);
        unsafe { b.launch(elementwise(what, rows * c / 8 + 1)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// The one-hot rows `(n, vocab)` in `dtype` of `ids` `(n,)` (zero rows for ids outside the
/// vocabulary).
pub(super) fn one_hot(
    (si, li): (&CudaStorage, &Layout),
    vocab: usize,
    dtype: DType,
) -> Result<CudaStorage> {
    let what = "one_hot";
    let dev = si.device().clone();
    let rows = li.shape().elem_count();
    let (rows_i, vocab_i) = (i32_arg(what, rows)?, i32_arg(what, vocab)?);
    let ids = contiguous_view::<u32>(si, li, what, "ids")?;
    by_dtype!(what, dtype, T => {
        let mut out = alloc::<T>(&dev, rows * vocab)?;
        let name = format!("one_hot_{}", dtype_suffix(dtype, what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&ids).arg(&mut out).arg(&rows_i).arg(&vocab_i);
        unsafe { b.launch(elementwise(what, rows * vocab)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// The sum over the leading axis of `x` `(b, n)` (as laid out by `l`), in f32: `(n,)`.
pub(super) fn batch_sum((s, l): (&CudaStorage, &Layout), b: usize) -> Result<CudaStorage> {
    let what = "batch_sum_f32";
    let dev = s.device().clone();
    let n = l.shape().elem_count() / b.max(1);
    let b_i = i32_arg(what, b)?;
    let mut out = alloc::<f32>(&dev, n)?;
    by_dtype!(what, s.dtype(), T => {
        let x = contiguous_view::<T>(s, l, what, "x")?;
        let name = format!("batch_sum_{}", dtype_suffix(s.dtype(), what)?);
        let f = load_kernel!(dev, name, MODULE, kernels::FUSED, 0);
        let mut bld = f.builder();
        bld.arg(&x).arg(&mut out).arg(&b_i).arg(&n);
        unsafe { bld.launch(elementwise(what, n / 4 + 1)?) }.w()?;
        Ok::<(), candle::Error>(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
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

/// The copy unit of the heads kernels: the widest of 16, 4 or 2 bytes dividing a head row of `d`
/// elements of `dtype` and every input's start offset (`offsets`, in elements); returns its
/// kernel suffix and the units per head row.
fn heads_unit(
    what: &str,
    dtype: DType,
    d: usize,
    offsets: &[usize],
) -> Result<(&'static str, u32)> {
    let size = dtype.size_in_bytes();
    let unit = [(16, "u16"), (4, "u4"), (2, "u2")]
        .into_iter()
        .find(|(u, _)| {
            (d * size).is_multiple_of(*u) && offsets.iter().all(|o| (o * size).is_multiple_of(*u))
        });
    match unit {
        Some((u, name)) => {
            let du = u32::try_from(d * size / u).map_err(|_| {
                candle::Error::Msg(format!("{what} (cuda): head dim {d} too large"))
            })?;
            Ok((name, du))
        }
        None => bail!("{what} (cuda): dtype {dtype:?} is not supported (f32, bf16, f16)"),
    }
}

/// The `u32` sizes of a heads launch, checked so that every unit index (and its grid-stride
/// successor) fits in 32 bits.
fn heads_dims(what: &str, n: Heads, du: u32) -> Result<[u32; 3]> {
    let total = n.b * n.t * n.parts.max(3) * n.h * du as usize;
    if total > i32::MAX as usize {
        bail!("{what} (cuda): {n:?} is too large for 32-bit indices")
    }
    Ok([n.b as u32, n.h as u32, n.t as u32])
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
    let (unit, du) = heads_unit(what, s.dtype(), n.d, &[l.start_offset()])?;
    let [b_, h_, t_] = heads_dims(what, n, du)?;
    let (parts, part) = (n.parts as u32, n.part as u32);
    let units = out_len / n.d * du as usize;
    by_dtype!(what, s.dtype(), T => {
        let src = contiguous_view::<T>(s, l, what, "input")?;
        let mut out = alloc::<T>(&dev, out_len)?;
        let f = load_kernel!(dev, format!("{kernel}_{unit}"), MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&src).arg(&mut out).arg(&b_).arg(&h_).arg(&t_).arg(&du).arg(&parts).arg(&part);
        unsafe { b.launch(elementwise(what, units)?) }.w()?;
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

/// The three parts of `(b, t, 3, h, d)` whose `(b, t)` rows are `ld` elements apart (each row
/// contiguous) as `(b, h, t, d)` storages, in one pass.
pub(super) fn heads_split3(
    (s, l): (&CudaStorage, &Layout),
    n: Heads,
    ld: usize,
) -> Result<[CudaStorage; 3]> {
    let what = "split_qkv";
    let dev = s.device().clone();
    let (unit, du) = heads_unit(what, s.dtype(), n.d, &[l.start_offset(), ld])?;
    let [b_, h_, t_] = heads_dims(what, n, du)?;
    let ru = units_of(what, s.dtype(), ld, du, n.d, n.b * n.t)?;
    let len = n.b * n.h * n.t * n.d;
    let units = n.b * n.h * n.t * du as usize;
    by_dtype!(what, s.dtype(), T => {
        let src = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
        let mut q = alloc::<T>(&dev, len)?;
        let mut k = alloc::<T>(&dev, len)?;
        let mut v = alloc::<T>(&dev, len)?;
        let f = load_kernel!(dev, format!("heads_split3_{unit}"), MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&src).arg(&mut q).arg(&mut k).arg(&mut v);
        b.arg(&b_).arg(&h_).arg(&t_).arg(&du).arg(&ru);
        unsafe { b.launch(elementwise(what, units)?) }.w()?;
        Ok([q, k, v].map(|x| CudaStorage::wrap_cuda_slice(x, dev.clone())))
    })
}

/// `(b, t, 3, h, d)` from the three `(b, h, t, d)` parts, with the rows of `extra` `(b, t, e)`
/// appended when given, in one pass.
pub(super) fn heads_merge3(
    parts: [(&CudaStorage, &Layout); 3],
    extra: Option<(&CudaStorage, &Layout)>,
    n: Heads,
) -> Result<CudaStorage> {
    let what = "merge_qkv";
    let s = parts[0].0;
    let dev = s.device().clone();
    let rows = n.b * n.t;
    let e = extra.map_or(0, |(_, l)| l.shape().elem_count() / rows.max(1));
    let width = 3 * n.h * n.d + e;
    let mut aligned = parts.map(|(_, l)| l.start_offset()).to_vec();
    aligned.push(width);
    aligned.extend(extra.map(|(_, l)| l.start_offset()));
    let (unit, du) = heads_unit(what, s.dtype(), n.d, &aligned)?;
    let [b_, h_, t_] = heads_dims(what, n, du)?;
    let ru = units_of(what, s.dtype(), width, du, n.d, rows)?;
    let len = rows * width;
    by_dtype!(what, s.dtype(), T => {
        let [(sq, lq), (sk, lk), (sv, lv)] = parts;
        let q = contiguous_view::<T>(sq, lq, what, "q")?;
        let k = contiguous_view::<T>(sk, lk, what, "k")?;
        let v = contiguous_view::<T>(sv, lv, what, "v")?;
        let ex = match extra {
            Some((sx, lx)) => contiguous_view::<T>(sx, lx, what, "extra")?,
            // Never read when there are no extra columns.
            None => contiguous_view::<T>(sq, lq, what, "q")?,
        };
        let mut out = alloc::<T>(&dev, len)?;
        let f = load_kernel!(dev, format!("heads_merge3_{unit}"), MODULE, kernels::FUSED, 0);
        let mut b = f.builder();
        b.arg(&q).arg(&k).arg(&v).arg(&ex).arg(&mut out);
        b.arg(&b_).arg(&h_).arg(&t_).arg(&du).arg(&ru);
        unsafe { b.launch(elementwise(what, rows * ru as usize)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// `width` elements (a multiple of the unit: [`heads_unit`] checked it) in units of the head
/// row's `du` units per `d` elements, checked so that `rows` rows of them fit 32-bit indices.
fn units_of(what: &str, dtype: DType, width: usize, du: u32, d: usize, rows: usize) -> Result<u32> {
    let ru = width * du as usize / d;
    if rows.saturating_mul(ru) > i32::MAX as usize {
        bail!("{what} (cuda): {rows} rows of {width} {dtype:?} are too many for 32-bit indices")
    }
    Ok(ru as u32)
}

/// The f32 views of the `tensors` of a kernel over a [`WordTable`] of pointers (one grid row per
/// tensor: at least one, each contiguous).
fn table_views<'a>(
    what: &str,
    tensors: &[(&'a CudaStorage, &Layout)],
) -> Result<Vec<CudaView<'a, f32>>> {
    if tensors.is_empty() {
        bail!("{what} (cuda): needs at least one tensor")
    }
    tensors
        .iter()
        .enumerate()
        .map(|(i, (s, l))| contiguous_view::<f32>(s, l, what, &format!("tensor {i}")))
        .collect()
}

/// The f32 `tensors` (contiguous) cast to `dtype` (bf16 or f16) into one storage, one after the
/// other (`offsets[i]` where tensor `i` starts): one launch per 160 tensors, the pointers passed
/// as a [`WordTable`].
pub(super) fn cast_concat(
    dev: &CudaDevice,
    tensors: &[(&CudaStorage, &Layout)],
    offsets: &[usize],
    dtype: DType,
) -> Result<CudaStorage> {
    let what = "cast_concat";
    let views = table_views(what, tensors)?;
    let stream = dev.cuda_stream();
    let mut rows = Vec::with_capacity(3 * views.len());
    let mut guards = Vec::with_capacity(views.len());
    let mut largest = 0;
    for (v, &offset) in views.iter().zip(offsets) {
        let (ptr, guard) = v.device_ptr(&stream);
        rows.extend([ptr, offset as u64, v.len() as u64]);
        guards.push(guard);
        largest = largest.max(v.len());
    }
    let total = offsets.last().copied().unwrap_or(0) + views.last().map_or(0, |v| v.len());
    let blocks = largest.div_ceil(THREADS * 4).clamp(1, 1024);
    macro_rules! run {
        ($t:ty, $kernel:expr) => {{
            let mut out = alloc::<$t>(dev, total)?;
            let f = load_kernel!(dev, $kernel, MODULE, kernels::FUSED, 0);
            for (_, count, table) in WordTable::chunks(&rows, 3) {
                let mut b = f.builder();
                b.arg(&table).arg(&mut out);
                unsafe { b.launch(launch_config(what, (blocks, count), THREADS, 0)?) }.w()?;
            }
            drop(guards);
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match dtype {
        DType::BF16 => run!(bf16, "cast_concat_bf16"),
        DType::F16 => run!(f16, "cast_concat_f16"),
        other => bail!("{what} (cuda): casts to bf16 or f16, got {other:?}"),
    }
}

/// The sum of squares of every element of the f32 `tensors` (contiguous), a `(1,)` f32 storage:
/// per-block partials (one launch per 240 tensors, the pointers passed as a [`WordTable`]), then
/// one block summing the partials in a fixed order.
pub(super) fn sum_of_squares(
    dev: &CudaDevice,
    tensors: &[(&CudaStorage, &Layout)],
) -> Result<CudaStorage> {
    let what = "sum_of_squares";
    let views = table_views(what, tensors)?;
    let (n, stream) = (views.len(), dev.cuda_stream());
    let mut rows = Vec::with_capacity(2 * n);
    let mut guards = Vec::with_capacity(n);
    for v in &views {
        let (ptr, guard) = v.device_ptr(&stream);
        rows.extend([ptr, v.len() as u64]);
        guards.push(guard);
    }
    let mut partial = alloc::<f32>(dev, n * SUMSQ_BLOCKS)?;
    let f = load_kernel!(dev, "sumsq_partial", MODULE, kernels::FUSED, 0);
    for (first, count, table) in WordTable::chunks(&rows, 2) {
        let first = i32_arg(what, first)?;
        let mut b = f.builder();
        b.arg(&table).arg(&mut partial).arg(&first);
        unsafe { b.launch(launch_config(what, (SUMSQ_BLOCKS, count), THREADS, 0)?) }.w()?;
    }
    drop(guards);
    let mut out = alloc::<f32>(dev, 1)?;
    let parts = i32_arg(what, n * SUMSQ_BLOCKS)?;
    let f = load_kernel!(dev, "sum_f32", MODULE, kernels::FUSED, 0);
    let mut b = f.builder();
    b.arg(&partial).arg(&mut out).arg(&parts);
    unsafe { b.launch(launch_config(what, (1, 1), 1024, 0)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `[norm, factor]` `(2,)` f32 from the sum of squares `sumsq` (one f32): `norm = √sumsq · scale`
/// and the factor clipping it to `max_norm`.
pub(super) fn norm_clip(
    (s, l): (&CudaStorage, &Layout),
    scale: f32,
    max_norm: f32,
) -> Result<CudaStorage> {
    let what = "norm_clip_factor";
    let dev = s.device().clone();
    let sumsq = contiguous_view::<f32>(s, l, what, "sumsq")?;
    let mut out = alloc::<f32>(&dev, 2)?;
    let f = load_kernel!(dev, "norm_clip", MODULE, kernels::FUSED, 0);
    let mut b = f.builder();
    b.arg(&sumsq).arg(&mut out).arg(&scale).arg(&max_norm);
    unsafe { b.launch(launch_config(what, (1, 1), 32, 0)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The scalar arguments of the AdamW kernels (`adamw_step`, `adamw_many`), in their order.
fn adamw_scalars(hp: &AdamWUpdate) -> [f32; 8] {
    [
        hp.lr,
        hp.beta1,
        hp.beta2,
        hp.eps,
        hp.weight_decay,
        hp.scale_m,
        hp.scale_v,
        hp.grad_scale,
    ]
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
    let scalars = adamw_scalars(hp);
    for x in &scalars {
        b.arg(x);
    }
    unsafe { b.launch(elementwise(what, n)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// AdamW of many `(param, state, grad)` f32 storages in place (`state`: `(2, n)` m then v), one
/// launch per 120 tensors (the pointers passed as a [`WordTable`]), the gradients also scaled by
/// the f32 scalar `grad_factor` when given, and `lr`, `scale_m`, `scale_v` read from the f32
/// `(3,)` `step_scalars` instead of `hp` when given. The caller guarantees that nothing else reads
/// or writes the params and states while the update is queued (they are updated like `Var::set`).
pub(super) fn adamw_many(
    dev: &CudaDevice,
    items: &[[(&CudaStorage, &Layout); 3]],
    grad_factor: Option<(&CudaStorage, &Layout)>,
    step_scalars: Option<(&CudaStorage, &Layout)>,
    hp: &AdamWUpdate,
) -> Result<()> {
    let what = "adamw_update_many";
    if items.is_empty() {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let mut views = Vec::with_capacity(3 * items.len());
    for (i, item) in items.iter().enumerate() {
        for ((s, l), name) in item.iter().zip(["param", "state", "grad"]) {
            views.push(contiguous_view::<f32>(s, l, what, &format!("{name} {i}"))?);
        }
    }
    let factor = grad_factor
        .map(|(s, l)| contiguous_view::<f32>(s, l, what, "grad_factor"))
        .transpose()?;
    let schedule = step_scalars
        .map(|(s, l)| contiguous_view::<f32>(s, l, what, "step_scalars"))
        .transpose()?;
    let mut rows = Vec::with_capacity(4 * items.len());
    let mut guards = Vec::with_capacity(3 * items.len() + 2);
    let mut largest = 0;
    for item in views.chunks(3) {
        for v in item {
            let (ptr, guard) = v.device_ptr(&stream);
            rows.push(ptr);
            guards.push(guard);
        }
        let n = item[0].len();
        largest = largest.max(n);
        rows.push(n as u64);
    }
    let mut scalar_ptrs = [0u64; 2];
    for (ptr, view) in scalar_ptrs.iter_mut().zip([&factor, &schedule]) {
        if let Some(v) = view {
            let (p, guard) = v.device_ptr(&stream);
            *ptr = p;
            guards.push(guard);
        }
    }
    let [factor_ptr, schedule_ptr] = scalar_ptrs;
    let f = load_kernel!(dev, "adamw_many", MODULE, kernels::FUSED, 0);
    let scalars = adamw_scalars(hp);
    let blocks = largest.div_ceil(THREADS * 8).clamp(1, 1024);
    for (_, count, table) in WordTable::chunks(&rows, 4) {
        let mut b = f.builder();
        b.arg(&table).arg(&factor_ptr).arg(&schedule_ptr);
        for x in &scalars {
            b.arg(x);
        }
        unsafe { b.launch(launch_config(what, (blocks, count), THREADS, 0)?) }.w()?;
    }
    drop(guards);
    Ok(())
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
