//! Text generation and perplexity with Hugging Face decoders (Llama-architecture, GPT-2) and a
//! choice of attention kind.
//!
//! ```text
//! cargo run --release --example generate -- generate --model data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --prompt "The capital of France is" --max-new-tokens 8
//! cargo run --release --example generate -- perplexity --model DIR_OR_ID --text-file FILE \
//!     --context-len 512 --stride 256 --attention dense
//! ```
//!
//! `--model` takes a `.gguf` file, a local directory (config.json, model.safetensors or a
//! sharded index, tokenizer.json), or a Hub model id (the Hugging Face cache, offline when
//! `HF_HUB_OFFLINE` is set, otherwise a download).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::{DType, Device};
use candle_sparse_models::attention::AttentionKind;
use candle_sparse_models::{generate, load_model, perplexity, Sampler, SamplingOptions};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Generation and perplexity with Hugging Face decoders and pluggable attention")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (streamed to stdout).
    Generate(GenerateArgs),
    /// Sliding-window perplexity of a text file.
    Perplexity(PerplexityArgs),
}

/// Options shared by both subcommands.
#[derive(Args, Debug)]
struct ModelArgs {
    /// A .gguf file, a model directory, or a Hub model id.
    #[arg(long)]
    model: String,
    /// Hub revision (branch, tag or commit) for a model id.
    #[arg(long)]
    revision: Option<String>,
    /// Attention kind: dense, hash_sparse:N_BUCKETS, qk_sparse:DROP_Q,DROP_K.
    #[arg(long, default_value = "dense")]
    attention: AttentionKind,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Run on CPU even when built with CUDA.
    #[arg(long)]
    cpu: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (raw text, or the user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in a chat template: Llama 3 or ChatML, whichever special tokens the
    /// tokenizer has.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Number of tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f64>,
    /// Repetition penalty (1 = none).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Number of latest tokens the repetition penalty considers.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
}

#[derive(Args, Debug)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to evaluate.
    #[arg(long)]
    text_file: std::path::PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    context_len: usize,
    /// Distance between window starts (default: half the context).
    #[arg(long)]
    stride: Option<usize>,
    /// Evaluate only the first N tokens of the file.
    #[arg(long)]
    max_tokens: Option<usize>,
}

fn device(cpu: bool) -> Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    Ok(Device::cuda_if_available(0)?)
}

fn dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("unknown dtype {other:?} (f32, bf16, f16)"),
    })
}

fn load(args: &ModelArgs) -> Result<candle_sparse_models::LoadedModel> {
    let device = device(args.cpu)?;
    let start = Instant::now();
    let loaded = load_model(
        &args.model,
        args.revision.as_deref(),
        &args.attention,
        dtype(&args.dtype)?,
        &device,
    )
    .with_context(|| format!("loading model {:?}", args.model))?;
    eprintln!(
        "loaded {} ({} layers, vocab {}, context {}) in {:.1}s on {device:?}, attention {}",
        args.model,
        loaded.model.num_layers(),
        loaded.model.vocab_size(),
        loaded.model.max_context(),
        start.elapsed().as_secs_f64(),
        args.attention
    );
    Ok(loaded)
}

/// The chat prompt for one user message (and an optional system message) in the template the
/// tokenizer's special tokens indicate (Llama 3 headers or ChatML), and the end-of-turn token id.
fn chat_prompt(
    tokenizer: &tokenizers::Tokenizer,
    system: Option<&str>,
    user: &str,
) -> Result<(String, u32)> {
    if let (Some(_), Some(eot)) = (
        tokenizer.token_to_id("<|start_header_id|>"),
        tokenizer.token_to_id("<|eot_id|>"),
    ) {
        let turn = |role: &str, text: &str| {
            format!("<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
        };
        let system = system.map(|s| turn("system", s)).unwrap_or_default();
        let text = format!(
            "<|begin_of_text|>{system}{}<|start_header_id|>assistant<|end_header_id|>\n\n",
            turn("user", user)
        );
        return Ok((text, eot));
    }
    if let (Some(_), Some(im_end)) = (
        tokenizer.token_to_id("<|im_start|>"),
        tokenizer.token_to_id("<|im_end|>"),
    ) {
        let turn = |role: &str, text: &str| format!("<|im_start|>{role}\n{text}<|im_end|>\n");
        let system = system.map(|s| turn("system", s)).unwrap_or_default();
        let text = format!("{system}{}<|im_start|>assistant\n", turn("user", user));
        return Ok((text, im_end));
    }
    bail!(
        "--chat: the tokenizer has neither ChatML (<|im_start|>, <|im_end|>) nor Llama 3 \
         (<|start_header_id|>, <|eot_id|>) special tokens; pass the formatted prompt without --chat"
    )
}

fn run_generate(args: &GenerateArgs) -> Result<()> {
    let loaded = load(&args.model)?;
    let tokenizer = &loaded.tokenizer;
    let mut stop = loaded.eos_token_ids.clone();
    let prompt = if args.chat {
        let (text, end_token) = chat_prompt(tokenizer, args.system.as_deref(), &args.prompt)?;
        stop.push(end_token);
        text
    } else {
        args.prompt.clone()
    };
    let encoding = tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids = encoding.get_ids().to_vec();
    let context = loaded.model.max_context();
    if prompt_ids.len() + args.max_new_tokens > context {
        bail!(
            "the prompt is {} tokens; with --max-new-tokens {} that exceeds the model's context \
             of {context} tokens (shorten the prompt or lower --max-new-tokens)",
            prompt_ids.len(),
            args.max_new_tokens
        )
    }
    let mut sampler = Sampler::new(SamplingOptions {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: args.seed,
    })?;
    print!("{prompt}");
    std::io::stdout().flush()?;
    // Streaming: decode all generated tokens and print the new suffix once it is whole UTF-8.
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let (_, stats) = generate(
        loaded.model.as_ref(),
        &prompt_ids,
        args.max_new_tokens,
        &mut sampler,
        &stop,
        |token| {
            generated.push(token);
            let text = tokenizer
                .decode(&generated, true)
                .map_err(|e| candle::Error::Msg(format!("decoding: {e}")))?;
            if text.len() > printed && !text.ends_with('\u{FFFD}') {
                print!("{}", &text[printed..]);
                printed = text.len();
                std::io::stdout().flush().map_err(candle::Error::wrap)?;
            }
            Ok(())
        },
    )?;
    println!();
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; generation: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.generation_tokens_per_s()
    );
    Ok(())
}

fn run_perplexity(args: &PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("reading text file {}", args.text_file.display()))?;
    let loaded = load(&args.model)?;
    let encoding = loaded
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", args.text_file.display()))?;
    let mut ids = encoding.get_ids().to_vec();
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    let stride = args.stride.unwrap_or((args.context_len / 2).max(1));
    let start = Instant::now();
    let report = perplexity(loaded.model.as_ref(), &ids, args.context_len, stride)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "attention {}: {} tokens scored in {} windows (context {}, stride {stride}): mean NLL \
         {:.4} nats, perplexity {:.3} ({:.1} tokens/s)",
        args.model.attention,
        report.scored_tokens,
        report.windows,
        args.context_len,
        report.mean_nll(),
        report.perplexity(),
        report.scored_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Perplexity(args) => run_perplexity(args),
    }
}
