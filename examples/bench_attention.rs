//! Attention benchmark: forward and forward+backward times of our kernels beside the baselines.
//!
//! Prints a table and writes JSON. Times are medians of repeated runs after warm-up, with the
//! device synchronised around each run. TFLOP/s follows the FlashAttention convention:
//! 4·N²·D·H·B, halved for causal, ×3.5 for forward+backward ("dense-equivalent" for sparse runs).
//! Forward+backward runs candle autograd with a fixed random output gradient `g`
//! ([`backward_from`], what PyTorch's `o.backward(g)` does); the backward kernels do the same work
//! whatever its values.
//!
//! ```text
//! cargo run --release --example bench_attention -- --device cpu
//! cargo run --release --features cuda --example bench_attention -- --device cuda \
//!     --baseline sdpa.json --json bench.json
//! ```
//! `--baseline` takes the JSON written by `examples/bench_sdpa.py` (PyTorch SDPA on the same
//! shapes), so one table shows ours and theirs side by side.

mod common;

use common::time_ms;

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use candle_sparse_attn::moa::{HeadSpan, MoaLayerPlan, MOA_BLOCK, MOA_SINK};
use candle_sparse_attn::scfa::{
    compact_kept, lsh_buckets, random_rotations, sort_by_bucket, RowKind, RowOrder,
};
use candle_sparse_attn::{
    flash_attn, hash_sparse_attn, moa_attn, qk_sparse_attn, reference, sparse_causal_attn,
    AttnParams, HashConfig, ScfaParams,
};
use clap::Parser;
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "Benchmark attention kernels (ours vs baselines)")]
struct Args {
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: bf16, f16 or f32 (CPU default f32, CUDA default bf16).
    #[arg(long)]
    dtype: Option<String>,
    /// Sequence lengths (default: 1k..32k on CUDA, 512..4096 on CPU).
    #[arg(long, value_delimiter = ',')]
    seq: Vec<usize>,
    /// Shapes as BxHxD (default: 4x48x64 and 2x16x128 on CUDA, 1x8x64 on CPU).
    #[arg(long, value_delimiter = ',')]
    shape: Vec<String>,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Warm-up runs.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Skip forward+backward.
    #[arg(long)]
    fwd_only: bool,
    /// Sparse causal flash attention runs: hash buckets (e.g. 8,16,32,64).
    #[arg(long, value_delimiter = ',')]
    hash: Vec<usize>,
    /// Sparse causal flash attention runs: query/key drop rates in percent (e.g. 30,50,70).
    #[arg(long, value_delimiter = ',')]
    drop: Vec<u32>,
    /// Also time the phases of every sparse run apart (arrangement, gathers, kernel alone,
    /// scatter; forward and forward+backward); printed, not written to the JSON.
    #[arg(long)]
    phases: bool,
    /// CUDA: keep freed memory in the device's default memory pool (release threshold at
    /// maximum, like a caching allocator) instead of returning it to the driver at every
    /// synchronisation; applies to every method of the run alike.
    #[arg(long)]
    keep_pool: bool,
    /// MoA prefill runs: a sink of 64 tokens plus a uniform band of this many tokens (multiples
    /// of 64, e.g. 8192,4096).
    #[arg(long, value_delimiter = ',')]
    moa_band: Vec<usize>,
    /// MoA prefill runs: sink 64 plus the uniform band whose work (visited 64×64 tiles) is this
    /// fraction of dense causal attention (e.g. 0.5).
    #[arg(long, value_delimiter = ',')]
    moa_density: Vec<f64>,
    /// Only run the sparse methods at lengths >= this.
    #[arg(long, default_value_t = 0)]
    sparse_min_seq: usize,
    /// JSON written by `bench_sdpa.py`, shown beside our numbers.
    #[arg(long)]
    baseline: Option<String>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench_attention.json")]
    json: String,
}

/// One measured row of the table.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Record {
    method: String,
    pass: String,
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    dtype: String,
    causal: bool,
    ms: f64,
    tflops: f64,
}

/// Dense attention FLOPs (FlashAttention convention).
fn flops(b: usize, h: usize, n: usize, d: usize, causal: bool, fwd_bwd: bool) -> f64 {
    let f = 4.0 * (n * n * d * h * b) as f64 * if causal { 0.5 } else { 1.0 };
    if fwd_bwd {
        3.5 * f
    } else {
        f
    }
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let p: Vec<usize> = s
        .split('x')
        .map(|x| {
            x.parse()
                .with_context(|| format!("bad shape {s:?}, want BxHxD"))
        })
        .collect::<Result<_>>()?;
    match p[..] {
        [b, h, d] => Ok((b, h, d)),
        _ => bail!("bad shape {s:?}, want BxHxD"),
    }
}

struct Bench<'a> {
    dev: &'a Device,
    args: &'a Args,
    dtype: DType,
    records: Vec<Record>,
}

impl Bench<'_> {
    fn record(
        &mut self,
        method: &str,
        fwd_bwd: bool,
        (b, h, n, d): (usize, usize, usize, usize),
        ms: f64,
    ) {
        let r = Record {
            method: method.into(),
            pass: if fwd_bwd { "fwd+bwd" } else { "fwd" }.into(),
            b,
            h,
            n,
            d,
            dtype: format!("{:?}", self.dtype).to_lowercase(),
            causal: true,
            ms,
            tflops: flops(b, h, n, d, true, fwd_bwd) / ms / 1e9,
        };
        println!(
            "{:<22} {:<8} B={:<2} H={:<3} N={:<6} D={:<4} {:>10.3} ms {:>9.3} TFLOP/s",
            r.method, r.pass, b, h, n, d, r.ms, r.tflops
        );
        self.records.push(r);
    }

    fn inputs(&self, b: usize, h: usize, n: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let mk = || -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1., (b, h, n, d), self.dev)?.to_dtype(self.dtype)?)
        };
        Ok((mk()?, mk()?, mk()?))
    }

    /// Times `attn` forward, and forward+backward (from a random output gradient).
    fn run(
        &mut self,
        method: &str,
        shape: (usize, usize, usize, usize),
        attn: impl Fn(&Tensor, &Tensor, &Tensor) -> candle::Result<Tensor>,
    ) -> Result<()> {
        let (b, h, n, d) = shape;
        let (q, k, v) = self.inputs(b, h, n, d)?;
        let (w, r) = (self.args.warmup, self.args.reps);
        let ms = time_ms(self.dev, w, r, || Ok(attn(&q, &k, &v).map(drop)?))?;
        self.record(method, false, shape, ms);
        if !self.args.fwd_only {
            let g = self.inputs(b, h, n, d)?.0;
            let (q, k, v) = (
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            );
            let ms = time_ms(self.dev, w, r, || {
                let out = attn(&q, &k, &v)?;
                backward_from(&out, &g)?;
                Ok(())
            })?;
            self.record(method, true, shape, ms);
        }
        Ok(())
    }

    /// Our dense causal op.
    fn dense(&mut self, shape: (usize, usize, usize, usize)) -> Result<()> {
        let p = AttnParams::default();
        self.run("ours dense", shape, |q, k, v| flash_attn(q, k, v, &p))
    }

    /// Sparse causal flash attention: hash buckets and query/key dropping, everything included
    /// (hashing, sorting, compaction, gathers, scatters). Keep masks are drawn once per shape.
    fn sparse(&mut self, shape: (usize, usize, usize, usize)) -> Result<()> {
        let (b, h, n, _) = shape;
        for nb in self.args.hash.clone() {
            let cfg = HashConfig::new(nb, 0);
            let label = format!("hash nb={nb}");
            self.run(&label, shape, |q, k, v| hash_sparse_attn(q, k, v, &cfg))?;
            if self.args.phases {
                self.phases(&label, shape, |q, k| {
                    let mut prep = vec![];
                    let rot = timed(self.dev, &mut prep, "rotations", || {
                        Ok(random_rotations(k.dim(1)?, k.dim(3)?, nb, 0, self.dev)?)
                    })?;
                    let (qi, ki) = timed(self.dev, &mut prep, "lsh q+k", || {
                        Ok((lsh_buckets(q, &rot)?, lsh_buckets(k, &rot)?))
                    })?;
                    let orders = timed(self.dev, &mut prep, "sort q+k", || {
                        Ok((
                            sort_by_bucket(&qi, nb, RowKind::Query)?,
                            sort_by_bucket(&ki, nb, RowKind::Key)?,
                        ))
                    })?;
                    Ok((orders, prep))
                })?;
            }
        }
        for pct in self.args.drop.clone() {
            let keep = || -> Result<Tensor> {
                Ok(Tensor::rand(0f32, 1., (b, h, n), self.dev)?.ge(pct as f64 / 100.0)?)
            };
            let (q_keep, k_keep) = (keep()?, keep()?);
            let p = ScfaParams::default();
            let label = format!("qk drop={pct}%");
            self.run(&label, shape, |q, k, v| {
                qk_sparse_attn(q, k, v, &q_keep, &k_keep, &p)
            })?;
            if self.args.phases {
                self.phases(&label, shape, |_, _| {
                    let mut prep = vec![];
                    let orders = timed(self.dev, &mut prep, "compaction q+k", || {
                        Ok((
                            compact_kept(&q_keep, RowKind::Query)?,
                            compact_kept(&k_keep, RowKind::Key)?,
                        ))
                    })?;
                    Ok((orders, prep))
                })?;
            }
        }
        Ok(())
    }

    /// `--phases`: the pieces of one sparse run timed apart (medians like [`Bench::run`]): the
    /// arrangement (`arrange` times its own steps into the list it returns), the gathers of q, k,
    /// v, the kernel alone on the arranged rows, the scatter back; then the kernel alone forward
    /// and backward on arranged leaf variables, beside the whole method's times in the records.
    fn phases(
        &self,
        label: &str,
        shape: (usize, usize, usize, usize),
        arrange: impl Fn(&Tensor, &Tensor) -> Result<((RowOrder, RowOrder), Vec<(String, f64)>)>,
    ) -> Result<()> {
        let (b, h, n, d) = shape;
        let (q, k, v) = self.inputs(b, h, n, d)?;
        let ((qo, ko), mut times) = arrange(&q, &k)?;
        let (qs, ks, vs) = timed(self.dev, &mut times, "gathers q,k,v", || {
            Ok((qo.gather(&q)?, ko.gather(&k)?, ko.gather(&v)?))
        })?;
        let buckets = qo.bucket.as_ref().zip(ko.bucket.as_ref());
        let p = ScfaParams::default();
        let attn = |q: &Tensor, k: &Tensor, v: &Tensor| {
            sparse_causal_attn(q, k, v, &qo.pos, &ko.pos, buckets, &p)
        };
        let os = timed(self.dev, &mut times, "kernel fwd", || {
            Ok(attn(&qs, &ks, &vs)?)
        })?;
        timed(self.dev, &mut times, "scatter", || Ok(qo.scatter(&os)?))?;
        let (qv, kv, vv) = (
            Var::from_tensor(&qs)?,
            Var::from_tensor(&ks)?,
            Var::from_tensor(&vs)?,
        );
        let g = self.inputs(b, h, n, d)?.0;
        timed(self.dev, &mut times, "kernel fwd+bwd", || {
            backward_from(&attn(&qv, &kv, &vv)?, &g)?;
            Ok(())
        })?;
        let whole = |fwd_bwd: bool| {
            let pass = if fwd_bwd { "fwd+bwd" } else { "fwd" };
            self.records
                .iter()
                .rev()
                .find(|r| r.method == label && r.pass == pass && (r.b, r.h, r.n, r.d) == shape)
                .map_or(f64::NAN, |r| r.ms)
        };
        times.push(("whole fwd".into(), whole(false)));
        times.push(("whole fwd+bwd".into(), whole(true)));
        let list: Vec<String> = times.iter().map(|(k, ms)| format!("{k} {ms:.3}")).collect();
        println!(
            "phases {label} B={b} H={h} N={n} D={d} (ms): {}",
            list.join(" | ")
        );
        Ok(())
    }

    /// MoA prefill with one uniform span per head (sink 64 + band), explicit bands first, then
    /// the bands matching the requested work fractions.
    fn moa(&mut self, shape: (usize, usize, usize, usize)) -> Result<()> {
        let (_, h, n, _) = shape;
        let mut bands: Vec<(String, usize)> = vec![];
        for &band in &self.args.moa_band {
            if !band.is_multiple_of(MOA_BLOCK) {
                bail!("--moa-band {band} must be a multiple of {MOA_BLOCK}")
            }
            bands.push((format!("moa band={band}"), band));
        }
        for &density in &self.args.moa_density {
            let band = moa_band_for_work(n, density);
            let work = moa_work(n, band / MOA_BLOCK) / moa_work(n, n.div_ceil(MOA_BLOCK));
            bands.push((format!("moa work={:.0}% band={band}", 100.0 * work), band));
        }
        for (name, band) in bands {
            let plan = MoaLayerPlan::uniform(
                h,
                HeadSpan {
                    sink: MOA_SINK,
                    band,
                },
            );
            self.run(&name, shape, |q, k, v| moa_attn(q, k, v, &plan, None))?;
        }
        Ok(())
    }

    /// CPU baselines: candle-nn's CPU flash attention and the naive materialised path.
    fn cpu_baselines(&mut self, shape: (usize, usize, usize, usize)) -> Result<()> {
        let (b, h, n, d) = shape;
        let (q, k, v) = self.inputs(b, h, n, d)?;
        let scale = 1.0 / (d as f32).sqrt();
        let (w, r) = (self.args.warmup, self.args.reps);
        let (qt, kt, vt) = (
            q.transpose(1, 2)?.contiguous()?,
            k.transpose(1, 2)?.contiguous()?,
            v.transpose(1, 2)?.contiguous()?,
        );
        let ms = time_ms(self.dev, w, r, || {
            let mask = candle_nn::attention::AttnMask::causal();
            candle_nn::attention::flash_attn::<f32>(&qt, &kt, &vt, scale, mask, None, None)?;
            Ok(())
        })?;
        self.record("candle-nn cpu flash", false, shape, ms);
        let mask = reference::mask(&candle_sparse_attn::Visibility::Causal, (b, h, h, n, n))?;
        let ms = time_ms(self.dev, w.min(1), r.min(3), || {
            reference::attention(&q, &k, &v, scale as f64, Some(&mask))?;
            Ok(())
        })?;
        self.record("naive matmul-softmax", false, shape, ms);
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => bail!("unknown device {other:?} (cpu or cuda)"),
    };
    let dtype = match (args.dtype.as_deref(), dev.is_cuda()) {
        (Some("bf16"), _) | (None, true) => DType::BF16,
        (Some("f16"), _) => DType::F16,
        (Some("f32"), _) | (None, false) => DType::F32,
        (Some(other), _) => bail!("unknown dtype {other:?} (bf16, f16, f32)"),
    };
    let seqs = if !args.seq.is_empty() {
        args.seq.clone()
    } else if dev.is_cuda() {
        vec![1024, 2048, 4096, 8192, 16384, 32768]
    } else {
        vec![512, 1024, 2048, 4096]
    };
    let shapes: Vec<(usize, usize, usize)> = if !args.shape.is_empty() {
        args.shape
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<_>>()?
    } else if dev.is_cuda() {
        vec![(4, 48, 64), (2, 16, 128)]
    } else {
        vec![(1, 8, 64)]
    };
    if args.keep_pool {
        if !dev.is_cuda() {
            bail!("--keep-pool needs a CUDA device (and a build with --features cuda), got {dev:?}")
        }
        candle_sparse_attn::keep_memory_pool(&dev)?;
    }
    println!(
        "device {dev:?}, dtype {dtype:?}, median of {} runs after {} warm-up{}",
        args.reps,
        args.warmup,
        if args.keep_pool {
            ", memory pool kept"
        } else {
            ""
        }
    );
    let mut bench = Bench {
        dev: &dev,
        args: &args,
        dtype,
        records: vec![],
    };
    for &(b, h, d) in &shapes {
        for &n in &seqs {
            bench.dense((b, h, n, d))?;
            if n >= args.sparse_min_seq {
                bench.sparse((b, h, n, d))?;
                bench.moa((b, h, n, d))?;
            }
            if !dev.is_cuda() && dtype == DType::F32 {
                bench.cpu_baselines((b, h, n, d))?;
            }
        }
    }
    let records = bench.records;
    print_speedups(&records);
    if let Some(path) = &args.baseline {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading baseline {path}"))?;
        let base: Vec<Record> =
            serde_json::from_str(&text).with_context(|| format!("parsing baseline {path}"))?;
        print_side_by_side(&records, &base);
        let mut all = records.clone();
        all.extend(base);
        std::fs::write(&args.json, serde_json::to_string_pretty(&all)?)?;
    } else {
        std::fs::write(&args.json, serde_json::to_string_pretty(&records)?)?;
    }
    println!("wrote {}", args.json);
    Ok(())
}

/// Backpropagates the output gradient `grad` (shape and dtype of `out`) through the graph of
/// `out`, as PyTorch's `out.backward(grad)` does. (A scalar loss costs candle more than the
/// attention's own gradient plumbing: `out[..., 0].sum()`, used until then, reduced 3M elements
/// in one block, ≈ 4 ms at B4 H48 N16k on the H100, and zero-padded its gradient, ≈ 1 ms; `Σ out`
/// reduced one axis at a time took 1.9 ms plus 3.7 ms for the broadcast of its gradient.)
fn backward_from(out: &Tensor, grad: &Tensor) -> candle::Result<()> {
    out.apply_op1(SeedGrad(grad.clone()))?.backward()?;
    Ok(())
}

/// A scalar (0, f32) whose gradient with respect to its input is the held tensor.
struct SeedGrad(Tensor);

impl CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        _: &Layout,
    ) -> candle::Result<(candle::CudaStorage, Shape)> {
        use candle::backend::BackendStorage;
        let dev = s.device();
        let zero = dev.alloc_zeros::<f32>(1)?;
        Ok((
            candle::CudaStorage::wrap_cuda_slice(zero, dev.clone()),
            Shape::from(()),
        ))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// Times `f` like [`Bench::run`] (median after warm-up), appends `(name, ms)` to `times` and
/// returns one more result of `f`.
fn timed<T>(
    dev: &Device,
    times: &mut Vec<(String, f64)>,
    name: &str,
    f: impl Fn() -> Result<T>,
) -> Result<T> {
    let ms = time_ms(dev, 2, 5, || f().map(drop))?;
    times.push((name.to_string(), ms));
    f()
}

/// 64×64 tiles a sink of one block plus a band of `band_blocks` blocks visits at length `n`
/// (query block `qb` sees block 0 and blocks `[qb − band + 1, qb]`).
fn moa_work(n: usize, band_blocks: usize) -> f64 {
    (0..n.div_ceil(MOA_BLOCK))
        .map(|qb| {
            let band_start = (qb + 1).saturating_sub(band_blocks);
            // The band, plus block 0 when the band does not reach it.
            (qb + 1 - band_start + usize::from(band_start > 0)) as f64
        })
        .sum()
}

/// The band (tokens, a multiple of 64) whose [`moa_work`] is closest to `density` × causal.
fn moa_band_for_work(n: usize, density: f64) -> usize {
    let blocks = n.div_ceil(MOA_BLOCK);
    let causal = moa_work(n, blocks);
    let best = (0..=blocks)
        .min_by(|&a, &b| {
            let err = |w| (moa_work(n, w) / causal - density).abs();
            err(a).total_cmp(&err(b))
        })
        .unwrap_or(blocks);
    best * MOA_BLOCK
}

/// One row per (shape, pass): our dense time beside every baseline method and the ratio.
fn print_side_by_side(ours: &[Record], base: &[Record]) {
    let key = |r: &Record| (r.b, r.h, r.d, r.n, r.pass.clone());
    // (b, h, d, n, pass) -> (our ms, [(baseline method, ms)])
    type Row = (Option<f64>, Vec<(String, f64)>);
    let mut rows: BTreeMap<_, Row> = BTreeMap::new();
    for r in ours.iter().filter(|r| r.method == "ours dense") {
        rows.entry(key(r)).or_default().0 = Some(r.ms);
    }
    for r in base {
        rows.entry(key(r))
            .or_default()
            .1
            .push((r.method.clone(), r.ms));
    }
    println!("\nside by side (ms; ratio = baseline time / ours, > 1 means we are faster)");
    for ((b, h, d, n, pass), (ours, base)) in rows {
        let Some(ours) = ours else { continue };
        let cols: Vec<String> = base
            .iter()
            .map(|(m, ms)| format!("{m} {ms:.3} ({:.2}x)", ms / ours))
            .collect();
        println!(
            "B={b} H={h} D={d} N={n:<6} {pass:<8} ours {ours:.3} | {}",
            cols.join(" | ")
        );
    }
}

/// Every sparse run's speed-up over our dense op on the same shape and pass.
fn print_speedups(records: &[Record]) {
    let dense: BTreeMap<_, f64> = records
        .iter()
        .filter(|r| r.method == "ours dense")
        .map(|r| ((r.b, r.h, r.n, r.d, r.pass.clone()), r.ms))
        .collect();
    let sparse: Vec<_> = records
        .iter()
        .filter(|r| r.method != "ours dense")
        .collect();
    if sparse.is_empty() {
        return;
    }
    println!("\nour dense time / method time (same shape and pass; > 1: the method is faster than our dense op)");
    for r in sparse {
        if let Some(d) = dense.get(&(r.b, r.h, r.n, r.d, r.pass.clone())) {
            println!(
                "{:<22} {:<8} B={} H={} N={:<6} D={:<4} {:>10.3} ms vs {:>10.3} ms  {:.2}x",
                r.method,
                r.pass,
                r.b,
                r.h,
                r.n,
                r.d,
                r.ms,
                d,
                d / r.ms
            );
        }
    }
}
