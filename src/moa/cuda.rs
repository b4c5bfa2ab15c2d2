//! CUDA launch side of the MoA decode cache and attention (kernels in `cuda/moa_decode.cu`).
//! Everything runs on candle's stream; nothing is copied to the host.

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaStorage, DType, Layout, Result, Storage, StorageRef, Tensor};
use half::{bf16, f16};

use super::cache::MoaCache;
use crate::cuda_launch::{contiguous_view, launch_config, load_kernel, wrap_slice};
use crate::kernels;

/// Module name of `cuda/moa_decode.cu`'s PTX in candle's custom-module cache.
const MODULE: &str = "candle_sparse_attn::moa_decode";
/// Warps per attention block (`NWARPS` in the .cu file).
const WARPS: usize = 4;
/// Query-head group sizes the attention kernel is instantiated for.
const GROUPS: [usize; 4] = [1, 2, 4, 8];

/// The in-place scatter of one decode step (see `AppendRow` in the cache module): K or V rows
/// `(batch, kv_heads, 1, d)` into the cache buffer `(batch, total, d)` at position `pos`.
pub(crate) fn append_row(
    cache: &mut CudaStorage,
    lc: &Layout,
    rows: &CudaStorage,
    lr: &Layout,
    meta: &CudaStorage,
    lm: &Layout,
    pos: usize,
) -> Result<()> {
    const WHAT: &str = "moa cache append";
    if lc.start_offset() != 0 || !lc.is_contiguous() {
        bail!("{WHAT} (cuda): the cache buffer must be contiguous from offset 0, got {lc:?}")
    }
    let (total, d, hkv) = (lc.dims()[1], lc.dims()[2], lr.dims()[1]);
    let b = lc.dims()[0];
    let dev = cache.device().clone();
    let mv = contiguous_view::<u32>(meta, lm, WHAT, "meta")?;
    let name = match cache.dtype() {
        DType::F32 => "moa_append_u32",
        DType::F16 | DType::BF16 => "moa_append_u16",
        other => bail!("{WHAT} (cuda): dtype {other:?} is not supported (f32, f16, bf16)"),
    };
    if rows.dtype() != cache.dtype() {
        bail!(
            "{WHAT} (cuda): rows {:?} and cache {:?} differ",
            rows.dtype(),
            cache.dtype()
        )
    }
    let f = load_kernel!(dev, name, MODULE, kernels::MOA_DECODE, 0);
    let cfg = launch_config(WHAT, (b * hkv, 1), 128, 0)?;
    let args = (hkv as i32, total as i64, d as i32, pos as i64);
    macro_rules! go {
        ($t:ty) => {{
            let rv = contiguous_view::<$t>(rows, lr, WHAT, "rows")?;
            let cs = cache.as_cuda_slice_mut::<$t>()?;
            let mut a = f.builder();
            a.arg(cs);
            a.arg(&rv);
            a.arg(&mv);
            candle::builder_arg!(a, args.0, args.1, args.2, args.3);
            unsafe { a.launch(cfg) }.w()?;
        }};
    }
    // The kernel moves raw 2- or 4-byte words.
    match cache.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        _ => go!(bf16),
    }
    Ok(())
}

/// See [`super::decode::moa_decode_scaled`]: `q` `(batch, q_heads, d)` contiguous, checked
/// against the cache. Returns `(batch, q_heads, d)`.
pub(crate) fn decode(q: &Tensor, cache: &MoaCache, scale: f32) -> Result<Tensor> {
    match q.dtype() {
        DType::F32 => decode_t::<f32>(q, cache, scale, "f32"),
        DType::F16 => decode_t::<f16>(q, cache, scale, "f16"),
        DType::BF16 => decode_t::<bf16>(q, cache, scale, "bf16"),
        other => bail!("moa decode (cuda): dtype {other:?} is not supported (f32, f16, bf16)"),
    }
}

fn decode_t<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    cache: &MoaCache,
    scale: f32,
    tn: &str,
) -> Result<Tensor> {
    const WHAT: &str = "moa decode";
    let (b, hq, d) = q.dims3()?;
    let hkv = cache.kv_heads();
    let group = hq / hkv;
    let Some(&g) = GROUPS.iter().find(|&&g| g >= group) else {
        bail!(
            "{WHAT} (cuda): at most {} query heads per kv head, got q {:?} and {hkv} kv heads",
            GROUPS[GROUPS.len() - 1],
            q.dims()
        )
    };
    let dev = match q.device() {
        candle::Device::Cuda(dev) => dev.clone(),
        other => bail!("{WHAT} (cuda): q is on {:?}", other.location()),
    };
    let total = *cache
        .starts()
        .last()
        .expect("starts has kv_heads + 1 entries");
    let n_items = *cache.item_offsets().last().expect("item offsets");
    let (gq, gk, gv, gm) = (
        q.storage_and_layout(),
        cache.k_buffer().storage_and_layout(),
        cache.v_buffer().storage_and_layout(),
        cache.meta().storage_and_layout(),
    );
    let (sq, sk, sv, sm) = (
        storage(&gq, "q")?,
        storage(&gk, "k")?,
        storage(&gv, "v")?,
        storage(&gm, "meta")?,
    );
    if gk.1.start_offset() != 0 || gv.1.start_offset() != 0 {
        bail!("{WHAT} (cuda): cache buffers must start at offset 0")
    }
    let qv = contiguous_view::<T>(sq, gq.1, WHAT, "q")?;
    let kv = contiguous_view::<T>(sk, gk.1, WHAT, "k")?;
    let vv = contiguous_view::<T>(sv, gv.1, WHAT, "v")?;
    let mv = contiguous_view::<u32>(sm, gm.1, WHAT, "meta")?;
    let lanes = lanes_per_key(d, std::mem::size_of::<T>());
    let streams = WARPS * 32 / lanes;
    let smem = streams * group * (d + 2) * 4;
    let mut part_o = unsafe { dev.alloc::<f32>(b * n_items * group * d) }?;
    let mut part_ml = unsafe { dev.alloc::<f32>(b * n_items * group * 2) }?;
    let name = format!("moa_decode_{tn}_d{d}_g{g}");
    let f = load_kernel!(dev, name, MODULE, kernels::MOA_DECODE, smem);
    let mut a = f.builder();
    a.arg(&qv);
    a.arg(&kv);
    a.arg(&vv);
    a.arg(&mv);
    a.arg(&mut part_o);
    a.arg(&mut part_ml);
    let len = cache.len() as i64;
    let chunk = cache.chunk() as i32;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    candle::builder_arg!(
        a,
        hq as i32,
        hkv as i32,
        total as i64,
        n_items as i32,
        len,
        chunk,
        scale_log2
    );
    unsafe { a.launch(launch_config(WHAT, (n_items, b), WARPS * 32, smem)?) }.w()?;
    let mut out = unsafe { dev.alloc::<T>(b * hq * d) }?;
    let f = load_kernel!(
        dev,
        format!("moa_merge_{tn}"),
        MODULE,
        kernels::MOA_DECODE,
        0
    );
    let mut a = f.builder();
    a.arg(&part_o);
    a.arg(&part_ml);
    a.arg(&mv);
    a.arg(&mut out);
    candle::builder_arg!(
        a,
        hq as i32,
        hkv as i32,
        n_items as i32,
        len,
        chunk,
        d as i32
    );
    unsafe { a.launch(launch_config(WHAT, (b * hq, 1), d, 0)?) }.w()?;
    Ok(wrap_slice(out, &dev, (b, hq, d)))
}

/// The CUDA storage behind a guard.
fn storage<'a>(g: &'a (StorageRef<'_>, &Layout), name: &str) -> Result<&'a CudaStorage> {
    match &*g.0 {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("moa decode (cuda): {name} is not on a CUDA device"),
    }
}

/// `lanes_per_key<T, D>()` of the .cu file: lanes sharing one key row.
fn lanes_per_key(d: usize, elem: usize) -> usize {
    let want = d / (16 / elem);
    let mut l = 1;
    while l * 2 <= want && l * 2 <= 32 {
        l *= 2;
    }
    l
}
