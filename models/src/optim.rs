//! Optimisation pieces candle-nn lacks or keeps private: an AdamW whose moments can be saved and
//! restored, accumulated gradients with global-norm clipping, and the warm-up + cosine schedule.

use std::collections::HashMap;

use candle::backprop::GradStore;
use candle::{bail, DType, Result, Tensor, TensorId, Var};
use candle_sparse_attn::fused;
use serde::{Deserialize, Serialize};

/// Gradients of a set of variables, summed over micro-batches (f32, the variables' shapes), with
/// pending scale factors applied by the consumer ([`AdamW::step`] folds them into its update kernel
/// instead of rescaling every tensor): a host factor, and the device factor that clipping
/// ([`Gradients::clip_global_norm`]) computes without reading the norm back.
#[derive(Debug)]
pub struct Gradients {
    grads: HashMap<TensorId, Tensor>,
    /// Host factor the stored tensors are to be multiplied by ([`Gradients::get`] returns them
    /// unscaled).
    scale: f64,
    /// Device factor (an f32 scalar) on top of `scale`, set by clipping.
    factor: Option<Tensor>,
}

impl Default for Gradients {
    fn default() -> Self {
        Self {
            grads: HashMap::new(),
            scale: 1.0,
            factor: None,
        }
    }
}

impl Gradients {
    /// No gradients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pending host factor of every stored gradient (1 unless scaled): the gradient of `var`
    /// is `scale() · factor() · get(var)`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The pending device factor (an f32 scalar on the gradients' device) set by
    /// [`Gradients::clip_global_norm`], if any.
    pub fn factor(&self) -> Option<&Tensor> {
        self.factor.as_ref()
    }

    /// Adds the gradient of every var in `vars` found in `store` (scaled by `scale`).
    pub fn accumulate(&mut self, store: &GradStore, vars: &[Var], scale: f64) -> Result<()> {
        if self.scale != 1.0 || self.factor.is_some() {
            // Accumulating after clipping: apply the pending factors first.
            let factor = self.factor.take();
            for g in self.grads.values_mut() {
                *g = (&*g * self.scale)?;
                if let Some(f) = &factor {
                    *g = g.broadcast_mul(f)?;
                }
            }
            self.scale = 1.0;
        }
        for var in vars {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let g = if scale == 1.0 { g } else { (g * scale)? };
                let id = var.as_tensor().id();
                let sum = match self.grads.remove(&id) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                self.grads.insert(id, sum);
            }
        }
        Ok(())
    }

    /// The stored gradient of `var`, if any, before the pending [`Gradients::scale`].
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.grads.get(&var.as_tensor().id())
    }

    /// The L2 norm of all gradients together (pending factors included), an f32 scalar on their
    /// device (a CPU zero when there are none): one sum of squares ([`fused::sum_of_squares`], two
    /// launches on CUDA) and no read back, so a training step need not wait for the device.
    pub fn global_norm(&self) -> Result<Tensor> {
        Ok(self.norm_and_clip(f64::INFINITY)?.0)
    }

    /// The global norm and the factor clipping it to `max_norm`
    /// ([`fused::norm_clip_factor`]: on CUDA one kernel after the sum of squares).
    fn norm_and_clip(&self, max_norm: f64) -> Result<(Tensor, Tensor)> {
        let grads: Vec<Tensor> = self.grads.values().cloned().collect();
        if grads.is_empty() {
            let zero = Tensor::new(0f32, &candle::Device::Cpu)?;
            return Ok((zero.clone(), zero.ones_like()?));
        }
        let sumsq = fused::sum_of_squares(&grads)?;
        // A pending factor f (from an earlier clip) scales the norm: sum of squares times f².
        let sumsq = match &self.factor {
            Some(f) => sumsq.broadcast_mul(&f.sqr()?)?,
            None => sumsq,
        };
        fused::norm_clip_factor(&sumsq, self.scale, max_norm)
    }

    /// Scales all gradients so their global norm is at most `max_norm`: a pending device factor
    /// `max_norm / (norm + 1e-6)` where the norm exceeds `max_norm` (1 where it does not, or is
    /// not finite), computed on the device. Returns the norm before clipping (see
    /// [`Gradients::global_norm`]). The tensors are not touched.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<Tensor> {
        let (norm, factor) = self.norm_and_clip(max_norm)?;
        self.factor = Some(match self.factor.take() {
            Some(f) => (f * factor)?,
            None => factor,
        });
        Ok(norm)
    }
}

/// Hyper-parameters of [`AdamW`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Learning rate (usually overwritten every step by the schedule).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
}

/// AdamW (Loshchilov & Hutter) with decoupled weight decay, the update of PyTorch and candle-nn:
/// `θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)` with bias-corrected moments, every parameter updated in
/// place by one fused launch ([`candle_sparse_attn::fused::adamw_update_many`]). Moments are f32
/// and can be exported with [`AdamW::state`] and restored with [`AdamW::load_state`].
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    /// First and second moments per var, same order as `vars`: `(2, n)` f32, `m` then `v`
    /// (updated in place).
    moments: Vec<Var>,
    step: u64,
}

impl AdamW {
    /// An optimiser over named f32 variables, moments zero, step 0.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|(name, v)| {
                if v.dtype() != DType::F32 {
                    bail!("adamw: parameter {name:?} must be f32, got {:?}", v.dtype())
                }
                Var::zeros((2, v.elem_count()), DType::F32, v.device())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            vars,
            moments,
            step: 0,
        })
    }

    /// The current learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    /// Sets the learning rate for the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Number of updates done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every var that has a gradient in `grads` (its pending factors included).
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        let hp = self.next_update(grads.scale());
        self.apply(grads, &hp, None)
    }

    /// Counts one more step and returns its hyper-parameters (the learning rate and bias
    /// corrections of that step count, the gradients scaled by `grad_scale`): the host side of
    /// [`AdamW::step`], for a caller that queues the update itself ([`AdamW::apply`]).
    pub fn next_update(&mut self, grad_scale: f64) -> fused::AdamWUpdate {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        fused::AdamWUpdate {
            lr: p.lr as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            weight_decay: p.weight_decay as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            grad_scale: grad_scale as f32,
        }
    }

    /// Queues the update `hp` ([`AdamW::next_update`]) of every var that has a gradient in
    /// `grads`, with `lr`, `scale_m` and `scale_v` read from the device when `schedule` (f32
    /// `(3,)`, see [`fused::adamw_update_many`]) is given. The step count is not touched.
    pub fn apply(
        &self,
        grads: &Gradients,
        hp: &fused::AdamWUpdate,
        schedule: Option<&Tensor>,
    ) -> Result<()> {
        let (mut params, mut states, mut gs) = (vec![], vec![], vec![]);
        for ((_, var), state) in self.vars.iter().zip(&self.moments) {
            if let Some(g) = grads.get(var) {
                params.push(var);
                states.push(state);
                gs.push(g);
            }
        }
        fused::adamw_update_many(&params, &states, &gs, grads.factor(), schedule, hp)
    }

    /// The moments as `{prefix}m.{name}` / `{prefix}v.{name}` tensors (the step count is stored
    /// separately by the caller).
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.vars
            .iter()
            .zip(&self.moments)
            .flat_map(|((name, var), state)| {
                ["m", "v"].into_iter().enumerate().map(move |(i, kind)| {
                    // A copy: the moments are updated in place by later steps.
                    let moment = state.get(i).and_then(|m| m.reshape(var.shape())?.copy());
                    moment.map(|m| (format!("{prefix}{kind}.{name}"), m))
                })
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        step: u64,
    ) -> Result<()> {
        for ((name, var), state) in self.vars.iter().zip(self.moments.iter_mut()) {
            let mut moments = Vec::with_capacity(2);
            for kind in ["m", "v"] {
                let key = format!("{prefix}{kind}.{name}");
                let Some(t) = tensors.get(&key) else {
                    bail!("checkpoint is missing optimizer state {key:?}")
                };
                if t.dims() != var.dims() {
                    bail!(
                        "checkpoint optimizer state {key:?} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    )
                }
                moments.push(
                    t.to_dtype(DType::F32)?
                        .to_device(var.device())?
                        .flatten_all()?,
                );
            }
            *state = Var::from_tensor(&Tensor::stack(&moments, 0)?)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up from 0 to `max_lr` over `warmup_steps`, then cosine decay to `min_lr` at
/// `decay_steps`, constant `min_lr` afterwards (nanoGPT's schedule). `step` counts from 0.
pub fn cosine_lr(
    step: usize,
    max_lr: f64,
    min_lr: f64,
    warmup_steps: usize,
    decay_steps: usize,
) -> f64 {
    if step < warmup_steps {
        return max_lr * (step + 1) as f64 / (warmup_steps + 1) as f64;
    }
    if step >= decay_steps || decay_steps <= warmup_steps {
        return min_lr;
    }
    let progress = (step - warmup_steps) as f64 / (decay_steps - warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    min_lr + coeff * (max_lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;
    use candle_nn::Optimizer;

    #[test]
    fn adamw_matches_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        let ours_var = Var::from_tensor(&init)?;
        let theirs_var = Var::from_tensor(&init)?;
        let params = AdamWParams {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut ours = AdamW::new(vec![("w".into(), ours_var.clone())], params)?;
        let mut theirs = candle_nn::AdamW::new(
            vec![theirs_var.clone()],
            candle_nn::ParamsAdamW {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )?;
        let target = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        for _ in 0..5 {
            let loss = (ours_var.as_tensor() - &target)?.sqr()?.sum_all()?;
            let mut g = Gradients::new();
            g.accumulate(&loss.backward()?, std::slice::from_ref(&ours_var), 1.0)?;
            ours.step(&g)?;
            let loss = (theirs_var.as_tensor() - &target)?.sqr()?.sum_all()?;
            theirs.step(&loss.backward()?)?;
        }
        let diff = (ours_var.as_tensor() - theirs_var.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let var = Var::from_tensor(&Tensor::ones(4, DType::F32, &Device::Cpu)?)?;
        let loss = (var.as_tensor() * 10.0)?.sum_all()?;
        let mut g = Gradients::new();
        g.accumulate(&loss.backward()?, std::slice::from_ref(&var), 1.0)?;
        let before = g.clip_global_norm(1.0)?.to_scalar::<f32>()?;
        assert!((before - 20.0).abs() < 1e-4);
        assert!((g.global_norm()?.to_scalar::<f32>()? - 1.0).abs() < 1e-4);
        // Below the bound nothing changes; a second clip composes with the first.
        let again = g.clip_global_norm(2.0)?.to_scalar::<f32>()?;
        assert!((again - 1.0).abs() < 1e-4);
        assert!((g.global_norm()?.to_scalar::<f32>()? - 1.0).abs() < 1e-4);
        // A non-finite norm is not clipped (the factor stays 1).
        let mut inf = Gradients::new();
        let loss = (var.as_tensor() * f64::INFINITY)?.sum_all()?;
        inf.accumulate(&loss.backward()?, std::slice::from_ref(&var), 1.0)?;
        let norm = inf.clip_global_norm(1.0)?.to_scalar::<f32>()?;
        assert!(norm.is_infinite());
        assert_eq!(
            inf.factor().map(|f| f.to_scalar::<f32>()).transpose()?,
            Some(1.0)
        );
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| cosine_lr(s, 1e-3, 1e-4, 10, 110);
        assert!(lr(0) < lr(5) && lr(5) < lr(9));
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(60) - 5.5e-4).abs() < 1e-9);
        assert!((lr(110) - 1e-4).abs() < 1e-12);
        assert!((lr(500) - 1e-4).abs() < 1e-12);
    }
}
