//! CPU kernels of every Twilight stage (rayon over rows, f32 arithmetic). Inputs are contiguous
//! (checked); cache buffers are read in place.

use candle::{bail, DType, Device, Layout, Result, Storage, StorageRef, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{TwilightCache, NO_TOKEN, TOP_P_EPS, TOP_P_MAX_ITERS};

/// A tensor's storage guard and layout (keep it alive while its slice is used).
type Guard<'a> = (StorageRef<'a>, &'a Layout);

/// The contiguous CPU slice behind a guard.
fn slice<'a, T: WithDType>(g: &'a Guard<'_>, name: &str) -> Result<&'a [T]> {
    let (start, end) = match g.1.contiguous_offsets() {
        Some(o) => o,
        None => bail!("twilight (cpu): {name} must be contiguous, got {:?}", g.1),
    };
    match &*g.0 {
        Storage::Cpu(c) => Ok(&c.as_slice::<T>()?[start..end]),
        _ => bail!("twilight (cpu): {name} is not on the CPU"),
    }
}

/// Calls `$f::<T>` with `T` the Rust type of a float dtype.
macro_rules! float_dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => bail!("twilight (cpu): dtype {other:?} is not supported (f32, f16, bf16)"),
        }
    };
}

fn f<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}

/// See [`super::page_scores`].
pub(crate) fn page_scores(cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
    float_dispatch!(q.dtype(), page_scores_t, cache, q)
}

fn page_scores_t<T: WithDType>(cache: &TwilightCache, q: &Tensor) -> Result<Tensor> {
    let (b, hq, d) = q.dims3()?;
    let (hkv, pcap, np) = (
        cache.kv_heads(),
        cache.page_min().dim(2)?,
        cache.num_pages(),
    );
    let group = hq / hkv;
    let (gq, gmin, gmax) = (
        q.storage_and_layout(),
        cache.page_min().storage_and_layout(),
        cache.page_max().storage_and_layout(),
    );
    let (qs, mins, maxs) = (
        slice::<T>(&gq, "q")?,
        slice::<T>(&gmin, "page_min")?,
        slice::<T>(&gmax, "page_max")?,
    );
    let mut out = vec![0f32; b * hq * np];
    out.par_chunks_mut(np).enumerate().for_each(|(row, o)| {
        let base = (row / hq * hkv + row % hq / group) * pcap * d;
        let qr = &qs[row * d..(row + 1) * d];
        for (page, score) in o.iter_mut().enumerate() {
            let off = base + page * d;
            *score = (0..d)
                .map(|c| {
                    let qc = f(qr[c]);
                    (qc * f(maxs[off + c])).max(qc * f(mins[off + c]))
                })
                .sum();
        }
    });
    Tensor::from_vec(out, (b, hq, np), &Device::Cpu)
}

/// See [`super::top_indices`]: a stable sort by (score desc, index asc), NaN as `-inf`.
pub(crate) fn top_indices(
    scores: &Tensor,
    k: usize,
    expand: usize,
    valid_len: usize,
) -> Result<Tensor> {
    let (b, h, n) = scores.dims3()?;
    let g = scores.storage_and_layout();
    let s = slice::<f32>(&g, "scores")?;
    let width = k * expand;
    let mut out = vec![NO_TOKEN; b * h * width];
    out.par_chunks_mut(width).enumerate().for_each(|(row, o)| {
        let r = &s[row * n..(row + 1) * n];
        let key = |i: usize| {
            if r[i].is_nan() {
                f32::NEG_INFINITY
            } else {
                r[i]
            }
        };
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&x, &y| key(y).total_cmp(&key(x)));
        let mut top = idx[..k].to_vec();
        top.sort_unstable();
        for (slot, &i) in top.iter().enumerate() {
            for j in 0..expand {
                let t = i * expand + j;
                if t < valid_len {
                    o[slot * expand + j] = t as u32;
                }
            }
        }
    });
    Tensor::from_vec(out, (b, h, width), &Device::Cpu)
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

fn estimate_t<T: WithDType>(
    cache: &TwilightCache,
    q: &Tensor,
    candidates: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (b, hq, d) = q.dims3()?;
    let n = candidates.dim(2)?;
    let (hkv, cap, len) = (cache.kv_heads(), cache.capacity(), cache.len());
    let group = hq / hkv;
    let (gq, gc, gcodes, gsm) = (
        q.storage_and_layout(),
        candidates.storage_and_layout(),
        cache.k_codes().storage_and_layout(),
        cache.k_scale_min().storage_and_layout(),
    );
    let (qs, cand, codes, sm) = (
        slice::<T>(&gq, "q")?,
        slice::<u32>(&gc, "candidates")?,
        slice::<u8>(&gcodes, "k_codes")?,
        slice::<f16>(&gsm, "k_scale_min")?,
    );
    let mut out = vec![f32::NEG_INFINITY; b * hq * n];
    out.par_chunks_mut(n).enumerate().for_each(|(row, o)| {
        let kv_row = (row / hq * hkv + row % hq / group) * cap;
        let qr: Vec<f32> = qs[row * d..(row + 1) * d].iter().map(|&x| f(x)).collect();
        let qsum: f32 = qr.iter().sum();
        for (slot, est) in o.iter_mut().enumerate() {
            let t = cand[row * n + slot] as usize;
            if t >= len {
                continue;
            }
            let tok = kv_row + t;
            let packed = &codes[tok * d / 2..(tok + 1) * d / 2];
            let dot: f32 = packed
                .iter()
                .enumerate()
                .map(|(j, &byte)| {
                    qr[2 * j] * (byte & 15) as f32 + qr[2 * j + 1] * (byte >> 4) as f32
                })
                .sum();
            let (s, m) = (sm[2 * tok].to_f32(), sm[2 * tok + 1].to_f32());
            *est = scale * (s * dot + m * qsum);
        }
    });
    Tensor::from_vec(out, (b, hq, n), &Device::Cpu)
}

/// The top-p threshold of normalised weights `w` (see [`super::top_p`]): keep `{w > t}`.
pub(crate) fn top_p_threshold(w: &[f32], p: f32) -> f32 {
    let (mut lo, mut hi) = (0f32, w.iter().copied().fold(0f32, f32::max));
    for _ in 0..TOP_P_MAX_ITERS {
        let mid = 0.5 * (lo + hi);
        let (mut sum_gt, mut min_gt_lo, mut max_le_hi) = (0f32, hi, lo);
        for &x in w {
            if x > mid {
                sum_gt += x;
            }
            if x > lo {
                min_gt_lo = min_gt_lo.min(x);
            }
            if x <= hi {
                max_le_hi = max_le_hi.max(x);
            }
        }
        if max_le_hi - min_gt_lo <= TOP_P_EPS || mid <= lo || mid >= hi {
            break;
        }
        if sum_gt >= p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// See [`super::top_p`].
pub(crate) fn top_p(est: &Tensor, candidates: &Tensor, p: f32) -> Result<Tensor> {
    let (b, h, n) = est.dims3()?;
    let (ge, gc) = (est.storage_and_layout(), candidates.storage_and_layout());
    let (e, cand) = (slice::<f32>(&ge, "est")?, slice::<u32>(&gc, "candidates")?);
    let mut out = vec![NO_TOKEN; b * h * n];
    out.par_chunks_mut(n).enumerate().for_each(|(row, o)| {
        let (er, cr) = (&e[row * n..(row + 1) * n], &cand[row * n..(row + 1) * n]);
        let m = er.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            return;
        }
        if p >= 1.0 {
            for j in 0..n {
                if er[j] > f32::NEG_INFINITY {
                    o[j] = cr[j];
                }
            }
            return;
        }
        let mut w: Vec<f32> = er.iter().map(|&x| (x - m).exp()).collect();
        let sum: f32 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= sum);
        let t = top_p_threshold(&w, p);
        for j in 0..n {
            if w[j] > t {
                o[j] = cr[j];
            }
        }
    });
    Tensor::from_vec(out, (b, h, n), &Device::Cpu)
}

/// See [`super::union_per_group`]; entries past the count are [`NO_TOKEN`].
pub(crate) fn union_per_group(
    kept: &Tensor,
    kv_heads: usize,
    len: usize,
    cap: usize,
) -> Result<Tensor> {
    let (b, hq, n) = kept.dims3()?;
    let group = hq / kv_heads;
    let g = kept.storage_and_layout();
    let ids = slice::<u32>(&g, "kept")?;
    let mut out = vec![NO_TOKEN; b * kv_heads * (1 + cap)];
    out.par_chunks_mut(1 + cap)
        .enumerate()
        .for_each(|(row, o)| {
            let first = (row / kv_heads * hq + row % kv_heads * group) * n;
            let mut seen = vec![false; len];
            for &t in &ids[first..first + group * n] {
                if (t as usize) < len {
                    seen[t as usize] = true;
                }
            }
            let mut count = 0;
            for (t, _) in seen.iter().enumerate().filter(|(_, &s)| s) {
                count += 1;
                o[count] = t as u32;
            }
            o[0] = count as u32;
        });
    Tensor::from_vec(out, (b, kv_heads, 1 + cap), &Device::Cpu)
}

/// See [`super::sparse_decode_attention`].
pub(crate) fn sparse_decode_attention(
    cache: &TwilightCache,
    q: &Tensor,
    lists: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    float_dispatch!(q.dtype(), attend_t, cache, q, lists, scale)
}

fn attend_t<T: WithDType>(
    cache: &TwilightCache,
    q: &Tensor,
    lists: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (b, hq, d) = q.dims3()?;
    let (hkv, cap, len) = (cache.kv_heads(), cache.capacity(), cache.len());
    let (group, width) = (hq / hkv, lists.dim(2)?);
    let (gq, gl, gk, gv) = (
        q.storage_and_layout(),
        lists.storage_and_layout(),
        cache.k_buffer().storage_and_layout(),
        cache.v_buffer().storage_and_layout(),
    );
    let (qs, ls, ks, vs) = (
        slice::<T>(&gq, "q")?,
        slice::<u32>(&gl, "lists")?,
        slice::<T>(&gk, "k")?,
        slice::<T>(&gv, "v")?,
    );
    let mut out = vec![T::zero(); b * hq * d];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let kv = row / hq * hkv + row % hq / group;
        let list = &ls[kv * width..(kv + 1) * width];
        let ids: Vec<usize> = list[1..1 + (list[0] as usize).min(width - 1)]
            .iter()
            .map(|&t| t as usize)
            .filter(|&t| t < len)
            .collect();
        if ids.is_empty() {
            return;
        }
        let qr = &qs[row * d..(row + 1) * d];
        let row_of = |t: usize| (kv * cap + t) * d;
        let s: Vec<f32> = ids
            .iter()
            .map(|&t| {
                let kr = &ks[row_of(t)..row_of(t) + d];
                scale * (0..d).map(|c| f(qr[c]) * f(kr[c])).sum::<f32>()
            })
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
        let sum: f32 = w.iter().sum();
        for (c, oc) in o.iter_mut().enumerate() {
            let acc: f32 = ids
                .iter()
                .zip(&w)
                .map(|(&t, &wj)| wj * f(vs[row_of(t) + c]))
                .sum();
            *oc = T::from_f64((acc / sum) as f64);
        }
    });
    Tensor::from_vec(out, (b, hq, d), &Device::Cpu)
}
