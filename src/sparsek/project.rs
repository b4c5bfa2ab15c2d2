//! The SPARSEK operator on its own: the Euclidean projection of every row (last dimension) of a
//! score tensor onto the capped simplex `{0 ≤ p ≤ 1, Σp = k}`.

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::tau_sorted;

/// `SPARSEK(z, k)` along the last dimension: `p = clip(z − τ, 0, 1)` with the per-row threshold τ
/// such that `Σ_row p = k`.
///
/// - `z`: any shape `(…, m)`, f32 (the scores are computed in f32 by design). Returns p, same
///   shape, f32.
/// - `k > 0` (real budgets are allowed). Rows with `m ≤ k` get `p = 1` everywhere.
/// - p is unique even when τ is not (ties get equal p; a gap ≥ 1 at the k-th value gives the hard
///   top-k indicator).
/// - Differentiable: `g_z = 1_S ⊙ (g − mean_S g)` with `S = {0 < p < 1}` per row (zero when S is
///   empty).
/// - CPU: exact sorted scan in f64. CUDA: bisection in f32 polished with the closed form
///   `τ = (Σ_S z + |U| − k) / |S|`, one warp per row.
/// - Errors on NaN scores (CPU), `k ≤ 0` or non-finite `k`, non-f32 input or rank 0.
pub fn sparsek(z: &Tensor, k: f64) -> Result<Tensor> {
    if !(k.is_finite() && k > 0.0) {
        bail!(
            "sparsek: k must be finite and > 0, got {k} (z {:?})",
            z.dims()
        )
    }
    if z.dtype() != DType::F32 {
        bail!(
            "sparsek: scores must be f32, got {:?} (z {:?})",
            z.dtype(),
            z.dims()
        )
    }
    if z.rank() == 0 || z.elem_count() == 0 {
        bail!(
            "sparsek: scores must have a non-empty last dim, got {:?}",
            z.dims()
        )
    }
    z.contiguous()?.apply_op1(Project { k })
}

/// The forward op of [`sparsek`]: input z `(…, m)` f32, output p of the same shape.
struct Project {
    k: f64,
}

/// p of one row, computed exactly (f64 sort and scan).
pub(crate) fn project_row(z: &[f32], k: f64, out: &mut [f32]) {
    let mut sorted: Vec<f64> = z.iter().map(|&x| x as f64).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    match tau_sorted(&sorted, k) {
        None => out.fill(1.0),
        Some(tau) => {
            for (o, &x) in out.iter_mut().zip(z) {
                *o = (x as f64 - tau).clamp(0.0, 1.0) as f32;
            }
        }
    }
}

impl candle::CustomOp1 for Project {
    fn name(&self) -> &'static str {
        "sparsek-project"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = match s {
            CpuStorage::F32(v) => match l.contiguous_offsets() {
                Some((a, b)) => &v[a..b],
                None => bail!("sparsek: scores must be contiguous, got {l:?}"),
            },
            _ => bail!("sparsek: scores must be f32, got {:?}", s.dtype()),
        };
        if z.iter().any(|x| x.is_nan()) {
            bail!("sparsek: NaN in the scores {:?}", l.dims())
        }
        let m = l.dims()[l.dims().len() - 1];
        let mut p = vec![0f32; z.len()];
        p.par_chunks_mut(m)
            .zip(z.par_chunks(m))
            .for_each(|(p, z)| project_row(z, self.k, p));
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        super::cuda::project(s, l, self.k)
    }

    fn bwd(&self, _z: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let in_s = p.gt(0.0)?.mul(&p.lt(1.0)?)?.to_dtype(DType::F32)?;
        let n_s = in_s.sum_keepdim(D::Minus1)?.maximum(1.0)?;
        let mean = (grad.mul(&in_s)?.sum_keepdim(D::Minus1)? / n_s)?;
        Ok(Some(grad.broadcast_sub(&mean)?.mul(&in_s)?))
    }
}
