//! Model-level checks: gradients reach every parameter for every attention kind, KV-cache
//! decoding equals the full forward, sampling is seeded.

use candle::{Device, Result, Tensor};
use candle_sparse_attn::reference::rel_err;
use candle_sparse_models::{AttentionKind, Gpt, GptConfig, PositionEncoding, SampleOptions};

fn config(attention: AttentionKind, positions: PositionEncoding) -> GptConfig {
    GptConfig {
        vocab_size: 11,
        block_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        dropout: 0.1,
        positions,
        attention,
    }
}

/// Kinds whose kernels are wired: each must train every parameter.
fn available_kinds() -> Vec<AttentionKind> {
    vec![
        AttentionKind::Dense,
        AttentionKind::HashSparse { n_buckets: 4 },
        AttentionKind::QkSparse {
            drop_q: 0.25,
            drop_k: 0.25,
        },
        // Block 16: rows past k + window = 4 select among more candidates than k.
        AttentionKind::SparseK { k: 2, window: 2 },
    ]
}

fn batch(dev: &Device) -> Result<(Tensor, Tensor)> {
    let x: Vec<u32> = (0..2 * 16).map(|i| (i * 7 % 11) as u32).collect();
    let y: Vec<u32> = (0..2 * 16).map(|i| ((i * 7 + 3) % 11) as u32).collect();
    Ok((
        Tensor::from_vec(x, (2, 16), dev)?,
        Tensor::from_vec(y, (2, 16), dev)?,
    ))
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let (x, y) = batch(&dev)?;
    for attention in available_kinds() {
        for positions in [
            PositionEncoding::Learned,
            PositionEncoding::Rope { theta: 10000.0 },
        ] {
            let model = Gpt::new(config(attention.clone(), positions.clone()), 3, &dev)?;
            // The trainer's fused pass (the autograd path is compared with it below).
            let grads = model.training_pass(&x, &y, true, 5)?.backward()?;
            let params = model.named_params();
            let scorer_params = params
                .iter()
                .filter(|(n, _)| n.contains(".scorer."))
                .count();
            let expected = match attention {
                AttentionKind::SparseK { .. } => 2 * 2, // weight and slope per layer
                _ => 0,
            };
            assert_eq!(scorer_params, expected, "{attention}: scorer parameters");
            for (name, var) in &params {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| {
                    panic!("{attention} / {positions:?}: no gradient for {name}")
                });
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(
                    norm.is_finite(),
                    "{attention}: gradient of {name} is {norm}"
                );
                assert!(
                    norm > 0.0,
                    "{attention} / {positions:?}: gradient of {name} has squared norm {norm}"
                );
            }
        }
    }
    Ok(())
}

/// The fused training pass (the trainer's default) gives the loss and gradients of candle's
/// autograd over [`Gpt::loss`], for every attention kind and both position encodings (learned:
/// every kind's taped attention, SparseK's with its scorer folded into the q/k/v projection;
/// RoPE: the attention under a local graph), with dropout on and off, and at a sequence shorter
/// than the block (positions padded in the gradient).
#[test]
fn fused_training_pass_matches_autograd() -> Result<()> {
    let dev = Device::Cpu;
    let (x, y) = batch(&dev)?;
    let short = (x.narrow(1, 0, 12)?, y.narrow(1, 0, 12)?);
    for attention in available_kinds() {
        for positions in [
            PositionEncoding::Learned,
            PositionEncoding::Rope { theta: 10000.0 },
        ] {
            let model = Gpt::new(config(attention.clone(), positions.clone()), 3, &dev)?;
            // train = false: no dropout (the position add fused into the first LayerNorm).
            let cases = [(&x, &y, true), (&short.0, &short.1, true), (&x, &y, false)];
            for (x, y, train) in cases {
                let what = format!("{attention} / {positions:?} / t = {} / {train}", x.dim(1)?);
                let reference = model.loss(x, y, train, 7)?;
                let reference_grads = reference.backward()?;
                let pass = model.training_pass(x, y, train, 7)?;
                let loss = pass.loss().to_scalar::<f32>()?;
                let expected = reference.to_scalar::<f32>()?;
                assert!(
                    (loss - expected).abs() <= 1e-5 * expected.abs(),
                    "{what}: loss {loss} vs autograd {expected}"
                );
                let grads = pass.backward()?;
                for (name, var) in model.named_params() {
                    let got = grads.get(var.as_tensor()).expect("fused gradient");
                    let want = reference_grads
                        .get(var.as_tensor())
                        .expect("autograd gradient");
                    assert_eq!(got.dims(), var.dims(), "{what}: {name}");
                    let err = rel_err(got, want)?;
                    assert!(err <= 1e-4, "{what}: gradient of {name}: rel err {err:.2e}");
                }
            }
        }
    }
    Ok(())
}

/// Bad inputs of the fused pass are refused with the shapes named.
#[test]
fn fused_training_pass_rejects_bad_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let (x, y) = batch(&dev)?;
    let model = Gpt::new(
        config(AttentionKind::Dense, PositionEncoding::Learned),
        3,
        &dev,
    )?;
    let err = model
        .training_pass(&x, &y.narrow(1, 0, 8)?, true, 1)
        .unwrap_err();
    assert!(err.to_string().contains("targets [2, 8]"), "{err}");
    let long = Tensor::zeros((1, 17), candle::DType::U32, &dev)?;
    let err = model.training_pass(&long, &long, true, 1).unwrap_err();
    assert!(err.to_string().contains("block_size 16"), "{err}");
    Ok(())
}

#[test]
fn kv_cache_decoding_matches_full_forward() -> Result<()> {
    let dev = Device::Cpu;
    for positions in [
        PositionEncoding::Learned,
        PositionEncoding::Rope { theta: 10000.0 },
    ] {
        // Twilight with p = 1 and a budget covering every page decodes exactly like dense.
        let twilight = AttentionKind::Twilight {
            p: 1.0,
            base_budget: 64,
            page_size: 4,
            dense_layers: 0,
            sink_pages: 1,
            recent_pages: 1,
        };
        let sparsek = [
            // Prefix 4 ≥ window: prefill through sparsek_attn, then steps.
            AttentionKind::SparseK { k: 2, window: 2 },
            // Prefix shorter than the window: single-token steps from the start.
            AttentionKind::SparseK { k: 1, window: 6 },
            // No window: every older key is a candidate.
            AttentionKind::SparseK { k: 3, window: 0 },
        ];
        for kind in [AttentionKind::Dense, twilight].into_iter().chain(sparsek) {
            let model = Gpt::new(config(kind.clone(), positions.clone()), 9, &dev)?;
            let ids: Vec<u32> = (0..10).map(|i| (i * 5 % 11) as u32).collect();
            let full = model.forward(
                &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
                0,
                None,
                false,
                0,
            )?;
            let mut caches = model.new_cache()?;
            let prefix = Tensor::new(&ids[..4], &dev)?.unsqueeze(0)?;
            let mut pieces = vec![model.forward(&prefix, 0, Some(&mut caches), false, 0)?];
            for (pos, &id) in ids.iter().enumerate().skip(4) {
                let step = Tensor::new(&[id], &dev)?.unsqueeze(0)?;
                pieces.push(model.forward(&step, pos, Some(&mut caches), false, 0)?);
            }
            let cached = Tensor::cat(&pieces, 1)?;
            let diff = (full - cached)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "{kind} / {positions:?}: max logit difference {diff}"
            );
        }
    }
    Ok(())
}

#[test]
fn generation_is_seeded_and_runs_past_the_context() -> Result<()> {
    let dev = Device::Cpu;
    let model = Gpt::new(
        config(AttentionKind::Dense, PositionEncoding::Learned),
        1,
        &dev,
    )?;
    let opts = SampleOptions {
        max_new_tokens: 40, // more than block_size 16: exercises the cache refill
        temperature: 1.0,
        top_k: Some(5),
        seed: 7,
    };
    let a = model.generate(&[1, 2, 3], &opts)?;
    let b = model.generate(&[1, 2, 3], &opts)?;
    assert_eq!(a.len(), 40);
    assert_eq!(a, b);
    assert!(a.iter().all(|&t| t < 11));
    assert!(model.generate(&[], &opts).is_err());
    assert!(model.generate(&[11], &opts).is_err());
    Ok(())
}

#[test]
fn sparsek_generates_and_evicts() -> Result<()> {
    let dev = Device::Cpu;
    let mut c = config(
        AttentionKind::SparseK { k: 2, window: 3 },
        PositionEncoding::Rope { theta: 10000.0 },
    );
    c.block_size = 32;
    let model = Gpt::new(c, 4, &dev)?;
    assert!(model.supports_kv_cache());
    let opts = SampleOptions {
        max_new_tokens: 70, // past block_size 32: exercises the cache refill
        temperature: 1.0,
        top_k: Some(5),
        seed: 3,
    };
    let a = model.generate(&[1, 2], &opts)?;
    assert_eq!(a, model.generate(&[1, 2], &opts)?);
    assert_eq!(a.len(), 70);
    // Memory stays O(window + K′): 20 tokens in, at most 3 + 4 retained per layer and kv head.
    let mut caches = model.new_cache()?;
    let ids: Vec<u32> = (0..20).map(|i| (i * 3 % 11) as u32).collect();
    model.forward(
        &Tensor::new(&ids[..5], &dev)?.unsqueeze(0)?,
        0,
        Some(&mut caches),
        false,
        0,
    )?;
    for (pos, &id) in ids.iter().enumerate().skip(5) {
        let step = Tensor::new(&[id], &dev)?.unsqueeze(0)?;
        model.forward(&step, pos, Some(&mut caches), false, 0)?;
    }
    for layer in &caches.layers {
        assert_eq!(layer.len(), 20);
        let kept = layer.kept_fraction().expect("a decode step ran");
        let kept = kept.to_scalar::<f32>()?;
        assert!(kept > 0.0 && kept <= 7.0 / 20.0, "kept fraction {kept}");
    }
    Ok(())
}

#[test]
fn attention_kind_parses_and_serializes() -> Result<()> {
    let kinds = [
        ("dense", AttentionKind::Dense),
        ("hash_sparse:8", AttentionKind::HashSparse { n_buckets: 8 }),
        (
            "qk-sparse:0.5,0.25",
            AttentionKind::QkSparse {
                drop_q: 0.5,
                drop_k: 0.25,
            },
        ),
        (
            "twilight:0.95,256",
            AttentionKind::Twilight {
                p: 0.95,
                base_budget: 256,
                page_size: 16,
                dense_layers: 2,
                sink_pages: 1,
                recent_pages: 1,
            },
        ),
        (
            "sparsek:256,256",
            AttentionKind::SparseK {
                k: 256,
                window: 256,
            },
        ),
        (
            "sparse-k: 16, 0",
            AttentionKind::SparseK { k: 16, window: 0 },
        ),
        (
            "twilight:0.9,64,8,1",
            AttentionKind::Twilight {
                p: 0.9,
                base_budget: 64,
                page_size: 8,
                dense_layers: 1,
                sink_pages: 1,
                recent_pages: 1,
            },
        ),
    ];
    let kinds = kinds.into_iter().chain([(
        "twilight:0.95,1024,16,2,0,3",
        AttentionKind::Twilight {
            p: 0.95,
            base_budget: 1024,
            page_size: 16,
            dense_layers: 2,
            sink_pages: 0,
            recent_pages: 3,
        },
    )]);
    // Configs written before the pinned pages existed get one sink and one recent page.
    let old_json = r#"{"kind":"twilight","p":0.9,"base_budget":64,"page_size":8,"dense_layers":1}"#;
    assert_eq!(
        serde_json::from_str::<AttentionKind>(old_json).unwrap(),
        "twilight:0.9,64,8,1".parse::<AttentionKind>()?
    );
    for (text, kind) in kinds {
        assert_eq!(kind.to_string().parse::<AttentionKind>()?, kind);
        assert_eq!(text.parse::<AttentionKind>()?, kind);
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(serde_json::from_str::<AttentionKind>(&json).unwrap(), kind);
    }
    for bad in [
        "flash",
        "hash_sparse",
        "hash_sparse:0",
        "hash_sparse:3",
        "qk_sparse:1.5,0",
        "qk_sparse:0.1",
        "twilight:0.9",
        "twilight:1.5,64",
        "twilight:0,64",
        "twilight:0.9,0",
        "twilight:0.9,64,0",
        "twilight:0.9,64,16,2,1",
        "sparsek",
        "sparsek:16",
        "sparsek:0,16",
        "sparsek:-1,16",
        "sparsek:16,x",
        "sparsek:16,16,4",
    ] {
        let err = bad.parse::<AttentionKind>().unwrap_err().to_string();
        assert!(
            err.contains(bad.split(':').next().unwrap()) || err.contains("must"),
            "{bad}: {err}"
        );
    }
    let zero = "sparsek:0,16"
        .parse::<AttentionKind>()
        .unwrap_err()
        .to_string();
    assert!(zero.contains("k must be at least 1"), "{zero}");
    let json = serde_json::to_string(&AttentionKind::SparseK { k: 8, window: 4 }).unwrap();
    assert_eq!(json, r#"{"kind":"sparsek","k":8,"window":4}"#);
    let unknown = serde_json::from_str::<AttentionKind>(r#"{"kind":"flash"}"#);
    assert!(unknown.unwrap_err().to_string().contains("flash"));
    Ok(())
}

#[test]
fn bad_model_configs_are_rejected() {
    let mut c = config(AttentionKind::Dense, PositionEncoding::Learned);
    c.n_head = 3;
    assert!(Gpt::new(c.clone(), 0, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("n_head 3"));
    c.n_head = 4; // head dim 16: not a kernel size
    assert!(Gpt::new(c, 0, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("16"));
}
