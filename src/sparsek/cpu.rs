//! CPU kernels of SparseK attention: the incremental selection (top-`K′` of each query's candidate
//! prefix, one insertion per query, exact τ by a sorted scan) and the forward / backward passes
//! over `window ∪ selected` keys, f32 arithmetic, rayon over kv heads.

use std::borrow::Cow;
use std::collections::BTreeSet;

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, Layout, Result};
use half::{bf16, f16};
use rayon::prelude::*;

use super::attn::Dims;
use super::scorer::ScoreDims;
use super::tau_sorted;

/// A candidate key ordered by `(score, position)`: equal scores rank the newer key higher.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ranked {
    u: f32,
    j: u32,
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.u.total_cmp(&other.u).then(self.j.cmp(&other.j))
    }
}

/// The selected candidates of every row `(b, kv_head, i)`: keys with `p > 0`, and their p.
#[derive(Clone, Debug, Default)]
pub(crate) struct HostSelection {
    /// Row `r` owns entries `offsets[r]..offsets[r + 1]`.
    pub offsets: Vec<usize>,
    /// Key positions (within the sequence).
    pub keys: Vec<u32>,
    /// SPARSEK weights `p ∈ (0, 1]`.
    pub weights: Vec<f32>,
}

impl HostSelection {
    /// `(key, p)` pairs of row `r`.
    pub fn row(&self, r: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let (a, b) = (self.offsets[r], self.offsets[r + 1]);
        self.keys[a..b]
            .iter()
            .zip(&self.weights[a..b])
            .map(|(&j, &p)| (j as usize, p))
    }
}

/// Selection for scores `u` laid out `(rows, t)` (rows = batch × kv heads): for each query `i`, the
/// top-`cap` candidates `j ≤ i − window` by `(u_j, j)`, SPARSEK with budget `k` over them.
pub(crate) fn select(u: &[f32], t: usize, k: usize, window: usize, cap: usize) -> HostSelection {
    let per_head: Vec<HostSelection> = u
        .par_chunks(t)
        .map(|u| {
            let mut sel = HostSelection {
                offsets: vec![0],
                ..Default::default()
            };
            let mut top: BTreeSet<Ranked> = BTreeSet::new();
            let mut z: Vec<f64> = Vec::with_capacity(cap);
            for i in 0..t {
                if i + 1 > window {
                    let j = i - window;
                    top.insert(Ranked {
                        u: u[j] + 0.0,
                        j: j as u32,
                    });
                    if top.len() > cap {
                        top.pop_first();
                    }
                }
                z.clear();
                z.extend(top.iter().rev().map(|r| r.u as f64));
                let tau = tau_sorted(&z, k as f64);
                for r in top.iter().rev() {
                    let p = match tau {
                        None => 1.0,
                        Some(tau) => (r.u as f64 - tau).clamp(0.0, 1.0) as f32,
                    };
                    if p > 0.0 {
                        sel.keys.push(r.j);
                        sel.weights.push(p);
                    }
                }
                sel.offsets.push(sel.keys.len());
            }
            sel
        })
        .collect();
    let mut all = HostSelection {
        offsets: vec![0],
        ..Default::default()
    };
    for s in per_head {
        let base = all.keys.len();
        all.offsets.extend(s.offsets[1..].iter().map(|o| o + base));
        all.keys.extend(s.keys);
        all.weights.extend(s.weights);
    }
    all
}

/// A storage's contiguous data as f32 (borrowed when it already is f32).
pub(crate) fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<Cow<'a, [f32]>> {
    let range = match l.contiguous_offsets() {
        Some((a, b)) => a..b,
        None => bail!("sparsek: {name} must be contiguous, got {l:?}"),
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[range]),
        CpuStorage::F16(v) => Cow::Owned(v[range].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::BF16(v) => Cow::Owned(v[range].iter().map(|x| x.to_f32()).collect()),
        other => bail!("sparsek: {name} has unsupported dtype {:?}", other.dtype()),
    })
}

/// f32 results back in the dtype of `like`.
pub(crate) fn from_f32(v: Vec<f32>, like: &CpuStorage) -> Result<CpuStorage> {
    Ok(match like {
        CpuStorage::F32(_) => CpuStorage::F32(v),
        CpuStorage::F16(_) => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        other => bail!("sparsek: unsupported dtype {:?}", other.dtype()),
    })
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The keys query `i` attends to with their weights: window (weight 1), then the selection.
fn attended<'a>(
    sel: &'a HostSelection,
    sel_row: usize,
    i: usize,
    window: usize,
) -> impl Iterator<Item = (usize, f32)> + 'a {
    ((i + 1).saturating_sub(window)..=i)
        .filter(move |_| window > 0)
        .map(|j| (j, 1.0))
        .chain(sel.row(sel_row))
}

/// Forward: output `(b, hq, t, d)` f32 and the log-sum-exp per query row.
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &HostSelection,
    dims: Dims,
    window: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { hq, hkv, t, d, .. } = dims;
    let group = hq / hkv;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; q.len() / d];
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(qrow, (o, lse))| {
            let (bh, i) = (qrow / t, qrow % t);
            let bhk = bh / hq * hkv + bh % hq / group;
            let qi = &q[qrow * d..(qrow + 1) * d];
            let keys: Vec<(usize, f32)> = attended(sel, bhk * t + i, i, window).collect();
            let s: Vec<f32> = keys
                .iter()
                .map(|&(j, _)| scale * dot(qi, &k[(bhk * t + j) * d..][..d]))
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                return;
            }
            let l: f32 = s.iter().map(|x| (x - m).exp()).sum();
            for (&(j, w), &sj) in keys.iter().zip(&s) {
                let a = (sj - m).exp() / l * w;
                let vj = &v[(bhk * t + j) * d..][..d];
                o.iter_mut().zip(vj).for_each(|(o, v)| *o += a * v);
            }
            *lse = m + l.ln();
        });
    (out, lse)
}

/// Backward: `(dq, dk, dv, du)` in f32, laid out like q, k, v and u.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &HostSelection,
    out: &[f32],
    grad_out: &[f32],
    lse: &[f32],
    dims: Dims,
    window: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { hq, hkv, t, d, .. } = dims;
    let group = hq / hkv;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let mut du = vec![0f32; dims.b * hkv * t];
    dq.par_chunks_mut(group * t * d)
        .zip(dk.par_chunks_mut(t * d))
        .zip(dv.par_chunks_mut(t * d))
        .zip(du.par_chunks_mut(t))
        .enumerate()
        .for_each(|(bhk, (((dq, dk), dv), du))| {
            let k = &k[bhk * t * d..(bhk + 1) * t * d];
            let v = &v[bhk * t * d..(bhk + 1) * t * d];
            let bh0 = bhk / hkv * hq + bhk % hkv * group;
            for h in 0..group {
                for i in 0..t {
                    let qrow = (bh0 + h) * t + i;
                    let qi = &q[qrow * d..(qrow + 1) * d];
                    let go = &grad_out[qrow * d..(qrow + 1) * d];
                    let delta = dot(go, &out[qrow * d..(qrow + 1) * d]);
                    let dqi = &mut dq[(h * t + i) * d..(h * t + i + 1) * d];
                    // r_i and |S_i| of the SPARSEK backward, accumulated on the way.
                    let (mut r, mut n_s) = (0f32, 0usize);
                    for (j, w) in attended(sel, bhk * t + i, i, window) {
                        let kj = &k[j * d..(j + 1) * d];
                        let vj = &v[j * d..(j + 1) * d];
                        let a = (scale * dot(qi, kj) - lse[qrow]).exp();
                        let go_v = dot(go, vj);
                        let ds = a * (w * go_v - delta);
                        dqi.iter_mut()
                            .zip(kj)
                            .for_each(|(x, k)| *x += scale * ds * k);
                        dk[j * d..(j + 1) * d]
                            .iter_mut()
                            .zip(qi)
                            .for_each(|(x, q)| *x += scale * ds * q);
                        dv[j * d..(j + 1) * d]
                            .iter_mut()
                            .zip(go)
                            .for_each(|(x, g)| *x += a * w * g);
                        let is_candidate = j + window <= i;
                        if is_candidate && w > 0.0 && w < 1.0 {
                            let g_w = a * go_v;
                            du[j] += g_w;
                            r += g_w;
                            n_s += 1;
                        }
                    }
                    if n_s > 0 {
                        let mean = r / n_s as f32;
                        for (j, w) in sel.row(bhk * t + i) {
                            if w < 1.0 {
                                du[j] -= mean;
                            }
                        }
                    }
                }
            }
        });
    (dq, dk, dv, du)
}

/// Key scorer forward: `u[b, h, j] = x[b, j] · w[h] + δ[h]·(offset + j)` for `x` `(b·t, c)`, `w`
/// `(h, c)`, `δ` `(h)`: returns `u` `(b, h, t)` f32 (f32 arithmetic, rayon over rows of `u`).
pub(crate) fn score_forward(x: &[f32], w: &[f32], delta: &[f32], d: ScoreDims) -> Vec<f32> {
    let mut u = vec![0f32; d.b * d.h * d.t];
    u.par_chunks_mut(d.t).enumerate().for_each(|(bh, row)| {
        let (b, h) = (bh / d.h, bh % d.h);
        let wh = &w[h * d.c..(h + 1) * d.c];
        for (j, uj) in row.iter_mut().enumerate() {
            let xr = &x[(b * d.t + j) * d.c..][..d.c];
            *uj = dot(xr, wh) + delta[h] * (d.offset + j) as f32;
        }
    });
    u
}

/// Key scorer backward for `du` `(b, h, t)`: `dx = duᵀ · w` `(b·t, c)`, `dw = du · x` `(h, c)` and
/// `dδ[h] = Σ du[b, h, j]·(offset + j)` (f32 arithmetic).
pub(crate) fn score_backward(
    x: &[f32],
    w: &[f32],
    du: &[f32],
    d: ScoreDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = |b: usize, h: usize, j: usize| du[(b * d.h + h) * d.t + j];
    let mut dx = vec![0f32; d.b * d.t * d.c];
    dx.par_chunks_mut(d.c).enumerate().for_each(|(row, dxr)| {
        let (b, j) = (row / d.t, row % d.t);
        for h in 0..d.h {
            let gh = g(b, h, j);
            for (o, wv) in dxr.iter_mut().zip(&w[h * d.c..(h + 1) * d.c]) {
                *o += gh * wv;
            }
        }
    });
    let mut dw = vec![0f32; d.h * d.c];
    dw.par_chunks_mut(d.c).enumerate().for_each(|(h, dwr)| {
        for row in 0..d.b * d.t {
            let gh = g(row / d.t, h, row % d.t);
            for (o, xv) in dwr.iter_mut().zip(&x[row * d.c..(row + 1) * d.c]) {
                *o += gh * xv;
            }
        }
    });
    let ddelta = (0..d.h)
        .map(|h| {
            (0..d.b * d.t)
                .map(|row| g(row / d.t, h, row % d.t) * (d.offset + row % d.t) as f32)
                .sum()
        })
        .collect();
    (dx, dw, ddelta)
}
