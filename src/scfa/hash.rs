//! Hash-bucket attention pre-processing: seedable random rotations, angular LSH bucket ids and a
//! stable counting sort by (bucket, position).

use candle::backend::BackendStorage;
use candle::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::{RowKind, RowOrder};

/// Largest supported number of buckets (the CUDA counting sort keeps one counter per bucket in
/// shared memory).
pub const MAX_BUCKETS: usize = 8192;

/// Largest head dimension [`lsh_buckets`] accepts (the CUDA kernel stages rows in shared memory).
const MAX_LSH_HEAD_DIM: usize = 1024;

/// Random rotations for angular LSH: `(heads, head_dim, n_buckets / 2)` f32 on `device`, entries
/// drawn from N(0, 1) and every column (over `head_dim`) L2-normalised.
///
/// A pure function of `seed`, drawn on `device` itself (one kernel on CUDA, no host generator and
/// no copy; see [`super::random`]); the CPU and CUDA values agree up to the last bits of f64
/// `ln` / `cos`. `n_buckets` must be even, in `2..=`[`MAX_BUCKETS`].
pub fn random_rotations(
    heads: usize,
    head_dim: usize,
    n_buckets: usize,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    check_lsh_buckets(n_buckets)?;
    if heads == 0 || head_dim == 0 {
        bail!("random_rotations: heads ({heads}) and head_dim ({head_dim}) must be non-zero")
    }
    super::random::normalised_gaussian((heads, head_dim, n_buckets / 2), seed, device)
}

/// `n_buckets` for angular LSH: even, in `2..=MAX_BUCKETS`.
/// Checks a bucket count for [`crate::hash_sparse_attn`]: even and in `2..=`[`MAX_BUCKETS`].
pub fn check_lsh_buckets(n_buckets: usize) -> Result<()> {
    if n_buckets < 2 || !n_buckets.is_multiple_of(2) || n_buckets > MAX_BUCKETS {
        bail!("hash attention: n_buckets must be even and in 2..={MAX_BUCKETS}, got {n_buckets}")
    }
    Ok(())
}

/// Angular LSH bucket ids: `bucket = argmax([x·R, −x·R])`, ties to the lowest id.
///
/// - `x`: `(batch, heads, t, head_dim)` f32, f16 or bf16.
/// - `rotations`: `(rot_heads, head_dim, n_buckets / 2)` f32 on the device of `x`, with
///   `rot_heads` 1 (shared) or dividing `heads`: head `h` uses rotation `h / (heads / rot_heads)`,
///   so GQA query heads use the rotation of their kv head when `rot_heads` = kv heads.
/// - Returns `(batch, heads, t)` i32 in `[0, n_buckets)`. Dot products are accumulated in f32.
pub fn lsh_buckets(x: &Tensor, rotations: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 || !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "lsh_buckets: x must be (batch, heads, t, head_dim) f32/f16/bf16, got {:?} {:?}",
            x.dtype(),
            x.dims()
        )
    }
    let (_, heads, _, d) = x.dims4()?;
    if rotations.rank() != 3 || rotations.dtype() != DType::F32 {
        bail!(
            "lsh_buckets: rotations must be (rot_heads, head_dim, n_buckets / 2) f32, got {:?} {:?}",
            rotations.dtype(),
            rotations.dims()
        )
    }
    let (rot_heads, rd, half) = rotations.dims3()?;
    if rd != d || half == 0 || rot_heads == 0 || !heads.is_multiple_of(rot_heads) {
        bail!(
            "lsh_buckets: rotations {:?} do not fit x {:?}: expected (1 or a divisor of {heads}, {d}, n_buckets / 2 >= 1)",
            rotations.dims(),
            x.dims()
        )
    }
    if d > MAX_LSH_HEAD_DIM {
        bail!(
            "lsh_buckets: head_dim {d} of x {:?} exceeds {MAX_LSH_HEAD_DIM}",
            x.dims()
        )
    }
    if 2 * half > MAX_BUCKETS {
        bail!(
            "lsh_buckets: rotations {:?} give {} buckets, more than {MAX_BUCKETS}",
            rotations.dims(),
            2 * half
        )
    }
    if !rotations.device().same_device(x.device()) {
        bail!(
            "lsh_buckets: rotations are on {:?} but x is on {:?}",
            rotations.device().location(),
            x.device().location()
        )
    }
    x.contiguous()?
        .apply_op2_no_bwd(&rotations.contiguous()?, &Lsh)
}

/// The op behind [`lsh_buckets`]: inputs x and rotations, output `(batch, heads, t)` i32.
struct Lsh;

/// Argmax order: larger value first, then lower index.
#[inline]
fn better(v: f32, i: usize, best: f32, best_i: usize) -> bool {
    v > best || (v == best && i < best_i)
}

impl Lsh {
    fn cpu<T: Copy + Into<f32> + Sync>(x: &[T], rot: &[f32], dims: LshDims) -> Vec<i32> {
        let LshDims {
            t,
            heads,
            rot_heads,
            d,
            half,
        } = dims;
        let group = heads / rot_heads;
        x.par_chunks(d)
            .enumerate()
            .map(|(row, xr)| {
                let rh = (row / t) % heads / group;
                let r = &rot[rh * d * half..(rh + 1) * d * half];
                let xr: Vec<f32> = xr.iter().map(|&v| v.into()).collect();
                let (mut best, mut best_i) = (f32::NEG_INFINITY, 0usize);
                for c in 0..half {
                    let p: f32 = xr
                        .iter()
                        .enumerate()
                        .map(|(k, x)| x * r[k * half + c])
                        .sum();
                    if better(p, c, best, best_i) {
                        (best, best_i) = (p, c);
                    }
                    if better(-p, c + half, best, best_i) {
                        (best, best_i) = (-p, c + half);
                    }
                }
                best_i as i32
            })
            .collect()
    }
}

/// Sizes of one LSH call.
#[derive(Clone, Copy)]
struct LshDims {
    t: usize,
    heads: usize,
    rot_heads: usize,
    d: usize,
    half: usize,
}

impl CustomOp2 for Lsh {
    fn name(&self) -> &'static str {
        "scfa-lsh-buckets"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, heads, t, d) = lx.shape().dims4()?;
        let (rot_heads, _, half) = lr.shape().dims3()?;
        let dims = LshDims {
            t,
            heads,
            rot_heads,
            d,
            half,
        };
        let (rot, (xs, xe)) = match (sr, lr.contiguous_offsets(), lx.contiguous_offsets()) {
            (CpuStorage::F32(r), Some((rs, re)), Some(xo)) => (&r[rs..re], xo),
            _ => bail!("lsh_buckets: expected contiguous inputs and f32 rotations"),
        };
        let out = match sx {
            CpuStorage::F32(v) => Self::cpu(&v[xs..xe], rot, dims),
            CpuStorage::F16(v) => Self::cpu(&v[xs..xe], rot, dims),
            CpuStorage::BF16(v) => Self::cpu(&v[xs..xe], rot, dims),
            other => bail!("lsh_buckets: unsupported dtype {:?}", other.dtype()),
        };
        Ok((CpuStorage::I32(out), Shape::from((b, heads, t))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        sr: &candle::CudaStorage,
        lr: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use super::launch::view;
        use candle::cuda_backend::CudaStorageSlice as S;
        use half::{bf16, f16};

        let (b, heads, t, d) = lx.shape().dims4()?;
        let (rot_heads, _, half) = lr.shape().dims3()?;
        let dims = LshDims {
            t,
            heads,
            rot_heads,
            d,
            half,
        };
        let rot = view::<f32>(sr, lr, "rotations")?;
        let rows = b * heads * t;
        let off = lx.start_offset();
        let out = match &sx.slice {
            S::F32(_) => Self::cuda(sx, &view::<f32>(sx, lx, "x")?, off, &rot, rows, dims, "f32")?,
            S::F16(_) => Self::cuda(sx, &view::<f16>(sx, lx, "x")?, off, &rot, rows, dims, "f16")?,
            S::BF16(_) => Self::cuda(
                sx,
                &view::<bf16>(sx, lx, "x")?,
                off,
                &rot,
                rows,
                dims,
                "bf16",
            )?,
            _ => bail!("lsh_buckets: unsupported dtype {:?}", sx.dtype()),
        };
        Ok((out, Shape::from((b, heads, t))))
    }
}

#[cfg(feature = "cuda")]
impl Lsh {
    fn cuda<T>(
        s: &candle::CudaStorage,
        x: &candle::cuda_backend::cudarc::driver::CudaView<'_, T>,
        x_offset: usize,
        rot: &candle::cuda_backend::cudarc::driver::CudaView<'_, f32>,
        rows: usize,
        dims: LshDims,
        suffix: &str,
    ) -> Result<candle::CudaStorage> {
        use super::launch;
        use crate::cuda_launch::launch_config;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;

        const WARPS: usize = 8;
        const SHARED_LIMIT: usize = 48 * 1024;
        let dev = &s.device;
        let mut out = unsafe { dev.alloc::<i32>(rows) }?;
        if rows == 0 {
            return Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let LshDims {
            t,
            heads,
            rot_heads,
            d,
            half,
        } = dims;
        let group = (heads / rot_heads) as u32;
        // Head dims 64 and 128 with 16-byte aligned rows and a rotation head that fits in shared
        // memory: one thread per row, blocks of THREADS rows inside one (batch, head) sequence.
        let rot_bytes = d * half * std::mem::size_of::<f32>();
        if matches!(d, 64 | 128)
            && (x_offset * std::mem::size_of::<T>()).is_multiple_of(16)
            && rot_bytes <= SHARED_LIMIT
            && rows <= u32::MAX as usize
        {
            const THREADS: usize = 256;
            let seqs = rows / t;
            let tiles = t.div_ceil(THREADS);
            let name = format!("lsh_rows_{suffix}_d{d}");
            let f = dev.get_or_load_custom_func(&name, launch::MODULE, launch::PTX)?;
            let cfg = launch_config("lsh_buckets", (seqs * tiles, 1), THREADS, rot_bytes)?;
            let mut b = f.builder();
            b.arg(x);
            b.arg(rot);
            b.arg(&mut out);
            candle::builder_arg!(
                b,
                seqs as u32,
                t as u32,
                heads as u32,
                group,
                rot_heads as u32,
                half as u32,
                tiles as u32
            );
            unsafe { b.launch(cfg) }.w()?;
            return Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        // Lanes per row: the smallest power of two covering the columns (at most 32); the rest of
        // the warp takes further rows, as far as the staged rows fit in shared memory.
        let mut rows_per_warp = 32 / half.next_power_of_two().min(32);
        let staged = |r: usize| WARPS * r * d * std::mem::size_of::<f32>();
        while rows_per_warp > 1 && staged(rows_per_warp) > SHARED_LIMIT {
            rows_per_warp /= 2;
        }
        let name = format!("lsh_buckets_{suffix}");
        let f = dev.get_or_load_custom_func(&name, launch::MODULE, launch::PTX)?;
        let cfg = launch_config(
            "lsh_buckets",
            (rows.div_ceil(WARPS * rows_per_warp).min(1 << 20), 1),
            32 * WARPS,
            staged(rows_per_warp),
        )?;
        let mut b = f.builder();
        b.arg(x);
        b.arg(rot);
        b.arg(&mut out);
        candle::builder_arg!(
            b,
            rows as u64,
            t as u32,
            heads as u32,
            group,
            rot_heads as u32,
            d as u32,
            half as u32,
            rows_per_warp as u32
        );
        unsafe { b.launch(cfg) }.w()?;
        Ok(candle::CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Stable counting sort of every `(batch, head)` row set by (bucket, position).
///
/// - `ids`: `(batch, heads, t)` i32 bucket ids, expected in `[0, n_buckets)`.
/// - Returns a [`RowOrder`], all `(batch, heads, t)` i32: arranged row `r` of a `(batch, head)`
///   is original step `pos[r]` with bucket `bucket[r]`; buckets are non-decreasing and positions
///   increase inside a bucket; `inv[s]` is the arranged row of step `s`.
/// - Ids outside `[0, n_buckets)` are sorted last as padding rows (the padding position and
///   bucket of `kind`, `inv` = -1): such rows are dropped.
///
/// O(t + n_buckets) per row: histogram, exclusive scan, time-ordered scatter. No host sync; on
/// CUDA one block per `(batch, head)` with the counters in shared memory (up to 32 warps, each
/// counting then ranking its own consecutive segment of the row, ordered by a prefix over the
/// per-warp counts; fewer warps when many buckets leave no room for per-warp counters).
pub fn sort_by_bucket(ids: &Tensor, n_buckets: usize, kind: RowKind) -> Result<RowOrder> {
    if ids.dtype() != DType::I32 || ids.rank() != 3 {
        bail!(
            "sort_by_bucket: ids must be (batch, heads, t) i32, got {:?} {:?}",
            ids.dtype(),
            ids.dims()
        )
    }
    if n_buckets == 0 || n_buckets > MAX_BUCKETS {
        bail!("sort_by_bucket: n_buckets must be in 1..={MAX_BUCKETS}, got {n_buckets}")
    }
    if ids.dim(2)? >= i32::MAX as usize {
        bail!(
            "sort_by_bucket: sequence length of {:?} does not fit i32 positions",
            ids.dims()
        )
    }
    let packed = ids.contiguous()?.apply_op1_no_bwd(&BucketSort {
        n_buckets,
        pad_pos: kind.pad_pos(),
        pad_bucket: kind.pad_bucket(),
    })?;
    Ok(RowOrder {
        pos: packed.get(0)?,
        inv: packed.get(2)?,
        bucket: Some(packed.get(1)?),
    })
}

/// The op behind [`sort_by_bucket`]: output `(3, batch, heads, t)`: positions, ids, inverse.
struct BucketSort {
    n_buckets: usize,
    pad_pos: i32,
    pad_bucket: i32,
}

impl CustomOp1 for BucketSort {
    fn name(&self) -> &'static str {
        "scfa-bucket-sort"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let ids = match (s, l.contiguous_offsets()) {
            (CpuStorage::I32(v), Some((start, end))) => &v[start..end],
            _ => bail!("sort_by_bucket: ids must be contiguous i32, got {l:?}"),
        };
        let (b, h, t) = l.shape().dims3()?;
        let nb = self.n_buckets;
        let n = ids.len();
        let mut out = vec![0i32; 3 * n];
        if t > 0 {
            let (pos, rest) = out.split_at_mut(n);
            let (bkt, inv) = rest.split_at_mut(n);
            pos.par_chunks_mut(t)
                .zip(bkt.par_chunks_mut(t))
                .zip(inv.par_chunks_mut(t))
                .zip(ids.par_chunks(t))
                .for_each(|(((pos, bkt), inv), ids)| {
                    let slot = |id: i32| usize::try_from(id).ok().filter(|&i| i < nb).unwrap_or(nb);
                    let mut offsets = vec![0usize; nb + 1];
                    ids.iter().for_each(|&id| offsets[slot(id)] += 1);
                    let mut acc = 0;
                    for o in offsets.iter_mut() {
                        (*o, acc) = (acc, acc + *o);
                    }
                    for (i, &id) in ids.iter().enumerate() {
                        let s = slot(id);
                        let dst = offsets[s];
                        offsets[s] += 1;
                        (pos[dst], bkt[dst], inv[i]) = if s < nb {
                            (i as i32, id, dst as i32)
                        } else {
                            (self.pad_pos, self.pad_bucket, -1)
                        };
                    }
                });
        }
        Ok((CpuStorage::I32(out), Shape::from((3, b, h, t))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use super::launch::{self, view};
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;

        /// Shared memory the sort may use (the default per-block limit).
        const SHARED_LIMIT: usize = 48 * 1024;
        let (b, h, t) = l.shape().dims3()?;
        let dev = &s.device;
        let ids = view::<i32>(s, l, "bucket ids")?;
        let rows = b * h;
        let mut out = unsafe { dev.alloc::<i32>(3 * rows * t) }?;
        if rows > 0 && t > 0 {
            let f = dev.get_or_load_custom_func("bucket_sort", launch::MODULE, launch::PTX)?;
            // Running offsets, plus per-warp counters when more than one warp ranks steps.
            let slot_bytes = (self.n_buckets + 1) * std::mem::size_of::<i32>();
            let warps = (SHARED_LIMIT / slot_bytes).saturating_sub(1).clamp(1, 32);
            let shared = if warps > 1 {
                (warps + 1) * slot_bytes
            } else {
                slot_bytes
            };
            let mut builder = f.builder();
            builder.arg(&ids);
            builder.arg(&mut out);
            candle::builder_arg!(
                builder,
                rows as u32,
                t as u32,
                self.n_buckets as u32,
                self.pad_pos,
                self.pad_bucket
            );
            let cfg = launch::block_per_row(rows, 32 * warps as u32, shared as u32)?;
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((3, b, h, t)),
        ))
    }
}
