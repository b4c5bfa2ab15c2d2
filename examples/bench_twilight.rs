//! Twilight decode benchmark: one decode attention step (Quest selection + INT4 estimate + top-p +
//! sparse attention) against dense decode over the full cache (`flash_attn`, q_len 1), plus the
//! time of each call of the step (`step: ...`, the fused paths on CUDA), of each stage function
//! on its own, the kept fraction and the output error vs dense. Every time is the median of
//! `--reps` runs with a device synchronisation after each; the "back to back" rows time 10 calls
//! between two synchronisations (per call), as a model queues its layers.
//!
//! Inputs are **synthetic keys with realistic structure** (no real-model keys are available
//! here): per head a rank-8 signal whose coefficients drift by 64-token segment ("topics", so
//! pages are coherent), Gaussian noise, an attention sink (token 0) and ~0.4 % heavy-hitter
//! tokens sharing a direction with the query; the query mixes that direction, two topic
//! vectors and noise. Values are Gaussian.
//!
//! ```text
//! cargo run --release --features cuda --example bench_twilight -- --device cuda
//! cargo run --release --example bench_twilight -- --batch 1 --heads 2 --context 8192   # CPU
//! ```
//! Prints a table and one JSON object (also written to `--json`).
//!
//! **Real keys** (`--qkv FILE`, written by `examples/generate.rs dump-qkv` from SmolLM2-135M:
//! per recorded layer L, `q.L` `(1, 9, 1, 64)`, `k.L` / `v.L` `(1, 3, T, 64)`, post-RoPE): the
//! recorded (layer, kv head) slices, with their 3 query heads each (SmolLM2's GQA group), are
//! tiled over the benchmark's `batch × kv_heads` slots in order (slot `i` takes slice
//! `i mod slices`), so `--heads` is 3 × `--kv-heads`, `--head-dim` is 64 and `--context` is at
//! most the recorded length (the first `--context` tokens plus the recorded decode token's key).
//! ```text
//! bench_twilight --device cuda --qkv smollm2_qkv.safetensors --batch 16 --kv-heads 8 --context 8192
//! ```

mod common;

use common::{dense_decode_ms, time_ms};

use anyhow::Result;
use candle::{DType, Device, Tensor, D};
use candle_sparse_attn::twilight::{
    decode_layer, estimate_scores, page_scores, prune_and_union, sparse_decode_attention,
    top_indices, top_p, union_per_group, BaseSelector, QuestSelector, TwilightCache,
    TwilightConfig,
};
use candle_sparse_attn::{flash_attn, reference, AttnParams};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Twilight decode attention vs dense decode")]
struct Args {
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Query heads = kv heads (MHA) unless `--kv-heads` is given.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 32768)]
    context: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 0.95)]
    p: f32,
    /// Base (Quest) budget B0 in tokens.
    #[arg(long, default_value_t = 8192)]
    budget: usize,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    #[arg(long, default_value = "bench_twilight.json")]
    json: String,
    /// Synthetic keys: heavy-hitter component along the shared direction, in units of sqrt(D).
    #[arg(long, default_value_t = 1.2)]
    heavy: f64,
    /// Synthetic query: component along the heavy-hitter direction, in units of sqrt(D).
    #[arg(long, default_value_t = 0.5)]
    q_dir: f64,
    /// Synthetic query: weight of its two topic vectors.
    #[arg(long, default_value_t = 0.05)]
    q_topic: f64,
    /// Synthetic query: per-channel Gaussian noise.
    #[arg(long, default_value_t = 0.2)]
    q_noise: f64,
    /// CUDA: keep freed memory in the device's default memory pool (release threshold at
    /// maximum, like a caching allocator, as `generate` does) instead of returning it to the
    /// driver at every synchronisation; applies to dense decode and Twilight alike.
    #[arg(long)]
    keep_pool: bool,
    /// Real attention inputs from `generate dump-qkv` (see the module docs) instead of the
    /// synthetic ones; sets head_dim 64 and heads = 3 × kv heads.
    #[arg(long)]
    qkv: Option<std::path::PathBuf>,
}

/// The synthetic cache and query described in the module docs.
fn build(args: &Args, dev: &Device) -> Result<(TwilightCache, Tensor)> {
    let (b, hq, d, t) = (args.batch, args.heads, args.head_dim, args.context);
    let hkv = args.kv_heads.unwrap_or(hq);
    let (rank, seg) = (8, 64);
    let f32_ = DType::F32;
    let basis = Tensor::randn(0f32, 1., (b, hkv, rank, d), dev)?;
    let sink_dir = Tensor::randn(0f32, 1., (b, hkv, 1, d), dev)?;
    let sink_dir = sink_dir.broadcast_div(&sink_dir.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
    let topics = Tensor::randn(0f32, 1., (b, hkv, t.div_ceil(seg), rank), dev)?;
    let mut cache = TwilightCache::new(b, hkv, d, t, args.page_size, DType::BF16, dev)?;
    let chunk = 2048;
    let scale = (d as f64).sqrt();
    for start in (0..t).step_by(chunk) {
        let n = chunk.min(t - start);
        // Topic of each token's segment plus per-token jitter, projected on the basis.
        let seg_ids: Vec<u32> = (start..start + n).map(|i| (i / seg) as u32).collect();
        let seg_ids = Tensor::from_vec(seg_ids, n, dev)?;
        let coef = (topics.index_select(&seg_ids, 2)?
            + (Tensor::randn(0f32, 1., (b, hkv, n, rank), dev)? * 0.5)?)?;
        let signal = coef.matmul(&basis)?;
        let noise = (Tensor::randn(0f32, 1., (b, hkv, n, d), dev)? * 0.5)?;
        // Heavy hitters: the sink and every token with (i * 2654435761) % 256 == 7 (~0.4 %).
        let heavy: Vec<f32> = (start..start + n)
            .map(|i| {
                if i == 0 || (i as u64 * 2654435761) % 256 == 7 {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let heavy = Tensor::from_vec(heavy, (1, 1, n, 1), dev)?;
        let boost = heavy.broadcast_mul(&sink_dir)? * (args.heavy * scale);
        let k = (signal + noise + boost?)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1., (b, hkv, n, d), dev)?.to_dtype(DType::BF16)?;
        cache.append(&k, &v)?;
    }
    // Query: the heavy-hitter direction, two topics, noise (per query head of the group).
    let group = hq / hkv;
    let rep = |x: &Tensor| reference::repeat_kv(x, group);
    let topic_q = topics.narrow(2, 3, 1)? + topics.narrow(2, t.div_ceil(seg) / 2, 1)?;
    let q = ((rep(&sink_dir)? * (args.q_dir * scale))?
        + (rep(&topic_q?.matmul(&basis)?)? * args.q_topic)?
        + (Tensor::randn(0f32, 1., (b, hq, 1, d), dev)? * args.q_noise)?)?;
    Ok((cache, q.to_dtype(f32_)?.to_dtype(DType::BF16)?))
}

/// The real-key cache and query of `--qkv` (see the module docs): `(layer, kv head)` slices of
/// the file tiled over `batch × kv_heads`, keeping each slice's query heads.
fn load_real(args: &Args, path: &std::path::Path, dev: &Device) -> Result<(TwilightCache, Tensor)> {
    let tensors = candle::safetensors::load(path, &Device::Cpu)?;
    let mut layers: Vec<usize> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("q.")?.parse().ok())
        .collect();
    layers.sort_unstable();
    let get = |name: String| {
        tensors
            .get(&name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor {name}", path.display()))
    };
    // Slices: (q (group, D), k (T, D), v (T, D)) per (layer, kv head).
    let mut slices = Vec::new();
    for l in &layers {
        let (q, k, v) = (
            get(format!("q.{l}"))?,
            get(format!("k.{l}"))?,
            get(format!("v.{l}"))?,
        );
        let (_, hq, _, d) = q.dims4()?;
        let (_, hkv, t, _) = k.dims4()?;
        let group = hq / hkv;
        for h in 0..hkv {
            slices.push((
                q.squeeze(0)?.squeeze(1)?.narrow(0, h * group, group)?,
                k.squeeze(0)?.get(h)?,
                v.squeeze(0)?.get(h)?,
                d,
                t,
            ));
        }
    }
    let Some(&(ref q0, _, _, d, t_file)) = slices.first() else {
        anyhow::bail!("{}: no q.L tensors", path.display())
    };
    let group = q0.dim(0)?;
    let (b, hkv, t) = (
        args.batch,
        args.kv_heads.unwrap_or(args.heads / group),
        args.context,
    );
    if t > t_file || args.heads != group * hkv || args.head_dim != d {
        anyhow::bail!(
            "--qkv {}: recorded context {t_file}, head_dim {d}, GQA group {group}; got --context {t}, --head-dim {}, --heads {} for {hkv} kv heads",
            path.display(),
            args.head_dim,
            args.heads
        )
    }
    let pick = |i: usize| &slices[i % slices.len()];
    let stack = |f: &dyn Fn(usize) -> Result<Tensor>| -> Result<Tensor> {
        let rows = (0..b)
            .map(|bi| {
                let heads = (0..hkv)
                    .map(|h| f(bi * hkv + h))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&heads, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    };
    // The recorded decode token's key is the last row; keep the first t - 1 plus it.
    let take = |x: &Tensor| -> Result<Tensor> {
        Ok(Tensor::cat(
            &[x.narrow(0, 0, t - 1)?, x.narrow(0, t_file - 1, 1)?],
            0,
        )?)
    };
    let k = stack(&|i| take(&pick(i).1))?
        .to_dtype(DType::BF16)?
        .to_device(dev)?;
    let v = stack(&|i| take(&pick(i).2))?
        .to_dtype(DType::BF16)?
        .to_device(dev)?;
    let q = stack(&|i| Ok(pick(i).0.clone()))?
        .reshape((b, hkv * group, 1, d))?
        .to_dtype(DType::BF16)?
        .to_device(dev)?;
    let mut cache = TwilightCache::new(b, hkv, d, t, args.page_size, DType::BF16, dev)?;
    cache.append(&k, &v)?;
    Ok((cache, q))
}

/// Warm-up runs before each timing.
const WARMUP: usize = 2;
/// Calls per timing in the back-to-back rows.
const CHAIN: usize = 10;

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = match args.device.as_str() {
        "cuda" => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    let (b, hq, d, t) = (args.batch, args.heads, args.head_dim, args.context);
    if args.keep_pool {
        if !dev.is_cuda() {
            anyhow::bail!("--keep-pool needs a CUDA device, got {dev:?}")
        }
        candle_sparse_attn::keep_memory_pool(&dev)?;
    }
    let (cache, q) = match &args.qkv {
        Some(path) => load_real(&args, path, &dev)?,
        None => build(&args, &dev)?,
    };
    let hkv = cache.kv_heads();
    let cfg = TwilightConfig {
        p: args.p,
        base_budget: args.budget,
        page_size: args.page_size,
        ..TwilightConfig::default()
    };
    let (keys, values) = (cache.keys()?, cache.values()?);
    let reps = args.reps;

    let dense_ms = dense_decode_ms(&dev, WARMUP, reps, &q, &keys, &values)?;
    let twilight_ms = time_ms(&dev, WARMUP, reps, || {
        decode_layer(2, &cache, &q, &cfg)?;
        Ok(())
    })?;
    // Back to back: CHAIN calls between two synchronisations (as the layers of a model's decode
    // step are queued), the time per call; the device's time where launching keeps ahead of it.
    let params = AttnParams {
        softmax_scale: None,
        causal: false,
    };
    let dense_chain_ms = time_ms(&dev, WARMUP, reps, || {
        for _ in 0..CHAIN {
            flash_attn(&q, &keys, &values, &params)?;
        }
        Ok(())
    })? / CHAIN as f64;
    let twilight_chain_ms = time_ms(&dev, WARMUP, reps, || {
        for _ in 0..CHAIN {
            decode_layer(2, &cache, &q, &cfg)?;
        }
        Ok(())
    })? / CHAIN as f64;
    let base_only_ms = time_ms(&dev, WARMUP, reps, || {
        decode_layer(2, &cache, &q, &TwilightConfig { p: 1.0, ..cfg })?;
        Ok(())
    })?;

    // Stages, each timed on its own inputs.
    let q3 = q.squeeze(2)?.contiguous()?;
    let sc = 1.0 / (d as f32).sqrt();
    let pages = cache.num_pages();
    let keep_pages = args.budget.div_ceil(args.page_size).min(pages);
    let scores = page_scores(&cache, &q3)?;
    let cand = top_indices(&scores, keep_pages, args.page_size, t)?;
    let est = estimate_scores(&cache, &q3, &cand, sc)?;
    let kept = top_p(&est, &cand, args.p)?;
    let lists = union_per_group(&kept, hkv, t)?;
    let stage = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<(&str, f64)> {
        Ok((name, time_ms(&dev, WARMUP, reps, f)?))
    };
    let quest = QuestSelector::new(args.budget);
    // The decode step's calls (fused on CUDA), then the stage functions one by one.
    let stages = vec![
        stage("step: Quest select", &mut || {
            quest.select(&cache, &q3)?;
            Ok(())
        })?,
        stage("step: prune + union", &mut || {
            prune_and_union(&cache, &q3, &cand, sc, args.p)?;
            Ok(())
        })?,
        stage("step: sparse attention", &mut || {
            sparse_decode_attention(&cache, &q3, &lists, sc)?;
            Ok(())
        })?,
        stage("select: page scores", &mut || {
            page_scores(&cache, &q3)?;
            Ok(())
        })?,
        stage("select: top pages", &mut || {
            top_indices(&scores, keep_pages, args.page_size, t)?;
            Ok(())
        })?,
        stage("estimate (INT4)", &mut || {
            estimate_scores(&cache, &q3, &cand, sc)?;
            Ok(())
        })?,
        stage("top-p", &mut || {
            top_p(&est, &cand, args.p)?;
            Ok(())
        })?,
        stage("GQA union", &mut || {
            union_per_group(&kept, hkv, t)?;
            Ok(())
        })?,
    ];

    // Quality and sizes (read back once, outside the timed loops).
    let step = decode_layer(2, &cache, &q, &cfg)?;
    let kept_fraction = step.kept_fraction()?.to_scalar::<f32>()?;
    let dense = flash_attn(&q, &keys, &values, &params)?;
    let rel_err = reference::rel_err(&step.output, &dense)?;
    let union_tokens = step
        .lists
        .narrow(2, 0, 1)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let es = 2.0; // bf16
    let dense_bytes = 2.0 * (b * hkv * t * d) as f64 * es;
    let twilight_bytes = (b * hkv * pages * 2 * d) as f64 * es
        + (b * hq * keep_pages * args.page_size) as f64 * (d as f64 / 2.0 + 4.0)
        + union_tokens * 2.0 * d as f64 * es;
    let gbs = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9;

    println!(
        "Twilight decode: B={b} Hq={hq} Hkv={hkv} D={d} T={t} bf16, p={} B0={} page={} on {:?}{}",
        args.p,
        args.budget,
        args.page_size,
        dev,
        if args.keep_pool {
            ", memory pool kept"
        } else {
            ""
        }
    );
    println!("{:<28} {:>10} {:>12}", "what", "ms", "GB/s");
    println!(
        "{:<28} {:>10.3} {:>12.0}",
        "dense decode (flash_attn)",
        dense_ms,
        gbs(dense_bytes, dense_ms)
    );
    println!(
        "{:<28} {:>10.3} {:>12.0}",
        "twilight step",
        twilight_ms,
        gbs(twilight_bytes, twilight_ms)
    );
    println!(
        "{:<28} {:>10.3} {:>12}",
        "quest only (p = 1)", base_only_ms, ""
    );
    println!(
        "{:<28} {:>10.3} {:>12.0}",
        "dense, back to back",
        dense_chain_ms,
        gbs(dense_bytes, dense_chain_ms)
    );
    println!(
        "{:<28} {:>10.3} {:>12.0}",
        "twilight, back to back",
        twilight_chain_ms,
        gbs(twilight_bytes, twilight_chain_ms)
    );
    for (name, ms) in &stages {
        println!("  {name:<26} {ms:>10.3}");
    }
    println!(
        "speed-up {:.2}x (back to back {:.2}x), kept fraction {:.4} ({:.0} tokens/head), union tokens/kv head {:.0}, rel err vs dense {:.4}",
        dense_ms / twilight_ms,
        dense_chain_ms / twilight_chain_ms,
        kept_fraction,
        kept_fraction as f64 * t as f64,
        union_tokens / (b * hkv) as f64,
        rel_err
    );
    let inputs = match &args.qkv {
        Some(path) => format!(
            "real SmolLM2-135M q/k/v from {} tiled over batch x kv heads",
            path.display()
        ),
        None => "synthetic structured keys (see bench_twilight.rs docs)".to_string(),
    };
    println!("inputs: {inputs}");
    let json = serde_json::json!({
        "batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "context": t, "dtype": "bf16",
        "p": args.p, "base_budget": args.budget, "page_size": args.page_size,
        "device": format!("{dev:?}"), "inputs": inputs, "keep_pool": args.keep_pool,
        "dense_ms": dense_ms, "dense_gbps": gbs(dense_bytes, dense_ms),
        "twilight_ms": twilight_ms, "twilight_gbps": gbs(twilight_bytes, twilight_ms),
        "quest_only_ms": base_only_ms, "speedup": dense_ms / twilight_ms,
        "dense_back_to_back_ms": dense_chain_ms, "twilight_back_to_back_ms": twilight_chain_ms,
        "speedup_back_to_back": dense_chain_ms / twilight_chain_ms,
        "stages_ms": stages.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>(),
        "kept_fraction": kept_fraction, "union_tokens_per_kv_head": union_tokens / (b * hkv) as f64,
        "rel_err_vs_dense": rel_err,
    });
    println!("{json}");
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
