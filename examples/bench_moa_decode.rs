//! MoA decode benchmark: one decode attention step over a layer's [`MoaCache`] (every kv head its
//! own span: a static sink plus a ring) against dense decode over the full cache (`flash_attn`,
//! q_len 1) in the same run, plus the per-step cache append. Prints the achieved bandwidth (bytes
//! of K and V read / time).
//!
//! Spans are heterogeneous: kv head `h` gets `SPANS[h % 4] · context / 16` slots (2k, 6k, 10k and
//! 14k tokens at a 16k context), 50 % of the context on average over the 4-head cycle.
//!
//! ```text
//! cargo run --release --features cuda --example bench_moa_decode -- --device cuda
//! cargo run --release --example bench_moa_decode -- --batch 1 --heads 4 --context 4096   # CPU
//! ```
//! Prints a table and one JSON object (also written to `--json`).

mod common;

use common::{dense_decode_ms, time_ms};

use anyhow::Result;
use candle::{DType, Device, Tensor};
use candle_sparse_attn::moa::{moa_decode, HeadSpan, MoaCache, MoaLayerPlan, MOA_BLOCK};
use clap::Parser;

/// Spans of a 4-head cycle in sixteenths of the context (mean 8/16 = 50 %).
const SPANS: [usize; 4] = [2, 6, 10, 14];

#[derive(Parser, Debug)]
#[command(about = "MoA decode attention vs dense decode")]
struct Args {
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Query heads = kv heads (MHA) unless `--kv-heads` is given.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 16384)]
    context: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Device copy bandwidth in GB/s the achieved bandwidth is compared with (H100: GPU.md).
    #[arg(long, default_value_t = 3020.0)]
    copy_gbps: f64,
    #[arg(long, default_value = "bench_moa_decode.json")]
    json: String,
}

/// Warm-up runs before each timing.
const WARMUP: usize = 3;

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = match args.device.as_str() {
        "cuda" => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    let (b, hq, d, t) = (args.batch, args.heads, args.head_dim, args.context);
    let hkv = args.kv_heads.unwrap_or(hq);
    let dt = DType::BF16;
    let plan = MoaLayerPlan {
        spans: (0..hkv)
            .map(|h| {
                let size = (SPANS[h % SPANS.len()] * t / 16).div_ceil(MOA_BLOCK) * MOA_BLOCK;
                HeadSpan::from_size(size.max(2 * MOA_BLOCK))
            })
            .collect(),
    };
    // The full history once (the dense decode's cache), written into the MoA cache as a prompt.
    let keys = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev)?.to_dtype(dt)?;
    let values = Tensor::randn(0f32, 1., (b, hkv, t, d), &dev)?.to_dtype(dt)?;
    let mut cache = MoaCache::new(&plan, b, d, dt, &dev)?;
    cache.append(&keys.narrow(2, 0, t - 1)?, &values.narrow(2, 0, t - 1)?)?;
    let (k1, v1) = (
        keys.narrow(2, t - 1, 1)?.contiguous()?,
        values.narrow(2, t - 1, 1)?.contiguous()?,
    );
    cache.append(&k1, &v1)?;
    let q = Tensor::randn(0f32, 1., (b, hq, 1, d), &dev)?.to_dtype(dt)?;
    let reps = args.reps;

    let dense_ms = dense_decode_ms(&dev, WARMUP, reps, &q, &keys, &values)?;
    let moa_ms = time_ms(&dev, WARMUP, reps, || {
        moa_decode(&q, &cache)?;
        Ok(())
    })?;
    // Split-KV chunk sweep (the default above is cache.chunk()).
    let mut sweep = Vec::new();
    for chunk in [256, 512, 1024, 2048, 4096] {
        let c = cache.clone().with_chunk(chunk)?;
        let ms = time_ms(&dev, WARMUP, reps, || {
            moa_decode(&q, &c)?;
            Ok(())
        })?;
        sweep.push((chunk, ms));
    }
    // The append of a step (ring write of one token per kv head, K and V); the length advances,
    // which does not change the work.
    let mut step_cache = cache.clone();
    let append_ms = time_ms(&dev, WARMUP, reps, || {
        step_cache.append(&k1, &v1)?;
        Ok(())
    })?;

    let moa_bytes = cache.bytes_read() as f64;
    let dense_bytes = (2 * b * hkv * t * d * dt.size_in_bytes()) as f64;
    let density = moa_bytes / dense_bytes;
    let gbs = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9;
    let (moa_gbps, dense_gbps) = (gbs(moa_bytes, moa_ms), gbs(dense_bytes, dense_ms));
    println!(
        "MoA decode: B={b} Hq={hq} Hkv={hkv} D={d} context={t} bf16, density {:.3} ({} chunks of {} slots) on {:?}",
        density,
        cache.item_offsets().last().unwrap(),
        cache.chunk(),
        dev
    );
    println!(
        "{:<28} {:>10} {:>12} {:>14}",
        "what", "ms", "GB/s", "% of copy bw"
    );
    for (name, ms, gbps) in [
        ("dense decode (flash_attn)", dense_ms, dense_gbps),
        ("moa decode", moa_ms, moa_gbps),
    ] {
        println!(
            "{name:<28} {ms:>10.4} {gbps:>12.0} {:>13.1}%",
            100.0 * gbps / args.copy_gbps
        );
    }
    for &(chunk, ms) in &sweep {
        let gbps = gbs(moa_bytes, ms);
        println!(
            "{:<28} {ms:>10.4} {gbps:>12.0} {:>13.1}%",
            format!("  chunk {chunk}"),
            100.0 * gbps / args.copy_gbps
        );
    }
    println!("{:<28} {append_ms:>10.4}", "moa append (1 token)");
    println!("speed-up vs dense {:.2}x", dense_ms / moa_ms);
    let json = serde_json::json!({
        "batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "context": t, "dtype": "bf16",
        "device": format!("{dev:?}"), "density": density, "chunk": cache.chunk(),
        "spans": cache.sizes(),
        "dense_ms": dense_ms, "dense_gbps": dense_gbps,
        "moa_ms": moa_ms, "moa_gbps": moa_gbps, "moa_fraction_of_copy_bw": moa_gbps / args.copy_gbps,
        "append_ms": append_ms, "speedup": dense_ms / moa_ms,
        "chunk_sweep_ms": sweep.iter().map(|(c, ms)| (c.to_string(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>(),
    });
    println!("{json}");
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
