//! Text generation and perplexity with Hugging Face decoders (Llama-architecture, GPT-2) and a
//! choice of attention kind.
//!
//! ```text
//! cargo run --release --example generate -- generate --model data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --prompt "The capital of France is" --max-new-tokens 8
//! cargo run --release --example generate -- perplexity --model DIR_OR_ID --text-file FILE \
//!     --context-len 512 --stride 256 --attention dense
//! cargo run --release --example generate -- compare --model data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --attention twilight:0.95,256 --text-file data/shakespeare.txt --prompt-len 1536
//! ```
//!
//! `compare` measures decode-only sparse kinds (Twilight; `--attention` and every `--also`)
//! against dense decoding of the same model on windows of a text: greedy continuations
//! (free-running token agreement, and teacher-forced top-1 agreement on the dense continuation;
//! `--new-tokens 0` skips them) and decode-style perplexity of the text after the prompt, with the
//! top-1 agreement with dense on that text and the kept fraction. `twilight-stats` measures the
//! attention mass each Twilight stage keeps, per layer.
//!
//! `--model` takes a `.gguf` file, a local directory (config.json, model.safetensors or a
//! sharded index, tokenizer.json), or a Hub model id (the Hugging Face cache, offline when
//! `HF_HUB_OFFLINE` is set, otherwise a download).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::{DType, Device};
use candle_sparse_attn::twilight::{
    estimate_scores, sparse_decode_attention, top_p, union_per_group, BaseSelector, FullSelector,
    QuestSelector, TwilightCache,
};
use candle_sparse_models::attention::AttentionKind;
use candle_sparse_models::{
    generate, load_model, perplexity, perplexity_decode, CausalLm, Sampler, SamplingOptions,
};
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
    /// Sliding-window perplexity of a text file (or decode-style with --decode-prefix).
    Perplexity(PerplexityArgs),
    /// Greedy agreement and decode-style perplexity of --attention against dense decoding.
    Compare(CompareArgs),
    /// Writes a GGUF model as a Hugging Face checkpoint (f32 safetensors, config.json,
    /// tokenizer.json) plus our logits on a text, for comparison with `transformers`.
    ExportHf(ExportArgs),
    /// Records real attention inputs: after a dense prefill of --context tokens of a text, the
    /// decode query of the next token and the cached keys and values of the chosen layers.
    DumpQkv(DumpArgs),
    /// Twilight's stages measured on a dense decode of real text: per layer, the exact attention
    /// mass each stage keeps (Quest candidates, INT4 top-p, the same top-p on exact scores, the
    /// GQA union), the kept fractions, the INT4 score error and the attention output error.
    TwilightStats(TwilightStatsArgs),
}

#[derive(Args, Debug)]
struct TwilightStatsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text the prompts are cut from.
    #[arg(long)]
    text_file: std::path::PathBuf,
    /// Prompt length in tokens (prefilled densely).
    #[arg(long, default_value_t = 2048)]
    prompt_len: usize,
    /// Decode steps per prompt (teacher-forced on the text, dense outputs).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Number of prompts, at evenly spaced offsets of the text.
    #[arg(long, default_value_t = 2)]
    prompts: usize,
    /// Configurations measured at every step, `P,B0,SINK_PAGES,RECENT_PAGES` separated by `;`
    /// (`B0 = 0`: every token, i.e. top-p alone); pages of 16 tokens.
    #[arg(
        long,
        default_value = "0.95,1024,0,0;0.95,1024,1,1;1,1024,1,1;0.95,0,0,0"
    )]
    variants: String,
    /// Print the per-layer table of every variant (else only the summary over layers >= 2).
    #[arg(long)]
    per_layer: bool,
    /// Read only the first N bytes of the text file.
    #[arg(long, default_value_t = 400_000)]
    max_bytes: usize,
}

#[derive(Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory.
    #[arg(long)]
    out: std::path::PathBuf,
    /// UTF-8 text whose first --logits-tokens tokens are run through our model; the ids
    /// (`ids`, i64) and f32 logits (`logits`, (tokens, vocab)) go to OUT/our_logits.safetensors.
    #[arg(long)]
    text_file: std::path::PathBuf,
    #[arg(long, default_value_t = 128)]
    logits_tokens: usize,
}

#[derive(Args, Debug)]
struct DumpArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text the context is cut from.
    #[arg(long)]
    text_file: std::path::PathBuf,
    /// Context length in tokens (prefilled densely).
    #[arg(long, default_value_t = 8191)]
    context: usize,
    /// Layers to record, comma-separated.
    #[arg(long, default_value = "2,7,12,17,22,27", value_delimiter = ',')]
    layers: Vec<usize>,
    /// Output safetensors: per recorded layer L, `q.L` (1, q_heads, 1, head_dim) and `k.L`,
    /// `v.L` (1, kv_heads, context + 1, head_dim) (post-RoPE, bf16).
    #[arg(long)]
    out: std::path::PathBuf,
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
    /// Attention kind: dense, hash_sparse:N_BUCKETS, qk_sparse:DROP_Q,DROP_K,
    /// twilight:P,BASE_BUDGET[,PAGE_SIZE[,DENSE_LAYERS[,SINK_PAGES,RECENT_PAGES]]] (page size 16,
    /// 2 dense layers, 1 pinned sink page and 1 pinned recent page by default).
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
    #[arg(long, required_unless_present = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this UTF-8 file instead (see --prompt-tokens).
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<std::path::PathBuf>,
    /// Keep only the first N tokens of the prompt (for throughput runs at a given length).
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Keep generating past end-of-sequence tokens (throughput runs).
    #[arg(long)]
    ignore_eos: bool,
    /// Before the timed generation, run the same prompt once untimed (prefill plus two decode
    /// steps) so that kernel loading (the PTX JIT on first use) and allocator growth are not
    /// counted in the prompt and generation tokens/s (throughput runs).
    #[arg(long)]
    warmup: bool,
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
    /// Decode-style evaluation instead of windows: prefill the first N tokens (dense), then
    /// score every following token with one decode step each (for decode-only kinds such as
    /// Twilight). Needs --max-tokens within the model's context.
    #[arg(long)]
    decode_prefix: Option<usize>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file the prompts are cut from.
    #[arg(long)]
    text_file: std::path::PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 1536)]
    prompt_len: usize,
    /// Greedy tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Text tokens after the prompt scored by decode-style perplexity (0: skip).
    #[arg(long, default_value_t = 64)]
    score_tokens: usize,
    /// Number of prompts, at evenly spaced offsets of the text.
    #[arg(long, default_value_t = 2)]
    prompts: usize,
    /// Read only the first N bytes of the text file (tokenizing a large file is slow).
    #[arg(long, default_value_t = 400_000)]
    max_bytes: usize,
    /// Further kinds measured against the same dense reference (repeatable).
    #[arg(long)]
    also: Vec<AttentionKind>,
}

fn device(cpu: bool) -> Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    let device = Device::cuda_if_available(0)?;
    // Freed device memory stays in the pool between steps (see keep_memory_pool).
    candle_sparse_attn::keep_memory_pool(&device)?;
    Ok(device)
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
    let raw = match (&args.prompt, &args.prompt_file) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading prompt file {}", path.display()))?,
        (Some(p), None) => p.clone(),
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let prompt = if args.chat {
        let (text, end_token) = chat_prompt(tokenizer, args.system.as_deref(), &raw)?;
        stop.push(end_token);
        text
    } else {
        raw
    };
    if args.ignore_eos {
        stop.clear();
    }
    let encoding = tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let mut prompt_ids = encoding.get_ids().to_vec();
    if let Some(n) = args.prompt_tokens {
        if prompt_ids.len() < n {
            bail!(
                "--prompt-tokens {n}: the prompt has only {} tokens",
                prompt_ids.len()
            )
        }
        prompt_ids.truncate(n);
    }
    let prompt = match args.prompt_tokens {
        Some(_) => tokenizer
            .decode(&prompt_ids, false)
            .map_err(|e| anyhow::anyhow!("decoding the prompt: {e}"))?,
        None => prompt,
    };
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
    if args.prompt_file.is_none() {
        print!("{prompt}");
    } else {
        print!(
            "[{} prompt tokens from {:?}] ...",
            prompt_ids.len(),
            args.prompt_file
        );
    }
    std::io::stdout().flush()?;
    if args.warmup {
        let mut warm_sampler = Sampler::new(SamplingOptions::default())?;
        generate(
            loaded.model.as_ref(),
            &prompt_ids,
            args.max_new_tokens.min(3),
            &mut warm_sampler,
            &[],
            |_| Ok(()),
        )?;
    }
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
    if let Some(mean) = stats.mean_kept_fraction() {
        let steps: Vec<String> = stats
            .kept_fractions
            .iter()
            .map(|f| format!("{f:.3}"))
            .collect();
        eprintln!(
            "kept fraction (sparse decode layers): mean {mean:.4}; per step [{}]",
            steps.join(", ")
        );
    }
    Ok(())
}

/// Token ids of a UTF-8 text file, cut to its first `max_bytes` bytes (at a char boundary).
fn tokenize_file(
    tokenizer: &tokenizers::Tokenizer,
    path: &std::path::Path,
    max_bytes: usize,
) -> Result<Vec<u32>> {
    let mut text = std::fs::read_to_string(path)
        .with_context(|| format!("reading text file {}", path.display()))?;
    if text.len() > max_bytes {
        let end = (0..=max_bytes)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(end);
    }
    let encoding = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", path.display()))?;
    Ok(encoding.get_ids().to_vec())
}

fn run_perplexity(args: &PerplexityArgs) -> Result<()> {
    let loaded = load(&args.model)?;
    let mut ids = tokenize_file(&loaded.tokenizer, &args.text_file, usize::MAX)?;
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    let start = Instant::now();
    let (report, how) = match args.decode_prefix {
        Some(prefix) => (
            perplexity_decode(loaded.model.as_ref(), &ids, prefix)?,
            format!("decode steps after a {prefix}-token prefill"),
        ),
        None => {
            let stride = args.stride.unwrap_or((args.context_len / 2).max(1));
            let report = perplexity(loaded.model.as_ref(), &ids, args.context_len, stride)?;
            let how = format!(
                "{} windows (context {}, stride {stride})",
                report.windows, args.context_len
            );
            (report, how)
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let kept = report
        .mean_kept_fraction
        .map(|f| format!(", mean kept fraction {f:.4}"))
        .unwrap_or_default();
    println!(
        "attention {}: {} tokens scored in {how}: mean NLL {:.4} nats, perplexity {:.3} \
         ({:.1} tokens/s){kept}",
        args.model.attention,
        report.scored_tokens,
        report.mean_nll(),
        report.perplexity(),
        report.scored_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Greedy argmax of the last row of `model`'s logits for `input` through `cache`.
fn greedy_step(
    model: &dyn CausalLm,
    input: &[u32],
    cache: &mut candle_sparse_models::DecoderCache,
) -> Result<u32> {
    let tokens = candle::Tensor::new(input, model.device())?.unsqueeze(0)?;
    let logits = model.forward(&tokens, Some(cache))?.squeeze(0)?;
    Ok(logits.get(input.len() - 1)?.argmax(0)?.to_scalar::<u32>()?)
}

/// The measurements of one sparse kind over the prompts of `compare`.
#[derive(Debug, Default)]
struct CompareTotals {
    free_equal: usize,
    forced_equal: usize,
    generated: usize,
    text_equal: usize,
    nll: f64,
    scored: usize,
    kept: Vec<f64>,
}

fn run_compare(args: &CompareArgs) -> Result<()> {
    let dense_args = ModelArgs {
        attention: AttentionKind::Dense,
        model: args.model.model.clone(),
        revision: args.model.revision.clone(),
        dtype: args.model.dtype.clone(),
        cpu: args.model.cpu,
    };
    let dense = load(&dense_args)?;
    let kinds: Vec<AttentionKind> = std::iter::once(args.model.attention.clone())
        .chain(args.also.iter().cloned())
        .collect();
    let sparse = kinds
        .iter()
        .map(|kind| {
            load(&ModelArgs {
                attention: kind.clone(),
                model: args.model.model.clone(),
                revision: args.model.revision.clone(),
                dtype: args.model.dtype.clone(),
                cpu: args.model.cpu,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let ids = tokenize_file(&dense.tokenizer, &args.text_file, args.max_bytes)?;
    let window = args.prompt_len + args.new_tokens.max(args.score_tokens);
    if args.prompt_len == 0 || args.prompts == 0 || ids.len() < window {
        bail!(
            "compare: need --prompt-len > 0, --prompts > 0 and a text of at least {window} tokens \
             ({} in {})",
            ids.len(),
            args.text_file.display()
        )
    }
    let dm = dense.model.as_ref();
    let mut totals: Vec<CompareTotals> = kinds.iter().map(|_| CompareTotals::default()).collect();
    let mut nll_dense = 0.0;
    for i in 0..args.prompts {
        let offset = i * (ids.len() - window) / args.prompts.max(2).saturating_sub(1).max(1);
        let prompt = &ids[offset..offset + args.prompt_len];
        let greedy = |model: &dyn CausalLm| -> Result<_> {
            let mut sampler = Sampler::new(SamplingOptions::default())?;
            Ok(generate(
                model,
                prompt,
                args.new_tokens,
                &mut sampler,
                &[],
                |_| Ok(()),
            )?)
        };
        let text = &ids[offset..offset + args.prompt_len + args.score_tokens];
        let start = Instant::now();
        let reference = if args.new_tokens > 0 {
            greedy(dm)?.0
        } else {
            Vec::new()
        };
        let dense_ppl = if args.score_tokens > 0 {
            Some(perplexity_decode(dm, text, args.prompt_len)?)
        } else {
            None
        };
        println!(
            "prompt {i} (tokens {offset}..{}): dense reference {:.1}s",
            offset + args.prompt_len,
            start.elapsed().as_secs_f64()
        );
        for ((kind, loaded), total) in kinds.iter().zip(&sparse).zip(&mut totals) {
            let sm = loaded.model.as_ref();
            let start = Instant::now();
            let mut line = format!("prompt {i} {kind}:");
            if args.new_tokens > 0 {
                let (free, stats) = greedy(sm)?;
                // Teacher forcing: the sparse model decodes the dense continuation.
                let mut cache = sm.new_cache()?;
                let mut forced = vec![greedy_step(sm, prompt, &mut cache)?];
                for &t in &reference[..reference.len() - 1] {
                    forced.push(greedy_step(sm, &[t], &mut cache)?);
                }
                let equal = |a: &[u32]| a.iter().zip(&reference).filter(|(x, y)| x == y).count();
                let first_diff = free
                    .iter()
                    .zip(&reference)
                    .position(|(x, y)| x != y)
                    .map_or("none".to_string(), |p| p.to_string());
                total.free_equal += equal(&free);
                total.forced_equal += equal(&forced);
                total.generated += reference.len();
                total.kept.extend(stats.kept_fractions.iter().copied());
                line += &format!(
                    " free-running {}/{} equal (first difference at {first_diff}), \
                     teacher-forced {}/{}, kept fraction {:.4};",
                    equal(&free),
                    reference.len(),
                    equal(&forced),
                    reference.len(),
                    stats.mean_kept_fraction().unwrap_or(1.0),
                );
            }
            if let Some(d) = &dense_ppl {
                let s = perplexity_decode(sm, text, args.prompt_len)?;
                let agree = s
                    .predictions
                    .iter()
                    .zip(&d.predictions)
                    .filter(|(a, b)| a == b)
                    .count();
                total.text_equal += agree;
                total.nll += s.total_nll;
                total.scored += s.scored_tokens;
                if args.new_tokens == 0 {
                    total.kept.extend(s.mean_kept_fraction);
                }
                line += &format!(
                    " decode-style perplexity of the next {} text tokens: dense {:.3}, sparse \
                     {:.3}, top-1 equal to dense {agree}/{} (kept fraction {:.4});",
                    args.score_tokens,
                    d.perplexity(),
                    s.perplexity(),
                    s.scored_tokens,
                    s.mean_kept_fraction.unwrap_or(1.0)
                );
            }
            println!("{line} {:.1}s", start.elapsed().as_secs_f64());
        }
        nll_dense += dense_ppl.map_or(0.0, |d| d.total_nll);
    }
    println!(
        "\n{} prompts of {} tokens, {} greedy tokens and {} scored text tokens each\n\n\
         | kind | kept fraction | free-running | teacher-forced | text top-1 | ppl dense | ppl sparse | Δ ppl |\n\
         |---|---|---|---|---|---|---|---|",
        args.prompts, args.prompt_len, args.new_tokens, args.score_tokens
    );
    for (kind, t) in kinds.iter().zip(&totals) {
        let pct = |a: usize, n: usize| {
            if n == 0 {
                "-".to_string()
            } else {
                format!("{:.1}% ({a}/{n})", 100.0 * a as f64 / n as f64)
            }
        };
        let (pd, ps) = (
            (nll_dense / t.scored.max(1) as f64).exp(),
            (t.nll / t.scored.max(1) as f64).exp(),
        );
        let ppl = if t.scored == 0 {
            "- | - | -".to_string()
        } else {
            format!("{pd:.3} | {ps:.3} | {:+.2}%", 100.0 * (ps / pd - 1.0))
        };
        println!(
            "| {kind} | {:.2}% | {} | {} | {} | {ppl} |",
            100.0 * t.kept.iter().sum::<f64>() / t.kept.len().max(1) as f64,
            pct(t.free_equal, t.generated),
            pct(t.forced_equal, t.generated),
            pct(t.text_equal, t.scored),
        );
    }
    Ok(())
}

fn run_export(args: &ExportArgs) -> Result<()> {
    let gguf = candle_sparse_models::gguf::GgufFile::open(std::path::Path::new(&args.model.model))
        .with_context(|| format!("--model {:?} must be a .gguf file", args.model.model))?;
    gguf.write_hf_checkpoint(&args.out, DType::F32)?;
    let loaded = load(&args.model)?;
    let mut ids = tokenize_file(&loaded.tokenizer, &args.text_file, 100_000)?;
    ids.truncate(args.logits_tokens);
    let model = loaded.model.as_ref();
    let tokens = candle::Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model
        .forward(&tokens, None)?
        .squeeze(0)?
        .to_device(&Device::Cpu)?;
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = ids.len();
    let tensors = std::collections::HashMap::from([
        (
            "ids".to_string(),
            candle::Tensor::from_vec(ids, n, &Device::Cpu)?,
        ),
        ("logits".to_string(), logits),
    ]);
    candle::safetensors::save(&tensors, args.out.join("our_logits.safetensors"))?;
    println!(
        "wrote {} (model.safetensors f32, config.json, tokenizer.json, our_logits.safetensors: {n} tokens, attention {}, {})",
        args.out.display(),
        args.model.attention,
        args.model.dtype
    );
    Ok(())
}

/// Dense attention that records, for chosen layers, the decode query and the full cached keys
/// and values it attends over (for `dump-qkv`).
#[derive(Debug)]
struct RecordingAttention {
    layers: Vec<usize>,
    recorded: std::sync::Mutex<std::collections::HashMap<String, candle::Tensor>>,
}

/// The growing KV cache of [`RecordingAttention`], which also knows its layer.
#[derive(Debug)]
struct RecordingCache {
    layer: usize,
    kv: candle_sparse_models::KvCache,
}

impl candle_sparse_models::LayerCache for RecordingCache {
    fn len(&self) -> usize {
        self.kv.len()
    }
    fn reset(&mut self) {
        self.kv.reset()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl candle_sparse_models::AttentionBackend for RecordingAttention {
    fn name(&self) -> String {
        "recording dense".to_string()
    }
    fn supports_kv_cache(&self) -> bool {
        true
    }
    fn forward(
        &self,
        q: &candle::Tensor,
        k: &candle::Tensor,
        v: &candle::Tensor,
        call: &candle_sparse_models::AttentionCall,
    ) -> candle::Result<candle::Tensor> {
        candle_sparse_models::attention::DenseAttention.forward(q, k, v, call)
    }
    fn new_cache(&self, layer: usize) -> candle::Result<Box<dyn candle_sparse_models::LayerCache>> {
        Ok(Box::new(RecordingCache {
            layer,
            kv: candle_sparse_models::KvCache::new(),
        }))
    }
    fn forward_cached(
        &self,
        q: &candle::Tensor,
        k: &candle::Tensor,
        v: &candle::Tensor,
        cache: &mut dyn candle_sparse_models::LayerCache,
        call: &candle_sparse_models::AttentionCall,
    ) -> candle::Result<candle::Tensor> {
        let cache = candle_sparse_models::downcast_cache::<RecordingCache>(cache, "recording")?;
        let (k, v) = cache.kv.append(k, v)?;
        if q.dim(2)? == 1 && self.layers.contains(&cache.layer) {
            let mut recorded = self.recorded.lock().expect("recorder lock");
            for (name, t) in [("q", q), ("k", &k), ("v", &v)] {
                recorded.insert(
                    format!("{name}.{}", cache.layer),
                    t.to_dtype(DType::BF16)?.to_device(&Device::Cpu)?,
                );
            }
        }
        self.forward(q, &k, &v, call)
    }
}

fn run_dump(args: &DumpArgs) -> Result<()> {
    let device = device(args.model.cpu)?;
    let gguf = candle_sparse_models::gguf::GgufFile::open(std::path::Path::new(&args.model.model))
        .with_context(|| format!("--model {:?} must be a .gguf file", args.model.model))?;
    let mut model = gguf.load_llama(&AttentionKind::Dense, dtype(&args.model.dtype)?, &device)?;
    let recorder = std::sync::Arc::new(RecordingAttention {
        layers: args.layers.clone(),
        recorded: Default::default(),
    });
    model.set_attention(candle_sparse_models::Attention::with_backend(
        recorder.clone(),
    ));
    let tokenizer = gguf.tokenizer()?;
    let ids = tokenize_file(&tokenizer, &args.text_file, 8 * args.context + 4096)?;
    if ids.len() < args.context + 1 {
        bail!(
            "dump-qkv: the text has {} tokens, --context needs {}",
            ids.len(),
            args.context + 1
        )
    }
    let mut cache = model.new_cache()?;
    let step = |input: &[u32], cache: &mut candle_sparse_models::DecoderCache| -> Result<()> {
        let tokens = candle::Tensor::new(input, &device)?.unsqueeze(0)?;
        model.forward(&tokens, Some(cache))?;
        Ok(())
    };
    step(&ids[..args.context], &mut cache)?;
    step(&ids[args.context..args.context + 1], &mut cache)?;
    let recorded = recorder.recorded.lock().expect("recorder lock").clone();
    if recorded.len() != 3 * args.layers.len() {
        bail!(
            "dump-qkv: recorded {} tensors for layers {:?} (model has {} layers)",
            recorded.len(),
            args.layers,
            model.num_layers()
        )
    }
    candle::safetensors::save(&recorded, &args.out)?;
    println!(
        "wrote {}: q/k/v of layers {:?} at context {} (+1 decode token)",
        args.out.display(),
        args.layers,
        args.context
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Perplexity(args) => run_perplexity(args),
        Command::Compare(args) => run_compare(args),
        Command::ExportHf(args) => run_export(args),
        Command::DumpQkv(args) => run_dump(args),
        Command::TwilightStats(args) => run_twilight_stats(args),
    }
}

/// One configuration measured by `twilight-stats`.
#[derive(Clone, Copy, Debug)]
struct ProbeVariant {
    p: f32,
    /// `None`: every token (top-p alone).
    quest: Option<QuestSelector>,
}

impl std::fmt::Display for ProbeVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.quest {
            Some(q) => write!(
                f,
                "p {} B0 {} pins {}+{}",
                self.p, q.budget, q.sink_pages, q.recent_pages
            ),
            None => write!(f, "p {} B0 all", self.p),
        }
    }
}

/// Sums over (decode step, query head) of one variant and layer (see [`ProbeStats::row`]).
#[derive(Clone, Debug, Default)]
struct ProbeStats {
    n: f64,
    cand_frac: f64,
    cand_mass: f64,
    kept_frac: f64,
    kept_mass: f64,
    exact_kept_frac: f64,
    exact_kept_mass: f64,
    union_frac: f64,
    union_mass: f64,
    est_rms: f64,
    out_err: f64,
    sink_in: f64,
    last_in: f64,
}

impl ProbeStats {
    fn add(&mut self, o: &ProbeStats) {
        let ProbeStats {
            n,
            cand_frac,
            cand_mass,
            kept_frac,
            kept_mass,
            exact_kept_frac,
            exact_kept_mass,
            union_frac,
            union_mass,
            est_rms,
            out_err,
            sink_in,
            last_in,
        } = self;
        for (a, b) in [
            (n, o.n),
            (cand_frac, o.cand_frac),
            (cand_mass, o.cand_mass),
            (kept_frac, o.kept_frac),
            (kept_mass, o.kept_mass),
            (exact_kept_frac, o.exact_kept_frac),
            (exact_kept_mass, o.exact_kept_mass),
            (union_frac, o.union_frac),
            (union_mass, o.union_mass),
            (est_rms, o.est_rms),
            (out_err, o.out_err),
            (sink_in, o.sink_in),
            (last_in, o.last_in),
        ] {
            *a += b;
        }
    }

    /// Means, as a table row: candidates (fraction, exact mass), INT4 top-p kept (fraction,
    /// mass), exact-score top-p over the same candidates (fraction, mass), GQA union (fraction,
    /// mass), RMS of the INT4 score error over the candidates, relative output error, and the
    /// share of heads whose candidates hold token 0 and the current token.
    fn row(&self) -> String {
        let m = |x: f64| x / self.n.max(1.0);
        format!(
            "| {:.1}% | {:.4} | {:.2}% | {:.4} | {:.2}% | {:.4} | {:.2}% | {:.4} | {:.3} | {:.4} | {:.0}% | {:.0}% |",
            100.0 * m(self.cand_frac),
            m(self.cand_mass),
            100.0 * m(self.kept_frac),
            m(self.kept_mass),
            100.0 * m(self.exact_kept_frac),
            m(self.exact_kept_mass),
            100.0 * m(self.union_frac),
            m(self.union_mass),
            m(self.est_rms),
            m(self.out_err),
            100.0 * m(self.sink_in),
            100.0 * m(self.last_in),
        )
    }
}

const PROBE_HEADER: &str = "| cand. | cand. mass | kept (INT4) | kept mass | kept (exact) | exact mass | union | union mass | est. RMS | out err | sink in | current in |";

/// Dense attention that, at every decode step, also runs Twilight's stages over a
/// [`TwilightCache`] of the same keys and values and records [`ProbeStats`] per variant and layer.
#[derive(Debug)]
struct TwilightProbe {
    variants: Vec<ProbeVariant>,
    capacity: usize,
    /// `stats[variant][layer]`.
    stats: std::sync::Mutex<Vec<Vec<ProbeStats>>>,
}

#[derive(Debug)]
struct ProbeCache {
    layer: usize,
    cache: Option<TwilightCache>,
}

impl candle_sparse_models::LayerCache for ProbeCache {
    fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, TwilightCache::len)
    }
    fn reset(&mut self) {
        self.cache = None
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Rows of a `(1, heads, n)` tensor on the host.
fn rows<T: candle::WithDType>(t: &candle::Tensor) -> candle::Result<Vec<Vec<T>>> {
    t.to_device(&Device::Cpu)?.squeeze(0)?.to_vec2::<T>()
}

impl TwilightProbe {
    /// The stats of every variant for one decode step of `layer`: `q3` `(1, hq, d)`, `dense`
    /// `(1, hq, d)` the exact output.
    fn measure(
        &self,
        layer: usize,
        cache: &TwilightCache,
        q3: &candle::Tensor,
        dense: &candle::Tensor,
    ) -> candle::Result<()> {
        let (_, hq, d) = q3.dims3()?;
        let (t, group) = (cache.len(), hq / cache.kv_heads());
        let scale = 1.0 / (d as f32).sqrt();
        let keys = candle_sparse_attn::reference::repeat_kv(&cache.keys()?, group)?
            .to_dtype(DType::F32)?;
        let exact = (q3.to_dtype(DType::F32)?.unsqueeze(2)?.matmul(&keys.t()?)? * scale as f64)?
            .squeeze(2)?;
        let weights = rows::<f32>(&candle_nn::ops::softmax_last_dim(&exact)?)?;
        let exact_rows = rows::<f32>(&exact)?;
        let dense_rows = rows::<f32>(&dense.to_dtype(DType::F32)?)?;
        let mass = |h: usize, ids: &[u32]| -> f64 {
            ids.iter()
                .filter(|&&i| (i as usize) < t)
                .map(|&i| weights[h][i as usize] as f64)
                .sum()
        };
        let count = |ids: &[u32]| ids.iter().filter(|&&i| (i as usize) < t).count() as f64;
        let mut out = Vec::with_capacity(self.variants.len());
        for v in &self.variants {
            let cand = match &v.quest {
                Some(quest) => quest.select(cache, q3)?,
                None => FullSelector.select(cache, q3)?,
            };
            let est = estimate_scores(cache, q3, &cand, scale)?;
            let kept = if v.p < 1.0 {
                top_p(&est, &cand, v.p)?
            } else {
                cand.clone()
            };
            let cand_rows = rows::<u32>(&cand)?;
            // The oracle: the same top-p over the exact scores of the candidates.
            let exact_est: Vec<f32> = cand_rows
                .iter()
                .enumerate()
                .flat_map(|(h, r)| {
                    r.iter()
                        .map(|&i| {
                            if (i as usize) < t {
                                exact_rows[h][i as usize]
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let exact_est = candle::Tensor::from_vec(exact_est, cand.shape(), cand.device())?;
            let exact_kept = rows::<u32>(&top_p(&exact_est, &cand, v.p)?)?;
            let lists = union_per_group(&kept, cache.kv_heads(), t)?;
            let sparse = rows::<f32>(
                &sparse_decode_attention(cache, q3, &lists, scale)?.to_dtype(DType::F32)?,
            )?;
            let (kept, est, lists) = (
                rows::<u32>(&kept)?,
                rows::<f32>(&est)?,
                rows::<u32>(&lists)?,
            );
            let mut s = ProbeStats::default();
            for h in 0..hq {
                let union = &lists[h / group][1..1 + lists[h / group][0] as usize];
                let (mut se, mut ne) = (0f64, 0f64);
                for (&i, &e) in cand_rows[h].iter().zip(&est[h]) {
                    if (i as usize) < t {
                        se += ((e - exact_rows[h][i as usize]) as f64).powi(2);
                        ne += 1.0;
                    }
                }
                let diff: f64 = (0..d)
                    .map(|c| ((sparse[h][c] - dense_rows[h][c]) as f64).powi(2))
                    .sum();
                let norm: f64 = (0..d).map(|c| (dense_rows[h][c] as f64).powi(2)).sum();
                s.add(&ProbeStats {
                    n: 1.0,
                    cand_frac: count(&cand_rows[h]) / t as f64,
                    cand_mass: mass(h, &cand_rows[h]),
                    kept_frac: count(&kept[h]) / t as f64,
                    kept_mass: mass(h, &kept[h]),
                    exact_kept_frac: count(&exact_kept[h]) / t as f64,
                    exact_kept_mass: mass(h, &exact_kept[h]),
                    union_frac: union.len() as f64 / t as f64,
                    union_mass: mass(h, union),
                    est_rms: (se / ne.max(1.0)).sqrt(),
                    out_err: (diff / norm.max(1e-30)).sqrt(),
                    sink_in: cand_rows[h].contains(&0) as u8 as f64,
                    last_in: cand_rows[h].contains(&(t as u32 - 1)) as u8 as f64,
                });
            }
            out.push(s);
        }
        let mut stats = self.stats.lock().expect("stats lock");
        for (vi, s) in out.iter().enumerate() {
            if stats[vi].len() <= layer {
                stats[vi].resize(layer + 1, ProbeStats::default());
            }
            stats[vi][layer].add(s);
        }
        Ok(())
    }
}

impl candle_sparse_models::AttentionBackend for TwilightProbe {
    fn name(&self) -> String {
        "twilight probe (dense)".to_string()
    }
    fn supports_kv_cache(&self) -> bool {
        true
    }
    fn forward(
        &self,
        q: &candle::Tensor,
        k: &candle::Tensor,
        v: &candle::Tensor,
        call: &candle_sparse_models::AttentionCall,
    ) -> candle::Result<candle::Tensor> {
        candle_sparse_models::attention::DenseAttention.forward(q, k, v, call)
    }
    fn new_cache(&self, layer: usize) -> candle::Result<Box<dyn candle_sparse_models::LayerCache>> {
        Ok(Box::new(ProbeCache { layer, cache: None }))
    }
    fn forward_cached(
        &self,
        q: &candle::Tensor,
        k: &candle::Tensor,
        v: &candle::Tensor,
        cache: &mut dyn candle_sparse_models::LayerCache,
        call: &candle_sparse_models::AttentionCall,
    ) -> candle::Result<candle::Tensor> {
        let layer = candle_sparse_models::downcast_cache::<ProbeCache>(cache, "twilight probe")?;
        let (b, h, _, d) = k.dims4()?;
        if layer.cache.is_none() {
            layer.cache = Some(TwilightCache::new(
                b,
                h,
                d,
                self.capacity,
                16,
                k.dtype(),
                k.device(),
            )?);
        }
        let cache = layer.cache.as_mut().expect("allocated above");
        cache.append(k, v)?;
        let (keys, values) = (cache.keys()?.contiguous()?, cache.values()?.contiguous()?);
        let out = self.forward(q, &keys, &values, call)?;
        if q.dim(2)? == 1 {
            let q3 = q.squeeze(2)?.contiguous()?;
            self.measure(layer.layer, cache, &q3, &out.squeeze(2)?)?;
        }
        Ok(out)
    }
}

fn run_twilight_stats(args: &TwilightStatsArgs) -> Result<()> {
    let device = device(args.model.cpu)?;
    let variants = args
        .variants
        .split(';')
        .map(|v| {
            let f: Vec<&str> = v.split(',').map(str::trim).collect();
            let [p, b0, sink, recent] = f.as_slice() else {
                bail!("--variants: {v:?} is not P,B0,SINK_PAGES,RECENT_PAGES")
            };
            let budget: usize = b0.parse()?;
            Ok(ProbeVariant {
                p: p.parse()?,
                quest: (budget > 0).then_some(QuestSelector {
                    budget,
                    sink_pages: sink.parse()?,
                    recent_pages: recent.parse()?,
                }),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let gguf = candle_sparse_models::gguf::GgufFile::open(std::path::Path::new(&args.model.model))
        .with_context(|| format!("--model {:?} must be a .gguf file", args.model.model))?;
    let mut model = gguf.load_llama(&AttentionKind::Dense, dtype(&args.model.dtype)?, &device)?;
    let probe = std::sync::Arc::new(TwilightProbe {
        variants: variants.clone(),
        capacity: args.prompt_len + args.steps,
        stats: std::sync::Mutex::new(vec![Vec::new(); variants.len()]),
    });
    model.set_attention(candle_sparse_models::Attention::with_backend(probe.clone()));
    let ids = tokenize_file(&gguf.tokenizer()?, &args.text_file, args.max_bytes)?;
    let window = args.prompt_len + args.steps;
    if args.steps == 0 || args.prompts == 0 || ids.len() < window {
        bail!(
            "twilight-stats: need --steps > 0, --prompts > 0 and at least {window} tokens ({} in {})",
            ids.len(),
            args.text_file.display()
        )
    }
    for i in 0..args.prompts {
        let offset = i * (ids.len() - window) / args.prompts.max(2).saturating_sub(1).max(1);
        let mut cache = model.new_cache()?;
        let start = Instant::now();
        for (j, chunk) in std::iter::once(&ids[offset..offset + args.prompt_len])
            .chain(ids[offset + args.prompt_len..offset + window].chunks(1))
            .enumerate()
        {
            let tokens = candle::Tensor::new(chunk, &device)?.unsqueeze(0)?;
            model.forward(&tokens, Some(&mut cache))?;
            if j == 0 {
                eprintln!(
                    "prompt {i} (tokens {offset}..): prefill {:.1}s",
                    start.elapsed().as_secs_f64()
                );
            }
        }
        eprintln!(
            "prompt {i}: {} decode steps, {:.1}s",
            args.steps,
            start.elapsed().as_secs_f64()
        );
    }
    let stats = probe.stats.lock().expect("stats lock");
    println!(
        "twilight-stats: {} prompts x {} steps after {} prompt tokens; means over steps and query heads",
        args.prompts, args.steps, args.prompt_len
    );
    println!("\n| config | layers {PROBE_HEADER}\n|{}", "---|".repeat(14));
    for (v, per_layer) in variants.iter().zip(stats.iter()) {
        let mut sparse = ProbeStats::default();
        per_layer.iter().skip(2).for_each(|s| sparse.add(s));
        println!("| {v} | 2-{} {}", per_layer.len() - 1, sparse.row());
    }
    if args.per_layer {
        for (v, per_layer) in variants.iter().zip(stats.iter()) {
            println!("\n{v}\n\n| layer {PROBE_HEADER}\n|{}", "---|".repeat(13));
            for (l, s) in per_layer.iter().enumerate() {
                println!("| {l} {}", s.row());
            }
        }
    }
    Ok(())
}
