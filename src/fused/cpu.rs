//! CPU kernels of the fused ops (f32 arithmetic whatever the storage dtype; rows in parallel).

use candle::{bail, CpuStorage, Layout, Result, WithDType};
use rayon::prelude::*;

use super::{rows_cols, AdamWUpdate, Heads};

/// Blocks of rows of the LayerNorm gain gradient (partial sums, added by the caller).
pub(super) const DGAIN_PARTS: usize = 16;

/// The contiguous typed slice behind a layout (`what` names the caller).
pub(super) fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => bail!("{what} (cpu): input must be contiguous, got {l:?}"),
    }
}

fn f<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}

fn t<T: WithDType>(x: f32) -> T {
    T::from_f64(x as f64)
}

/// Mean and `1/√(var + eps)` of a row.
fn stats<T: WithDType>(x: &[T], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = x.iter().map(|&v| f(v)).sum::<f32>() / c;
    let var = x.iter().map(|&v| (f(v) - mean).powi(2)).sum::<f32>() / c;
    (mean, 1.0 / (var + eps).sqrt())
}

pub(super) fn ln_fwd<T: WithDType>(
    (sx, lx): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
    eps: f32,
) -> Result<CpuStorage> {
    let (x, gain) = (
        slice::<T>(sx, lx, "layer_norm")?,
        slice::<T>(sg, lg, "layer_norm")?,
    );
    let c = rows_cols(lx).1;
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(yr, xr)| {
            let (mean, rstd) = stats(xr, eps);
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(gain) {
                *o = t((f(v) - mean) * rstd * f(g));
            }
        });
    Ok(T::to_cpu_storage_owned(y))
}

pub(super) fn ln_bwd_dx<T: WithDType>(
    (sx, lx): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
    (sd, ld): (&CpuStorage, &Layout),
    eps: f32,
) -> Result<CpuStorage> {
    let what = "layer_norm backward";
    let (x, gain, dy) = (
        slice::<T>(sx, lx, what)?,
        slice::<T>(sg, lg, what)?,
        slice::<T>(sd, ld, what)?,
    );
    let c = rows_cols(lx).1;
    let mut dx = vec![T::from_f64(0.0); x.len()];
    dx.par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
        .for_each(|(out, (xr, dr))| {
            let (mean, rstd) = stats(xr, eps);
            let (mut sg, mut sgx) = (0f32, 0f32);
            for ((&v, &d), &g) in xr.iter().zip(dr).zip(gain) {
                let gy = f(d) * f(g);
                sg += gy;
                sgx += gy * (f(v) - mean) * rstd;
            }
            let (sg, sgx) = (sg / c as f32, sgx / c as f32);
            for (((o, &v), &d), &g) in out.iter_mut().zip(xr).zip(dr).zip(gain) {
                let xh = (f(v) - mean) * rstd;
                *o = t(rstd * (f(d) * f(g) - sg - xh * sgx));
            }
        });
    Ok(T::to_cpu_storage_owned(dx))
}

/// `(DGAIN_PARTS, c)` partial sums of `dy · x̂` over blocks of rows.
pub(super) fn ln_bwd_dgain<T: WithDType>(
    (sx, lx): (&CpuStorage, &Layout),
    (sd, ld): (&CpuStorage, &Layout),
    eps: f32,
) -> Result<Vec<f32>> {
    let what = "layer_norm backward";
    let (x, dy) = (slice::<T>(sx, lx, what)?, slice::<T>(sd, ld, what)?);
    let (rows, c) = rows_cols(lx);
    let per = rows.div_ceil(DGAIN_PARTS).max(1);
    let mut out = vec![0f32; DGAIN_PARTS * c];
    out.par_chunks_mut(c).enumerate().for_each(|(p, acc)| {
        for r in (p * per).min(rows)..((p + 1) * per).min(rows) {
            let (xr, dr) = (&x[r * c..(r + 1) * c], &dy[r * c..(r + 1) * c]);
            let (mean, rstd) = stats(xr, eps);
            for ((a, &v), &d) in acc.iter_mut().zip(xr).zip(dr) {
                *a += f(d) * (f(v) - mean) * rstd;
            }
        }
    });
    Ok(out)
}

/// `√(2/π)` and the cubic coefficient of the tanh approximation of GELU.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_C * (x + GELU_A * x * x * x)).tanh())
}

/// The derivative of [`gelu`].
fn gelu_grad(x: f32) -> f32 {
    let th = (GELU_C * (x + GELU_A * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
}

pub(super) fn gelu_fwd<T: WithDType>((s, l): (&CpuStorage, &Layout)) -> Result<CpuStorage> {
    let x = slice::<T>(s, l, "gelu")?;
    Ok(T::to_cpu_storage_owned(
        x.par_iter().map(|&v| t(gelu(f(v)))).collect(),
    ))
}

pub(super) fn gelu_bwd<T: WithDType>(
    (sx, lx): (&CpuStorage, &Layout),
    (sd, ld): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let (x, dy) = (
        slice::<T>(sx, lx, "gelu backward")?,
        slice::<T>(sd, ld, "gelu backward")?,
    );
    Ok(T::to_cpu_storage_owned(
        x.par_iter()
            .zip(dy)
            .map(|(&v, &d)| t(f(d) * gelu_grad(f(v))))
            .collect(),
    ))
}

/// The `(vocab, c)` f32 table gradient: rows of `dy` summed by id.
pub(super) fn emb_bwd<T: WithDType>(
    (sd, ld): (&CpuStorage, &Layout),
    (si, li): (&CpuStorage, &Layout),
    vocab: usize,
) -> Result<Vec<f32>> {
    let what = "embedding backward";
    let (dy, ids) = (slice::<T>(sd, ld, what)?, slice::<u32>(si, li, what)?);
    let c = rows_cols(ld).1;
    let mut out = vec![0f32; vocab * c];
    for (&id, dr) in ids.iter().zip(dy.chunks(c)) {
        let Some(row) = out.get_mut(id as usize * c..(id as usize + 1) * c) else {
            bail!("{what}: id {id} is outside the vocabulary of {vocab}")
        };
        for (o, &d) in row.iter_mut().zip(dr) {
            *o += f(d);
        }
    }
    Ok(out)
}

/// Part `p` of `x` `(b, t, parts, h, d)` whose `(b, t)` rows are `ld` elements apart, as a
/// `(b, h, t, d)` vector.
fn split_part<T: WithDType>(x: &[T], n: Heads, ld: usize, p: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); n.b * n.h * n.t * n.d];
    out.par_chunks_mut(n.d).enumerate().for_each(|(r, row)| {
        let (ti, bh) = (r % n.t, r / n.t);
        let i = ((bh / n.h) * n.t + ti) * ld + (p * n.h + bh % n.h) * n.d;
        row.copy_from_slice(&x[i..i + n.d]);
    });
    out
}

pub(super) fn heads_split<T: WithDType>(
    (s, l): (&CpuStorage, &Layout),
    n: Heads,
) -> Result<CpuStorage> {
    let x = slice::<T>(s, l, "heads split")?;
    let out = split_part(x, n, n.parts * n.h * n.d, n.part);
    Ok(T::to_cpu_storage_owned(out))
}

pub(super) fn heads_merge<T: WithDType>(
    (s, l): (&CpuStorage, &Layout),
    n: Heads,
) -> Result<CpuStorage> {
    let dout = slice::<T>(s, l, "heads merge")?;
    let mut out = vec![T::from_f64(0.0); n.b * n.t * n.parts * n.h * n.d];
    out.par_chunks_mut(n.parts * n.h * n.d)
        .enumerate()
        .for_each(|(bt, row)| {
            let (bi, ti) = (bt / n.t, bt % n.t);
            for hi in 0..n.h {
                let src = ((bi * n.h + hi) * n.t + ti) * n.d;
                let dst = (n.part * n.h + hi) * n.d;
                row[dst..dst + n.d].copy_from_slice(&dout[src..src + n.d]);
            }
        });
    Ok(T::to_cpu_storage_owned(out))
}

/// The three parts of a `(b, t, 3, h, d)` tensor whose `(b, t)` rows are `ld` elements apart, as
/// `(b, h, t, d)` (see [`super::split_qkv`]).
pub(super) fn heads_split3<T: WithDType>(
    (s, l): (&CpuStorage, &Layout),
    n: Heads,
    ld: usize,
) -> Result<[CpuStorage; 3]> {
    let x = &s.as_slice::<T>()?[l.start_offset()..];
    Ok([0, 1, 2].map(|p| T::to_cpu_storage_owned(split_part(x, n, ld, p))))
}

/// `(b, t, 3, h, d)` from the three `(b, h, t, d)` parts, with the rows of `extra` `(b, t, e)`
/// appended when given (see [`super::merge_qkv_with`]).
pub(super) fn heads_merge3<T: WithDType>(
    parts: [(&CpuStorage, &Layout); 3],
    extra: Option<(&CpuStorage, &Layout)>,
    n: Heads,
) -> Result<CpuStorage> {
    let [q, k, v] = parts.map(|(s, l)| slice::<T>(s, l, "merge_qkv"));
    let srcs = [q?, k?, v?];
    let extra = extra
        .map(|(s, l)| slice::<T>(s, l, "merge_qkv"))
        .transpose()?;
    let qkv_width = 3 * n.h * n.d;
    let e = extra.map_or(0, |x| x.len() / (n.b * n.t).max(1));
    let width = qkv_width + e;
    let mut out = vec![T::from_f64(0.0); n.b * n.t * width];
    out.par_chunks_mut(width).enumerate().for_each(|(bt, row)| {
        let (bi, ti) = (bt / n.t, bt % n.t);
        for (pi, src) in srcs.iter().enumerate() {
            for hi in 0..n.h {
                let from = ((bi * n.h + hi) * n.t + ti) * n.d;
                let to = (pi * n.h + hi) * n.d;
                row[to..to + n.d].copy_from_slice(&src[from..from + n.d]);
            }
        }
        if let Some(x) = extra {
            row[qkv_width..].copy_from_slice(&x[bt * e..(bt + 1) * e]);
        }
    });
    Ok(T::to_cpu_storage_owned(out))
}

/// Per-row losses (f32) and the logit gradient (the logits' dtype) of
/// [`super::cross_entropy_with_grad`].
pub(super) fn xent<T: WithDType>(
    (sl, ll): (&CpuStorage, &Layout),
    (st, lt): (&CpuStorage, &Layout),
    grad_scale: f32,
) -> Result<(Vec<f32>, CpuStorage)> {
    let what = "cross_entropy_with_grad";
    let (logits, targets) = (slice::<T>(sl, ll, what)?, slice::<u32>(st, lt, what)?);
    let v = rows_cols(ll).1;
    if let Some(&bad) = targets.iter().find(|&&id| id as usize >= v) {
        bail!("{what}: target {bad} is outside the {v} classes of logits {ll:?}")
    }
    let mut losses = vec![0f32; targets.len()];
    let mut grad = vec![T::from_f64(0.0); logits.len()];
    losses
        .par_iter_mut()
        .zip(grad.par_chunks_mut(v).zip(logits.par_chunks(v)))
        .zip(targets.par_iter())
        .for_each(|((loss, (gr, row)), &target)| {
            let max = row.iter().map(|&x| f(x)).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&x| (f(x) - max).exp()).sum();
            *loss = sum.ln() + max - f(row[target as usize]);
            for (j, (g, &x)) in gr.iter_mut().zip(row).enumerate() {
                let p = (f(x) - max).exp() / sum - f32::from(j == target as usize);
                *g = t(p * grad_scale);
            }
        });
    Ok((losses, T::to_cpu_storage_owned(grad)))
}

/// `[param | m | v]` after one AdamW step (see [`super::adamw_update`]).
pub(super) fn adamw(
    (sp, lp): (&CpuStorage, &Layout),
    (ss, ls): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
    hp: &AdamWUpdate,
) -> Result<Vec<f32>> {
    let (p, s, g) = (
        slice::<f32>(sp, lp, "adamw")?,
        slice::<f32>(ss, ls, "adamw")?,
        slice::<f32>(sg, lg, "adamw")?,
    );
    let n = p.len();
    let mut out = vec![0f32; 3 * n];
    let (new_p, mv) = out.split_at_mut(n);
    let (new_m, new_v) = mv.split_at_mut(n);
    new_p
        .par_iter_mut()
        .zip(new_m.par_iter_mut().zip(new_v.par_iter_mut()))
        .enumerate()
        .for_each(|(i, (op, (om, ov)))| {
            let g = g[i] * hp.grad_scale;
            let m = hp.beta1 * s[i] + (1.0 - hp.beta1) * g;
            let v = hp.beta2 * s[n + i] + (1.0 - hp.beta2) * g * g;
            let update = (m * hp.scale_m) / ((v * hp.scale_v).sqrt() + hp.eps);
            *op = p[i] * (1.0 - hp.lr * hp.weight_decay) - hp.lr * update;
            *om = m;
            *ov = v;
        });
    Ok(out)
}
