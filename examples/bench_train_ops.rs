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
use candle_sparse_attn::scfa::{
    compact_kept, gather_rows, lsh_buckets, random_keep, random_rotations, sort_by_bucket, RowKind,
};
use candle_sparse_attn::{
    flash_attn, fused, hash_sparse_attn, qk_sparse_attn, sparse_causal_attn, AttnParams,
    HashConfig, ScfaParams,
};
use candle_sparse_models::attention::{Attention, AttentionKind};
use candle_sparse_models::layers::{in_dtype, layer_norm, linear, SeededVars};
use candle_sparse_models::optim::{AdamW, AdamWParams, Gradients};
use candle_sparse_models::{Gpt, GptConfig, PositionEncoding};
use clap::Parser;
use common::time_ms;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

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
    /// Only the per-stage breakdown of one layer's attention (hash and qk pipelines).
    #[arg(long)]
    breakdown_only: bool,
    /// Only the whole-model rows: candle's autograd against the fused training pass (time, host
    /// enqueue time, and the largest relative difference of their gradients).
    #[arg(long)]
    model_only: bool,
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
    if args.model_only {
        return model_rows(&args, &dev, dt);
    }
    attention_breakdown(&args, &dev, dt)?;
    if args.breakdown_only {
        return Ok(());
    }
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
            "gelu candle (tanh) (b,t,4c)",
            Box::new(|| in_dtype(&x4, dt)?.gelu()),
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

    // The row kernels of the fused training pass (no autograd) on (B·T, C) rows of the compute
    // dtype, and the LSH of one (b, heads, t, head_dim) tensor with 16 buckets; each timed run
    // queues 10 calls (ms per call, so the synchronisation is amortised).
    {
        let ln_in = || Tensor::randn(0f32, 1f32, (rows, c), &dev)?.to_dtype(dt);
        let (xl, dl, dyl, accl) = (ln_in()?, ln_in()?, ln_in()?, ln_in()?);
        let gl = (Tensor::randn(0f32, 0.2f32, c, &dev)? + 1.0)?.to_dtype(dt)?;
        let heads_x = Tensor::randn(0f32, 1f32, (b, nh, t, hd), &dev)?.to_dtype(dt)?;
        let rot = random_rotations(nh, hd, 16, 7, &dev)?;
        let per_call = |f: &dyn Fn() -> candle::Result<()>| -> Result<f64> {
            const CALLS: usize = 10;
            let ms = time_ms(&dev, 2, args.reps, || {
                for _ in 0..CALLS {
                    f()?;
                }
                Ok(())
            })?;
            Ok(ms / CALLS as f64)
        };
        type Call<'a> = (&'a str, Box<dyn Fn() -> candle::Result<()> + 'a>);
        let calls: Vec<Call> = vec![
            (
                "fused::layer_norm (rows, c)",
                Box::new(|| fused::layer_norm(&xl, &gl, 1e-5).map(|_| ())),
            ),
            (
                "fused::add_layer_norm (rows, c)",
                Box::new(|| fused::add_layer_norm(&xl, &dl, &gl, 1e-5).map(|_| ())),
            ),
            (
                "fused::layer_norm_backward (rows, c)",
                Box::new(|| fused::layer_norm_backward(&xl, &gl, &dyl, 1e-5).map(|_| ())),
            ),
            (
                "fused::layer_norm_backward_add (rows, c)",
                Box::new(|| {
                    fused::layer_norm_backward_add(&xl, &gl, &dyl, &accl, 1e-5).map(|_| ())
                }),
            ),
            (
                "lsh_buckets (b, heads, t, head_dim), 16 buckets",
                Box::new(|| lsh_buckets(&heads_x, &rot).map(|_| ())),
            ),
        ];
        for (name, f) in &calls {
            println!("| {name} | {:.4} | |", per_call(f.as_ref())?);
        }
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

/// Per attention kind, the whole model's loss and gradients (dropout 0.1) by candle's autograd
/// (`Gpt::loss` + `backward`) and by the fused training pass (`Gpt::training_pass`): synchronised
/// and host-enqueue medians, and the largest relative error of a parameter gradient of the fused
/// pass against autograd.
fn model_rows(args: &Args, dev: &Device, dt: DType) -> Result<()> {
    let (b, t) = (args.batch, args.seq);
    let ids = |shift: usize| -> Vec<u32> {
        (0..b * t)
            .map(|i| (((i + shift) * 7919) % args.vocab) as u32)
            .collect()
    };
    let inputs = Tensor::from_vec(ids(0), (b, t), dev)?;
    let targets = Tensor::from_vec(ids(1), (b, t), dev)?;
    println!(
        "\n| model loss + gradients ({} layers, {dt:?}) | autograd ms | autograd host ms | fused ms | fused host ms | max grad rel err (param) |",
        args.layers
    );
    println!("|---|---|---|---|---|---|");
    for kind in &args.kinds {
        let kind: AttentionKind = kind.parse()?;
        let mut cfg = model_config(args, kind.clone());
        cfg.dropout = 0.1;
        let mut gpt = Gpt::new(cfg, 1, dev)?;
        gpt.set_compute_dtype(dt)?;
        let autograd = || -> Result<candle::backprop::GradStore> {
            Ok(gpt.loss(&inputs, &targets, true, 1)?.backward()?)
        };
        let fused_pass = || -> Result<candle::backprop::GradStore> {
            Ok(gpt.training_pass(&inputs, &targets, true, 1)?.backward()?)
        };
        let a_ms = time_ms(dev, 2, args.reps, || autograd().map(drop))?;
        let a_host = enqueue_ms(dev, args.reps, || autograd().map(drop))?;
        let f_ms = time_ms(dev, 2, args.reps, || fused_pass().map(drop))?;
        let f_host = enqueue_ms(dev, args.reps, || fused_pass().map(drop))?;
        let (reference, fused) = (autograd()?, fused_pass()?);
        let mut worst = (0f64, String::new());
        for (name, var) in gpt.named_params() {
            let (Some(f), Some(r)) = (fused.get(var.as_tensor()), reference.get(var.as_tensor()))
            else {
                anyhow::bail!("{kind}: no gradient of {name}")
            };
            let err = candle_sparse_attn::reference::rel_err(f, r)?;
            if err > worst.0 || err.is_nan() {
                worst = (err, name);
            }
        }
        println!(
            "| {kind} | {a_ms:.3} | {a_host:.3} | {f_ms:.3} | {f_host:.3} | {:.2e} ({}) |",
            worst.0, worst.1
        );
    }
    Ok(())
}

/// Median host time in ms of enqueuing `f` (the device synchronised before, not after): close to
/// the synchronised time when `f` waits for the device somewhere.
fn enqueue_ms(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    dev.synchronize()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One layer's attention at the training shape, stage by stage: the preprocessing of the hash
/// and query/key-dropping pipelines, the sparse kernel on already-arranged rows, the glue around
/// attention, and the whole calls (synchronised time and host enqueue time).
fn attention_breakdown(args: &Args, dev: &Device, dt: DType) -> Result<()> {
    let (b, t, c, nh) = (args.batch, args.seq, args.width, args.heads);
    let hd = c / nh;
    let reps = args.reps;
    let qkv = Var::from_tensor(&Tensor::randn(0f32, 1f32, (b, t, 3 * c), dev)?.to_dtype(dt)?)?;
    let [q, k, v] = [0, 1, 2].map(|i| fused::split_heads(qkv.as_tensor(), nh, i).unwrap());
    let (qv, kv, vv) = (
        Var::from_tensor(&q)?,
        Var::from_tensor(&k)?,
        Var::from_tensor(&v)?,
    );
    let r = Tensor::randn(0f32, 1f32, (b, nh, t, hd), dev)?;
    let r_btc = Tensor::randn(0f32, 1f32, (b, t, c), dev)?;
    let sync_ms = |f: &mut dyn FnMut() -> candle::Result<()>| time_ms(dev, 2, reps, || Ok(f()?));
    let row = |name: &str, ms: f64| println!("| {name} | {ms:.3} |");
    // Two rows for `f`: "{stem} fwd{tail}" and "{stem} fwd+bwd{tail}" (backward of `(out·r).sum()`).
    let fwd_rows = |stem: &str, tail: &str, f: &dyn Fn() -> candle::Result<Tensor>| -> Result<()> {
        row(
            &format!("{stem} fwd{tail}"),
            sync_ms(&mut || f().map(|_| ()))?,
        );
        row(
            &format!("{stem} fwd+bwd{tail}"),
            sync_ms(&mut || {
                loss_of(&f()?, &r)?.backward()?;
                Ok(())
            })?,
        );
        Ok(())
    };
    println!("Attention breakdown, one layer, B={b} H={nh} T={t} D={hd} {dt:?}; median ms");
    println!("| stage | ms |");
    println!("|---|---|");
    row(
        "loss only (b,h,t,d) fwd+bwd",
        sync_ms(&mut || {
            loss_of(qv.as_tensor(), &r)?.backward()?;
            Ok(())
        })?,
    );
    row(
        "split_heads x3 fwd",
        sync_ms(&mut || {
            for i in 0..3 {
                fused::split_heads(qkv.as_tensor(), nh, i)?;
            }
            Ok(())
        })?,
    );
    row(
        "split_heads x3 fwd+bwd (loss on q+k+v)",
        sync_ms(&mut || {
            let [q, k, v] = [0, 1, 2].map(|i| fused::split_heads(qkv.as_tensor(), nh, i));
            loss_of(&((q? + k?)? + v?)?, &r)?.backward()?;
            Ok(())
        })?,
    );
    // The GPT's q/k/v since step2: three projections (rows of c_attn) and one-part head splits.
    let h_in = Var::from_tensor(&Tensor::randn(0f32, 1f32, (b, t, c), dev)?.to_dtype(dt)?)?;
    let w_attn = Var::from_tensor(&Tensor::randn(0f32, 0.02f32, (3 * c, c), dev)?)?;
    row(
        "c_attn linear + split_heads x3 fwd+bwd (one projection)",
        sync_ms(&mut || {
            let qkv = linear(h_in.as_tensor(), &in_dtype(&w_attn, dt)?)?;
            let [q, k, v] = [0, 1, 2].map(|i| fused::split_heads(&qkv, nh, i));
            loss_of(&((q? + k?)? + v?)?, &r)?.backward()?;
            Ok(())
        })?,
    );
    row(
        "c_attn as 3 linears + to_heads x3 fwd+bwd",
        sync_ms(&mut || {
            let w = in_dtype(&w_attn, dt)?;
            let [q, k, v] = [0, 1, 2]
                .map(|i| fused::to_heads(&linear(h_in.as_tensor(), &w.narrow(0, i * c, c)?)?, nh));
            loss_of(&((q? + k?)? + v?)?, &r)?.backward()?;
            Ok(())
        })?,
    );
    row(
        "output transpose+reshape fwd+bwd",
        sync_ms(&mut || {
            let y = qv.as_tensor().transpose(1, 2)?.reshape((b, t, c))?;
            loss_of(&y, &r_btc)?.backward()?;
            Ok(())
        })?,
    );
    row(
        "output merge_heads fwd+bwd",
        sync_ms(&mut || {
            loss_of(&fused::merge_heads(qv.as_tensor())?, &r_btc)?.backward()?;
            Ok(())
        })?,
    );
    let dense = || {
        flash_attn(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            &AttnParams::default(),
        )
    };
    fwd_rows("dense flash", "", &dense)?;

    // Hash-sparse with 16 buckets, stage by stage.
    let n_buckets = 16;
    row(
        "hash: random_rotations (on the device)",
        sync_ms(&mut || random_rotations(nh, hd, n_buckets, 7, dev).map(|_| ()))?,
    );
    let rot = random_rotations(nh, hd, n_buckets, 7, dev)?;
    row(
        "hash: lsh_buckets q + k",
        sync_ms(&mut || {
            lsh_buckets(&q, &rot)?;
            lsh_buckets(&k, &rot).map(|_| ())
        })?,
    );
    let (q_ids, k_ids) = (lsh_buckets(&q, &rot)?, lsh_buckets(&k, &rot)?);
    row(
        "hash: sort_by_bucket q + k",
        sync_ms(&mut || {
            sort_by_bucket(&q_ids, n_buckets, RowKind::Query)?;
            sort_by_bucket(&k_ids, n_buckets, RowKind::Key).map(|_| ())
        })?,
    );
    let qo = sort_by_bucket(&q_ids, n_buckets, RowKind::Query)?;
    let ko = sort_by_bucket(&k_ids, n_buckets, RowKind::Key)?;
    row(
        "hash: gather q, k, v",
        sync_ms(&mut || {
            gather_rows(&q, &qo.pos)?;
            gather_rows(&k, &ko.pos)?;
            gather_rows(&v, &ko.pos).map(|_| ())
        })?,
    );
    let (qs, ks, vs) = (
        Var::from_tensor(&gather_rows(&q, &qo.pos)?)?,
        Var::from_tensor(&gather_rows(&k, &ko.pos)?)?,
        Var::from_tensor(&gather_rows(&v, &ko.pos)?)?,
    );
    let (qb, kb) = (qo.bucket.clone().unwrap(), ko.bucket.clone().unwrap());
    let hash_kernel = || {
        sparse_causal_attn(
            qs.as_tensor(),
            ks.as_tensor(),
            vs.as_tensor(),
            &qo.pos,
            &ko.pos,
            Some((&qb, &kb)),
            &ScfaParams::default(),
        )
    };
    fwd_rows("hash: sparse kernel on arranged rows", "", &hash_kernel)?;
    let hash = || {
        hash_sparse_attn(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            &HashConfig::new(n_buckets, 7),
        )
    };
    fwd_rows("hash: hash_sparse_attn", "", &hash)?;
    row(
        "hash: hash_sparse_attn fwd, host enqueue",
        enqueue_ms(dev, reps, || {
            hash()?;
            Ok(())
        })?,
    );

    // Query/key dropping 50%/50%, the masks drawn as the model draws them (before step2: host
    // generator and a copy).
    let host_masks = || -> candle::Result<(Tensor, Tensor)> {
        let mut rng = StdRng::seed_from_u64(3);
        let mut keep = || {
            let m: Vec<u8> = (0..b * nh * t)
                .map(|_| u8::from(rng.random::<f32>() >= 0.5))
                .collect();
            Tensor::from_vec(m, (b, nh, t), dev)
        };
        Ok((keep()?, keep()?))
    };
    let masks = || -> candle::Result<(Tensor, Tensor)> {
        Ok((
            random_keep((b, nh, t), 0.5, 3, dev)?,
            random_keep((b, nh, t), 0.5, 4, dev)?,
        ))
    };
    row(
        "qk: keep masks, host generator + copy",
        sync_ms(&mut || host_masks().map(|_| ()))?,
    );
    row(
        "qk: keep masks, host generator + copy, host enqueue",
        enqueue_ms(dev, reps, || {
            host_masks()?;
            Ok(())
        })?,
    );
    row(
        "qk: keep masks, random_keep on the device",
        sync_ms(&mut || masks().map(|_| ()))?,
    );
    let (q_keep, k_keep) = masks()?;
    row(
        "qk: compact_kept q + k",
        sync_ms(&mut || {
            compact_kept(&q_keep, RowKind::Query)?;
            compact_kept(&k_keep, RowKind::Key).map(|_| ())
        })?,
    );
    let qo = compact_kept(&q_keep, RowKind::Query)?;
    let ko = compact_kept(&k_keep, RowKind::Key)?;
    let (qs, ks, vs) = (
        Var::from_tensor(&gather_rows(&q, &qo.pos)?)?,
        Var::from_tensor(&gather_rows(&k, &ko.pos)?)?,
        Var::from_tensor(&gather_rows(&v, &ko.pos)?)?,
    );
    let qk_kernel = || {
        sparse_causal_attn(
            qs.as_tensor(),
            ks.as_tensor(),
            vs.as_tensor(),
            &qo.pos,
            &ko.pos,
            None,
            &ScfaParams::default(),
        )
    };
    fwd_rows("qk: sparse kernel on arranged rows", "", &qk_kernel)?;
    let qk = |q_keep: &Tensor, k_keep: &Tensor| {
        qk_sparse_attn(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            q_keep,
            k_keep,
            &ScfaParams::default(),
        )
    };
    fwd_rows("qk: qk_sparse_attn", " (masks given)", &|| {
        qk(&q_keep, &k_keep)
    })?;
    row(
        "qk: qk_sparse_attn fwd with masks, host enqueue",
        enqueue_ms(dev, reps, || {
            let (a, b) = masks()?;
            qk(&a, &b)?;
            Ok(())
        })?,
    );
    Ok(())
}
