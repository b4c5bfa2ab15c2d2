//! The SparseK scoring network: one scalar score per key-side token and kv head.

use candle::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Sizes and initialisation of a [`SparseKScorer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseKScorerConfig {
    /// Width of the token representations fed to the scorer (the layer input).
    pub d_model: usize,
    /// Number of kv heads: one score per kv head (a GQA group shares the selection).
    pub kv_heads: usize,
    /// Initial position slope δ per token (default `1e-3`, the spec's suggestion).
    pub slope_init: f64,
}

impl SparseKScorerConfig {
    /// A config with the default slope `1e-3`.
    pub fn new(d_model: usize, kv_heads: usize) -> Self {
        Self {
            d_model,
            kv_heads,
            slope_init: 1e-3,
        }
    }
}

/// `u[b, h, j] = x_j · w_h + δ_h · j`, computed in f32.
///
/// Parameters (names under the VarBuilder prefix):
/// - `weight` `(kv_heads, d_model)`, Kaiming-normal init;
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
        let weight = vb.get_with_hints(
            (cfg.kv_heads, cfg.d_model),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let raw = cfg.slope_init.exp_m1().ln();
        let slope = vb.get_with_hints(cfg.kv_heads, "slope", Init::Const(raw))?;
        Ok(Self { weight, slope })
    }

    /// The slopes `δ = softplus(ρ)`, `(kv_heads)` f32.
    pub fn slopes(&self) -> Result<Tensor> {
        (self.slope.to_dtype(DType::F32)?.exp()? + 1.0)?.log()
    }

    /// Scores of tokens `x` `(batch, seq, d_model)` (any float dtype) sitting at absolute positions
    /// `offset..offset + seq`: returns `(batch, kv_heads, seq)` f32.
    pub fn forward_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t, dm) = x.dims3()?;
        let (h, dw) = self.weight.dims2()?;
        if dm != dw {
            candle::bail!(
                "sparsek scorer: x {:?} does not match weight (kv_heads, d_model) = {:?}",
                x.dims(),
                [h, dw]
            )
        }
        let w = self.weight.to_dtype(DType::F32)?;
        let lin = x
            .to_dtype(DType::F32)?
            .reshape((b * t, dm))?
            .matmul(&w.t()?)?
            .reshape((b, t, h))?
            .transpose(1, 2)?;
        let pos = Tensor::arange(offset as u32, (offset + t) as u32, x.device())?
            .to_dtype(DType::F32)?
            .reshape((1, 1, t))?;
        let slope = self.slopes()?.reshape((1, h, 1))?;
        lin.broadcast_add(&pos.broadcast_mul(&slope)?)?.contiguous()
    }
}

impl candle::Module for SparseKScorer {
    /// [`SparseKScorer::forward_at`] with positions starting at 0.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_at(x, 0)
    }
}
