//! Plots the JSON written by `bench_attention` as time against sequence length, one line per
//! method, on log-log axes (log2 N, log10 ms), one PNG per (shape, pass).
//!
//! ```text
//! cargo run --release --example plot_bench -- bench.json docs/
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_sparse_models::metrics::plot_series;
use serde::Deserialize;

/// The fields of a `bench_attention` record this plot needs.
#[derive(Deserialize)]
struct Record {
    method: String,
    pass: String,
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    ms: f64,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .context("usage: plot_bench BENCH_JSON [OUT_DIR]")?;
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let text = std::fs::read_to_string(&input).with_context(|| format!("reading {input}"))?;
    let records: Vec<Record> =
        serde_json::from_str(&text).with_context(|| format!("parsing {input}"))?;
    // (b, h, d, pass) -> method -> [(log2 N, log10 ms)]
    type Lines = BTreeMap<String, Vec<(f64, f64)>>;
    let mut charts: BTreeMap<(usize, usize, usize, String), Lines> = BTreeMap::new();
    for r in records {
        charts
            .entry((r.b, r.h, r.d, r.pass))
            .or_default()
            .entry(r.method)
            .or_default()
            .push(((r.n as f64).log2(), r.ms.log10()));
    }
    std::fs::create_dir_all(&out_dir)?;
    for ((b, h, d, pass), lines) in charts {
        let series: Vec<(String, Vec<(f64, f64)>)> = lines
            .into_iter()
            .filter(|(_, points)| points.len() > 1)
            .map(|(method, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                (method, points)
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let name = format!("bench_b{b}_h{h}_d{d}_{}.png", pass.replace('+', "_"));
        let path = out_dir.join(&name);
        let title = format!("{pass}, B={b} H={h} D={d}: time vs sequence length");
        plot_series(&path, &title, ("log2 N", "log10 ms"), &series)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
