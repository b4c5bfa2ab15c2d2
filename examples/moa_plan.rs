//! MoA plan pipeline, two steps:
//! - `profile` runs a Llama-architecture model (a `.gguf` file, a model directory or a Hub id)
//!   over calibration text with the profiling attention in every layer, backpropagates the
//!   language-model loss and writes the influence per layer / head / 64×64 block (one file per
//!   profiled length, items one at a time) — `candle_sparse_models::moa::MoaProfiler`;
//! - `optimize` turns the influence files of one or several lengths into a plan JSON in the
//!   reference's format, with the exact knapsack search of `candle_sparse_attn::moa::search`
//!   (the density bound holds at every profiled length).
//!
//! ```text
//! cargo run --release --example moa_plan -- profile --model data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --text data/shakespeare.txt --lengths 1024,2048 --items 2 --out infl.safetensors
//! cargo run --release --example moa_plan -- optimize \
//!     --influence infl.n1024.safetensors,infl.n2048.safetensors \
//!     --kv-heads 3 --density 0.5 --max-rules 2 --out plan.json
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::{DType, Device};
use candle_sparse_attn::moa::{search_plan, MoaInfluence, SearchOptions};
use candle_sparse_models::decoder::{detect_architecture, read_json, Architecture};
use candle_sparse_models::gguf::GgufFile;
use candle_sparse_models::hub::resolve_model_files;
use candle_sparse_models::moa::MoaProfiler;
use candle_sparse_models::{AttentionKind, Llama, LlamaConfig};
use clap::{Args, Parser, Subcommand};
use tokenizers::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "MoA: influence profile → plan JSON")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Profile a model's attention influence on calibration text.
    Profile(ProfileArgs),
    /// Search a plan from an influence profile.
    Optimize(OptimizeArgs),
}

#[derive(Args, Debug)]
struct ProfileArgs {
    /// A Llama-architecture model: a .gguf file, a model directory, or a Hub model id.
    #[arg(long)]
    model: String,
    /// Hub revision for a model id.
    #[arg(long)]
    revision: Option<String>,
    /// Calibration text (UTF-8).
    #[arg(long)]
    text: PathBuf,
    /// Use only bytes `[skip_bytes, skip_bytes + max_bytes)` of the text (keep calibration and
    /// evaluation text apart).
    #[arg(long, default_value_t = 0)]
    skip_bytes: usize,
    #[arg(long, default_value_t = 200_000)]
    max_bytes: usize,
    /// Profiled lengths in tokens (one influence file each).
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    lengths: Vec<usize>,
    /// Calibration items per length: consecutive windows of length + 1 tokens from the start of
    /// the text, one forward and backward pass each (memory of one item).
    #[arg(long, default_value_t = 2)]
    items: usize,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output influence (safetensors); with several lengths `.nLENGTH` is inserted before the
    /// extension.
    #[arg(long, default_value = "influence.safetensors")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct OptimizeArgs {
    /// Influence files (safetensors) written by `profile`, one per profiled length,
    /// comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    influence: Vec<PathBuf>,
    /// Key/value heads of the model (the influence has one entry per query head).
    #[arg(long)]
    kv_heads: usize,
    /// Average density bound (kept KV tokens / N over kv heads) at every profiled length.
    #[arg(long, default_value_t = 0.5)]
    density: f64,
    /// Lower bound on the kept tokens as a fraction of the budget.
    #[arg(long, default_value_t = 0.9)]
    lower_fraction: f64,
    /// At most this many distinct rules per layer (0: no cap).
    #[arg(long, default_value_t = 2)]
    max_rules: usize,
    /// Shortest length the plan must keep a positive span at (candidate filter).
    #[arg(long, default_value_t = 1024)]
    n_min: usize,
    /// Longest length the plan is meant for (candidate filter).
    #[arg(long, default_value_t = 16384)]
    n_max: usize,
    /// Model id written into the plan's metadata.
    #[arg(long)]
    model_id: Option<String>,
    /// Output plan JSON.
    #[arg(long, default_value = "moa_plan.json")]
    out: String,
}

fn optimize(args: &OptimizeArgs) -> Result<()> {
    let profiles = args
        .influence
        .iter()
        .map(MoaInfluence::load)
        .collect::<candle::Result<Vec<_>>>()?;
    let opts = SearchOptions {
        density: args.density,
        lower_fraction: args.lower_fraction,
        max_rules_per_layer: (args.max_rules > 0).then_some(args.max_rules),
        n_min: args.n_min,
        n_max: args.n_max,
    };
    let t = Instant::now();
    let mut found = search_plan(&profiles, args.kv_heads, &opts)?;
    let elapsed = t.elapsed().as_secs_f64();
    found.plan.model_id = args.model_id.clone();
    found.plan.save(&args.out)?;
    let plan = &found.plan;
    println!(
        "plan for {} layers × {} query heads, profiled at {:?} tokens: objective (masked \
         influence fraction summed over lengths) {:.4}, {elapsed:.2} s; written to {}",
        plan.num_layers(),
        plan.alphas[0].len(),
        found.lengths,
        found.assignment.loss,
        args.out
    );
    for (i, &n) in found.lengths.iter().enumerate() {
        let items: usize = profiles
            .iter()
            .filter(|p| p.length == n)
            .map(|p| p.items)
            .sum();
        println!(
            "  N = {n} ({items} items): masked influence {:.4} of the total, mean kept {:.0} \
             tokens per kv head (density {:.3})",
            found.masked_fraction[i],
            found.density[i] * n as f64,
            found.density[i]
        );
    }
    Ok(())
}

/// `text[skip..skip + max]`, cut at character boundaries.
fn text_slice(text: &str, skip: usize, max: usize) -> &str {
    let floor = |mut i: usize| {
        i = i.min(text.len());
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = floor(skip);
    &text[start..floor(start.saturating_add(max))]
}

/// A Llama-architecture model (dense attention) and its tokenizer from a .gguf file, a model
/// directory or a Hub id.
fn load_llama(model: &str, revision: Option<&str>, dtype: DType) -> Result<(Llama, Tokenizer)> {
    let device = Device::Cpu;
    let path = Path::new(model);
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let gguf = GgufFile::open(path)?;
        return Ok((
            gguf.load_llama(&AttentionKind::Dense, dtype, &device)?,
            gguf.tokenizer()?,
        ));
    }
    let files = resolve_model_files(model, revision)?;
    let json = read_json(&files.config)?;
    if detect_architecture(&json)? != Architecture::Llama {
        bail!("model {model:?}: MoA profiling supports Llama-architecture models only")
    }
    let config: LlamaConfig = serde_json::from_value(json)
        .with_context(|| format!("config {}", files.config.display()))?;
    let Some(tokenizer) = &files.tokenizer else {
        bail!(
            "model {model:?}: no tokenizer.json next to {}",
            files.config.display()
        )
    };
    let tokenizer = Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", tokenizer.display()))?;
    // SAFETY: the weights are memory-mapped read-only and not modified while loaded.
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files.weights, dtype, &device)? };
    Ok((Llama::load(config, &AttentionKind::Dense, vb)?, tokenizer))
}

/// `out` with `.nLENGTH` before its extension.
fn length_path(out: &Path, length: usize) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let ext = out
        .extension()
        .map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
    out.with_file_name(format!("{stem}.n{length}{ext}"))
}

fn profile(args: &ProfileArgs) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("unknown dtype {other:?} (f32, bf16, f16)"),
    };
    let mut sorted = args.lengths.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() || sorted[0] == 0 || sorted.len() != args.lengths.len() {
        bail!(
            "--lengths {:?}: give one or more distinct positive lengths",
            args.lengths
        )
    }
    let (model, tokenizer) = load_llama(&args.model, args.revision.as_deref(), dtype)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let text = text_slice(&text, args.skip_bytes, args.max_bytes);
    let ids = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", args.text.display()))?
        .get_ids()
        .to_vec();
    for &length in &args.lengths {
        let need = args.items * (length + 1);
        if ids.len() < need {
            bail!(
                "{} items of {length} tokens need {need} tokens; bytes {}..{} of {} have {}",
                args.items,
                args.skip_bytes,
                args.skip_bytes + text.len(),
                args.text.display(),
                ids.len()
            )
        }
        let mut profiler = MoaProfiler::new(&model)?;
        for (i, item) in ids.chunks_exact(length + 1).take(args.items).enumerate() {
            let t = Instant::now();
            let loss = profiler.add_item(item)?;
            eprintln!(
                "length {length}: item {}/{}, loss {loss:.4} nats, {:.1} s",
                i + 1,
                args.items,
                t.elapsed().as_secs_f64()
            );
        }
        let out = if args.lengths.len() == 1 {
            args.out.clone()
        } else {
            length_path(&args.out, length)
        };
        profiler.influence()?.save(&out)?;
        println!(
            "influence at {length} tokens ({} items) written to {}",
            args.items,
            out.display()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Profile(a) => profile(&a),
        Command::Optimize(a) => optimize(&a),
    }
}
