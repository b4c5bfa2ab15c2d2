//! MoA plan pipeline: `optimize` turns an influence profile (made by `profile`) into a plan JSON
//! in the reference's format, with the exact knapsack search of `candle_sparse_attn::moa::search`.
//!
//! ```text
//! cargo run --release --example moa_plan -- optimize --influence infl.safetensors \
//!     --kv-heads 3 --density 0.5 --max-rules 2 --out plan.json
//! ```

use anyhow::Result;
use candle_sparse_attn::moa::{search_plan, MoaInfluence, SearchOptions};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "MoA: influence profile → plan JSON")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Search a plan from an influence profile.
    Optimize(OptimizeArgs),
}

#[derive(Args, Debug)]
struct OptimizeArgs {
    /// Influence file (safetensors) written by `profile`.
    #[arg(long)]
    influence: String,
    /// Key/value heads of the model (the influence has one entry per query head).
    #[arg(long)]
    kv_heads: usize,
    /// Average density bound (kept KV tokens / N over kv heads) at the profiled length.
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
    let inf = MoaInfluence::load(&args.influence)?;
    let opts = SearchOptions {
        density: args.density,
        lower_fraction: args.lower_fraction,
        max_rules_per_layer: (args.max_rules > 0).then_some(args.max_rules),
        n_min: args.n_min,
        n_max: args.n_max,
    };
    let t = std::time::Instant::now();
    let (mut plan, a) = search_plan(&inf, args.kv_heads, &opts)?;
    plan.model_id = args.model_id.clone();
    plan.save(&args.out)?;
    let groups = a.rule.len();
    println!(
        "plan for {} layers × {} query heads at N = {} ({} items): masked influence {:.4e}, \
         mean kept {:.0} tokens per kv head ({:.3} density), {:.2} s; written to {}",
        plan.num_layers(),
        plan.alphas[0].len(),
        inf.length,
        inf.items,
        a.loss,
        (a.weight * 64) as f64 / groups as f64,
        (a.weight * 64) as f64 / (groups * inf.length) as f64,
        t.elapsed().as_secs_f64(),
        args.out
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Optimize(a) => optimize(&a),
    }
}
