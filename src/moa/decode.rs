//! MoA decode attention (spec §6): one query token per sequence against every kv head's sink and
//! ring in a [`MoaCache`], all heads of a layer in one call. No mask and no positions: the cache
//! holds exactly the visible tokens.

use candle::{bail, DType, Device, Layout, Result, Storage, StorageRef, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::cache::MoaCache;

/// Decode attention with the default scale `1/sqrt(head_dim)`; see [`moa_decode_scaled`].
pub fn moa_decode(q: &Tensor, cache: &MoaCache) -> Result<Tensor> {
    moa_decode_scaled(q, cache, 1.0 / (cache.head_dim() as f32).sqrt())
}

/// `o = softmax(scale · q Kᵀ) V` per query head over the `valid_h` tokens its kv head holds (the
/// sink plus the newest `band_h` positions, the current one included: append it first).
///
/// - `q`: `(batch, q_heads, 1, head_dim)` in the cache dtype, on its device; `q_heads` a multiple
///   of the cache's kv heads (GQA: the group shares its kv head's span). CUDA serves groups of at
///   most 8 query heads per kv head.
/// - Returns `(batch, q_heads, 1, head_dim)` in the cache dtype (f32 accumulation).
///
/// CUDA: one launch over all heads, split over the slots in `cache.chunk()`-slot work items (each
/// reads its K/V once for the whole group), then a log-sum-exp merge per query head. CPU: rayon
/// over (batch, query head).
pub fn moa_decode_scaled(q: &Tensor, cache: &MoaCache, scale: f32) -> Result<Tensor> {
    let q3 = check_query(q, cache)?;
    if !scale.is_finite() {
        bail!("moa decode: scale must be finite, got {scale}")
    }
    let (b, hq, d) = q3.dims3()?;
    let out = match cache.device() {
        Device::Cpu => match q.dtype() {
            DType::F32 => decode_cpu::<f32>(&q3, cache, scale)?,
            DType::F16 => decode_cpu::<f16>(&q3, cache, scale)?,
            DType::BF16 => decode_cpu::<bf16>(&q3, cache, scale)?,
            other => bail!("moa decode: dtype {other:?} is not supported (f32, f16, bf16)"),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::decode(&q3, cache, scale)?,
        other => bail!("moa decode: device {:?} is not supported", other.location()),
    };
    out.reshape((b, hq, 1, d))
}

/// Validates a decode query against the cache; returns it as `(batch, q_heads, head_dim)`,
/// contiguous.
fn check_query(q: &Tensor, cache: &MoaCache) -> Result<Tensor> {
    let (b, h, d) = (cache.batch(), cache.kv_heads(), cache.head_dim());
    if cache.is_empty() {
        bail!("moa decode: the cache is empty; append the prompt first")
    }
    if q.dtype() != cache.dtype() || !q.device().same_device(cache.device()) {
        bail!(
            "moa decode: q ({:?} on {:?}) must match the cache ({:?} on {:?})",
            q.dtype(),
            q.device().location(),
            cache.dtype(),
            cache.device().location()
        )
    }
    match q.dims() {
        &[qb, qh, 1, qd] if qb == b && qd == d && qh > 0 && qh % h == 0 => {}
        dims => bail!(
            "moa decode: q must be (batch, q_heads, 1, head_dim) = ({b}, k·{h}, 1, {d}) for this \
             cache (q heads a multiple of its {h} kv heads), got {dims:?}"
        ),
    }
    q.squeeze(2)?.contiguous()
}

/// The CPU kernel: rayon over (batch, query head), f32 scores and accumulation, the cache read in
/// place.
fn decode_cpu<T: WithDType>(q: &Tensor, cache: &MoaCache, scale: f32) -> Result<Tensor> {
    let (b, hq, d) = q.dims3()?;
    let group = hq / cache.kv_heads();
    let total = *cache
        .starts()
        .last()
        .expect("starts has kv_heads + 1 entries");
    let (starts, valid) = (cache.starts(), cache.valid());
    let (gq, gk, gv) = (
        q.storage_and_layout(),
        cache.k_buffer().storage_and_layout(),
        cache.v_buffer().storage_and_layout(),
    );
    let qs = cpu_slice::<T>(&gq, "q")?;
    let ks = cpu_slice::<T>(&gk, "k")?;
    let vs = cpu_slice::<T>(&gv, "v")?;
    let mut out = vec![T::zero(); b * hq * d];
    out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
        let (bi, h) = (r / hq, r % hq / group);
        let qf: Vec<f32> = qs[r * d..(r + 1) * d]
            .iter()
            .map(|&x| x.to_f64() as f32 * scale)
            .collect();
        let rows = (bi * total + starts[h])..(bi * total + starts[h] + valid[h]);
        let scores: Vec<f32> = rows
            .clone()
            .map(|t| {
                let k = &ks[t * d..(t + 1) * d];
                qf.iter().zip(k).map(|(a, &b)| a * b.to_f64() as f32).sum()
            })
            .collect();
        let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut acc = vec![0f32; d];
        let mut sum = 0f32;
        for (t, s) in rows.zip(&scores) {
            let p = (s - mx).exp();
            sum += p;
            for (a, &x) in acc.iter_mut().zip(&vs[t * d..(t + 1) * d]) {
                *a += p * x.to_f64() as f32;
            }
        }
        for (o, a) in o.iter_mut().zip(&acc) {
            *o = T::from_f64((a / sum) as f64);
        }
    });
    Tensor::from_vec(out, (b, hq, d), &Device::Cpu)
}

/// The contiguous CPU slice behind a storage guard.
fn cpu_slice<'a, T: WithDType>(g: &'a (StorageRef<'_>, &Layout), name: &str) -> Result<&'a [T]> {
    let Some((s, e)) = g.1.contiguous_offsets() else {
        bail!("moa decode (cpu): {name} must be contiguous, got {:?}", g.1)
    };
    match &*g.0 {
        Storage::Cpu(c) => Ok(&c.as_slice::<T>()?[s..e]),
        _ => bail!("moa decode (cpu): {name} is not on the CPU"),
    }
}
