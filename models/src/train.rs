//! Training a [`Gpt`] on a [`CharDataset`]: two AdamW groups (weight decay on matrices only),
//! warm-up + cosine learning rate, global-norm clipping, gradient accumulation, seeded batches
//! and dropout, evaluation, and checkpoints that resume exactly. Gradients come from the fused
//! training pass ([`Gpt::training_pass`]) unless [`Trainer::set_autograd`] asks for candle's
//! autograd over the whole model (the reference path). On CUDA the step can be recorded once as a
//! CUDA graph and replayed with one launch ([`Trainer::set_cuda_graph`]).
//!
//! A checkpoint is a directory with three files, each written atomically (temporary file, then
//! rename): `checkpoint.safetensors` (parameters under `model.`, AdamW moments under
//! `adamw_decay.` / `adamw_no_decay.`), `config.json` ([`CheckpointMeta`]) and `vocab.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{bail, DType, Device, Result, Tensor, Var};
use candle_sparse_attn::fused::AdamWUpdate;
use candle_sparse_attn::CudaGraph;
use serde::{Deserialize, Serialize};

use crate::attention::AttentionKind;
use crate::data::{CharDataset, Split, Vocab};
use crate::gpt::{Gpt, GptConfig};
use crate::layers::mix_seed;
use crate::optim::{cosine_lr, AdamW, AdamWParams, Gradients};

/// File name of the tensors of a checkpoint.
pub const WEIGHTS_FILE: &str = "checkpoint.safetensors";
/// File name of the [`CheckpointMeta`] of a checkpoint.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the vocabulary of a checkpoint.
pub const VOCAB_FILE: &str = "vocab.json";
/// Version of the checkpoint layout.
pub const CHECKPOINT_FORMAT: u32 = 1;

const MODEL_PREFIX: &str = "model.";
const DECAY_PREFIX: &str = "adamw_decay.";
const NO_DECAY_PREFIX: &str = "adamw_no_decay.";
const TRAIN_BATCH_TAG: u64 = 1;
const TRAIN_DROPOUT_TAG: u64 = 2;
const EVAL_BATCH_TAG: u64 = 3;

/// Arithmetic precision of training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// bf16 compute with f32 master weights and optimizer state.
    Bf16,
}

impl Precision {
    /// The compute dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Optimisation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
    /// Total optimizer steps (also the end of the cosine decay).
    pub max_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Decoupled weight decay of the matrices (embeddings and projections); gains get none.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// Global gradient-norm clip (0 disables clipping).
    pub grad_clip: f64,
    /// Evaluate every this many steps.
    pub eval_interval: usize,
    /// Batches per split in one evaluation.
    pub eval_batches: usize,
    /// Seed of initialisation, batches and dropout.
    pub seed: u64,
    /// Fraction of the text (at its end) used for validation.
    pub val_fraction: f64,
    /// Compute precision.
    pub precision: Precision,
}

impl TrainConfig {
    /// Checks the values; the error names the offending one.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("max_steps", self.max_steps),
            ("eval_interval", self.eval_interval),
            ("eval_batches", self.eval_batches),
        ] {
            if v == 0 {
                bail!("train config: {name} must be positive, got 0")
            }
        }
        let lr_ok = self.lr > 0.0 && self.lr.is_finite();
        if !(lr_ok && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!(
                "train config: need 0 < lr and 0 <= min_lr <= lr, got lr {} and min_lr {}",
                self.lr,
                self.min_lr
            )
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("train config: {name} must be in [0, 1), got {b}")
            }
        }
        let non_negative = |x: f64| x >= 0.0; // false for NaN too
        if !non_negative(self.weight_decay) || !non_negative(self.grad_clip) {
            bail!(
                "train config: weight_decay ({}) and grad_clip ({}) must be non-negative",
                self.weight_decay,
                self.grad_clip
            )
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            bail!(
                "train config: val_fraction must be in (0, 1), got {}",
                self.val_fraction
            )
        }
        Ok(())
    }

    /// Names of the settings that differ from `saved` and would change how a resumed run
    /// continues (everything but `max_steps`, `eval_interval` and `eval_batches`).
    pub fn resume_conflicts(&self, saved: &TrainConfig) -> Result<Vec<String>> {
        const FREE: [&str; 3] = ["max_steps", "eval_interval", "eval_batches"];
        let to_map = |c: &TrainConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            other => Err(candle::Error::Msg(format!(
                "train config to json: {other:?}"
            ))),
        };
        let (now, then) = (to_map(self)?, to_map(saved)?);
        Ok(now
            .iter()
            .filter(|(k, v)| !FREE.contains(&k.as_str()) && then.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: checkpoint {} vs requested {v}",
                    then.get(k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect())
    }
}

/// What `config.json` of a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_FORMAT`] of the writer.
    pub format: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// The architecture.
    pub model: GptConfig,
    /// The optimisation settings.
    pub train: TrainConfig,
}

/// Numbers of one optimizer step. The loss and the gradient norm stay on the device until read
/// ([`StepStats::loss`], [`StepStats::grad_norm`]): a step does not wait for the device, so the
/// host queues the next step while this one runs; reading them waits for the step to finish.
#[derive(Clone, Debug)]
pub struct StepStats {
    /// The step just done (0-based).
    pub step: usize,
    /// Mean training loss over the micro-batches (nats per character), an f32 scalar.
    loss: Tensor,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping, an f32 scalar.
    grad_norm: Tensor,
    /// Tokens processed.
    pub tokens: usize,
    /// Wall time of each phase, measured only when [`Trainer::set_phase_timing`] is on.
    pub phases: Option<PhaseTimes>,
}

/// Seconds spent in each phase of one training step (the device is synchronised at each phase
/// boundary, which costs a little throughput; for profiling only), and the host's share of each:
/// the time to enqueue the phase's work before waiting for the device. A phase whose host time is
/// close to its total is bound by the host (launch overhead), not by the device.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Batch sampling and the forward pass with the loss, summed over micro-batches.
    pub forward: f64,
    /// The backward pass and gradient accumulation, summed over micro-batches.
    pub backward: f64,
    /// Gradient clipping and the optimizer updates.
    pub optimizer: f64,
    /// Host time enqueuing the forward phase.
    pub forward_host: f64,
    /// Host time enqueuing the backward phase.
    pub backward_host: f64,
    /// Host time enqueuing the optimizer phase.
    pub optimizer_host: f64,
}

impl StepStats {
    /// The mean training loss (nats per character), read from the device (waits for the step);
    /// an error when it is not finite (the training diverged).
    pub fn loss(&self) -> Result<f64> {
        let loss = self.loss.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            bail!("training diverged: loss {loss} at step {}", self.step)
        }
        Ok(loss)
    }

    /// The global gradient norm before clipping, read from the device (waits for the step).
    pub fn grad_norm(&self) -> Result<f64> {
        Ok(self.grad_norm.to_scalar::<f32>()? as f64)
    }
}

impl std::ops::AddAssign for PhaseTimes {
    /// Field-wise sum (to average the phases over steps).
    fn add_assign(&mut self, rhs: Self) {
        self.forward += rhs.forward;
        self.backward += rhs.backward;
        self.optimizer += rhs.optimizer;
        self.forward_host += rhs.forward_host;
        self.backward_host += rhs.backward_host;
        self.optimizer_host += rhs.optimizer_host;
    }
}

impl PhaseTimes {
    fn add_forward(&mut self, (total, host): (f64, f64)) {
        self.forward += total;
        self.forward_host += host;
    }

    fn add_backward(&mut self, (total, host): (f64, f64)) {
        self.backward += total;
        self.backward_host += host;
    }
}

/// Lap timer that synchronises the device before reading the clock (a no-op when off).
struct PhaseClock<'a> {
    device: Option<&'a Device>,
    last: std::time::Instant,
}

impl<'a> PhaseClock<'a> {
    fn new(on: bool, device: &'a Device) -> Result<Self> {
        if on {
            device.synchronize()?;
        }
        Ok(Self {
            device: on.then_some(device),
            last: std::time::Instant::now(),
        })
    }

    /// `(total, host)` seconds since the previous lap: `host` up to this call (the time to
    /// enqueue the phase), `total` up to the device finishing it (both 0 when off).
    fn lap(&mut self) -> Result<(f64, f64)> {
        let Some(device) = self.device else {
            return Ok((0.0, 0.0));
        };
        let host = self.last.elapsed().as_secs_f64();
        device.synchronize()?;
        let now = std::time::Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        Ok((dt, host))
    }
}

/// A model with its optimizers and position in the schedule.
#[derive(Debug)]
pub struct Trainer {
    model: Gpt,
    /// Matrices (rank ≥ 2), with weight decay.
    decay: AdamW,
    /// Gains (rank 1), without weight decay.
    no_decay: AdamW,
    vars: Vec<Var>,
    config: TrainConfig,
    step: usize,
    phase_timing: bool,
    autograd: bool,
    /// Whether steps after the first replay a recorded CUDA graph ([`Trainer::set_cuda_graph`]).
    cuda_graph: bool,
    /// Eager steps run under [`CudaGraph::warm_up`] since the graph was turned on (a resumed
    /// trainer starts at a later step but still needs its own).
    warm_steps: usize,
    /// The recorded step, once captured.
    graph: Option<StepGraph>,
}

/// Eager steps before the step is recorded as a CUDA graph ([`CudaGraph::warm_up`]): the first
/// one loads the kernels, times the GEMMs' algorithms and caches candle's kernel parameters, none
/// of which a capture may do.
const GRAPH_WARM_UP_STEPS: usize = 1;

/// The training step recorded as a CUDA graph, and the tensors it reads and writes in place.
#[derive(Debug)]
struct StepGraph {
    graph: CudaGraph,
    /// Inputs and targets `(batch, block)` u32, refilled before each launch.
    inputs: Tensor,
    targets: Tensor,
    /// `(2, 3)` f32: `[lr, scale_m, scale_v]` of the decay and no-decay groups, refilled before
    /// each launch.
    schedule: Tensor,
    /// `(2,)` f32: the step's loss and gradient norm, written by each launch.
    outputs: Tensor,
}

impl Trainer {
    /// A freshly initialised model (seeded by `train.seed`) on `device`.
    pub fn new(model: GptConfig, train: TrainConfig, device: &Device) -> Result<Self> {
        train.validate()?;
        let gpt = Gpt::new(model, train.seed, device)?;
        Self::with_model(gpt, train)
    }

    fn with_model(mut model: Gpt, config: TrainConfig) -> Result<Self> {
        model.set_compute_dtype(config.precision.dtype())?;
        let params = model.named_params();
        let vars = params.iter().map(|(_, v)| v.clone()).collect();
        let (matrices, gains): (Vec<_>, Vec<_>) =
            params.into_iter().partition(|(_, v)| v.rank() >= 2);
        let adam = |weight_decay| AdamWParams {
            lr: config.lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: 1e-8,
            weight_decay,
        };
        Ok(Self {
            decay: AdamW::new(matrices, adam(config.weight_decay))?,
            no_decay: AdamW::new(gains, adam(0.0))?,
            vars,
            model,
            config,
            step: 0,
            phase_timing: false,
            autograd: false,
            cuda_graph: false,
            warm_steps: 0,
            graph: None,
        })
    }

    /// The model.
    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// The optimisation settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps done so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Learning rate of step `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        let c = &self.config;
        cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
    }

    /// Turns per-phase timing of [`Self::train_step`] on or off ([`StepStats::phases`]).
    pub fn set_phase_timing(&mut self, on: bool) {
        self.phase_timing = on;
    }

    /// Computes the gradients with candle's autograd over the whole model ([`Gpt::loss`], then
    /// `backward`: the reference) instead of the fused training pass ([`Gpt::training_pass`], the
    /// default; same loss and gradients up to rounding, faster).
    pub fn set_autograd(&mut self, on: bool) {
        self.autograd = on;
    }

    /// Records the training step as a CUDA graph after the first step and replays it for every
    /// later one: one launch instead of about 200, the same kernels, so the same numbers (the
    /// batch, the learning rate and the bias corrections are refilled on the device before each
    /// launch). Needs what [`Self::cuda_graph_blocker`] checks: an error names the setting in
    /// the way (here and in [`Self::train_step`]).
    pub fn set_cuda_graph(&mut self, on: bool) -> Result<()> {
        self.cuda_graph = on;
        self.warm_steps = 0;
        self.graph = None;
        self.check_cuda_graph()
    }

    /// What the training step needs to be recorded as a CUDA graph and the current settings lack,
    /// if anything: a CUDA device, the fused pass (not autograd), one micro-batch per step, no
    /// dropout and no random attention decisions (a recorded step would repeat one draw), no
    /// phase timing.
    pub fn cuda_graph_blocker(&self) -> Option<&'static str> {
        let random_attention = matches!(
            self.model.config().attention,
            AttentionKind::HashSparse { .. } | AttentionKind::QkSparse { .. }
        );
        Some(if !self.model.device().is_cuda() {
            "a CUDA device"
        } else if self.autograd {
            "the fused training pass, not autograd"
        } else if self.config.grad_accum != 1 {
            "grad_accum = 1"
        } else if self.model.config().dropout > 0.0 {
            "dropout = 0 (a recorded step would repeat one dropout mask)"
        } else if random_attention {
            "an attention without random draws (a recorded step would repeat one draw)"
        } else if self.phase_timing {
            "phase timing off"
        } else {
            return None;
        })
    }

    /// An error naming the setting that stops [`Self::set_cuda_graph`] when it is on.
    fn check_cuda_graph(&self) -> Result<()> {
        match self.cuda_graph_blocker().filter(|_| self.cuda_graph) {
            Some(conflict) => bail!("a CUDA graph of the training step needs {conflict}"),
            None => Ok(()),
        }
    }

    /// Sets the learning rate of step `self.step` on both groups and counts one more update in
    /// each: the hyper-parameters of the decay and no-decay updates, gradients scaled by
    /// `grad_scale`.
    fn next_updates(&mut self, grad_scale: f64) -> (f64, [AdamWUpdate; 2]) {
        let lr = self.lr_at(self.step);
        self.decay.set_learning_rate(lr);
        self.no_decay.set_learning_rate(lr);
        let hp = [
            self.decay.next_update(grad_scale),
            self.no_decay.next_update(grad_scale),
        ];
        (lr, hp)
    }

    /// Clips `grads` to `grad_clip` (when set) and queues both groups' updates `hp`, reading the
    /// learning rates and bias corrections from the `(2, 3)` `schedule` when given. Returns the
    /// gradient norm before clipping.
    fn clip_and_update(
        &self,
        grads: &mut Gradients,
        hp: &[AdamWUpdate; 2],
        schedule: Option<&Tensor>,
    ) -> Result<Tensor> {
        let clip = self.config.grad_clip;
        let grad_norm = if clip > 0.0 {
            grads.clip_global_norm(clip)?
        } else {
            grads.global_norm()?
        };
        let rows = match schedule {
            Some(s) => [Some(s.get(0)?), Some(s.get(1)?)],
            None => [None, None],
        };
        self.decay.apply(grads, &hp[0], rows[0].as_ref())?;
        self.no_decay.apply(grads, &hp[1], rows[1].as_ref())?;
        Ok(grad_norm)
    }

    /// One optimizer step over `grad_accum` micro-batches of the training split (a replay of the
    /// recorded step with [`Self::set_cuda_graph`]).
    pub fn train_step(&mut self, data: &CharDataset) -> Result<StepStats> {
        self.check_cuda_graph()?;
        if !self.cuda_graph {
            return self.eager_step(data);
        }
        if self.warm_steps >= GRAPH_WARM_UP_STEPS {
            return self.graph_step(data);
        }
        self.warm_steps += 1;
        let device = self.model.device().clone();
        CudaGraph::warm_up(&device, || self.eager_step(data))
    }

    /// Inputs and targets `(batch_size, block_size)` of micro-batch `micro` of the current step,
    /// seeded by the step: the eager and the recorded step train on the same batches.
    fn train_batch(&self, data: &CharDataset, micro: u64) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let seed = mix_seed(&[c.seed, TRAIN_BATCH_TAG, self.step as u64, micro]);
        let block = self.model.config().block_size;
        data.batch(Split::Train, c.batch_size, block, seed, self.model.device())
    }

    /// [`Self::train_step`] op by op.
    fn eager_step(&mut self, data: &CharDataset) -> Result<StepStats> {
        let c = &self.config;
        let block = self.model.config().block_size;
        let device = self.model.device().clone();
        let step = self.step as u64;
        let mut grads = Gradients::new();
        let mut loss_sum: Option<Tensor> = None;
        let mut phases = PhaseTimes::default();
        let mut clock = PhaseClock::new(self.phase_timing, &device)?;
        for micro in 0..c.grad_accum as u64 {
            let (x, y) = self.train_batch(data, micro)?;
            let dropout_seed = mix_seed(&[c.seed, TRAIN_DROPOUT_TAG, step, micro]);
            let (loss, store) = if self.autograd {
                let loss = self.model.loss(&x, &y, true, dropout_seed)?;
                phases.add_forward(clock.lap()?);
                let store = loss.backward()?;
                (loss, store)
            } else {
                let pass = self.model.training_pass(&x, &y, true, dropout_seed)?;
                phases.add_forward(clock.lap()?);
                let loss = pass.loss().clone();
                (loss, pass.backward()?)
            };
            grads.accumulate(&store, &self.vars, 1.0 / c.grad_accum as f64)?;
            // Summed on the device: the step never waits for it (see `StepStats`).
            loss_sum = Some(match loss_sum {
                Some(sum) => (sum + loss)?,
                None => loss,
            });
            phases.add_backward(clock.lap()?);
        }
        let loss = match loss_sum {
            Some(sum) => (sum / c.grad_accum as f64)?,
            None => bail!("train_step: grad_accum must be at least 1"),
        };
        let tokens = c.grad_accum * c.batch_size * block;
        let (lr, hp) = self.next_updates(grads.scale());
        let grad_norm = self.clip_and_update(&mut grads, &hp, None)?;
        (phases.optimizer, phases.optimizer_host) = clock.lap()?;
        self.step += 1;
        Ok(StepStats {
            step: self.step - 1,
            loss,
            lr,
            grad_norm,
            tokens,
            phases: self.phase_timing.then_some(phases),
        })
    }

    /// [`Self::train_step`] as a launch of the recorded step (recorded on the first call).
    fn graph_step(&mut self, data: &CharDataset) -> Result<StepStats> {
        let c = &self.config;
        let block = self.model.config().block_size;
        let device = self.model.device().clone();
        let (x, y) = self.train_batch(data, 0)?;
        let tokens = c.batch_size * block;
        let (lr, hp) = self.next_updates(1.0);
        let schedule = Tensor::new(&hp.map(|h| [h.lr, h.scale_m, h.scale_v]), &device)?;
        let graph = match self.graph.take() {
            Some(g) => {
                g.inputs.slice_set(&x, 0, 0)?;
                g.targets.slice_set(&y, 0, 0)?;
                g.schedule.slice_set(&schedule, 0, 0)?;
                g
            }
            None => self.record_step(x, y, schedule, &hp)?,
        };
        graph.graph.launch()?;
        // A copy: the next launch overwrites the outputs.
        let outputs = graph.outputs.copy()?;
        self.graph = Some(graph);
        self.step += 1;
        Ok(StepStats {
            step: self.step - 1,
            loss: outputs.get(0)?,
            lr,
            grad_norm: outputs.get(1)?,
            tokens,
            phases: None,
        })
    }

    /// Records one training step on `inputs` and `targets` with the learning rates and bias
    /// corrections of `schedule` (`hp` gives the rest of the update): the tensors become the
    /// graph's buffers.
    fn record_step(
        &self,
        inputs: Tensor,
        targets: Tensor,
        schedule: Tensor,
        hp: &[AdamWUpdate; 2],
    ) -> Result<StepGraph> {
        let device = self.model.device();
        let outputs = Tensor::zeros(2, DType::F32, device)?;
        let (graph, ()) = CudaGraph::capture(device, || {
            let pass = self.model.training_pass(&inputs, &targets, true, 0)?;
            let loss = pass.loss().reshape(1)?;
            let mut grads = Gradients::new();
            grads.accumulate(&pass.backward()?, &self.vars, 1.0)?;
            let grad_norm = self.clip_and_update(&mut grads, hp, Some(&schedule))?;
            outputs.slice_set(&Tensor::cat(&[loss, grad_norm.reshape(1)?], 0)?, 0, 0)
        })?;
        Ok(StepGraph {
            graph,
            inputs,
            targets,
            schedule,
            outputs,
        })
    }

    /// Mean loss (nats per character) over `eval_batches` fixed batches of a split, no dropout.
    pub fn evaluate(&self, data: &CharDataset, split: Split) -> Result<f64> {
        let c = &self.config;
        let block = self.model.config().block_size;
        let split_tag = match split {
            Split::Train => 0,
            Split::Val => 1,
        };
        let mut sum = 0f64;
        for i in 0..c.eval_batches as u64 {
            let seed = mix_seed(&[c.seed, EVAL_BATCH_TAG, split_tag, i]);
            let (x, y) = data.batch(split, c.batch_size, block, seed, self.model.device())?;
            sum += self.model.loss(&x, &y, false, 0)?.to_scalar::<f32>()? as f64;
        }
        Ok(sum / c.eval_batches as f64)
    }

    /// The checkpoint metadata of the current state.
    pub fn meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            format: CHECKPOINT_FORMAT,
            step: self.step,
            model: self.model.config().clone(),
            train: self.config.clone(),
        }
    }

    /// Writes the checkpoint into `dir` (created if needed), each file atomically.
    pub fn save(&self, dir: &Path, vocab: &Vocab) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| candle::Error::Msg(format!("cannot create {}: {e}", dir.display())))?;
        let mut tensors: HashMap<String, Tensor> = self
            .model
            .named_params()
            .into_iter()
            .map(|(n, v)| (format!("{MODEL_PREFIX}{n}"), v.as_tensor().clone()))
            .collect();
        tensors.extend(self.decay.state(DECAY_PREFIX)?);
        tensors.extend(self.no_decay.state(NO_DECAY_PREFIX)?);
        write_atomically(&dir.join(WEIGHTS_FILE), |tmp| {
            candle::safetensors::save(&tensors, tmp)
        })?;
        write_json(&dir.join(VOCAB_FILE), vocab)?;
        write_json(&dir.join(CONFIG_FILE), &self.meta())
    }

    /// Resumes from the checkpoint in `dir`. The saved architecture must equal `model` and the
    /// saved settings must agree with `train` (except `max_steps`, `eval_interval`,
    /// `eval_batches`, taken from `train`); the saved vocabulary must equal `vocab`.
    pub fn resume(
        dir: &Path,
        model: &GptConfig,
        train: TrainConfig,
        vocab: &Vocab,
        device: &Device,
    ) -> Result<Self> {
        train.validate()?;
        let meta = read_meta(dir)?;
        if &meta.model != model {
            bail!(
                "checkpoint {} was trained with a different model config:\n  checkpoint {}\n  requested  {}",
                dir.display(),
                to_json(&meta.model)?,
                to_json(model)?
            )
        }
        let conflicts = train.resume_conflicts(&meta.train)?;
        if !conflicts.is_empty() {
            bail!(
                "checkpoint {} was trained with different settings: {}",
                dir.display(),
                conflicts.join("; ")
            )
        }
        let saved_vocab = read_vocab(dir)?;
        if &saved_vocab != vocab {
            bail!(
                "checkpoint {} has a {}-character vocabulary that differs from the data's {} \
                 characters; resume on the same text",
                dir.display(),
                saved_vocab.len(),
                vocab.len()
            )
        }
        let tensors = read_tensors(dir, device)?;
        let gpt = Gpt::new(meta.model.clone(), train.seed, device)?;
        gpt.load_params(&tensors, MODEL_PREFIX)?;
        let mut trainer = Self::with_model(gpt, train)?;
        trainer
            .decay
            .load_state(&tensors, DECAY_PREFIX, meta.step as u64)?;
        trainer
            .no_decay
            .load_state(&tensors, NO_DECAY_PREFIX, meta.step as u64)?;
        trainer.step = meta.step;
        Ok(trainer)
    }
}

/// Loads the model (f32 compute) and vocabulary of a checkpoint for inference.
pub fn load_model(dir: &Path, device: &Device) -> Result<(Gpt, Vocab, CheckpointMeta)> {
    let meta = read_meta(dir)?;
    let vocab = read_vocab(dir)?;
    if vocab.len() != meta.model.vocab_size {
        bail!(
            "checkpoint {}: vocab.json has {} characters but the model has vocab_size {}",
            dir.display(),
            vocab.len(),
            meta.model.vocab_size
        )
    }
    let tensors = read_tensors(dir, device)?;
    let gpt = Gpt::new(meta.model.clone(), 0, device)?;
    gpt.load_params(&tensors, MODEL_PREFIX)?;
    Ok((gpt, vocab, meta))
}

/// Whether `dir` holds a checkpoint (its `config.json` exists).
pub fn checkpoint_exists(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// Reads and parses `config.json` of a checkpoint.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let meta: CheckpointMeta = read_json(&dir.join(CONFIG_FILE))?;
    if meta.format != CHECKPOINT_FORMAT {
        bail!(
            "checkpoint {} has format {}, this build reads format {CHECKPOINT_FORMAT}",
            dir.display(),
            meta.format
        )
    }
    meta.model.validate()?;
    Ok(meta)
}

fn read_vocab(dir: &Path) -> Result<Vocab> {
    read_json(&dir.join(VOCAB_FILE))
}

fn read_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(WEIGHTS_FILE);
    candle::safetensors::load(&path, device)
        .map_err(|e| candle::Error::Msg(format!("cannot read {}: {e}", path.display())))
}

fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| candle::Error::Msg(format!("json: {e}")))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| candle::Error::Msg(format!("cannot parse {}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| candle::Error::Msg(format!("json for {}: {e}", path.display())))?;
    write_atomically(path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(candle::Error::from)
    })
}

/// Runs `write` on a temporary sibling of `path`, then renames it over `path`, so readers see
/// either the old or the new file, never a partial one.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| candle::Error::Msg(format!("not a file path: {}", path.display())))?;
    // Keep the extension last: some writers (the PNG encoder) pick the format from it.
    let mut tmp_name = std::ffi::OsString::from(".tmp-");
    tmp_name.push(file_name);
    let tmp: PathBuf = path.with_file_name(tmp_name);
    write(&tmp).map_err(|e| candle::Error::Msg(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        candle::Error::Msg(format!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })
}
