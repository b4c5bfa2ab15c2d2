//! Where a char-LM training step spends its time: forward and forward+backward of each op of the
//! GPT's step on the training shapes (B·T rows of width C), one at a time, plus the whole model
//! and the optimizer. Each forward+backward takes its loss as `(out · r).sum()` for a fixed random
//! `r`, so every op sees a dense output gradient; the `loss only` row is that cost alone.
//!
//! ```text
//! cargo run --release --features cuda --example bench_train_ops -- --device cuda
//! ```

mod common;

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use candle_sparse_attn::{flash_attn, AttnParams};
use candle_sparse_models::attention::AttentionKind;
use candle_sparse_models::layers::{in_dtype, layer_norm, linear};
use candle_sparse_models::optim::{AdamW, AdamWParams, Gradients};
use candle_sparse_models::{Gpt, GptConfig, PositionEncoding};
use clap::Parser;
use common::time_ms;

#[derive(Parser, Debug)]
#[command(about = "Time each op of a char-LM training step (forward and forward+backward)")]
struct Args {
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Context length.
    #[arg(long, default_value_t = 8192)]
    seq: usize,
    /// Residual width.
    #[arg(long, default_value_t = 384)]
    width: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 6)]
    heads: usize,
    /// Layers of the whole-model rows.
    #[arg(long, default_value_t = 6)]
    layers: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 65)]
    vocab: usize,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// `(out · r).sum()` with `r` drawn once per shape: a loss whose gradient is dense.
fn loss_of(y: &Tensor, r: &Tensor) -> candle::Result<Tensor> {
    (y.to_dtype(DType::F32)? * r)?.sum_all()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device {other}"),
    };
    candle_sparse_attn::keep_memory_pool(&dev)?;
    let dt = if dev.is_cuda() { DType::BF16 } else { DType::F32 };
    let (b, t, c, nh) = (args.batch, args.seq, args.width, args.heads);
    let hd = c / nh;
    let rows = b * t;
    let var = |shape: &[usize], std: f32| -> candle::Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, std, shape, &dev)?)
    };
    let rand = |shape: &[usize]| Tensor::randn(0f32, 1f32, shape, &dev);
    let x = var(&[b, t, c], 1.0)?;
    let x4 = var(&[b, t, 4 * c], 1.0)?;
    let gain = var(&[c], 1.0)?;
    let wte = var(&[args.vocab, c], 0.02)?;
    let w_attn = var(&[3 * c, c], 0.02)?;
    let w_fc = var(&[4 * c, c], 0.02)?;
    let w_proj = var(&[c, 4 * c], 0.02)?;
    // Token ids spread over the vocabulary (a fixed multiplicative pattern, no generator needed).
    let ids: Vec<u32> = (0..rows).map(|i| ((i * 7919) % args.vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, rows, &dev)?;
    let logits_var = var(&[rows, args.vocab], 1.0)?;
    let qkv = var(&[b, t, 3 * c], 1.0)?;

    type Op<'a> = (&'a str, Box<dyn Fn() -> candle::Result<Tensor> + 'a>);
    let ops: Vec<Op> = vec![
        ("loss only (b,t,c)", Box::new(|| Ok(x.as_tensor().clone()))),
        (
            "cast x f32->compute",
            Box::new(|| in_dtype(&x, dt)),
        ),
        (
            "embedding (cast wte + index_select)",
            Box::new(|| in_dtype(&wte, dt)?.index_select(&ids, 0)),
        ),
        (
            "layer_norm (composite)",
            Box::new(|| layer_norm(&in_dtype(&x, dt)?, &in_dtype(&gain, dt)?, 1e-5)),
        ),
        (
            "cast x only for the above",
            Box::new(|| in_dtype(&x, dt)),
        ),
        (
            "linear c_attn (c -> 3c)",
            Box::new(|| linear(&in_dtype(&x, dt)?, &in_dtype(&w_attn, dt)?)),
        ),
        (
            "qkv split + transpose + contiguous",
            Box::new(|| {
                let q = in_dtype(&qkv, dt)?
                    .reshape((b, t, 3 * nh, hd))?
                    .transpose(1, 2)?;
                let parts = [0, 1, 2]
                    .map(|i| q.narrow(1, i * nh, nh).and_then(|p| p.contiguous()));
                let [q, k, v] = parts;
                Tensor::cat(&[q?, k?, v?], 1)
            }),
        ),
        (
            "flash attention dense (causal)",
            Box::new(|| {
                let q = in_dtype(&qkv, dt)?
                    .reshape((b, t, 3 * nh, hd))?
                    .transpose(1, 2)?;
                let part = |i: usize| q.narrow(1, i * nh, nh);
                flash_attn(&part(0)?, &part(1)?, &part(2)?, &AttnParams::default())?
                    .transpose(1, 2)?
                    .reshape((b, t, c))
            }),
        ),
        (
            "linear c_fc (c -> 4c)",
            Box::new(|| linear(&in_dtype(&x, dt)?, &in_dtype(&w_fc, dt)?)),
        ),
        (
            "gelu_erf (b,t,4c)",
            Box::new(|| in_dtype(&x4, dt)?.gelu_erf()),
        ),
        (
            "cast x4 only for the above",
            Box::new(|| in_dtype(&x4, dt)),
        ),
        (
            "linear mlp_proj (4c -> c)",
            Box::new(|| linear(&in_dtype(&x4, dt)?, &in_dtype(&w_proj, dt)?)),
        ),
        (
            "residual add",
            Box::new(|| {
                let xb = in_dtype(&x, dt)?;
                &xb + &xb
            }),
        ),
        (
            "head x·wteᵀ -> f32",
            Box::new(|| linear(&in_dtype(&x, dt)?, &in_dtype(&wte, dt)?)?.to_dtype(DType::F32)),
        ),
        (
            "cross_entropy (candle_nn)",
            Box::new(|| {
                candle_nn::loss::cross_entropy(logits_var.as_tensor(), &ids)?.unsqueeze(0)
            }),
        ),
    ];
    println!(
        "B={b} T={t} C={c} H={nh} vocab={} device={} dtype={dt:?}; median of {} runs, ms",
        args.vocab, args.device, args.reps
    );
    println!("| op | forward | forward+backward |");
    println!("|---|---|---|");
    for (name, f) in &ops {
        let shape = f()?.dims().to_vec();
        let r = rand(&shape)?;
        let fwd = time_ms(&dev, 2, args.reps, || {
            f()?;
            Ok(())
        })?;
        let both = time_ms(&dev, 2, args.reps, || {
            loss_of(&f()?, &r)?.backward()?;
            Ok(())
        })?;
        println!("| {name} | {fwd:.3} | {both:.3} |");
    }

    // The whole model and the optimizer, as in a training step.
    let cfg = GptConfig {
        vocab_size: args.vocab,
        block_size: t,
        n_layer: args.layers,
        n_head: nh,
        n_embd: c,
        dropout: 0.0,
        positions: PositionEncoding::Learned,
        attention: AttentionKind::Dense,
    };
    let mut gpt = Gpt::new(cfg, 1, &dev)?;
    gpt.set_compute_dtype(dt)?;
    let inputs = ids.reshape((b, t))?;
    let fwd = time_ms(&dev, 2, args.reps, || {
        gpt.loss(&inputs, &inputs, true, 1)?;
        Ok(())
    })?;
    let params = gpt.named_params();
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut store = None;
    let both = time_ms(&dev, 2, args.reps, || {
        store = Some(gpt.loss(&inputs, &inputs, true, 1)?.backward()?);
        Ok(())
    })?;
    let store = store.expect("timed at least once");
    let mut adam = AdamW::new(
        params,
        AdamWParams {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    )?;
    let accumulate = time_ms(&dev, 2, args.reps, || {
        let mut g = Gradients::new();
        g.accumulate(&store, &vars, 1.0)?;
        Ok(())
    })?;
    let mut grads = Gradients::new();
    grads.accumulate(&store, &vars, 1.0)?;
    let clip = time_ms(&dev, 2, args.reps, || {
        grads.clip_global_norm(1.0)?;
        Ok(())
    })?;
    let step = time_ms(&dev, 2, args.reps, || {
        adam.step(&grads)?;
        Ok(())
    })?;
    println!("| model loss ({} layers) | {fwd:.3} | {both:.3} |", args.layers);
    println!("| gradients accumulate (f32, all params) | {accumulate:.3} | |");
    println!("| clip global norm | {clip:.3} | |");
    println!("| AdamW step (all params) | {step:.3} | |");
    Ok(())
}
