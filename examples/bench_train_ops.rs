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
use candle::{DType, Device, Tensor, Var, D};
use candle_sparse_attn::{flash_attn, fused, AttnParams};
use candle_sparse_models::attention::{Attention, AttentionKind};
use candle_sparse_models::layers::{in_dtype, layer_norm, linear, SeededVars};
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
    /// Attention kinds of the per-kind rows (attention alone, whole model), repeatable.
    #[arg(long = "kind", default_values_t = [
        "dense".to_string(),
        "hash_sparse:16".to_string(),
        "qk_sparse:0.5,0.5".to_string(),
        "sparsek:256,256".to_string(),
    ])]
    kinds: Vec<String>,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// The LayerNorm the GPT used before the fused op: candle primitives, statistics in f32.
fn composite_layer_norm(x: &Tensor, gain: &Tensor) -> candle::Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(gain)
}

/// `(out · r).sum()` with `r` drawn once per shape: a loss whose gradient is dense.
fn loss_of(y: &Tensor, r: &Tensor) -> candle::Result<Tensor> {
    (y.to_dtype(DType::F32)? * r)?.sum_all()
}

/// The GPT of the char-LM runs with attention `kind`.
fn model_config(args: &Args, kind: AttentionKind) -> GptConfig {
    GptConfig {
        vocab_size: args.vocab,
        block_size: args.seq,
        n_layer: args.layers,
        n_head: args.heads,
        n_embd: args.width,
        dropout: 0.0,
        positions: PositionEncoding::Learned,
        attention: kind,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device {other}"),
    };
    candle_sparse_attn::keep_memory_pool(&dev)?;
    let dt = if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
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
    let ids: Vec<u32> = (0..rows)
        .map(|i| ((i * 7919) % args.vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, rows, &dev)?;
    let logits_var = var(&[rows, args.vocab], 1.0)?;
    let qkv = var(&[b, t, 3 * c], 1.0)?;

    type Op<'a> = (&'a str, Box<dyn Fn() -> candle::Result<Tensor> + 'a>);
    let ops: Vec<Op> = vec![
        ("loss only (b,t,c)", Box::new(|| Ok(x.as_tensor().clone()))),
        ("cast x f32->compute", Box::new(|| in_dtype(&x, dt))),
        (
            "embedding (cast wte + index_select)",
            Box::new(|| in_dtype(&wte, dt)?.index_select(&ids, 0)),
        ),
        (
            "embedding (cast wte + fused)",
            Box::new(|| fused::embedding(&in_dtype(&wte, dt)?, &ids)),
        ),
        (
            "layer_norm (composite)",
            Box::new(|| composite_layer_norm(&in_dtype(&x, dt)?, &in_dtype(&gain, dt)?)),
        ),
        (
            "layer_norm (fused)",
            Box::new(|| layer_norm(&in_dtype(&x, dt)?, &in_dtype(&gain, dt)?, 1e-5)),
        ),
        ("cast x only for the above", Box::new(|| in_dtype(&x, dt))),
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
                let parts = [0, 1, 2].map(|i| q.narrow(1, i * nh, nh).and_then(|p| p.contiguous()));
                let [q, k, v] = parts;
                Tensor::cat(&[q?, k?, v?], 1)
            }),
        ),
        (
            "qkv split_heads (fused) + cat",
            Box::new(|| {
                let qkv = in_dtype(&qkv, dt)?;
                let parts = [0, 1, 2].map(|i| fused::split_heads(&qkv, nh, i));
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
            "gelu (fused)",
            Box::new(|| fused::gelu(&in_dtype(&x4, dt)?)),
        ),
        ("cast x4 only for the above", Box::new(|| in_dtype(&x4, dt))),
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
            Box::new(|| candle_nn::loss::cross_entropy(logits_var.as_tensor(), &ids)?.unsqueeze(0)),
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

    // Per attention kind: attention alone (queries, keys, values and the scorer's scores from
    // the inputs above, as in one layer), then the whole model.
    let inputs = ids.reshape((b, t))?;
    for kind in &args.kinds {
        let kind: AttentionKind = kind.parse()?;
        let attention = Attention::new(&kind)?;
        let vars = SeededVars::new(1);
        let scorer = attention.new_scorer(c, nh, vars.var_builder(&dev))?;
        let attend = || -> candle::Result<Tensor> {
            let qkv = in_dtype(&qkv, dt)?;
            let [q, k, v] = [0, 1, 2].map(|i| fused::split_heads(&qkv, nh, i));
            let scores = match &scorer {
                Some(s) => Some(s.forward_at(&in_dtype(&x, dt)?, 0)?),
                None => None,
            };
            attention
                .forward(&q?, &k?, &v?, scores.as_ref(), None, 0, true, 1)?
                .transpose(1, 2)?
                .reshape((b, t, c))
        };
        let r = rand(&[b, t, c])?;
        let fwd = time_ms(&dev, 2, args.reps, || {
            attend()?;
            Ok(())
        })?;
        let both = time_ms(&dev, 2, args.reps, || {
            loss_of(&attend()?, &r)?.backward()?;
            Ok(())
        })?;
        println!("| attention {kind} (one layer, with split) | {fwd:.3} | {both:.3} |");
        let mut gpt = Gpt::new(model_config(&args, kind.clone()), 1, &dev)?;
        gpt.set_compute_dtype(dt)?;
        let fwd = time_ms(&dev, 2, args.reps, || {
            gpt.loss(&inputs, &inputs, true, 1)?;
            Ok(())
        })?;
        let both = time_ms(&dev, 2, args.reps, || {
            gpt.loss(&inputs, &inputs, true, 1)?.backward()?;
            Ok(())
        })?;
        println!(
            "| model loss {kind} ({} layers) | {fwd:.3} | {both:.3} |",
            args.layers
        );
    }

    // The optimizer over the dense model's parameters, as in a training step.
    let mut gpt = Gpt::new(model_config(&args, AttentionKind::Dense), 1, &dev)?;
    gpt.set_compute_dtype(dt)?;
    let params = gpt.named_params();
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let store = gpt.loss(&inputs, &inputs, true, 1)?.backward()?;
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
    println!("| gradients accumulate (f32, all params) | {accumulate:.3} | |");
    println!("| clip global norm | {clip:.3} | |");
    println!("| AdamW step (fused, all params) | {step:.3} | |");
    Ok(())
}
