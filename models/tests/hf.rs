//! Hugging Face decoders: tiny random Llama and GPT-2 checkpoints written in HF layout (and as
//! GGUF) into temp dirs, loaded through a directory, a fake HF cache and the GGUF reader, checked
//! against direct implementations with plain candle ops. No network. The real SmolLM2 GGUF test
//! runs only when `scripts/fetch-smollm2.sh` has fetched the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle::quantized::{gguf_file, GgmlDType, QTensor};
use candle::{DType, Device, Tensor, D};
use candle_sparse_attn::moa::{MoaPlan, SpanRule};
use candle_sparse_models::attention::AttentionKind;
use candle_sparse_models::decoder::{load_decoder, CausalLm};
use candle_sparse_models::gguf::GgufFile;
use candle_sparse_models::hub::{
    cache_dir_from, env_flag_is_set, looks_like_path, resolve_in_cache, resolve_in_dir,
    resolve_model_files,
};
use candle_sparse_models::{
    generate, load_model, perplexity, perplexity_decode, Attention, Sampler, SamplingOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const DEV: Device = Device::Cpu;

/// Sorted byte-level alphabet, then the merged token `Ġt`, then the special `<|im_end|>`.
fn vocab_tokens() -> Vec<String> {
    let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    chars.sort_unstable();
    let mut tokens: Vec<String> = chars.into_iter().map(String::from).collect();
    tokens.push("Ġt".to_string());
    tokens.push("<|im_end|>".to_string());
    tokens
}

fn tiny_tokenizer() -> Tokenizer {
    let tokens = vocab_tokens();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![("Ġ".to_string(), "t".to_string())])
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(vec![AddedToken::from("<|im_end|>", true)])
        .unwrap();
    tok
}

fn randn(rng: &mut StdRng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() - 0.5) * 2.0 * 1.732 * std)
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// Tiny Llama: hidden 64, 2 query / 1 KV heads of dim 32, 2 layers, vocab 258.
fn llama_config(tied: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_tokens().len(),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000.0,
        "max_position_embeddings": 48,
        "tie_word_embeddings": tied,
        "eos_token_id": vocab_tokens().len() - 1,
    })
}

fn llama_weights(tied: bool, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = vocab_tokens().len();
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        randn(&mut rng, &[v, 64], 1.0),
    );
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        let norm = (randn(&mut rng, &[64], 0.1) + 1.0).unwrap();
        w.insert(format!("{p}.input_layernorm.weight"), norm);
        let norm = (randn(&mut rng, &[64], 0.1) + 1.0).unwrap();
        w.insert(format!("{p}.post_attention_layernorm.weight"), norm);
        for (name, shape) in [
            ("self_attn.q_proj", [64, 64]),
            ("self_attn.k_proj", [32, 64]),
            ("self_attn.v_proj", [32, 64]),
            ("self_attn.o_proj", [64, 64]),
            ("mlp.gate_proj", [96, 64]),
            ("mlp.up_proj", [96, 64]),
            ("mlp.down_proj", [64, 96]),
        ] {
            let std = 1.0 / (shape[1] as f32).sqrt();
            w.insert(format!("{p}.{name}.weight"), randn(&mut rng, &shape, std));
        }
    }
    let norm = (randn(&mut rng, &[64], 0.1) + 1.0).unwrap();
    w.insert("model.norm.weight".into(), norm);
    if !tied {
        w.insert("lm_head.weight".into(), randn(&mut rng, &[v, 64], 0.125));
    }
    w
}

/// Tiny GPT-2: n_embd 64, 2 heads of dim 32, 2 layers, 40 positions, Conv1D weights `(in, out)`.
fn gpt2_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_tokens().len(),
        "n_positions": 40,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
    })
}

fn gpt2_weights(prefix: &str, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = vocab_tokens().len();
    let mut w = HashMap::new();
    w.insert(
        format!("{prefix}wte.weight"),
        randn(&mut rng, &[v, 64], 0.5),
    );
    w.insert(
        format!("{prefix}wpe.weight"),
        randn(&mut rng, &[40, 64], 0.1),
    );
    let ln = |rng: &mut StdRng, w: &mut HashMap<String, Tensor>, name: String| {
        w.insert(
            format!("{name}.weight"),
            (randn(rng, &[64], 0.1) + 1.0).unwrap(),
        );
        w.insert(format!("{name}.bias"), randn(rng, &[64], 0.1));
    };
    for i in 0..2 {
        let p = format!("{prefix}h.{i}");
        ln(&mut rng, &mut w, format!("{p}.ln_1"));
        ln(&mut rng, &mut w, format!("{p}.ln_2"));
        for (name, i_dim, o_dim) in [
            ("attn.c_attn", 64, 192),
            ("attn.c_proj", 64, 64),
            ("mlp.c_fc", 64, 256),
            ("mlp.c_proj", 256, 64),
        ] {
            let std = 1.0 / (i_dim as f32).sqrt();
            w.insert(
                format!("{p}.{name}.weight"),
                randn(&mut rng, &[i_dim, o_dim], std),
            );
            w.insert(format!("{p}.{name}.bias"), randn(&mut rng, &[o_dim], 0.1));
        }
        // The causal-mask buffer of HF checkpoints, which the loader must ignore.
        w.insert(
            format!("{p}.attn.bias"),
            Tensor::ones((1, 1, 40, 40), DType::F32, &DEV).unwrap(),
        );
    }
    ln(&mut rng, &mut w, format!("{prefix}ln_f"));
    w
}

/// Writes config.json, model.safetensors and tokenizer.json into `dir`.
fn write_checkpoint(dir: &Path, config: &serde_json::Value, weights: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    tiny_tokenizer()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tokens(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &DEV).unwrap().unsqueeze(0).unwrap()
}

const IDS: [u32; 12] = [71, 3, 200, 17, 256, 9, 140, 33, 88, 2, 250, 5];

// ---------- direct reference implementations (plain candle ops) ----------

/// `x · Wᵀ` for `x`: `(t, in)`, `w`: `(out, in)`.
fn mm_t(x: &Tensor, w: &Tensor) -> Tensor {
    x.matmul(&w.t().unwrap()).unwrap()
}

/// Causal softmax attention of `q` `(hq, t, d)` over `k`, `v` `(hkv, t, d)`, K/V heads repeated.
fn ref_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (hq, t, d) = q.dims3().unwrap();
    let hkv = k.dim(0).unwrap();
    let rep = hq / hkv;
    let repeat = |x: &Tensor| {
        x.unsqueeze(1)
            .unwrap()
            .expand((hkv, rep, t, d))
            .unwrap()
            .reshape((hq, t, d))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &DEV).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
    p.matmul(&v).unwrap()
}

/// Rotate-half RoPE of `x` `(h, t, d)` at positions `0..t` with base `theta`.
fn ref_rope(x: &Tensor, theta: f32) -> Tensor {
    let (h, t, d) = x.dims3().unwrap();
    let mut cos = vec![0f32; t * d / 2];
    let mut sin = vec![0f32; t * d / 2];
    for p in 0..t {
        for i in 0..d / 2 {
            let a = p as f32 * theta.powf(-(2.0 * i as f32) / d as f32);
            cos[p * d / 2 + i] = a.cos();
            sin[p * d / 2 + i] = a.sin();
        }
    }
    let cos = Tensor::from_vec(cos, (t, d / 2), &DEV).unwrap();
    let sin = Tensor::from_vec(sin, (t, d / 2), &DEV).unwrap();
    let x1 = x.narrow(2, 0, d / 2).unwrap();
    let x2 = x.narrow(2, d / 2, d / 2).unwrap();
    let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
    let r2 = (x1.broadcast_mul(&sin).unwrap() + x2.broadcast_mul(&cos).unwrap()).unwrap();
    let _ = h;
    Tensor::cat(&[r1, r2], 2).unwrap()
}

fn ref_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
}

/// Llama logits `(t, vocab)` for one sequence.
fn ref_llama(w: &HashMap<String, Tensor>, ids: &[u32], tied: bool) -> Tensor {
    let t = ids.len();
    let ids_t = Tensor::new(ids, &DEV).unwrap();
    let mut x = w["model.embed_tokens.weight"]
        .index_select(&ids_t, 0)
        .unwrap();
    let heads = |y: Tensor, n: usize| {
        y.reshape((t, n, 32))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    for i in 0..2 {
        let g = |n: &str| &w[&format!("model.layers.{i}.{n}.weight")];
        let h = ref_rms_norm(&x, g("input_layernorm"), 1e-5);
        let q = ref_rope(&heads(mm_t(&h, g("self_attn.q_proj")), 2), 1000.0);
        let k = ref_rope(&heads(mm_t(&h, g("self_attn.k_proj")), 1), 1000.0);
        let v = heads(mm_t(&h, g("self_attn.v_proj")), 1);
        let y = ref_attention(&q, &k, &v)
            .transpose(0, 1)
            .unwrap()
            .reshape((t, 64))
            .unwrap();
        x = (x + mm_t(&y, g("self_attn.o_proj"))).unwrap();
        let h = ref_rms_norm(&x, g("post_attention_layernorm"), 1e-5);
        let gate = mm_t(&h, g("mlp.gate_proj"));
        let silu = (&gate * candle_nn::ops::sigmoid(&gate).unwrap()).unwrap();
        let m = mm_t(
            &(silu * mm_t(&h, g("mlp.up_proj"))).unwrap(),
            g("mlp.down_proj"),
        );
        x = (x + m).unwrap();
    }
    let x = ref_rms_norm(&x, &w["model.norm.weight"], 1e-5);
    let head = if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    mm_t(&x, &w[head])
}

fn ref_layer_norm(x: &Tensor, w: &HashMap<String, Tensor>, name: &str) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    c.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w[&format!("{name}.weight")])
        .unwrap()
        .broadcast_add(&w[&format!("{name}.bias")])
        .unwrap()
}

/// GPT-2 logits `(t, vocab)`: Conv1D as `x · W + b` with `W` `(in, out)`; tanh GELU written out.
fn ref_gpt2(w: &HashMap<String, Tensor>, prefix: &str, ids: &[u32]) -> Tensor {
    let t = ids.len();
    let ids_t = Tensor::new(ids, &DEV).unwrap();
    let mut x = (w[&format!("{prefix}wte.weight")]
        .index_select(&ids_t, 0)
        .unwrap()
        + w[&format!("{prefix}wpe.weight")].narrow(0, 0, t).unwrap())
    .unwrap();
    let conv = |x: &Tensor, name: String| {
        x.matmul(&w[&format!("{name}.weight")])
            .unwrap()
            .broadcast_add(&w[&format!("{name}.bias")])
            .unwrap()
    };
    for i in 0..2 {
        let p = format!("{prefix}h.{i}");
        let h = ref_layer_norm(&x, w, &format!("{p}.ln_1"));
        let qkv = conv(&h, format!("{p}.attn.c_attn"));
        let split = |j: usize| {
            qkv.narrow(1, 64 * j, 64)
                .unwrap()
                .reshape((t, 2, 32))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let y = ref_attention(&split(0), &split(1), &split(2))
            .transpose(0, 1)
            .unwrap()
            .reshape((t, 64))
            .unwrap();
        x = (x + conv(&y, format!("{p}.attn.c_proj"))).unwrap();
        let h = conv(
            &ref_layer_norm(&x, w, &format!("{p}.ln_2")),
            format!("{p}.mlp.c_fc"),
        );
        // 0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³)))
        let inner = ((&h + (h.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap()
            * (2.0f64 / std::f64::consts::PI).sqrt())
        .unwrap();
        let gelu = ((&h * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap();
        x = (x + conv(&gelu, format!("{p}.mlp.c_proj"))).unwrap();
    }
    let x = ref_layer_norm(&x, w, &format!("{prefix}ln_f"));
    mm_t(&x, &w[&format!("{prefix}wte.weight")])
}

fn load_dir(dir: &Path, kind: &AttentionKind) -> Box<dyn CausalLm> {
    load_decoder(&resolve_in_dir(dir).unwrap(), kind, DType::F32, &DEV).unwrap()
}

// ---------- tests ----------

#[test]
fn llama_logits_match_reference_tied_and_untied() -> Result<()> {
    for tied in [false, true] {
        let tmp = tempfile::tempdir()?;
        let w = llama_weights(tied, 1);
        write_checkpoint(tmp.path(), &llama_config(tied), &w);
        let model = load_dir(tmp.path(), &AttentionKind::Dense);
        let ours = model.forward(&tokens(&IDS), None)?.squeeze(0)?;
        let reference = ref_llama(&w, &IDS, tied);
        let d = max_diff(&ours, &reference);
        assert!(d < 1e-3, "tied {tied}: max |logit diff| {d}");
    }
    Ok(())
}

#[test]
fn gpt2_logits_match_reference_with_and_without_prefix() -> Result<()> {
    for prefix in ["", "transformer."] {
        let tmp = tempfile::tempdir()?;
        let w = gpt2_weights(prefix, 2);
        write_checkpoint(tmp.path(), &gpt2_config(), &w);
        let model = load_dir(tmp.path(), &AttentionKind::Dense);
        let ours = model.forward(&tokens(&IDS), None)?.squeeze(0)?;
        let reference = ref_gpt2(&w, prefix, &IDS);
        let d = max_diff(&ours, &reference);
        assert!(d < 1e-3, "prefix {prefix:?}: max |logit diff| {d}");
    }
    Ok(())
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_checkpoint(
        &tmp.path().join("llama"),
        &llama_config(false),
        &llama_weights(false, 3),
    );
    write_checkpoint(
        &tmp.path().join("gpt2"),
        &gpt2_config(),
        &gpt2_weights("", 4),
    );
    for name in ["llama", "gpt2"] {
        let model = load_dir(&tmp.path().join(name), &AttentionKind::Dense);
        assert!(model.supports_kv_cache());
        let full = model.forward(&tokens(&IDS), None)?.squeeze(0)?;
        let mut cache = model.new_cache()?;
        // A 5-token prompt, then one token at a time.
        let mut rows = vec![model
            .forward(&tokens(&IDS[..5]), Some(&mut cache))?
            .squeeze(0)?];
        for i in 5..IDS.len() {
            rows.push(
                model
                    .forward(&tokens(&IDS[i..i + 1]), Some(&mut cache))?
                    .squeeze(0)?,
            );
        }
        assert_eq!(cache.len(), IDS.len());
        let d = max_diff(&Tensor::cat(&rows, 0)?, &full);
        assert!(d < 1e-3, "{name}: cached vs full max diff {d}");

        // Greedy generation with the cache equals greedy argmax over full recomputation.
        let mut sampler = Sampler::new(SamplingOptions::default())?;
        let (generated, stats) =
            generate(model.as_ref(), &IDS[..4], 6, &mut sampler, &[], |_| Ok(()))?;
        let mut seq = IDS[..4].to_vec();
        for _ in 0..6 {
            let logits = model.forward(&tokens(&seq), None)?.squeeze(0)?;
            let next = logits.get(seq.len() - 1)?.argmax(0)?.to_scalar::<u32>()?;
            seq.push(next);
        }
        assert_eq!(generated, seq[4..], "{name}");
        assert_eq!((stats.prompt_tokens, stats.generated_tokens), (4, 6));
    }
    Ok(())
}

#[test]
fn every_attention_kind_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_checkpoint(
        &tmp.path().join("llama"),
        &llama_config(true),
        &llama_weights(true, 5),
    );
    write_checkpoint(
        &tmp.path().join("gpt2"),
        &gpt2_config(),
        &gpt2_weights("", 6),
    );
    let kinds = [
        AttentionKind::Dense,
        AttentionKind::HashSparse { n_buckets: 2 },
        AttentionKind::QkSparse {
            drop_q: 0.2,
            drop_k: 0.2,
        },
        AttentionKind::Twilight {
            p: 0.8,
            base_budget: 4,
            page_size: 2,
            dense_layers: 1,
            sink_pages: 1,
            recent_pages: 1,
        },
    ];
    // qk_sparse dropping nothing is dense attention.
    let dense_like = [AttentionKind::QkSparse {
        drop_q: 0.0,
        drop_k: 0.0,
    }];
    for name in ["llama", "gpt2"] {
        let dir = tmp.path().join(name);
        let dense = load_dir(&dir, &AttentionKind::Dense).forward(&tokens(&IDS), None)?;
        for kind in &kinds {
            let model = load_dir(&dir, kind);
            let logits = model.forward(&tokens(&IDS), None)?;
            assert_eq!(logits.dims(), &[1, IDS.len(), vocab_tokens().len()]);
            let finite = logits
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            assert!(finite, "{name} {kind}: non-finite logits");
            let mut sampler = Sampler::new(SamplingOptions {
                temperature: 0.9,
                top_k: Some(20),
                top_p: Some(0.9),
                repetition_penalty: 1.2,
                repeat_last_n: 8,
                seed: 7,
            })?;
            let (out, _) = generate(model.as_ref(), &IDS[..3], 4, &mut sampler, &[], |_| Ok(()))?;
            assert_eq!(out.len(), 4, "{name} {kind}");
            let report = perplexity(model.as_ref(), &IDS, 8, 4)?;
            assert!(report.perplexity().is_finite(), "{name} {kind}");
        }
        for kind in &dense_like {
            let logits = load_dir(&dir, kind).forward(&tokens(&IDS), None)?;
            let d = max_diff(&logits, &dense);
            assert!(d < 1e-3, "{name} {kind}: differs from dense by {d}");
        }
        // SparseK needs a trained key scorer, which pretrained checkpoints do not have.
        let sparsek = AttentionKind::SparseK { k: 2, window: 2 };
        let err = load_decoder(&resolve_in_dir(&dir)?, &sparsek, DType::F32, &DEV)
            .err()
            .unwrap_or_else(|| panic!("{name}: sparsek was accepted"))
            .to_string();
        assert!(
            err.contains(name) && err.contains("sparsek") && err.contains("scor"),
            "{name}: {err}"
        );
    }
    Ok(())
}

/// 40 token ids of the tiny vocabulary.
fn long_ids() -> Vec<u32> {
    (0..40u32).map(|i| (i * 37 + 11) % 250).collect()
}

#[test]
fn twilight_p1_with_every_page_equals_dense_decoding() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_checkpoint(
        &tmp.path().join("llama"),
        &llama_config(false),
        &llama_weights(false, 11),
    );
    write_checkpoint(
        &tmp.path().join("gpt2"),
        &gpt2_config(),
        &gpt2_weights("", 12),
    );
    let ids = long_ids();
    for name in ["llama", "gpt2"] {
        let dir = tmp.path().join(name);
        let dense = load_dir(&dir, &AttentionKind::Dense);
        let full = dense.forward(&tokens(&ids), None)?.squeeze(0)?;
        // Both tiny models have 2 layers: 2 dense layers means no sparse layer at all.
        for dense_layers in [0, 1, 2] {
            // B0 = 64 tokens covers every 4-token page of the 40-token context.
            let kind = AttentionKind::Twilight {
                p: 1.0,
                base_budget: 64,
                page_size: 4,
                dense_layers,
                sink_pages: 1,
                recent_pages: 1,
            };
            let model = load_dir(&dir, &kind);
            let mut cache = model.new_cache()?;
            let mut rows = vec![model
                .forward(&tokens(&ids[..7]), Some(&mut cache))?
                .squeeze(0)?];
            assert_eq!(cache.kept_fraction()?, None, "no decode step yet");
            for i in 7..ids.len() {
                rows.push(
                    model
                        .forward(&tokens(&ids[i..i + 1]), Some(&mut cache))?
                        .squeeze(0)?,
                );
                // Every sparse layer kept every token.
                let kept = cache.kept_fraction()?;
                assert_eq!(kept.is_some(), dense_layers < 2, "{name}");
                if let Some(k) = kept {
                    assert!((k - 1.0).abs() < 1e-6, "{name}: kept fraction {k}");
                }
            }
            assert_eq!(cache.len(), ids.len());
            let d = max_diff(&Tensor::cat(&rows, 0)?, &full);
            assert!(d < 1e-3, "{name} {kind}: twilight vs dense max diff {d}");

            // Greedy generation agrees with dense, and reports one kept fraction per step.
            let greedy = |m: &dyn CausalLm| {
                let mut sampler = Sampler::new(SamplingOptions::default()).unwrap();
                generate(m, &ids[..20], 10, &mut sampler, &[], |_| Ok(())).unwrap()
            };
            let (reference, _) = greedy(dense.as_ref());
            let (ours, stats) = greedy(model.as_ref());
            assert_eq!(ours, reference, "{name} {kind}");
            assert_eq!(stats.kept_fractions.len(), (dense_layers < 2) as usize * 9);
        }
    }
    Ok(())
}

#[test]
fn twilight_prunes_below_the_base_budget_and_scores_decode_perplexity() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_checkpoint(tmp.path(), &llama_config(true), &llama_weights(true, 13));
    let ids = long_ids();
    let dense = load_dir(tmp.path(), &AttentionKind::Dense);
    // p = 1 and B0 = 8: exactly the selected pages (at most 8 tokens) are kept.
    let quest_only = load_dir(
        tmp.path(),
        &AttentionKind::Twilight {
            p: 1.0,
            base_budget: 8,
            page_size: 4,
            dense_layers: 0,
            sink_pages: 1,
            recent_pages: 1,
        },
    );
    let pruned = load_dir(
        tmp.path(),
        &AttentionKind::Twilight {
            p: 0.5,
            base_budget: 8,
            page_size: 4,
            dense_layers: 0,
            sink_pages: 1,
            recent_pages: 1,
        },
    );
    let prefix = 24;
    let reference = perplexity_decode(dense.as_ref(), &ids, prefix)?;
    assert_eq!(reference.scored_tokens, ids.len() - prefix);
    assert_eq!(reference.mean_kept_fraction, None);
    // Decode-style scoring with a dense model equals scoring the same targets from one full
    // forward pass.
    let log_probs =
        candle_nn::ops::log_softmax(&dense.forward(&tokens(&ids), None)?.squeeze(0)?, D::Minus1)?;
    let mut full_nll = 0.0;
    let mut full_argmax = Vec::new();
    for (position, &target) in ids.iter().enumerate().skip(prefix) {
        let row = log_probs.get(position - 1)?;
        full_nll -= row.get(target as usize)?.to_scalar::<f32>()? as f64;
        full_argmax.push(row.argmax(0)?.to_scalar::<u32>()?);
    }
    assert_eq!(reference.predictions, full_argmax, "decode-step argmax");
    assert!(
        (reference.total_nll - full_nll).abs() < 1e-3 * full_nll.abs(),
        "decode {} vs full {full_nll}",
        reference.total_nll
    );
    let quest = perplexity_decode(quest_only.as_ref(), &ids, prefix)?;
    let kept_quest = quest.mean_kept_fraction.unwrap();
    assert!(
        kept_quest > 0.0 && kept_quest <= 8.0 / prefix as f64 + 1e-6,
        "kept {kept_quest}"
    );
    let top_p = perplexity_decode(pruned.as_ref(), &ids, prefix)?;
    let kept_top_p = top_p.mean_kept_fraction.unwrap();
    assert!(
        kept_top_p > 0.0 && kept_top_p <= kept_quest + 1e-6,
        "kept {kept_top_p}"
    );
    for r in [&quest, &top_p] {
        assert!(r.perplexity().is_finite());
    }
    // Bad input: a prefix that leaves nothing to score.
    let err = perplexity_decode(dense.as_ref(), &ids, ids.len()).unwrap_err();
    assert!(err.to_string().contains("prefix length"), "{err}");
    Ok(())
}

#[test]
fn a_cache_of_another_kind_is_rejected() -> Result<()> {
    let twilight = Attention::new(&AttentionKind::Twilight {
        p: 0.9,
        base_budget: 8,
        page_size: 4,
        dense_layers: 0,
        sink_pages: 1,
        recent_pages: 1,
    })?;
    let dense = Attention::new(&AttentionKind::Dense)?;
    let q = Tensor::zeros((1, 2, 1, 32), DType::F32, &DEV)?;
    let k = Tensor::zeros((1, 1, 1, 32), DType::F32, &DEV)?;
    let mut cache = twilight.new_cache(0)?;
    let err = dense
        .forward(&q, &k, &k, None, Some(cache.as_mut()), 0, false, 0)
        .unwrap_err();
    assert!(err.to_string().contains("KvCache"), "{err}");
    let mut cache = dense.new_cache(0)?;
    let err = twilight
        .forward(&q, &k, &k, None, Some(cache.as_mut()), 0, false, 0)
        .unwrap_err();
    assert!(err.to_string().contains("TwilightLayerCache"), "{err}");
    let hash = Attention::new(&AttentionKind::HashSparse { n_buckets: 2 })?;
    assert!(hash.new_cache(0).is_err());
    Ok(())
}

#[test]
fn perplexity_sliding_window_scores_every_token_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_checkpoint(tmp.path(), &llama_config(false), &llama_weights(false, 8));
    let model = load_dir(tmp.path(), &AttentionKind::Dense);
    let ids: Vec<u32> = (0..30).map(|i| (i * 37 % 250) as u32).collect();
    // One window covering everything equals the direct mean NLL.
    let logits = model.forward(&tokens(&ids[..29]), None)?.squeeze(0)?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::new(&ids[1..], &DEV)?.unsqueeze(1)?;
    let direct = -lp.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()? as f64 / 29.0;
    let whole = perplexity(model.as_ref(), &ids, 30, 30)?;
    assert_eq!((whole.scored_tokens, whole.windows), (29, 1));
    assert!((whole.mean_nll() - direct).abs() < 1e-4);
    // Sliding windows: every token scored once, whatever the stride.
    for (ctx, stride) in [(8, 4), (8, 8), (10, 3), (2, 1)] {
        let r = perplexity(model.as_ref(), &ids, ctx, stride)?;
        assert_eq!(r.scored_tokens, 29, "context {ctx}, stride {stride}");
        assert!(r.mean_nll().is_finite());
    }
    assert!(perplexity(model.as_ref(), &ids, 100, 10).is_err());
    assert!(perplexity(model.as_ref(), &ids, 8, 9).is_err());
    Ok(())
}

/// Builds `models--x--y/{refs/main, snapshots/<hash>/…}` under `cache` from the files of `src`.
fn fake_cache(cache: &Path, src: &Path, files: &[&str]) -> PathBuf {
    let repo = cache.join("models--x--y");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    snap
}

#[test]
fn loads_from_fake_hf_cache_and_sharded_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let w = llama_weights(false, 9);
    write_checkpoint(&src, &llama_config(false), &w);
    let cache = tmp.path().join("hub");
    let snap = fake_cache(
        &cache,
        &src,
        &["config.json", "model.safetensors", "tokenizer.json"],
    );
    let files = resolve_in_cache(&cache, "x/y", "main")?;
    assert_eq!(files.config, snap.join("config.json"));
    assert_eq!(files.tokenizer, Some(snap.join("tokenizer.json")));
    let model = load_decoder(&files, &AttentionKind::Dense, DType::F32, &DEV)?;
    let d = max_diff(
        &model.forward(&tokens(&IDS), None)?.squeeze(0)?,
        &ref_llama(&w, &IDS, false),
    );
    assert!(d < 1e-3, "cache-loaded model differs by {d}");
    // An unknown revision and an unknown model say what is missing.
    let err = resolve_in_cache(&cache, "x/y", "v2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json") && err.contains("v2"), "{err}");
    assert!(resolve_in_cache(&cache, "x/z", "main").is_err());

    // Sharded weights: two files and an index.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded)?;
    std::fs::copy(src.join("config.json"), sharded.join("config.json"))?;
    std::fs::copy(src.join("tokenizer.json"), sharded.join("tokenizer.json"))?;
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (name, t) in &w {
        let file = if name.contains("layers.1") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        if file.contains("00001") {
            a.insert(name.clone(), t.clone());
        } else {
            b.insert(name.clone(), t.clone());
        }
        map.insert(name.clone(), serde_json::Value::String(file.to_string()));
    }
    candle::safetensors::save(&a, sharded.join("model-00001-of-00002.safetensors"))?;
    candle::safetensors::save(&b, sharded.join("model-00002-of-00002.safetensors"))?;
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )?;
    let files = resolve_in_dir(&sharded)?;
    assert_eq!(files.weights.len(), 2);
    let model = load_decoder(&files, &AttentionKind::Dense, DType::F32, &DEV)?;
    let d = max_diff(
        &model.forward(&tokens(&IDS), None)?.squeeze(0)?,
        &ref_llama(&w, &IDS, false),
    );
    assert!(d < 1e-3, "sharded model differs by {d}");
    // A missing shard is named.
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors"))?;
    let err = resolve_in_dir(&sharded).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    Ok(())
}

/// The only test that touches the process environment.
#[test]
fn environment_selects_offline_cache() -> Result<()> {
    assert_eq!(
        cache_dir_from(Some("/c"), Some("/h"), Some("/home")),
        PathBuf::from("/c")
    );
    assert_eq!(
        cache_dir_from(None, Some("/h"), Some("/home")),
        PathBuf::from("/h/hub")
    );
    assert_eq!(
        cache_dir_from(None, None, Some("/home")),
        PathBuf::from("/home/.cache/huggingface/hub")
    );
    for (v, on) in [
        ("1", true),
        ("TRUE", true),
        ("yes", true),
        ("on", true),
        ("0", false),
        ("", false),
    ] {
        assert_eq!(env_flag_is_set(Some(v)), on, "{v:?}");
    }
    assert!(!env_flag_is_set(None));
    for (m, path) in [
        ("x/y", false),
        ("gpt2", false),
        ("./x", true),
        ("/a/b", true),
        ("a/b/c", true),
    ] {
        assert_eq!(looks_like_path(m), path, "{m:?}");
    }

    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    write_checkpoint(&src, &gpt2_config(), &gpt2_weights("", 10));
    let cache = tmp.path().join("hub");
    fake_cache(
        &cache,
        &src,
        &["config.json", "model.safetensors", "tokenizer.json"],
    );
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", &cache);
    let files = resolve_model_files("x/y", None)?;
    assert!(files.config.starts_with(&cache));
    let loaded = load_model("x/y", Some("main"), &AttentionKind::Dense, DType::F32, &DEV)?;
    assert_eq!(loaded.model.vocab_size(), vocab_tokens().len());
    let err = resolve_model_files("x/missing", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("offline"),
        "{err}"
    );
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_HUB_CACHE");
    Ok(())
}

#[test]
fn bad_input_gives_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Missing directory contents.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let err = resolve_in_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(empty.join("config.json"), llama_config(false).to_string())?;
    let err = resolve_in_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // Config and weights disagree: the tensor name and both shapes are in the message.
    let dir = tmp.path().join("mismatch");
    let mut config = llama_config(false);
    config["intermediate_size"] = serde_json::json!(128);
    write_checkpoint(&dir, &config, &llama_weights(false, 11));
    let files = resolve_in_dir(&dir)?;
    let err = load_decoder(&files, &AttentionKind::Dense, DType::F32, &DEV)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("128") && err.contains("96"),
        "{err}"
    );

    // A missing tensor is named.
    let dir = tmp.path().join("missing_tensor");
    let mut w = llama_weights(false, 12);
    w.remove("model.layers.1.self_attn.v_proj.weight");
    write_checkpoint(&dir, &llama_config(false), &w);
    let err = load_decoder(
        &resolve_in_dir(&dir)?,
        &AttentionKind::Dense,
        DType::F32,
        &DEV,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.layers.1.self_attn.v_proj.weight"),
        "{err}"
    );

    // Unsupported architecture.
    let dir = tmp.path().join("arch");
    write_checkpoint(
        &dir,
        &serde_json::json!({"architectures": ["BertModel"], "model_type": "bert"}),
        &HashMap::new(),
    );
    let err = load_decoder(
        &resolve_in_dir(&dir)?,
        &AttentionKind::Dense,
        DType::F32,
        &DEV,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("unsupported architecture") && err.contains("BertModel"),
        "{err}"
    );

    // Prompt plus new tokens longer than the context (GPT-2: 40 positions).
    let dir = tmp.path().join("gpt2");
    write_checkpoint(&dir, &gpt2_config(), &gpt2_weights("", 13));
    let model = load_dir(&dir, &AttentionKind::Dense);
    let long: Vec<u32> = (0..38).collect();
    let mut sampler = Sampler::new(SamplingOptions::default())?;
    let err = generate(model.as_ref(), &long, 5, &mut sampler, &[], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("38") && err.contains("40"), "{err}");
    let too_long: Vec<u32> = (0..41).collect();
    assert!(model.forward(&tokens(&too_long), None).is_err());

    // A missing GGUF file says how to get SmolLM2.
    let err = GgufFile::open(&tmp.path().join("nope.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("nope.gguf") && err.contains("fetch-smollm2"),
        "{err}"
    );

    // Bad sampling options.
    assert!(Sampler::new(SamplingOptions {
        top_p: Some(0.0),
        ..Default::default()
    })
    .is_err());
    assert!(Sampler::new(SamplingOptions {
        temperature: -1.0,
        ..Default::default()
    })
    .is_err());
    Ok(())
}

/// llama.cpp's RoPE permutation of q/k rows (HF rotate-half → interleaved pairs).
fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

#[test]
fn gguf_llama_and_tokenizer_match_the_hf_checkpoint() -> Result<()> {
    use gguf_file::Value;
    let tmp = tempfile::tempdir()?;
    let w = llama_weights(false, 14);
    let names: [(&str, String); 12] = [
        ("token_embd.weight", "model.embed_tokens.weight".into()),
        ("output_norm.weight", "model.norm.weight".into()),
        ("output.weight", "lm_head.weight".into()),
        ("attn_norm", "input_layernorm".into()),
        ("attn_q", "self_attn.q_proj".into()),
        ("attn_k", "self_attn.k_proj".into()),
        ("attn_v", "self_attn.v_proj".into()),
        ("attn_output", "self_attn.o_proj".into()),
        ("ffn_norm", "post_attention_layernorm".into()),
        ("ffn_gate", "mlp.gate_proj".into()),
        ("ffn_up", "mlp.up_proj".into()),
        ("ffn_down", "mlp.down_proj".into()),
    ];
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (g, h) in &names[..3] {
        qtensors.push((g.to_string(), QTensor::quantize(&w[h], GgmlDType::F32)?));
    }
    for i in 0..2 {
        for (g, h) in &names[3..] {
            let mut t = w[&format!("model.layers.{i}.{h}.weight")].clone();
            if *g == "attn_q" {
                t = permute_for_gguf(&t, 2);
            } else if *g == "attn_k" {
                t = permute_for_gguf(&t, 1);
            }
            qtensors.push((
                format!("blk.{i}.{g}.weight"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
    }
    let toks = vocab_tokens();
    let s = |x: &str| Value::String(x.to_string());
    let types: Vec<Value> = (0..toks.len())
        .map(|i| Value::I32(if i + 1 == toks.len() { 3 } else { 1 }))
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.block_count", Value::U32(2)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(96)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(1000.0)),
        ("llama.context_length", Value::U32(48)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(toks.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(vec![s("Ġ t")])),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(toks.len() as u32 - 1),
        ),
    ];
    let path = tmp.path().join("tiny.gguf");
    let mut file = std::fs::File::create(&path)?;
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts)?;
    drop(file);

    let loaded = load_model(
        path.to_str().unwrap(),
        None,
        &AttentionKind::Dense,
        DType::F32,
        &DEV,
    )?;
    let d = max_diff(
        &loaded.model.forward(&tokens(&IDS), None)?.squeeze(0)?,
        &ref_llama(&w, &IDS, false),
    );
    assert!(d < 1e-3, "GGUF model differs from the HF reference by {d}");
    assert_eq!(loaded.eos_token_ids, vec![toks.len() as u32 - 1]);
    let reference = tiny_tokenizer();
    for text in ["the test", "Hello, wörld! 123 <|im_end|> tt", " \n\ttabs"] {
        let a = loaded
            .tokenizer
            .encode(text, false)
            .map_err(anyhow::Error::msg)?;
        let b = reference.encode(text, false).map_err(anyhow::Error::msg)?;
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        let back = loaded
            .tokenizer
            .decode(a.get_ids(), false)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(back, text);
    }
    Ok(())
}

/// The real SmolLM2-135M-Instruct GGUF (fetched by `scripts/fetch-smollm2.sh`); skipped when
/// the file is absent. Run with `cargo test -p candle-sparse-models --release --test hf smollm2`.
#[test]
fn smollm2_gguf_greedy_paris_and_tokenizer() -> Result<()> {
    let path = std::env::var("SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.is_file() {
        eprintln!(
            "skipping: {} not found (run scripts/fetch-smollm2.sh)",
            path.display()
        );
        return Ok(());
    }
    let gguf = GgufFile::open(&path)?;
    let config = gguf.llama_config()?;
    assert_eq!(
        (
            config.num_hidden_layers,
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
            config.vocab_size
        ),
        (30, 9, 3, 64, 49152)
    );
    let loaded = load_model(
        path.to_str().unwrap(),
        None,
        &AttentionKind::Dense,
        DType::F32,
        &DEV,
    )?;
    let tok = &loaded.tokenizer;
    let prompt = tok
        .encode("The capital of France is", false)
        .map_err(anyhow::Error::msg)?;
    let mut sampler = Sampler::new(SamplingOptions::default())?;
    let (out, _) = generate(
        loaded.model.as_ref(),
        prompt.get_ids(),
        3,
        &mut sampler,
        &[],
        |_| Ok(()),
    )?;
    let text = tok.decode(&out, true).map_err(anyhow::Error::msg)?;
    assert!(
        text.trim_start().starts_with("Paris"),
        "continuation {text:?}"
    );

    // Tokenization agrees with the GGUF's own vocabulary: every id maps to the GGUF token
    // string and back, texts round-trip, specials are single tokens.
    let raw = candle::quantized::gguf_file::Content::read(&mut std::io::BufReader::new(
        std::fs::File::open(&path)?,
    ))?;
    let vocab: Vec<String> = raw.metadata["tokenizer.ggml.tokens"]
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle::Result<_>>()?;
    for (id, token) in vocab.iter().enumerate() {
        assert_eq!(
            tok.id_to_token(id as u32).as_deref(),
            Some(token.as_str()),
            "id {id}"
        );
        assert_eq!(tok.token_to_id(token), Some(id as u32), "token {token:?}");
    }
    for text in [
        "The capital of France is Paris.",
        "Once upon a time, there was a little girl named Emma.",
        "def add(x, y):\n    return x + y  # 2024-11-22",
        "Ünïcödé — “quotes” 😀 and numbers 1234567",
    ] {
        let enc = tok.encode(text, false).map_err(anyhow::Error::msg)?;
        for (id, piece) in enc.get_ids().iter().zip(enc.get_tokens()) {
            assert_eq!(&vocab[*id as usize], piece);
        }
        assert_eq!(
            tok.decode(enc.get_ids(), false)
                .map_err(anyhow::Error::msg)?,
            text
        );
    }
    // Digits are split one by one (SmolLM pre-tokenizer), specials are single ids.
    let digits = tok.encode("1234", false).map_err(anyhow::Error::msg)?;
    assert_eq!(digits.get_ids().len(), 4);
    let chat = tok
        .encode("<|im_start|>user", false)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(chat.get_ids()[0], tok.token_to_id("<|im_start|>").unwrap());
    Ok(())
}

#[test]
fn sampler_filters_and_penalties() -> Result<()> {
    let logits = Tensor::new(&[0.0f32, 2.0, 1.9, -1.0], &DEV)?;
    let opts = |top_k, top_p, repetition_penalty| SamplingOptions {
        temperature: 1.0,
        top_k,
        top_p,
        repetition_penalty,
        repeat_last_n: 4,
        seed: 3,
    };
    // top-k 1 and a tiny top-p keep only the argmax.
    for o in [opts(Some(1), None, 1.0), opts(None, Some(1e-6), 1.0)] {
        let mut s = Sampler::new(o)?;
        assert!((0..20).all(|_| s.sample(&logits, &[]).unwrap() == 1));
    }
    // top-k 2 samples both of the two best tokens and nothing else.
    let mut s = Sampler::new(opts(Some(2), None, 1.0))?;
    let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits, &[]).unwrap()).collect();
    assert!(picks.contains(&1) && picks.contains(&2) && picks.iter().all(|&p| p == 1 || p == 2));
    // The same seed repeats the same draws.
    let mut again = Sampler::new(opts(Some(2), None, 1.0))?;
    let repeat: Vec<u32> = (0..200)
        .map(|_| again.sample(&logits, &[]).unwrap())
        .collect();
    assert_eq!(picks, repeat);
    // Greedy with a repetition penalty avoids the recently seen best token.
    let mut greedy = Sampler::new(SamplingOptions {
        repetition_penalty: 1.5,
        ..Default::default()
    })?;
    assert_eq!(greedy.sample(&logits, &[1])?, 2);
    assert_eq!(greedy.sample(&logits, &[])?, 1);
    Ok(())
}

#[test]
fn rope_scaling_variants() -> Result<()> {
    let with = |scaling: serde_json::Value| -> candle_sparse_models::LlamaConfig {
        let mut c = llama_config(false);
        c["rope_theta"] = serde_json::json!(500000.0);
        c["rope_scaling"] = scaling;
        serde_json::from_value(c).unwrap()
    };
    let base = with(serde_json::Value::Null).rope_frequencies()?;
    let linear = with(serde_json::json!({"type": "linear", "factor": 4.0})).rope_frequencies()?;
    for (b, l) in base.iter().zip(&linear) {
        assert!((b / 4.0 - l).abs() <= 1e-6 * b);
    }
    let llama3 = with(serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64
    }))
    .rope_frequencies()?;
    // Wavelengths below 64/4 = 16 positions keep their frequency; above 64 are divided by 8.
    let (first, last) = (0, base.len() - 1);
    assert_eq!(llama3[first], base[first]);
    assert!((llama3[last] - base[last] / 8.0).abs() <= 1e-6 * base[last]);
    let bad = with(serde_json::json!({"rope_type": "yarn", "factor": 2.0}));
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("yarn"), "{err}");
    Ok(())
}

#[test]
fn moa_with_spans_covering_the_context_equals_dense_decoding() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_checkpoint(
        &tmp.path().join("llama"),
        &llama_config(false),
        &llama_weights(false, 13),
    );
    // Both tiny models: 2 layers of 2 query heads. Spans of 8192 tokens cover the whole context,
    // so the sink + band prompt pass and the sink + ring decode cache must reproduce dense.
    let plan = MoaPlan::from_rules(&vec![
        vec![
            SpanRule {
                alpha: 8192.0,
                beta: 0.0
            };
            2
        ];
        2
    ]);
    let plan_path = tmp.path().join("plan.json");
    plan.save(&plan_path)?;
    let kind: AttentionKind = format!("moa:{},16", plan_path.display()).parse()?;
    let ids = long_ids();
    let dir = tmp.path().join("llama");
    let dense = load_dir(&dir, &AttentionKind::Dense);
    let full = dense.forward(&tokens(&ids), None)?.squeeze(0)?;
    let model = load_dir(&dir, &kind);
    let mut cache = model.new_cache()?;
    let mut rows = vec![model
        .forward(&tokens(&ids[..20]), Some(&mut cache))?
        .squeeze(0)?];
    for i in 20..ids.len() {
        rows.push(
            model
                .forward(&tokens(&ids[i..i + 1]), Some(&mut cache))?
                .squeeze(0)?,
        );
    }
    let d = max_diff(&Tensor::cat(&rows, 0)?, &full);
    assert!(d < 1e-3, "{kind}: moa vs dense max diff {d}");
    // Without a cache (perplexity, training) the layers run moa_attn with the plan's spans.
    let uncached = model.forward(&tokens(&ids), None)?.squeeze(0)?;
    let d = max_diff(&uncached, &full);
    assert!(
        d < 1e-3,
        "{kind} without a cache: moa vs dense max diff {d}"
    );

    // Plans with too few layers or another head count are rejected.
    let rules = |layers: usize, heads: usize| {
        MoaPlan::from_rules(&vec![
            vec![
                SpanRule {
                    alpha: 8192.0,
                    beta: 0.0
                };
                heads
            ];
            layers
        ])
    };
    rules(1, 2).save(&plan_path)?;
    let err = load_dir(&dir, &kind).new_cache().unwrap_err().to_string();
    assert!(err.contains("past the plan's 1 layers"), "{err}");
    let err = load_dir(&dir, &kind)
        .forward(&tokens(&ids), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 layers"), "{err}");
    rules(2, 3).save(&plan_path)?;
    let model = load_dir(&dir, &kind);
    let mut cache = model.new_cache()?;
    let err = model
        .forward(&tokens(&ids[..20]), Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 heads"), "{err}");
    Ok(())
}
