//! MoA profiling of a whole model: on a tiny random Llama (GQA, lengths not multiples of 64) the
//! [`MoaProfiler`]'s per-layer influence equals `block_influence` of each layer's recorded
//! queries, keys, values and its exact `dL/dO` (taken from a zero `Var` added to the attention
//! output), and profile → search → plan JSON gives a plan that loads, resolves and runs, from one
//! profiled length and from several (the density bound holding at each).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use candle_sparse_attn::moa::profile::block_influence;
use candle_sparse_attn::moa::{search_plan, MoaPlan, SearchOptions, MOA_BLOCK};
use candle_sparse_attn::{flash_attn, reference, AttnParams};
use candle_sparse_models::attention::{
    downcast_cache, Attention, AttentionBackend, AttentionCall, AttentionKind, LayerCache,
};
use candle_sparse_models::decoder::CausalLm;
use candle_sparse_models::moa::{MoaProfiler, LOSS_CHUNK};
use candle_sparse_models::{Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEV: Device = Device::Cpu;
const LAYERS: usize = 2;
const Q_HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const HIDDEN: usize = Q_HEADS * HEAD_DIM;
const VOCAB: usize = 50;

fn randn(rng: &mut StdRng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() - 0.5) * 2.0 * 1.732 * std)
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// Tiny random Llama: 2 layers, 4 query / 2 KV heads of dim 32, vocab 50, context 1024.
fn tiny_llama(kind: &AttentionKind) -> Result<Llama> {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 96,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": true,
    }))?;
    let mut rng = StdRng::seed_from_u64(11);
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&mut rng, &[VOCAB, HIDDEN], 1.0),
    );
    let kv = KV_HEADS * HEAD_DIM;
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let gain = (randn(&mut rng, &[HIDDEN], 0.1) + 1.0)?;
            w.insert(format!("{p}.{norm}.weight"), gain);
        }
        for (name, shape) in [
            ("self_attn.q_proj", [HIDDEN, HIDDEN]),
            ("self_attn.k_proj", [kv, HIDDEN]),
            ("self_attn.v_proj", [kv, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HIDDEN]),
            ("mlp.gate_proj", [96, HIDDEN]),
            ("mlp.up_proj", [96, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, 96]),
        ] {
            // Larger query/key weights give peaked, position-dependent attention.
            let std = if name.ends_with("q_proj") || name.ends_with("k_proj") {
                3.0
            } else {
                1.0
            } / (shape[1] as f32).sqrt();
            w.insert(format!("{p}.{name}.weight"), randn(&mut rng, &shape, std));
        }
    }
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(HIDDEN, DType::F32, &DEV)?,
    );
    Ok(Llama::load(
        config,
        kind,
        VarBuilder::from_tensors(w, DType::F32, &DEV),
    )?)
}

fn random_tokens(rng: &mut StdRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect()
}

/// What [`Recorder`] saw in one layer: detached q, k, v and the zero `Var` added to the output.
type Recorded = (Tensor, Tensor, Tensor, Var);

/// Dense attention that records each layer's inputs and adds a zero `Var` to its output, so
/// `grads.get(var)` is the exact `dL/dO` of the layer.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<Option<Recorded>>>,
}

#[derive(Debug)]
struct RecorderCache {
    layer: usize,
    len: usize,
}

impl LayerCache for RecorderCache {
    fn len(&self) -> usize {
        self.len
    }

    fn reset(&mut self) {
        self.len = 0;
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl AttentionBackend for Recorder {
    fn name(&self) -> String {
        "recorder".to_string()
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &AttentionCall,
    ) -> candle::Result<Tensor> {
        candle::bail!("recorder: cached calls only")
    }

    fn new_cache(&self, layer: usize) -> candle::Result<Box<dyn LayerCache>> {
        Ok(Box::new(RecorderCache { layer, len: 0 }))
    }

    fn forward_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut dyn LayerCache,
        call: &AttentionCall,
    ) -> candle::Result<Tensor> {
        let layer = downcast_cache::<RecorderCache>(cache, "recorder")?;
        layer.len = k.dim(2)?;
        let o = flash_attn(
            q,
            k,
            v,
            &AttnParams {
                softmax_scale: call.softmax_scale,
                causal: true,
            },
        )?;
        let zero = Var::zeros(o.shape(), o.dtype(), o.device())?;
        let out = (o + zero.as_tensor())?;
        let mut seen = self.seen.lock().unwrap();
        if seen.len() <= layer.layer {
            seen.resize(layer.layer + 1, None);
        }
        seen[layer.layer] = Some((q.detach(), k.detach(), v.detach(), zero));
        Ok(out)
    }
}

#[test]
fn profiler_equals_block_influence_of_each_layer_with_exact_gradients() -> Result<()> {
    let n = 300; // 5 blocks, the last one partial; two chunks of the loss (LOSS_CHUNK = 256)
    assert!(n > LOSS_CHUNK);
    let items = 2;
    let mut rng = StdRng::seed_from_u64(5);
    let calib: Vec<Vec<u32>> = (0..items).map(|_| random_tokens(&mut rng, n + 1)).collect();

    let model = tiny_llama(&AttentionKind::Dense)?;
    let mut profiler = MoaProfiler::new(&model)?;
    let mut losses = Vec::new();
    for item in &calib {
        losses.push(profiler.add_item(item)?);
    }
    let inf = profiler.influence()?;
    let nb = n.div_ceil(MOA_BLOCK);
    assert_eq!(inf.blocks.dims(), &[LAYERS, Q_HEADS, nb, nb]);
    assert_eq!((inf.length, inf.items), (n, items));

    // Brute force: record q, k, v and dL/dO of every layer, then the op-level block influence.
    let recorder = Arc::new(Recorder::default());
    let mut plain = tiny_llama(&AttentionKind::Dense)?;
    plain.set_attention(Attention::with_backend(recorder.clone()));
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let mut want = vec![Tensor::zeros((Q_HEADS, nb, nb), DType::F32, &DEV)?; LAYERS];
    for (item, profiled_loss) in calib.iter().zip(&losses) {
        let input = Tensor::new(&item[..n], &DEV)?.unsqueeze(0)?;
        let targets = Tensor::new(&item[1..], &DEV)?;
        let mut cache = plain.new_cache()?;
        let logits = plain.forward(&input, Some(&mut cache))?.squeeze(0)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        assert!(
            (loss_value - profiled_loss).abs() < 1e-5,
            "profiling changed the loss: {loss_value} vs {profiled_loss}"
        );
        let grads = loss.backward()?;
        let seen = recorder.seen.lock().unwrap();
        for (l, w) in want.iter_mut().enumerate() {
            let (q, k, v, zero) = seen[l].as_ref().expect("layer recorded");
            let d_o = grads.get(zero).expect("dL/dO of the layer");
            *w = (&*w + block_influence(q, k, v, d_o, scale)?)?;
        }
    }
    for (l, w) in want.iter().enumerate() {
        let w = (w / items as f64)?;
        let got = inf.blocks.get(l)?;
        let err = reference::rel_err(&got, &w)?;
        assert!(err < 1e-4, "layer {l}: influence rel err {err:.3e}");
        // Causal: nothing above the diagonal, something below.
        let blocks = got.to_vec3::<f32>()?;
        for (h, head) in blocks.iter().enumerate() {
            for (qb, row) in head.iter().enumerate() {
                for (kb, &x) in row.iter().enumerate() {
                    assert!(x.is_finite() && x >= 0.0, "layer {l} head {h}: {x}");
                    if kb > qb {
                        assert_eq!(x, 0.0, "layer {l} head {h} block ({qb}, {kb})");
                    }
                }
            }
            assert!(
                head[nb - 1][1] > 0.0,
                "layer {l} head {h}: no influence off the band"
            );
        }
    }
    Ok(())
}

#[test]
fn profile_then_search_gives_a_plan_that_loads_resolves_and_runs() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let model = tiny_llama(&AttentionKind::Dense)?;
    // Two lengths (10 and 7 blocks, the shorter one partial), one profiler per length.
    let mut profiles = Vec::new();
    for n in [640, 400] {
        let mut profiler = MoaProfiler::new(&model)?;
        profiler.add_item(&random_tokens(&mut rng, n + 1))?;
        // Items of another length belong to another profiler.
        assert!(profiler.add_item(&random_tokens(&mut rng, n)).is_err());
        profiles.push(profiler.influence()?);
    }
    let n = 640;

    let opts = SearchOptions {
        density: 0.5,
        lower_fraction: 0.9,
        max_rules_per_layer: Some(2),
        n_min: 128,
        n_max: 1024,
    };
    // One length, then both.
    let single = search_plan(&profiles[..1], KV_HEADS, &opts)?;
    assert_eq!(single.plan.profiled_lengths, Some(vec![n]));
    let found = search_plan(&profiles, KV_HEADS, &opts)?;
    assert_eq!(found.lengths, vec![400, 640]);
    for (i, &len) in found.lengths.iter().enumerate() {
        let budget = (0.5 * (len * LAYERS * KV_HEADS) as f64 / MOA_BLOCK as f64).floor() as usize;
        let w = found.assignment.weight[i];
        assert!(w <= budget, "{w} > {budget} at {len}");
        assert!(
            found.density[i] <= 0.5,
            "density {} at {len}",
            found.density[i]
        );
    }
    // Mismatched profiles: another model's (fewer layers) and the same length twice.
    let mut fewer = profiles[1].clone();
    fewer.blocks = fewer.blocks.narrow(0, 0, 1)?;
    let e = search_plan(&[profiles[0].clone(), fewer], KV_HEADS, &opts).unwrap_err();
    assert!(e.to_string().contains("different models"), "{e}");
    let e = search_plan(&[profiles[0].clone(), profiles[0].clone()], KV_HEADS, &opts).unwrap_err();
    assert!(e.to_string().contains("two profiles at 640"), "{e}");

    let mut plan = found.plan;
    plan.model_id = Some("tiny-llama".to_string());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("plan.json");
    plan.save(&path)?;
    let back = MoaPlan::load(&path)?;
    assert_eq!(back, plan);
    assert_eq!(back.profiled_lengths, Some(vec![400, 640]));
    // The reference's keys are there; the metadata is extra.
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(json["alphas"].as_array().map(Vec::len), Some(LAYERS));
    assert_eq!(json["betas"][0].as_array().map(Vec::len), Some(Q_HEADS));
    back.validate_for(LAYERS, Q_HEADS)?;
    let spans = back.resolve(n, LAYERS, Q_HEADS, KV_HEADS, true)?;
    assert_eq!(spans.len(), LAYERS);
    assert!(spans.iter().all(|l| l.kv_heads() == KV_HEADS));
    // A plan for another model is rejected.
    assert!(back.validate_for(LAYERS + 1, Q_HEADS).is_err());

    // The plan drives the model: a cached prompt with its sink + band pattern, then a decode step.
    let kind = AttentionKind::Moa {
        plan: path,
        max_new_tokens: 1,
    };
    let moa = tiny_llama(&kind)?;
    let prompt = random_tokens(&mut rng, n);
    let mut cache = moa.new_cache()?;
    let logits = moa.forward(
        &Tensor::new(prompt.as_slice(), &DEV)?.unsqueeze(0)?,
        Some(&mut cache),
    )?;
    let step = moa.forward(&Tensor::new(&[3u32], &DEV)?.unsqueeze(0)?, Some(&mut cache))?;
    for t in [&logits, &step] {
        let sum = t.sum_all()?.to_scalar::<f32>()?;
        assert!(sum.is_finite(), "non-finite logits");
    }
    assert_eq!(cache.len(), n + 1);
    Ok(())
}
