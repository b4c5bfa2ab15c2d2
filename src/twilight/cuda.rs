//! CUDA launch side of every Twilight stage (kernels in `cuda/twilight.cu`), and of the two fused
//! fast paths of a decode step (Quest selection; estimate + top-p + union). Everything runs on
//! candle's stream; the only allocations are the stage outputs and per-call scratch (the union
//! bitmap of the staged path, the attention partials), and nothing is copied to the host.

use candle::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, DType, Device, Layout, Result, Storage, StorageRef, Tensor};
use half::{bf16, f16};

use super::{TwilightCache, ATTN_CHUNK, TOP_P_EPS, TOP_P_MAX_ITERS};
use crate::cuda_launch::{contiguous_view, dtype_suffix, launch_config, load_kernel, wrap_slice};
use crate::kernels;

/// Module name of `cuda/twilight.cu`'s PTX in candle's custom-module cache.
const MODULE: &str = "candle_sparse_attn::twilight";
/// The caller named in launch errors.
const WHAT: &str = "twilight";
/// Largest dynamic shared memory a block may opt in to on sm_90, minus the static part.
const MAX_DYN_SMEM: usize = 227 * 1024 - 1024;
/// Query heads per KV head the attention kernel holds in registers (`MAXG` in the .cu file).
const MAX_GROUP: usize = 8;
/// Blocks per `(batch, kv head)` of the attention kernel (`ATT_MAX_BLOCKS`); each loops over the
/// list's chunks.
const ATTN_MAX_BLOCKS: usize = 16;

/// Threads that share one `head_dim` row in the row-parallel kernels (`RowSplit::LPR` in the .cu
/// file): the largest power of two `≤ 32` dividing `d` that leaves each thread a 16-byte vector
/// where `d` allows it.
fn row_lanes(d: usize, dtype: DType) -> usize {
    let vec = 16 / dtype.size_in_bytes();
    let mut l = 32;
    while l > 1 && (!d.is_multiple_of(l) || d / l < vec) {
        l /= 2;
    }
    l
}

type Guard<'a> = (StorageRef<'a>, &'a Layout);

/// The contiguous typed view behind a storage guard.
fn view<'a, T: CudaDType>(g: &'a Guard<'_>, name: &str) -> Result<CudaView<'a, T>> {
    match &*g.0 {
        Storage::Cuda(c) => contiguous_view(c, g.1, WHAT, name),
        _ => bail!("twilight (cuda): {name} is not on a CUDA device"),
    }
}

/// A cache buffer's view; the kernels use vector loads, so it must start at offset 0.
fn buffer<'a, T: CudaDType>(g: &'a Guard<'_>, name: &str) -> Result<CudaView<'a, T>> {
    if g.1.start_offset() != 0 {
        bail!(
            "twilight (cuda): cache buffer {name} must start at offset 0, got {:?}",
            g.1
        )
    }
    view(g, name)
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!(
            "twilight (cuda): expected a CUDA tensor, got {:?}",
            other.location()
        ),
    }
}

/// Loads a kernel of our module and opts it in to `smem` bytes of dynamic shared memory.
macro_rules! func {
    ($dev:expr, $name:expr, $smem:expr) => {{
        let smem: usize = $smem;
        if smem > MAX_DYN_SMEM {
            bail!(
                "twilight (cuda): {} needs {smem} bytes of shared memory (max {MAX_DYN_SMEM})",
                $name
            )
        }
        load_kernel!($dev, $name, MODULE, kernels::TWILIGHT, smem)
    }};
}

/// Calls `$f::<T>` with `T` the Rust type of a float dtype.
macro_rules! float_dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => bail!("twilight (cuda): dtype {other:?} is not supported (f32, f16, bf16)"),
        }
    };
}

fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| candle::Error::Msg(format!("twilight (cuda): {what} {x} exceeds i32")))
}

/// See [`super::page_scores`].
pub(crate) fn page_scores(cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
    float_dispatch!(q.dtype(), page_scores_t, cache, q)
}

fn page_scores_t<T: CudaDType + DeviceRepr>(cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (b, hq, d) = q.dims3()?;
    let (hkv, np) = (cache.kv_heads(), cache.num_pages());
    let pcap = cache.page_min().dim(2)?;
    let (gq, gmin, gmax) = (
        q.storage_and_layout(),
        cache.page_min().storage_and_layout(),
        cache.page_max().storage_and_layout(),
    );
    let (qv, minv, maxv) = (
        view::<T>(&gq, "q")?,
        buffer::<T>(&gmin, "page_min")?,
        buffer::<T>(&gmax, "page_max")?,
    );
    let mut out = unsafe { dev.alloc::<f32>(b * hq * np) }?;
    let smem = hq / hkv * d * 4;
    let f = func!(
        dev,
        &format!("tw_page_scores_{}_d{d}", dtype_suffix(q.dtype(), WHAT)?),
        smem
    );
    let mut a = f.builder();
    a.arg(&qv);
    a.arg(&minv);
    a.arg(&maxv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        i32_of(hq, "heads")?,
        hkv as i32,
        i32_of(pcap, "pages")?,
        np as i32
    );
    let pages_per_block = 256 / row_lanes(d, q.dtype());
    unsafe {
        a.launch(launch_config(
            WHAT,
            (np.div_ceil(pages_per_block), b * hkv),
            256,
            smem,
        )?)
    }
    .w()?;
    Ok(wrap_slice(out, &dev, (b, hq, np)))
}

/// See [`super::top_indices`].
pub(crate) fn top_indices(
    scores: &Tensor,
    k: usize,
    expand: usize,
    valid_len: usize,
) -> Result<Tensor> {
    let dev = cuda_device(scores)?;
    let (b, h, n) = scores.dims3()?;
    let g = scores.storage_and_layout();
    let sv = view::<f32>(&g, "scores")?;
    let mut out = unsafe { dev.alloc::<u32>(b * h * k * expand) }?;
    let smem = n * 4;
    let f = func!(dev, "tw_top_indices", smem);
    let mut a = f.builder();
    a.arg(&sv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        i32_of(n, "row length")?,
        k as i32,
        i32_of(expand, "expand")?,
        i32_of(valid_len.min(i32::MAX as usize), "valid_len")?
    );
    unsafe { a.launch(launch_config(WHAT, (b * h, 1), 1024, smem)?) }.w()?;
    Ok(wrap_slice(out, &dev, (b, h, k * expand)))
}

/// Dynamic shared memory of the fused kernels is kept below this, so that two blocks of 1024
/// threads can share an SM at the sizes of the benchmarks; larger problems take the staged path.
const FUSED_SMEM: usize = 160 * 1024;

/// The Quest selection in one kernel per `(batch, kv head)` (page scores of the group's query
/// heads in shared memory, radix select of the top `keep` pages, expansion to token ids): the
/// same result as `top_indices(page_scores(q), keep, page_size, len)`. `None` where it does not
/// fit (group above [`MAX_GROUP`], or the scores above [`FUSED_SMEM`]). `pinned` = (sink pages,
/// recent pages) always kept (scored `+inf`).
pub(crate) fn quest_select(
    cache: &TwilightCache,
    q: &Tensor,
    keep: usize,
    pinned: (usize, usize),
) -> Result<Option<Tensor>> {
    float_dispatch!(q.dtype(), quest_select_t, cache, q, keep, pinned)
}

fn quest_select_t<T: CudaDType + DeviceRepr>(
    cache: &TwilightCache,
    q: &Tensor,
    keep: usize,
    (sink, recent): (usize, usize),
) -> Result<Option<Tensor>> {
    let dev = cuda_device(q)?;
    let (b, hq, d) = q.dims3()?;
    let (hkv, np, ps) = (cache.kv_heads(), cache.num_pages(), cache.page_size());
    let group = hq / hkv;
    let smem = group * (d + np + keep) * 4;
    if group > MAX_GROUP || smem > FUSED_SMEM || keep == 0 || keep > np {
        return Ok(None);
    }
    let pcap = cache.page_min().dim(2)?;
    let (gq, gmin, gmax) = (
        q.storage_and_layout(),
        cache.page_min().storage_and_layout(),
        cache.page_max().storage_and_layout(),
    );
    let (qv, minv, maxv) = (
        view::<T>(&gq, "q")?,
        buffer::<T>(&gmin, "page_min")?,
        buffer::<T>(&gmax, "page_max")?,
    );
    let width = keep * ps;
    let mut out = unsafe { dev.alloc::<u32>(b * hq * width) }?;
    let f = func!(
        dev,
        &format!("tw_quest_select_{}_d{d}", dtype_suffix(q.dtype(), WHAT)?),
        smem
    );
    let mut a = f.builder();
    a.arg(&qv);
    a.arg(&minv);
    a.arg(&maxv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        i32_of(hq, "heads")?,
        hkv as i32,
        i32_of(pcap, "pages")?,
        np as i32,
        keep as i32,
        i32_of(ps, "page size")?,
        i32_of(cache.len(), "len")?,
        sink.min(np) as i32,
        recent.min(np) as i32
    );
    unsafe { a.launch(launch_config(WHAT, (b * hkv, 1), 1024, smem)?) }.w()?;
    Ok(Some(wrap_slice(out, &dev, (b, hq, width))))
}

/// See [`super::estimate_scores`].
pub(crate) fn estimate_scores(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    float_dispatch!(q.dtype(), estimate_t, cache, q, candidates, scale)
}

fn estimate_t<T: CudaDType + DeviceRepr>(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (b, hq, d) = q.dims3()?;
    let n = candidates.dim(2)?;
    let (gq, gc, gcodes, gsm) = (
        q.storage_and_layout(),
        candidates.storage_and_layout(),
        cache.k_codes().storage_and_layout(),
        cache.k_scale_min().storage_and_layout(),
    );
    let (qv, cv, codes, sm) = (
        view::<T>(&gq, "q")?,
        view::<u32>(&gc, "candidates")?,
        buffer::<u8>(&gcodes, "k_codes")?,
        buffer::<f16>(&gsm, "k_scale_min")?,
    );
    let mut out = unsafe { dev.alloc::<f32>(b * hq * n) }?;
    let f = func!(
        dev,
        &format!("tw_estimate_{}_d{d}", dtype_suffix(q.dtype(), WHAT)?),
        0
    );
    let mut a = f.builder();
    a.arg(&qv);
    a.arg(&codes);
    a.arg(&sm);
    a.arg(&cv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        hq as i32,
        cache.kv_heads() as i32,
        i32_of(cache.capacity(), "capacity")?,
        i32_of(cache.len(), "len")?,
        i32_of(n, "candidates")?,
        scale
    );
    unsafe { a.launch(launch_config(WHAT, (n.div_ceil(256), b * hq), 256, 0)?) }.w()?;
    Ok(wrap_slice(out, &dev, (b, hq, n)))
}

/// See [`super::top_p`].
pub(crate) fn top_p(est: &Tensor, candidates: &Tensor, p: f32) -> Result<Tensor> {
    let dev = cuda_device(est)?;
    let (b, h, n) = est.dims3()?;
    let (ge, gc) = (est.storage_and_layout(), candidates.storage_and_layout());
    let (ev, cv) = (view::<f32>(&ge, "est")?, view::<u32>(&gc, "candidates")?);
    let mut out = unsafe { dev.alloc::<u32>(b * h * n) }?;
    let smem = n * 4;
    let f = func!(dev, "tw_top_p", smem);
    let mut a = f.builder();
    a.arg(&ev);
    a.arg(&cv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        i32_of(n, "row length")?,
        p,
        TOP_P_EPS,
        TOP_P_MAX_ITERS as i32
    );
    unsafe { a.launch(launch_config(WHAT, (b * h, 1), 1024, smem)?) }.w()?;
    Ok(wrap_slice(out, &dev, (b, h, n)))
}

/// Estimate, top-p and the GQA union in one kernel per `(batch, kv head)` (see
/// [`super::prune_and_union`]): `(kept, lists)`. `None` where it does not fit (group above
/// [`MAX_GROUP`], or the group's estimates plus the union bitmap above [`FUSED_SMEM`]).
pub(crate) fn prune_and_union(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
    p: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    float_dispatch!(q.dtype(), prune_t, cache, q, candidates, scale, p)
}

fn prune_t<T: CudaDType + DeviceRepr>(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
    p: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let dev = cuda_device(q)?;
    let (b, hq, d) = q.dims3()?;
    let (hkv, len) = (cache.kv_heads(), cache.len());
    let group = hq / hkv;
    let n = candidates.dim(2)?;
    let smem = (group * (d + n) + len.div_ceil(32)) * 4;
    if group > MAX_GROUP || smem > FUSED_SMEM {
        return Ok(None);
    }
    let width = 1 + (group * n).min(len);
    let (gq, gc, gcodes, gsm) = (
        q.storage_and_layout(),
        candidates.storage_and_layout(),
        cache.k_codes().storage_and_layout(),
        cache.k_scale_min().storage_and_layout(),
    );
    let (qv, cv, codes, sm) = (
        view::<T>(&gq, "q")?,
        view::<u32>(&gc, "candidates")?,
        buffer::<u8>(&gcodes, "k_codes")?,
        buffer::<f16>(&gsm, "k_scale_min")?,
    );
    let mut kept = unsafe { dev.alloc::<u32>(b * hq * n) }?;
    let mut lists = unsafe { dev.alloc::<u32>(b * hkv * width) }?;
    let f = func!(
        dev,
        &format!("tw_prune_union_{}_d{d}", dtype_suffix(q.dtype(), WHAT)?),
        smem
    );
    let mut a = f.builder();
    a.arg(&qv);
    a.arg(&codes);
    a.arg(&sm);
    a.arg(&cv);
    a.arg(&mut kept);
    a.arg(&mut lists);
    candle::builder_arg!(
        a,
        hq as i32,
        hkv as i32,
        i32_of(cache.capacity(), "capacity")?,
        i32_of(len, "len")?,
        i32_of(n, "candidates")?,
        i32_of(width, "list width")?,
        scale,
        p,
        TOP_P_EPS,
        TOP_P_MAX_ITERS as i32
    );
    unsafe { a.launch(launch_config(WHAT, (b * hkv, 1), 1024, smem)?) }.w()?;
    Ok(Some((
        wrap_slice(kept, &dev, (b, hq, n)),
        wrap_slice(lists, &dev, (b, hkv, width)),
    )))
}

/// See [`super::union_per_group`]: a zeroed `(b, kv_heads, len)` u8 bitmap, marked, then
/// compacted per row.
pub(crate) fn union_per_group(
    kept: &Tensor,
    kv_heads: usize,
    len: usize,
    cap: usize,
) -> Result<Tensor> {
    let dev = cuda_device(kept)?;
    let (b, hq, n) = kept.dims3()?;
    let g = kept.storage_and_layout();
    let kv = view::<u32>(&g, "kept")?;
    let mut bitmap = dev.alloc_zeros::<u8>(b * kv_heads * len)?;
    let width = 1 + cap;
    let mut lists = unsafe { dev.alloc::<u32>(b * kv_heads * width) }?;
    let total = b * hq * n;
    let f = func!(dev, "tw_union_mark", 0);
    let mut a = f.builder();
    a.arg(&kv);
    a.arg(&mut bitmap);
    candle::builder_arg!(
        a,
        total as i64,
        hq as i32,
        kv_heads as i32,
        i32_of(n, "kept")?,
        i32_of(len, "len")?
    );
    unsafe { a.launch(launch_config(WHAT, (total.div_ceil(256), 1), 256, 0)?) }.w()?;
    let f = func!(dev, "tw_union_compact", 0);
    let mut a = f.builder();
    a.arg(&bitmap);
    a.arg(&mut lists);
    candle::builder_arg!(a, len as i32, i32_of(width, "list width")?);
    unsafe { a.launch(launch_config(WHAT, (b * kv_heads, 1), 1024, 0)?) }.w()?;
    Ok(wrap_slice(lists, &dev, (b, kv_heads, width)))
}

/// See [`super::sparse_decode_attention`]: chunks of [`ATTN_CHUNK`] list entries (at most
/// [`ATTN_MAX_BLOCKS`] blocks per list, each looping over chunks), then a merge over the chunks of
/// each query head.
pub(crate) fn sparse_decode_attention(
    cache: &TwilightCache,
    q: &Tensor,
    lists: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    float_dispatch!(q.dtype(), attend_t, cache, q, lists, scale)
}

fn attend_t<T: CudaDType + DeviceRepr>(
    cache: &TwilightCache,
    q: &Tensor,
    lists: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (b, hq, d) = q.dims3()?;
    let hkv = cache.kv_heads();
    let group = hq / hkv;
    if group > MAX_GROUP {
        bail!("twilight (cuda): at most {MAX_GROUP} query heads per kv head, got q {:?} and {hkv} kv heads", q.dims())
    }
    let width = lists.dim(2)?;
    let nchunks = (width - 1).div_ceil(ATTN_CHUNK).max(1);
    let (gq, gl, gk, gv) = (
        q.storage_and_layout(),
        lists.storage_and_layout(),
        cache.k_buffer().storage_and_layout(),
        cache.v_buffer().storage_and_layout(),
    );
    let (qv, lv, kv, vv) = (
        view::<T>(&gq, "q")?,
        view::<u32>(&gl, "lists")?,
        buffer::<T>(&gk, "k")?,
        buffer::<T>(&gv, "v")?,
    );
    let mut part_o = unsafe { dev.alloc::<f32>(b * hq * nchunks * d) }?;
    let mut part_ml = unsafe { dev.alloc::<f32>(b * hq * nchunks * 2) }?;
    let tn = dtype_suffix(q.dtype(), WHAT)?;
    let smem = 4 * group * (d + 2) * 4;
    // The kernel holds `group.next_power_of_two()` query heads in registers.
    let g = group.next_power_of_two();
    let f = func!(dev, &format!("tw_attn_{tn}_d{d}_g{g}"), smem);
    let mut a = f.builder();
    a.arg(&qv);
    a.arg(&kv);
    a.arg(&vv);
    a.arg(&lv);
    a.arg(&mut part_o);
    a.arg(&mut part_ml);
    candle::builder_arg!(
        a,
        hq as i32,
        hkv as i32,
        i32_of(cache.capacity(), "capacity")?,
        i32_of(width, "list width")?,
        nchunks as i32,
        scale
    );
    let blocks = nchunks.min(ATTN_MAX_BLOCKS);
    unsafe { a.launch(launch_config(WHAT, (blocks, b * hkv), 128, smem)?) }.w()?;
    let mut out = unsafe { dev.alloc::<T>(b * hq * d) }?;
    let f = func!(dev, &format!("tw_merge_{tn}"), 0);
    let mut a = f.builder();
    a.arg(&part_o);
    a.arg(&part_ml);
    a.arg(&lv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        hq as i32,
        hkv as i32,
        width as i32,
        nchunks as i32,
        d as i32
    );
    unsafe { a.launch(launch_config(WHAT, (b * hq, 1), d, 0)?) }.w()?;
    Ok(wrap_slice(out, &dev, (b, hq, d)))
}
