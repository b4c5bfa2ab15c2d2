//! The SparseK scoring network: one scalar score per key-side token and kv head, as one op with
//! CPU and CUDA kernels each way (`sk_score_fwd`; `sk_score_bwd_dx`, `sk_score_bwd_dw` in
//! `cuda/sparsek.cu`).

use candle::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;

/// Sizes and initialisation of a [`SparseKScorer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseKScorerConfig {
    /// Width of the token representations fed to the scorer (the layer input).
    pub d_model: usize,
    /// Number of kv heads: one score per kv head (a GQA group shares the selection).
    pub kv_heads: usize,
    /// Initial position slope δ per token (default `1e-3`, the spec's suggestion).
    pub slope_init: f64,
    /// Standard deviation of the initial linear scores `x · w` for inputs of unit variance per
    /// feature (a LayerNorm's output): the weight is drawn from `N(0, score_std² / d_model)`.
    /// Default `4` (documented choice). SPARSEK clips `u − τ` to `[0, 1]`, so the spread sets how
    /// hard the initial selection is: with `k = 256` among 8k Gaussian scores the support (the
    /// keys with `p > 0`, which the attention visits) holds about 420 keys at a spread of `√2`
    /// (Kaiming normal), 320 at 4, 280 at 10, while every spread leaves partial weights for the
    /// scorer's gradient. On the char-level GPT at 8k, 4 against `√2`: the same validation bpc
    /// after 500 steps and 10% less attention kernel time (EXPERIMENTS.md, "SparseK at 8k").
    pub score_std: f64,
}

impl SparseKScorerConfig {
    /// A config with the default slope `1e-3` and score spread `4`.
    pub fn new(d_model: usize, kv_heads: usize) -> Self {
        Self {
            d_model,
            kv_heads,
            slope_init: 1e-3,
            score_std: 4.0,
        }
    }
}

/// `u[b, h, j] = x_j · w_h + δ_h · j`, computed in f32 (one kernel; `x` is read in its own dtype).
///
/// Parameters (names under the VarBuilder prefix):
/// - `weight` `(kv_heads, d_model)`, normal init of std `score_std / √d_model`;
/// - `slope` `(kv_heads)`, the raw slope ρ with `δ = softplus(ρ) ≥ 0` (documented choice: a
///   learned non-negative slope, so newer keys are preferred and old keys age out; by the shift
///   equivariance of SPARSEK, `+δ·j` and the distance penalty `−δ·(i − j)` give the same p).
///   Initialised so that `δ = slope_init`.
///
/// No per-head constant: SPARSEK is shift-equivariant (`τ(u + c) = τ(u) + c`), so a bias would
/// never change the selection or the weights and its gradient would be rounding noise (which
/// AdamW would amplify into a random walk).
#[derive(Clone, Debug)]
pub struct SparseKScorer {
    weight: Tensor,
    slope: Tensor,
}

impl SparseKScorer {
    /// Creates (or loads) the parameters through `vb`.
    pub fn new(cfg: SparseKScorerConfig, vb: VarBuilder) -> Result<Self> {
        if !(cfg.slope_init > 0.0 && cfg.slope_init.is_finite()) {
            candle::bail!(
                "sparsek scorer: slope_init must be > 0, got {}",
                cfg.slope_init
            )
        }
        if !(cfg.score_std > 0.0 && cfg.score_std.is_finite()) {
            candle::bail!(
                "sparsek scorer: score_std must be > 0, got {}",
                cfg.score_std
            )
        }
        let weight = vb.get_with_hints(
            (cfg.kv_heads, cfg.d_model),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: cfg.score_std / (cfg.d_model.max(1) as f64).sqrt(),
            },
        )?;
        let raw = cfg.slope_init.exp_m1().ln();
        let slope = vb.get_with_hints(cfg.kv_heads, "slope", Init::Const(raw))?;
        Ok(Self { weight, slope })
    }

    /// The slopes `δ = softplus(ρ)`, `(kv_heads)` f32.
    pub fn slopes(&self) -> Result<Tensor> {
        (self.raw_slope()?.exp()? + 1.0)?.log()
    }

    /// Number of kv heads (one score per kv head and token).
    pub fn kv_heads(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The raw slope ρ `(kv_heads)` as a contiguous f32 tensor.
    pub(crate) fn raw_slope(&self) -> Result<Tensor> {
        self.slope.to_dtype(DType::F32)?.contiguous()
    }

    /// The weight `(kv_heads, d_model)` and the raw slope ρ `(kv_heads)`: the tensors of the
    /// VarBuilder's variables, in the order of [`ScorerGrads`].
    pub fn params(&self) -> [&Tensor; 2] {
        [&self.weight, &self.slope]
    }

    /// Scores of tokens `x` `(batch, seq, d_model)` (any float dtype) sitting at absolute positions
    /// `offset..offset + seq`: returns `(batch, kv_heads, seq)` f32, with autograd to `x` and the
    /// parameters.
    pub fn forward_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (w, op) = self.op(x, offset)?;
        x.contiguous()?.apply_op3(&w, &self.slopes()?, op)
    }

    /// [`Self::forward_at`] without autograd, for loops that run their own backward with
    /// [`Self::backward`].
    pub fn scores(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (w, op) = self.op(x, offset)?;
        x.contiguous()?.apply_op3_no_bwd(&w, &self.slopes()?, &op)
    }

    /// The gradients of [`Self::scores`] `(x, offset)` for the scores' gradient `du`
    /// `(batch, kv_heads, seq)` f32, without autograd: `dx` in the shape and dtype of `x` (plus
    /// `dx_add` when given, e.g. the rest of `x`'s gradient) and the parameters' gradients (f32).
    pub fn backward(
        &self,
        x: &Tensor,
        offset: usize,
        du: &Tensor,
        dx_add: Option<&Tensor>,
    ) -> Result<ScorerGrads> {
        let (w, op) = self.op(x, offset)?;
        let (dx, weight, ddelta) = op.backward(&x.contiguous()?, &w, du, dx_add)?;
        // δ = softplus(ρ): dδ/dρ = sigmoid(ρ).
        let slope = (ddelta * candle_nn::ops::sigmoid(&self.raw_slope()?)?)?;
        Ok(ScorerGrads { dx, weight, slope })
    }

    /// Scores from their linear part `lin` `(batch, seq, kv_heads)` computed elsewhere (f32, f16,
    /// bf16) plus the position term, for tokens at positions `offset..offset + seq`: `(batch,
    /// kv_heads, seq)` f32, no autograd. This is [`Self::scores`] with `x · weightᵀ` supplied,
    /// e.g. by a projection of `x` whose weight has this scorer's weight rows appended (one GEMM
    /// for q, k, v and the scores, `lin` the view of its last columns, read in place: rows may
    /// be any distance apart). The backward is [`Self::backward_linear`].
    pub fn scores_from_linear(&self, lin: &Tensor, offset: usize) -> Result<Tensor> {
        let h = self.kv_heads();
        let (b, t) = match lin.dims() {
            &[b, t, w] if w == h => (b, t),
            _ => bail!(
                "sparsek scorer: lin must be (batch, seq, kv_heads = {h}), got {:?}",
                lin.dims()
            ),
        };
        check_positions(b, t, offset, lin.dims())?;
        #[cfg(feature = "cuda")]
        if lin.device().is_cuda() {
            let d = ScoreDims {
                b,
                t,
                c: 0,
                h,
                offset,
            };
            let (lin, row) = crate::fused::rows_in_place(lin)?;
            return cuda::score_cols_forward(&lin, &self.raw_slope()?, row, d);
        }
        let pos = positions(offset, t, lin.device())?;
        let slope_term = self.slopes()?.reshape((1, h, 1))?.broadcast_mul(&pos)?;
        lin.to_dtype(DType::F32)?
            .transpose(1, 2)?
            .broadcast_add(&slope_term)?
            .contiguous()
    }

    /// The gradients of [`Self::scores_from_linear`] `(lin, offset)` for the scores' gradient `du`
    /// `(batch, kv_heads, seq)` f32, without autograd: `lin`'s `(batch, seq, width)` in `dtype`
    /// (`width ≥ kv_heads`: the columns after the first `kv_heads` are zero, padding for the
    /// projection gradient it joins, see [`crate::fused::merge_qkv_with`]) and the raw slope ρ's
    /// `(kv_heads)` f32. The weight's gradient is the projection's (its rows of the projection
    /// weight's gradient).
    pub fn backward_linear(
        &self,
        du: &Tensor,
        offset: usize,
        dtype: DType,
        width: usize,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.kv_heads();
        let (b, t) = match du.dims() {
            &[b, hh, t] if hh == h && du.dtype() == DType::F32 && width >= h => (b, t),
            _ => bail!(
                "sparsek scorer: du must be (batch, kv_heads = {h}, seq) f32 and width ({width}) \
                 at least kv_heads, got {:?} {:?}",
                du.dims(),
                du.dtype()
            ),
        };
        check_positions(b, t, offset, du.dims())?;
        let du = du.contiguous()?;
        #[cfg(feature = "cuda")]
        if du.device().is_cuda() {
            let d = ScoreDims {
                b,
                t,
                c: 0,
                h,
                offset,
            };
            return cuda::score_cols_backward(&du, &self.raw_slope()?, dtype, width, d);
        }
        let (dlin, ddelta) = linear_backward_cpu(&du, offset, dtype, width)?;
        let slope = (ddelta * candle_nn::ops::sigmoid(&self.raw_slope()?)?)?;
        Ok((dlin, slope))
    }

    /// [`Self::backward_linear`] with `lin`'s gradient written into columns
    /// `[col, col + kv_heads)` of `dst` `(batch, seq, width)` (a folded projection's output
    /// gradient; its other columns are left as they are) instead of a tensor of its own: on CUDA
    /// one kernel writing in place, elsewhere a copy. Returns the raw slope ρ's `(kv_heads)` f32.
    pub fn backward_linear_into(
        &self,
        du: &Tensor,
        offset: usize,
        dst: &Tensor,
        col: usize,
    ) -> Result<Tensor> {
        let h = self.kv_heads();
        let fits = match (du.dims(), dst.dims()) {
            (&[b, hh, t], &[db, dt, width]) => {
                hh == h && du.dtype() == DType::F32 && (db, dt) == (b, t) && col + h <= width
            }
            _ => false,
        };
        if !fits {
            bail!(
                "sparsek scorer: du {:?} {:?} must be (batch, kv_heads = {h}, seq) f32 and dst {:?} \
                 (batch, seq, width >= {})",
                du.dims(),
                du.dtype(),
                dst.dims(),
                col + h
            )
        }
        let (b, _, t) = du.dims3()?;
        check_positions(b, t, offset, du.dims())?;
        #[cfg(feature = "cuda")]
        if du.device().is_cuda() && dst.is_contiguous() {
            let op = cuda::ScoreColsInto {
                rho: self.raw_slope()?,
                col,
                d: ScoreDims {
                    b,
                    t,
                    c: 0,
                    h,
                    offset,
                },
                drho: std::sync::Mutex::new(None),
            };
            dst.inplace_op2(&du.contiguous()?, &op)?;
            let drho = op.drho.into_inner().ok().flatten();
            return drho
                .ok_or_else(|| candle::Error::Msg("sparsek scorer: no slope gradient".into()));
        }
        let (dlin, dslope) = self.backward_linear(du, offset, dst.dtype(), h)?;
        dst.slice_set(&dlin, 2, col)?;
        Ok(dslope)
    }

    /// The f32 weight and the op of a call on `x`, whose shape is checked against the weight.
    fn op(&self, x: &Tensor, offset: usize) -> Result<(Tensor, ScoreOp)> {
        let (h, c) = self.weight.dims2()?;
        let (b, t, dm) = match x.dims() {
            &[b, t, dm] => (b, t, dm),
            _ => bail!(
                "sparsek scorer: x must be (batch, seq, d_model = {c}), got {:?}",
                x.dims()
            ),
        };
        if dm != c {
            bail!(
                "sparsek scorer: x {:?} does not match weight (kv_heads, d_model) = {:?}",
                x.dims(),
                [h, c]
            )
        }
        check_positions(b, t, offset, x.dims())?;
        let d = ScoreDims { b, t, c, h, offset };
        Ok((self.weight.to_dtype(DType::F32)?, ScoreOp(d)))
    }
}

/// Checks that positions `offset..offset + t` and the `b·t` rows fit the kernels' 32-bit indices.
fn check_positions(b: usize, t: usize, offset: usize, dims: &[usize]) -> Result<()> {
    if offset + t > i32::MAX as usize || b * t > i32::MAX as usize {
        bail!("sparsek scorer: {dims:?} at offset {offset} is too large")
    }
    Ok(())
}

/// Positions `offset..offset + t` as a `(1, 1, t)` f32 tensor.
fn positions(offset: usize, t: usize, dev: &candle::Device) -> Result<Tensor> {
    Tensor::arange(offset as u32, (offset + t) as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((1, 1, t))
}

/// [`SparseKScorer::backward_linear`] on the CPU (f32 arithmetic): `du` transposed and padded to
/// `width` columns, and `dδ[h] = Σ du[b, h, j]·(offset + j)`.
fn linear_backward_cpu(
    du: &Tensor,
    offset: usize,
    dtype: DType,
    width: usize,
) -> Result<(Tensor, Tensor)> {
    let (_, h, t) = du.dims3()?;
    let dlin = du
        .transpose(1, 2)?
        .pad_with_zeros(2, 0, width - h)?
        .to_dtype(dtype)?
        .contiguous()?;
    let ddelta = du
        .broadcast_mul(&positions(offset, t, du.device())?)?
        .sum((0, 2))?;
    Ok((dlin, ddelta))
}

/// The gradients of a [`SparseKScorer`] call ([`SparseKScorer::backward`]).
#[derive(Clone, Debug)]
pub struct ScorerGrads {
    /// The input's gradient, in its shape and dtype.
    pub dx: Tensor,
    /// The weight's gradient `(kv_heads, d_model)` f32.
    pub weight: Tensor,
    /// The raw slope ρ's gradient `(kv_heads)` f32.
    pub slope: Tensor,
}

/// Sizes of a scorer call: batch, sequence, model width, kv heads, first position.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScoreDims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub h: usize,
    pub offset: usize,
}

/// `u = x · wᵀ + δ·(offset + j)` for `x` `(b, t, c)` (f32, f16, bf16), `w` `(h, c)` f32 and `δ`
/// `(h)` f32: `u` `(b, h, t)` f32. Backward: `dx` (dtype of `x`), `dw`, `dδ`.
struct ScoreOp(ScoreDims);

impl ScoreOp {
    /// `(dx [+ dx_add], dw, dδ)` for `du` `(b, h, t)` f32.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        du: &Tensor,
        dx_add: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = self.0;
        if du.dims() != [d.b, d.h, d.t] || du.dtype() != DType::F32 {
            bail!(
                "sparsek scorer: du must be ({}, {}, {}) f32, got {:?} {:?}",
                d.b,
                d.h,
                d.t,
                du.dims(),
                du.dtype()
            )
        }
        if let Some(a) = dx_add {
            if a.shape() != x.shape() || a.dtype() != x.dtype() {
                bail!(
                    "sparsek scorer: dx_add must be {:?} {:?}, got {:?} {:?}",
                    x.dims(),
                    x.dtype(),
                    a.dims(),
                    a.dtype()
                )
            }
        }
        let du = du.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let dx_add = dx_add.map(|a| a.contiguous()).transpose()?;
            return cuda::score_backward(x, w, &du, dx_add.as_ref(), d);
        }
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (dx, dw, ddelta) = cpu::score_backward(&f32_of(x)?, &f32_of(w)?, &f32_of(&du)?, d);
        let dev = x.device();
        // The addend joins in f32, one rounding to x's dtype, as in the CUDA kernel.
        let mut dx = Tensor::from_vec(dx, x.shape(), dev)?;
        if let Some(a) = dx_add {
            dx = (dx + a.to_dtype(DType::F32)?)?;
        }
        Ok((
            dx.to_dtype(x.dtype())?,
            Tensor::from_vec(dw, (d.h, d.c), dev)?,
            Tensor::from_vec(ddelta, d.h, dev)?,
        ))
    }
}

impl candle::CustomOp3 for ScoreOp {
    fn name(&self) -> &'static str {
        "sparsek-scorer"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.0;
        let (x, w) = (cpu::as_f32(sx, lx, "x")?, cpu::as_f32(sw, lw, "w")?);
        let delta = cpu::as_f32(sd, ld, "delta")?;
        let u = cpu::score_forward(&x, &w, &delta, d);
        Ok((CpuStorage::F32(u), Shape::from((d.b, d.h, d.t))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle::CudaStorage,
        lx: &Layout,
        sw: &candle::CudaStorage,
        lw: &Layout,
        sd: &candle::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let d = self.0;
        let u = cuda::score_forward((sx, lx), (sw, lw), (sd, ld), d)?;
        Ok((u, Shape::from((d.b, d.h, d.t))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _delta: &Tensor,
        _u: &Tensor,
        du: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, ddelta) = self.backward(x, w, du, None)?;
        Ok((Some(dx), Some(dw), Some(ddelta)))
    }
}

impl candle::Module for SparseKScorer {
    /// [`SparseKScorer::forward_at`] with positions starting at 0.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_at(x, 0)
    }
}
