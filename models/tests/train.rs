//! Training-level checks: exact resume, checkpoint round trip, and clear errors on bad input.

use std::path::Path;

use candle::{Device, Result, Tensor};
use candle_sparse_models::train::{
    checkpoint_exists, load_model, CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE,
};
use candle_sparse_models::{
    AttentionKind, CharDataset, GptConfig, PositionEncoding, Precision, Split, TrainConfig, Trainer,
};

const BLOCK: usize = 16;

fn text() -> String {
    let mut s = String::new();
    for i in 0..60 {
        s.push_str(&format!(
            "line {i}: the quick brown fox jumps over the lazy dog.\n"
        ));
    }
    s
}

fn model_config(vocab_size: usize) -> GptConfig {
    GptConfig {
        vocab_size,
        block_size: BLOCK,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        dropout: 0.1,
        positions: PositionEncoding::Learned,
        attention: AttentionKind::Dense,
    }
}

fn train_config(max_steps: usize) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        grad_accum: 2,
        max_steps,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        grad_clip: 1.0,
        eval_interval: 100,
        eval_batches: 2,
        seed: 17,
        val_fraction: 0.1,
        precision: Precision::F32,
    }
}

fn dataset() -> Result<CharDataset> {
    CharDataset::from_text(&text(), 0.1, BLOCK)
}

#[test]
fn resume_continues_exactly() -> Result<()> {
    let dev = Device::Cpu;
    let data = dataset()?;
    let mut mcfg = model_config(data.vocab().len());
    resume_continues_exactly_with(&mcfg, &data, &dev)?;
    // SparseK: the layers' scorers are trained, saved and resumed like every other parameter.
    mcfg.attention = AttentionKind::SparseK { k: 2, window: 4 };
    resume_continues_exactly_with(&mcfg, &data, &dev)
}

fn resume_continues_exactly_with(mcfg: &GptConfig, data: &CharDataset, dev: &Device) -> Result<()> {
    let n = 3;

    let mut straight = Trainer::new(mcfg.clone(), train_config(2 * n), dev)?;
    let initial: Vec<Tensor> = straight
        .model()
        .named_params()
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<Result<_>>()?;
    let straight_losses: Vec<f64> = (0..2 * n)
        .map(|_| straight.train_step(data)?.loss())
        .collect::<Result<_>>()?;

    let dir = tempfile::tempdir()?;
    let mut first = Trainer::new(mcfg.clone(), train_config(2 * n), dev)?;
    let mut resumed_losses: Vec<f64> = (0..n)
        .map(|_| first.train_step(data)?.loss())
        .collect::<Result<_>>()?;
    first.save(dir.path(), data.vocab())?;
    drop(first);
    let (loaded, _, meta) = load_model(dir.path(), dev)?;
    assert_eq!(&meta.model, mcfg);
    let names = |m: &candle_sparse_models::Gpt| -> Vec<String> {
        m.named_params().into_iter().map(|(n, _)| n).collect()
    };
    assert_eq!(names(&loaded), names(straight.model()));
    let mut second = Trainer::resume(dir.path(), mcfg, train_config(2 * n), data.vocab(), dev)?;
    assert_eq!(second.step(), n);
    for _ in 0..n {
        resumed_losses.push(second.train_step(data)?.loss()?);
    }

    for (i, (a, b)) in straight_losses.iter().zip(&resumed_losses).enumerate() {
        assert!(
            (a - b).abs() < 1e-5,
            "{}: step {i}: straight {a} vs resumed {b}",
            mcfg.attention
        );
    }
    assert!(
        straight_losses[2 * n - 1] < straight_losses[0],
        "{}: loss did not decrease: {straight_losses:?}",
        mcfg.attention
    );
    for (((name, a), (_, b)), init) in straight
        .model()
        .named_params()
        .iter()
        .zip(second.model().named_params())
        .zip(&initial)
    {
        let moved = (a.as_tensor() - init)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(moved > 0.0, "{name} was not trained");
        let diff = (a.as_tensor() - b.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-5,
            "{name}: straight and resumed weights differ by {diff}"
        );
    }
    Ok(())
}

#[test]
fn checkpoint_loads_for_sampling() -> Result<()> {
    let dev = Device::Cpu;
    let data = dataset()?;
    let mut trainer = Trainer::new(model_config(data.vocab().len()), train_config(1), &dev)?;
    trainer.train_step(&data)?;
    let dir = tempfile::tempdir()?;
    trainer.save(dir.path(), data.vocab())?;
    for f in [WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    assert!(checkpoint_exists(dir.path()));
    let (model, vocab, meta) = load_model(dir.path(), &dev)?;
    assert_eq!(meta.step, 1);
    assert_eq!(&vocab, data.vocab());
    let val = trainer.evaluate(&data, Split::Val)?;
    let reloaded = Trainer::resume(dir.path(), model.config(), train_config(1), &vocab, &dev)?;
    assert!((reloaded.evaluate(&data, Split::Val)? - val).abs() < 1e-6);
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_data_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let long_text = text();
    let cases: [(&str, &[u8], usize, &str); 4] = [
        ("empty.txt", b"", BLOCK, "empty"),
        (
            "tiny.txt",
            b"hello world",
            BLOCK,
            "need more than block_size",
        ),
        (
            "short.txt",
            long_text.as_bytes(),
            10_000,
            "block_size 10000",
        ),
        (
            "latin1.txt",
            b"caf\xe9 au lait",
            BLOCK,
            "not valid UTF-8 (first bad byte at offset 3)",
        ),
    ];
    for (name, bytes, block, expected) in cases {
        let path = write(dir.path(), name, bytes);
        let err = CharDataset::from_file(&path, 0.1, block)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{name}: {err}");
        assert!(
            err.contains(name),
            "{name}: error does not name the file: {err}"
        );
    }
    let missing = CharDataset::from_file(&dir.path().join("nope.txt"), 0.1, BLOCK).unwrap_err();
    assert!(missing.to_string().contains("nope.txt"));
}

#[test]
fn mismatched_checkpoint_is_refused_and_left_alone() -> Result<()> {
    let dev = Device::Cpu;
    let data = dataset()?;
    let mcfg = model_config(data.vocab().len());
    let trainer = Trainer::new(mcfg.clone(), train_config(2), &dev)?;
    let dir = tempfile::tempdir()?;
    trainer.save(dir.path(), data.vocab())?;
    let snapshot = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let before: Vec<Vec<u8>> = [WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE]
        .map(snapshot)
        .to_vec();

    let mut other_model = mcfg.clone();
    other_model.n_layer = 3;
    let err = Trainer::resume(
        dir.path(),
        &other_model,
        train_config(2),
        data.vocab(),
        &dev,
    )
    .unwrap_err();
    assert!(err.to_string().contains("different model config"), "{err}");

    let mut other_train = train_config(2);
    other_train.lr = 1.0;
    let err = Trainer::resume(dir.path(), &mcfg, other_train, data.vocab(), &dev).unwrap_err();
    assert!(
        err.to_string()
            .contains("lr: checkpoint 0.003 vs requested 1.0"),
        "{err}"
    );

    let other_data = CharDataset::from_text(&text().to_uppercase(), 0.1, BLOCK)?;
    let mut upper = mcfg.clone();
    upper.vocab_size = other_data.vocab().len();
    let err = Trainer::resume(
        dir.path(),
        &upper,
        train_config(2),
        other_data.vocab(),
        &dev,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("different model config")
            || err.to_string().contains("vocabulary"),
        "{err}"
    );

    // A longer run with the same settings is allowed.
    Trainer::resume(dir.path(), &mcfg, train_config(50), data.vocab(), &dev)?;

    let after: Vec<Vec<u8>> = [WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE]
        .map(snapshot)
        .to_vec();
    assert!(before == after, "a refused resume modified the checkpoint");
    Ok(())
}

#[test]
fn corrupt_checkpoint_config_is_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        CONFIG_FILE,
        br#"{"format": 1, "step": 0, "model": {"attention": {"kind": "magic"}}}"#,
    );
    let err = load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(CONFIG_FILE), "{err}");
    Ok(())
}

/// Steps replayed from a recorded CUDA graph ([`Trainer::set_cuda_graph`]) give the losses and
/// weights of eager steps (dense and SparseK, bf16, a context that fills SparseK's selection);
/// the settings a graph cannot hold are refused by name.
#[test]
fn cuda_graph_steps_match_eager_steps() -> Result<()> {
    let block = 256;
    let data = CharDataset::from_text(&text().repeat(3), 0.1, block)?;
    let mut mcfg = model_config(data.vocab().len());
    (mcfg.block_size, mcfg.dropout) = (block, 0.0);
    let tcfg = TrainConfig {
        grad_accum: 1,
        precision: Precision::Bf16,
        ..train_config(5)
    };
    let dev = Device::cuda_if_available(0)?;
    if !dev.is_cuda() {
        let mut t = Trainer::new(mcfg, tcfg, &dev)?;
        let e = t.set_cuda_graph(true).unwrap_err().to_string();
        assert!(e.contains("a CUDA device"), "{e}");
        return Ok(());
    }
    for attention in [
        AttentionKind::Dense,
        AttentionKind::SparseK { k: 64, window: 64 },
    ] {
        mcfg.attention = attention;
        let mut eager = Trainer::new(mcfg.clone(), tcfg.clone(), &dev)?;
        let mut graph = Trainer::new(mcfg.clone(), tcfg.clone(), &dev)?;
        // SparseK's trainer turns the graph on at step 1, as a resumed trainer would: it still
        // runs its warm-up step before the capture.
        let graph_from = match mcfg.attention {
            AttentionKind::Dense => 0,
            _ => 1,
        };
        for step in 0..5 {
            if step == graph_from {
                graph.set_cuda_graph(true)?;
            }
            let (a, b) = (eager.train_step(&data)?, graph.train_step(&data)?);
            let (la, lb) = (a.loss()?, b.loss()?);
            assert!(
                (la - lb).abs() <= 1e-3 * la.abs(),
                "{}: step {step}: eager loss {la} vs graph {lb}",
                mcfg.attention
            );
            let (na, nb) = (a.grad_norm()?, b.grad_norm()?);
            assert!(
                (na - nb).abs() <= 1e-2 * na.abs(),
                "{}: step {step}: eager grad norm {na} vs graph {nb}",
                mcfg.attention
            );
        }
        for ((name, a), (_, b)) in eager
            .model()
            .named_params()
            .iter()
            .zip(graph.model().named_params())
        {
            let err = candle_sparse_attn::reference::rel_err(a.as_tensor(), b.as_tensor())?;
            assert!(
                err <= 1e-3,
                "{}: {name}: eager vs graph rel err {err:.2e}",
                mcfg.attention
            );
        }
    }
    let mut t = Trainer::new(mcfg.clone(), train_config(5), &dev)?;
    let e = t.set_cuda_graph(true).unwrap_err().to_string();
    assert!(e.contains("grad_accum = 1"), "{e}");
    let hashed = GptConfig {
        attention: AttentionKind::HashSparse { n_buckets: 4 },
        ..mcfg.clone()
    };
    let mut t = Trainer::new(hashed, tcfg.clone(), &dev)?;
    let e = t.set_cuda_graph(true).unwrap_err().to_string();
    assert!(e.contains("random draws"), "{e}");
    mcfg.dropout = 0.1;
    let mut t = Trainer::new(mcfg, tcfg, &dev)?;
    assert!(t
        .cuda_graph_blocker()
        .is_some_and(|b| b.contains("dropout")));
    let e = t.set_cuda_graph(true).unwrap_err().to_string();
    assert!(e.contains("dropout = 0"), "{e}");
    Ok(())
}
