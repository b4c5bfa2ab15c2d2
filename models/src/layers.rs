//! Small differentiable building blocks (linear, LayerNorm through the crate's fused op with a
//! backward, which candle-nn's lacks), plus seeded initialisation and dropout.

use std::sync::{Arc, Mutex};

use candle::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Mixes several integers into one well-spread 64-bit seed (splitmix64 steps).
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        x ^= p;
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    }
    x
}

/// An f32 variable of `shape` drawn from `N(0, std²)` with a seeded generator.
pub fn normal_var(shape: &[usize], std: f64, seed: u64, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let normal = Normal::new(0f32, std as f32)
        .map_err(|e| candle::Error::Msg(format!("normal init with std {std}: {e}")))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Var::from_tensor(&Tensor::from_vec(values, shape, device)?)
}

/// A [`VarBuilder`] backend that creates fresh f32 [`Var`]s and records them by name, drawing
/// random initialisations from seeded generators (candle's CPU generator cannot be seeded), so
/// modules built through a VarBuilder (such as SparseK's scorer) join a model's named parameters
/// deterministically in the seed. Supports constant, normal and Kaiming-normal hints; asking twice
/// for a name returns the same variable.
#[derive(Clone, Debug, Default)]
pub struct SeededVars {
    seed: u64,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SeededVars {
    /// An empty collection; the `n`-th variable created is drawn with seed `mix_seed([seed, n])`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            vars: Arc::default(),
        }
    }

    /// A VarBuilder (f32) creating its variables here.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The variables created so far, in creation order, with their full names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Var)>> {
        // A poisoned lock only means another thread panicked mid-push; the list stays valid.
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SimpleBackend for SeededVars {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.lock();
        if let Some((_, v)) = vars.iter().find(|(n, _)| n == name) {
            if v.shape() != &s {
                bail!(
                    "seeded vars: {name} exists with shape {:?}, asked for {:?}",
                    v.dims(),
                    s.dims()
                )
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let seed = mix_seed(&[self.seed, vars.len() as u64]);
        let var = match h {
            Init::Const(c) => Var::from_tensor(&Tensor::full(c as f32, &s, dev)?)?,
            Init::Randn { mean, stdev } => {
                let n = normal_var(s.dims(), stdev, seed, dev)?;
                Var::from_tensor(&(n.as_tensor() + mean)?)?
            }
            Init::Kaiming {
                dist: NormalOrUniform::Normal,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                normal_var(s.dims(), std, seed, dev)?
            }
            other => bail!("seeded vars: initialisation {other:?} of {name} is not supported"),
        };
        vars.push((name.to_string(), var.clone()));
        var.as_tensor().to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.lock().iter().find(|(n, _)| n == name) {
            Some((_, v)) => v.as_tensor().to_dtype(dtype),
            None => bail!("seeded vars: no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().iter().any(|(n, _)| n == name)
    }
}

/// The parameter `var` in the compute dtype (a differentiable cast when it differs).
pub fn in_dtype(var: &Var, dtype: DType) -> Result<Tensor> {
    let t = var.as_tensor();
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// `x · wᵀ` for `x`: `(..., in)` and `w`: `(out, in)`; returns `(..., out)`. No bias. The fused
/// op [`candle_sparse_attn::fused::linear`] (one autograd node, no reshape nodes whose gradients
/// candle would zero-fill and add).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("linear: input must have rank at least 1, got a scalar")
    }
    candle_sparse_attn::fused::linear(x, w)
}

/// Layer normalisation over the last axis with a learned gain and no bias (nanoGPT's
/// `bias=False`): the fused op [`candle_sparse_attn::fused::layer_norm`] (one kernel forward, two
/// backward, gradients for the input and the gain). The statistics are computed in f32 whatever the
/// input dtype; the result has the input dtype (the gain is cast to it).
pub fn layer_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    candle_sparse_attn::fused::layer_norm(x, &weight.to_dtype(x.dtype())?, eps)
}

/// Inverted dropout with probability `p`: the mask comes from a generator seeded with `seed`, so
/// runs (and resumed runs) are reproducible. On CUDA the mask is drawn on the device (cuRAND,
/// re-seeded with `seed` for every call, so a call's mask depends only on its seed); on the CPU
/// from a seeded host generator. The two devices draw different masks. Identity when `p == 0`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let keep = dropout_keep(x.shape(), x.dtype(), p, seed, x.device())?;
    apply_dropout(x, keep.as_ref(), p)
}

/// The keep mask of [`dropout`] for a tensor of `shape` and `dtype`: 1 where kept, 0 where
/// dropped (the same draw as [`dropout`] with this seed), or `None` when `p == 0`.
pub fn dropout_keep(
    shape: &Shape,
    dtype: DType,
    p: f32,
    seed: u64,
    device: &Device,
) -> Result<Option<Tensor>> {
    if p == 0.0 {
        return Ok(None);
    }
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability must be in [0, 1), got {p}")
    }
    let keep = if device.is_cuda() {
        device.set_seed(seed)?;
        Tensor::rand(0f32, 1f32, shape, device)?.ge(p)?
    } else {
        let mut rng = StdRng::seed_from_u64(seed);
        let mask: Vec<u8> = (0..shape.elem_count())
            .map(|_| u8::from(rng.random::<f32>() >= p))
            .collect();
        Tensor::from_vec(mask, shape, device)?
    };
    Ok(Some(keep.to_dtype(dtype)?))
}

/// `x · keep / (1 − p)` for a mask from [`dropout_keep`] (`x` itself for `None`); also the
/// backward of dropout applied to an output gradient.
pub fn apply_dropout(x: &Tensor, keep: Option<&Tensor>, p: f32) -> Result<Tensor> {
    match keep {
        None => Ok(x.clone()),
        Some(keep) => (x * keep)? * (1.0 / (1.0 - p)) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2., (2, 3, 16), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 16, &dev)?;
        let ours = layer_norm(&x, &w, 1e-5)?;
        let bias = Tensor::zeros(16, DType::F32, &dev)?;
        let theirs = candle_nn::ops::layer_norm(&x, &w, &bias, 1e-5)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn seeded_vars_are_deterministic_and_recorded() -> Result<()> {
        let dev = Device::Cpu;
        let draw = |seed| -> Result<(Tensor, Vec<(String, Var)>)> {
            let vars = SeededVars::new(seed);
            let vb = vars.var_builder(&dev).pp("m");
            let w = vb.get_with_hints((3, 8), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
            let b = vb.get_with_hints(3, "b", Init::Const(0.5))?;
            assert_eq!(b.to_vec1::<f32>()?, [0.5; 3]);
            Ok((w, vars.vars()))
        };
        let (a, names) = draw(1)?;
        let (b, _) = draw(1)?;
        let (c, _) = draw(2)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            (x - y)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert_eq!(diff(&a, &b)?, 0.0);
        assert!(diff(&a, &c)? > 0.0);
        let names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["m.w", "m.b"]);
        Ok(())
    }

    #[test]
    fn dropout_is_seeded_and_scaled() -> Result<()> {
        let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.5, 7)?.to_vec2::<f32>()?;
        let b = dropout(&x, 0.5, 7)?.to_vec2::<f32>()?;
        assert_eq!(a, b);
        assert!(a.iter().flatten().all(|&v| v == 0.0 || v == 2.0));
        Ok(())
    }
}
