//! The dense reference: attention with materialised scores, built from plain candle ops so that
//! candle's autograd differentiates it. Every test in the crate compares against it; pass f64 CPU
//! tensors to get an f64-accurate reference.

use candle::{DType, Device, Result, Tensor, D};

use crate::mask::{SinkBand, Visibility};

/// `softmax(scale · q kᵀ, masked) v` with an optional explicit mask.
///
/// - `q`: `(batch, q_heads, q_len, head_dim)`; `k`, `v`: `(batch, kv_heads, kv_len, head_dim)`,
///   `kv_heads` dividing `q_heads` (each kv head is repeated for its group).
/// - `mask`: `(batch, q_heads, q_len, kv_len)` u8, 1 where the query may attend; `None` = all.
/// - Rows with no visible key output exactly 0 (and get zero gradients), never NaN.
///
/// Computes in the dtype of its inputs, on their device.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, hq, _, _) = q.dims4()?;
    let v = repeat_kv(v, hq / v.dim(1)?)?;
    let (scores, max, sum) = softmax_parts(q, k, scale, mask)?;
    scores
        .broadcast_sub(&max)?
        .exp()?
        .broadcast_div(&sum)?
        .matmul(&v)
}

/// The log-sum-exp `(b, hq, nq, 1)` of the scaled, masked scores of [`attention`] (0 for rows that
/// see no key), differentiable in q and k.
pub fn log_sum_exp(q: &Tensor, k: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (_, max, sum) = softmax_parts(q, k, scale, mask)?;
    sum.log()? + max
}

/// Scaled masked scores, their detached row max (0 where a row sees nothing) and the row sums of
/// `exp(scores - max)` (1 where a row sees nothing).
fn softmax_parts(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, hq, _, _) = q.dims4()?;
    let k = repeat_kv(k, hq / k.dim(1)?)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let neg_inf = Tensor::full(f64::NEG_INFINITY, scores.shape(), scores.device())?
        .to_dtype(scores.dtype())?;
    let scores = match mask {
        Some(m) => m.where_cond(&scores, &neg_inf)?,
        None => scores,
    };
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let max = max
        .eq(f64::NEG_INFINITY)?
        .where_cond(&max.zeros_like()?, &max)?;
    let sum = scores.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    let sum = sum.eq(0.0)?.where_cond(&sum.ones_like()?, &sum)?;
    Ok((scores, max, sum))
}

/// Repeats every kv head `n` times along the head axis: `(b, h, s, d)` → `(b, h·n, s, d)`.
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, h, n, s, d))?
        .reshape((b, h * n, s, d))
}

/// The explicit `(batch, q_heads, q_len, kv_len)` u8 mask equivalent to a [`Visibility`], on the CPU.
pub fn mask(
    visibility: &Visibility,
    (batch, q_heads, kv_heads, q_len, kv_len): (usize, usize, usize, usize, usize),
) -> Result<Tensor> {
    let group = q_heads / kv_heads;
    let mut m = vec![0u8; batch * q_heads * q_len * kv_len];
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<i32>();
    match visibility {
        Visibility::Full => m.fill(1),
        Visibility::Causal => {
            let offset = kv_len as isize - q_len as isize;
            for (r, row) in m.chunks_mut(kv_len).enumerate() {
                let i = (r % q_len) as isize;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = (j as isize <= i + offset) as u8;
                }
            }
        }
        Visibility::Sparse(l) => {
            let (qp, kp) = (host(&l.q_pos)?, host(&l.k_pos)?);
            let buckets = match &l.buckets {
                Some((qb, kb)) => Some((host(qb)?, host(kb)?)),
                None => None,
            };
            for (r, row) in m.chunks_mut(kv_len).enumerate() {
                let bh = r / q_len;
                let krow0 = (bh / q_heads * kv_heads + bh % q_heads / group) * kv_len;
                for (j, x) in row.iter_mut().enumerate() {
                    let causal = if l.strict {
                        qp[r] > kp[krow0 + j]
                    } else {
                        qp[r] >= kp[krow0 + j]
                    };
                    let same = buckets
                        .as_ref()
                        .is_none_or(|(qb, kb)| qb[r] == kb[krow0 + j]);
                    *x = (causal && same) as u8;
                }
            }
        }
        Visibility::SinkBand(sb) => {
            let blocks = sb.host_blocks()?;
            for (r, row) in m.chunks_mut(kv_len).enumerate() {
                let (bh, i) = (r / q_len, r % q_len);
                let span = blocks[bh % q_heads / group];
                for (j, x) in row.iter_mut().enumerate() {
                    *x = SinkBand::sees(i, j, span) as u8;
                }
            }
        }
    }
    Tensor::from_vec(m, (batch, q_heads, q_len, kv_len), &Device::Cpu)
}

/// Relative error `‖a − b‖ / ‖b‖` computed in f64 on the CPU (NaN anywhere gives NaN).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let num = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if den == 0.0 { num } else { num / den })
}
