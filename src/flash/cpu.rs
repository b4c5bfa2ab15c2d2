//! CPU kernels of [`super::FlashAttn`]: online softmax over key blocks, f32 arithmetic whatever
//! the storage dtype, rayon over query rows (forward, dq) and key rows (dk, dv). No `N×N` buffer.

use std::borrow::Cow;

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, Layout, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{contiguous_slice, Dims, FlashAttnBwd};
use crate::mask::Visibility;

/// Visibility with its side tensors read into host memory.
pub(crate) enum HostVisibility {
    Full,
    /// Query row `i` sees key rows `j <= i + offset` (`offset = nk - nq`).
    Causal {
        offset: isize,
    },
    Sparse {
        q_pos: Vec<i32>,
        k_pos: Vec<i32>,
        buckets: Option<(Vec<i32>, Vec<i32>)>,
        strict: bool,
    },
}

impl HostVisibility {
    pub(crate) fn new(vis: &Visibility, dims: Dims) -> Result<Self> {
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<i32>();
        Ok(match vis {
            Visibility::Full => Self::Full,
            Visibility::Causal => Self::Causal {
                offset: dims.nk as isize - dims.nq as isize,
            },
            Visibility::Sparse(l) => Self::Sparse {
                q_pos: host(&l.q_pos)?,
                k_pos: host(&l.k_pos)?,
                buckets: match &l.buckets {
                    Some((qb, kb)) => Some((host(qb)?, host(kb)?)),
                    None => None,
                },
                strict: l.strict,
            },
        })
    }

    /// Visibility of one query row against the keys of its kv head.
    /// `qrow` indexes `(b, hq, nq)` flattened, `krow0` the first key of `(b, hkv, nk)` flattened.
    fn row(&self, qrow: usize, i: usize, krow0: usize, nk: usize) -> RowVisibility<'_> {
        match self {
            Self::Full => RowVisibility::Prefix(nk),
            Self::Causal { offset } => {
                RowVisibility::Prefix((i as isize + offset + 1).clamp(0, nk as isize) as usize)
            }
            Self::Sparse {
                q_pos,
                k_pos,
                buckets,
                strict,
            } => RowVisibility::Sparse {
                q_pos: q_pos[qrow],
                k_pos: &k_pos[krow0..krow0 + nk],
                bucket: buckets
                    .as_ref()
                    .map(|(qb, kb)| (qb[qrow], &kb[krow0..krow0 + nk])),
                strict: *strict,
            },
        }
    }
}

/// Which keys one query row sees.
enum RowVisibility<'a> {
    /// Keys `0..n`.
    Prefix(usize),
    Sparse {
        q_pos: i32,
        k_pos: &'a [i32],
        bucket: Option<(i32, &'a [i32])>,
        strict: bool,
    },
}

impl RowVisibility<'_> {
    /// Number of key rows worth scanning (everything past it is invisible).
    fn end(&self) -> usize {
        match self {
            Self::Prefix(n) => *n,
            Self::Sparse { k_pos, .. } => k_pos.len(),
        }
    }

    #[inline]
    fn sees(&self, j: usize) -> bool {
        match self {
            Self::Prefix(n) => j < *n,
            Self::Sparse {
                q_pos,
                k_pos,
                bucket,
                strict,
            } => {
                let kp = k_pos[j];
                let causal = if *strict { *q_pos > kp } else { *q_pos >= kp };
                causal && bucket.is_none_or(|(qb, kb)| qb == kb[j])
            }
        }
    }
}

/// A storage's contiguous data as f32 (borrowed when it already is f32).
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<Cow<'a, [f32]>> {
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(contiguous_slice(v, l, name)?),
        CpuStorage::F16(v) => Cow::Owned(
            contiguous_slice(v, l, name)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        ),
        CpuStorage::BF16(v) => Cow::Owned(
            contiguous_slice(v, l, name)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        ),
        other => bail!(
            "flash attention: {name} has unsupported dtype {:?}",
            other.dtype()
        ),
    })
}

/// f32 results back in the dtype of `like`.
fn from_f32(v: Vec<f32>, like: &CpuStorage) -> Result<CpuStorage> {
    Ok(match like {
        CpuStorage::F32(_) => CpuStorage::F32(v),
        CpuStorage::F16(_) => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        other => bail!("flash attention: unsupported dtype {:?}", other.dtype()),
    })
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Row `r` of a row-major matrix with rows of length `d`.
#[inline]
fn row(x: &[f32], r: usize, d: usize) -> &[f32] {
    &x[r * d..(r + 1) * d]
}

/// Forward: returns the output (input dtype) and the log-sum-exp per query row (`-inf` when no
/// key is visible; such rows output 0).
pub(crate) fn forward(
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
    dims: Dims,
    scale: f32,
    visibility: &Visibility,
) -> Result<(CpuStorage, Vec<f32>)> {
    let (q, k, v) = (
        as_f32(sq, lq, "q")?,
        as_f32(sk, lk, "k")?,
        as_f32(sv, lv, "v")?,
    );
    let vis = HostVisibility::new(visibility, dims)?;
    let Dims { hq, nq, nk, d, .. } = dims;
    let group = dims.group();
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; dims.b * hq * nq];
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(qrow, (o, lse))| {
            let (bh, i) = (qrow / nq, qrow % nq);
            let krow0 = (bh / hq * dims.hkv + bh % hq / group) * nk;
            let rv = vis.row(qrow, i, krow0, nk);
            let qi = row(&q, qrow, d);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            for j in 0..rv.end() {
                if !rv.sees(j) {
                    continue;
                }
                let s = scale * dot(qi, row(&k, krow0 + j, d));
                let vj = row(&v, krow0 + j, d);
                if s > m {
                    let alpha = (m - s).exp();
                    l = l * alpha + 1.0;
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o = *o * alpha + v);
                    m = s;
                } else {
                    let p = (s - m).exp();
                    l += p;
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                }
            }
            if l > 0.0 {
                o.iter_mut().for_each(|o| *o /= l);
                *lse = m + l.ln();
            }
        });
    Ok((from_f32(out, sq)?, lse))
}

/// Backward: returns `[dq | dk | dv]` flattened, in the input dtype.
pub(crate) fn backward(
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
    dims: Dims,
    op: &FlashAttnBwd,
) -> Result<CpuStorage> {
    let (q, k, v) = (
        as_f32(sq, lq, "q")?,
        as_f32(sk, lk, "k")?,
        as_f32(sv, lv, "v")?,
    );
    let to_f32 = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_dtype(candle::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let (o, g, lse) = (to_f32(&op.out)?, to_f32(&op.grad_out)?, to_f32(&op.lse)?);
    let vis = HostVisibility::new(&op.visibility, dims)?;
    let Dims {
        hq, hkv, nq, nk, d, ..
    } = dims;
    let group = dims.group();
    let scale = op.scale;
    let delta: Vec<f32> = (0..lse.len())
        .into_par_iter()
        .map(|r| dot(row(&o, r, d), row(&g, r, d)))
        .collect();
    let krow0_of = |qrow: usize| {
        let bh = qrow / nq;
        (bh / hq * hkv + bh % hq / group) * nk
    };
    // P_ij and dS_ij of one visible pair.
    let p_ds = |qrow: usize, krow: usize| {
        let s = scale * dot(row(&q, qrow, d), row(&k, krow, d));
        let p = (s - lse[qrow]).exp();
        let dp = dot(row(&g, qrow, d), row(&v, krow, d));
        (p, p * (dp - delta[qrow]))
    };

    let mut dq = vec![0f32; q.len()];
    dq.par_chunks_mut(d).enumerate().for_each(|(qrow, dq)| {
        if lse[qrow] == f32::NEG_INFINITY {
            return;
        }
        let krow0 = krow0_of(qrow);
        let rv = vis.row(qrow, qrow % nq, krow0, nk);
        for j in (0..rv.end()).filter(|&j| rv.sees(j)) {
            let (_, ds) = p_ds(qrow, krow0 + j);
            let kj = row(&k, krow0 + j, d);
            dq.iter_mut()
                .zip(kj)
                .for_each(|(a, k)| *a += scale * ds * k);
        }
    });

    let mut dkv = vec![0f32; 2 * k.len()];
    let (dk, dv) = dkv.split_at_mut(k.len());
    dk.par_chunks_mut(d)
        .zip(dv.par_chunks_mut(d))
        .enumerate()
        .for_each(|(krow, (dk, dv))| {
            let (bhk, j) = (krow / nk, krow % nk);
            let (b, hk) = (bhk / hkv, bhk % hkv);
            let krow0 = bhk * nk;
            for h in hk * group..(hk + 1) * group {
                for i in 0..nq {
                    let qrow = (b * hq + h) * nq + i;
                    if lse[qrow] == f32::NEG_INFINITY {
                        continue;
                    }
                    let rv = vis.row(qrow, i, krow0, nk);
                    if j >= rv.end() || !rv.sees(j) {
                        continue;
                    }
                    let (p, ds) = p_ds(qrow, krow);
                    let (qi, gi) = (row(&q, qrow, d), row(&g, qrow, d));
                    dv.iter_mut().zip(gi).for_each(|(a, g)| *a += p * g);
                    dk.iter_mut()
                        .zip(qi)
                        .for_each(|(a, q)| *a += scale * ds * q);
                }
            }
        });
    dq.extend_from_slice(&dkv);
    from_f32(dq, sq)
}
