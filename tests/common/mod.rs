//! Test harness of the flash-attention suite: the devices to run on, seeded random cases, sparse
//! layouts built the way the SCFA pre-processing builds them, and the comparison of values and
//! gradients against the f64 reference. Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;

use candle::{DType, Device, Result, Tensor, Var};
use candle_sparse_attn::mask::{KEY_PAD_BUCKET, KEY_PAD_POS, QUERY_PAD_BUCKET, QUERY_PAD_POS};
use candle_sparse_attn::moa::{self, HeadSpan, MoaLayerPlan};
use candle_sparse_attn::{
    flash_attn, flash_attn_with_visibility, moa_attn, reference, AttnParams, SparseLayout,
    Visibility,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Writes a line to the real stderr, past the test harness' output capture, so that skips are
/// visible in a plain `cargo test` run.
pub fn notice(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The devices every test runs on: the CPU always, CUDA device 0 when built with the `cuda`
/// feature and a GPU is present (a `SKIP cuda: <reason>` line otherwise, printed once).
pub fn devices() -> Vec<Device> {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES
        .get_or_init(|| {
            #[allow(unused_mut)]
            let mut devices = vec![Device::Cpu];
            #[cfg(feature = "cuda")]
            match Device::new_cuda(0) {
                Ok(dev) => devices.push(dev),
                Err(e) => notice(&format!("SKIP cuda: no usable GPU ({e})")),
            }
            #[cfg(not(feature = "cuda"))]
            notice("SKIP cuda: built without the `cuda` feature");
            devices
        })
        .clone()
}

/// How the keys and queries of a sparse case are bucketed.
#[derive(Clone, Copy, Debug)]
pub enum Buckets {
    /// Every token (of every head) in a uniformly random bucket among `n`.
    Random(usize),
    /// Queries of a head take the buckets of their kv head's keys (shared QK, as in the hash LM).
    Shared(usize),
    /// Every position its own bucket.
    PerRow,
}

/// The visibility pattern of a case.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    Full,
    Causal,
    /// QK dropping: every query (key) token kept with probability `keep_q` (`keep_k`), kept rows
    /// compacted in time order, padding rows at the end. With `dropped_head`, head 0 of batch 0
    /// keeps no query and the last kv head of the last batch keeps no key.
    Dropped {
        keep_q: f64,
        keep_k: f64,
        dropped_head: bool,
        strict: bool,
    },
    /// Hash buckets: rows sorted by (bucket, position) over `min(q_len, kv_len)` tokens, the
    /// remaining rows padding.
    Hashed {
        buckets: Buckets,
        strict: bool,
    },
    /// MoA sink + band, one span per kv head, run through [`moa_attn`] (`q_len == kv_len`).
    SinkBand(&'static [HeadSpan]),
}

/// One test case: shapes, dtype, visibility and the seed of its random inputs.
#[derive(Clone, Debug)]
pub struct Case {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub dtype: DType,
    pub pattern: Pattern,
    /// `None`: `1/sqrt(d)`.
    pub scale: Option<f32>,
    pub seed: u64,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case seed={} b={} hq={} hkv={} nq={} nk={} d={} {:?} {:?} scale={:?}",
            self.seed,
            self.b,
            self.hq,
            self.hkv,
            self.nq,
            self.nk,
            self.d,
            self.dtype,
            self.pattern,
            self.scale
        )
    }
}

/// Hands out consecutive seeds, so that every case gets fresh inputs and a failing case can be
/// rebuilt from the seed printed in its description.
pub struct Seeds(u64);

impl Seeds {
    /// A counter starting at `base` (use a distinct base per test).
    pub fn new(base: u64) -> Self {
        Self(base)
    }

    pub fn next_seed(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// Standard normal samples (Box–Muller).
pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Host-side sparse layout: positions (and buckets) of every query and key row.
struct HostLayout {
    q_pos: Vec<i32>,
    k_pos: Vec<i32>,
    buckets: Option<(Vec<i32>, Vec<i32>)>,
    strict: bool,
}

/// The kept positions of `0..t` (each with probability `keep`), at most `n`, padded to `n`.
fn dropped_rows(rng: &mut StdRng, t: usize, n: usize, keep: f64, pad: i32) -> Vec<i32> {
    let mut rows: Vec<i32> = (0..t as i32)
        .filter(|_| rng.random::<f64>() < keep)
        .take(n)
        .collect();
    rows.resize(n, pad);
    rows
}

/// Rows of `t` tokens with bucket ids `bucket`, sorted by (bucket, position), padded to `n`.
fn hashed_rows(bucket: &[i32], n: usize, pad: (i32, i32)) -> (Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..bucket.len() as i32).collect();
    order.sort_by_key(|&t| (bucket[t as usize], t));
    let mut bkt: Vec<i32> = order.iter().map(|&t| bucket[t as usize]).collect();
    order.resize(n, pad.0);
    bkt.resize(n, pad.1);
    (order, bkt)
}

impl HostLayout {
    fn new(case: &Case, rng: &mut StdRng) -> Option<Self> {
        let Case {
            b, hq, hkv, nq, nk, ..
        } = *case;
        let group = hq / hkv;
        match case.pattern {
            Pattern::Full | Pattern::Causal | Pattern::SinkBand(_) => None,
            Pattern::Dropped {
                keep_q,
                keep_k,
                dropped_head,
                strict,
            } => {
                let t = nq.max(nk);
                let mut q_pos = Vec::with_capacity(b * hq * nq);
                for bh in 0..b * hq {
                    let keep = if dropped_head && bh == 0 { 0.0 } else { keep_q };
                    q_pos.extend(dropped_rows(rng, t, nq, keep, QUERY_PAD_POS));
                }
                let mut k_pos = Vec::with_capacity(b * hkv * nk);
                for bh in 0..b * hkv {
                    let keep = if dropped_head && bh == b * hkv - 1 {
                        0.0
                    } else {
                        keep_k
                    };
                    k_pos.extend(dropped_rows(rng, t, nk, keep, KEY_PAD_POS));
                }
                Some(Self {
                    q_pos,
                    k_pos,
                    buckets: None,
                    strict,
                })
            }
            Pattern::Hashed { buckets, strict } => {
                let t = nq.min(nk);
                let draw = |rng: &mut StdRng| -> Vec<i32> {
                    match buckets {
                        Buckets::Random(n) | Buckets::Shared(n) => {
                            (0..t).map(|_| rng.random_range(0..n as i32)).collect()
                        }
                        Buckets::PerRow => (0..t as i32).collect(),
                    }
                };
                let kv_buckets: Vec<Vec<i32>> = (0..b * hkv).map(|_| draw(rng)).collect();
                let (mut k_pos, mut k_bkt) = (vec![], vec![]);
                for bk in &kv_buckets {
                    let (p, bu) = hashed_rows(bk, nk, (KEY_PAD_POS, KEY_PAD_BUCKET));
                    k_pos.extend(p);
                    k_bkt.extend(bu);
                }
                let (mut q_pos, mut q_bkt) = (vec![], vec![]);
                for bh in 0..b * hq {
                    let bq = match buckets {
                        Buckets::Shared(_) => kv_buckets[bh / hq * hkv + bh % hq / group].clone(),
                        _ => draw(rng),
                    };
                    let (p, bu) = hashed_rows(&bq, nq, (QUERY_PAD_POS, QUERY_PAD_BUCKET));
                    q_pos.extend(p);
                    q_bkt.extend(bu);
                }
                Some(Self {
                    q_pos,
                    k_pos,
                    buckets: Some((q_bkt, k_bkt)),
                    strict,
                })
            }
        }
    }

    fn visibility(&self, case: &Case, dev: &Device) -> Result<Visibility> {
        let t = |v: &[i32], h: usize, n: usize| Tensor::from_slice(v, (case.b, h, n), dev);
        Ok(Visibility::Sparse(SparseLayout {
            q_pos: t(&self.q_pos, case.hq, case.nq)?,
            k_pos: t(&self.k_pos, case.hkv, case.nk)?,
            buckets: match &self.buckets {
                Some((qb, kb)) => Some((t(qb, case.hq, case.nq)?, t(kb, case.hkv, case.nk)?)),
                None => None,
            },
            strict: self.strict,
        }))
    }
}

/// What became of a case on one device.
pub enum Outcome {
    Passed,
    /// The device rejected the case as unsupported (CUDA head dims); the reason.
    Skipped(String),
}

/// `‖out − ref‖/‖ref‖` allowed for a dtype on a device.
pub fn tolerance(dtype: DType, dev: &Device) -> f64 {
    match (dtype, dev.is_cpu()) {
        (DType::F32, true) => 1e-4,
        (DType::F32, false) => 1e-3,
        _ => 1e-2,
    }
}

/// Whether an error is a device's refusal of a head dim (a skip on CUDA, not a failure).
pub fn is_unsupported_head_dim(e: &candle::Error) -> bool {
    let msg = e.to_string().to_lowercase();
    (msg.contains("head dim") || msg.contains("head_dim"))
        && (msg.contains("unsupported") || msg.contains("not supported"))
}

/// Zeroes the rows of `x` (rows of length `d`) whose position is a padding sentinel.
fn zero_padding_rows(x: &mut [f32], pos: &[i32], d: usize, pad: i32) {
    for (row, &p) in x.chunks_mut(d).zip(pos) {
        if p == pad {
            row.fill(0.0);
        }
    }
}

/// Runs the op on `dev`: forward, then backward of `sum(out ⊙ g)` for a random `g`, and compares
/// the output and dq, dk, dv with the f64 reference of the same (rounded) inputs. Also checks that
/// rows with no visible key (queries) or no query seeing them (keys) are exactly zero.
pub fn check(case: &Case, dev: &Device) -> Result<Outcome> {
    let Case {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dtype,
        ..
    } = *case;
    let mut rng = StdRng::seed_from_u64(case.seed);
    let layout = HostLayout::new(case, &mut rng);
    let (mut qh, mut kh, mut vh) = (
        normal(&mut rng, b * hq * nq * d),
        normal(&mut rng, b * hkv * nk * d),
        normal(&mut rng, b * hkv * nk * d),
    );
    let gh = normal(&mut rng, b * hq * nq * d);
    if let Some(l) = &layout {
        zero_padding_rows(&mut qh, &l.q_pos, d, QUERY_PAD_POS);
        zero_padding_rows(&mut kh, &l.k_pos, d, KEY_PAD_POS);
        zero_padding_rows(&mut vh, &l.k_pos, d, KEY_PAD_POS);
    }
    let input = |x: Vec<f32>, h: usize, n: usize| -> Result<Var> {
        Var::from_tensor(
            &Tensor::from_vec(x, (b, h, n, d), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?,
        )
    };
    let (q, k, v) = (input(qh, hq, nq)?, input(kh, hkv, nk)?, input(vh, hkv, nk)?);
    let g = input(gh, hq, nq)?.as_tensor().clone();
    let scale = case.scale.unwrap_or(1.0 / (d as f32).sqrt());

    let visibility = match (&layout, case.pattern) {
        (Some(l), _) => l.visibility(case, dev)?,
        (None, Pattern::Full) => Visibility::Full,
        (None, Pattern::SinkBand(spans)) => moa::sink_band(
            &MoaLayerPlan {
                spans: spans.to_vec(),
            },
            &Device::Cpu,
        )?,
        (None, _) => Visibility::Causal,
    };
    let result = match (&visibility, case.scale) {
        (Visibility::SinkBand(_), _) => {
            let Pattern::SinkBand(spans) = case.pattern else {
                unreachable!("sink-band visibility comes from its pattern")
            };
            let plan = MoaLayerPlan {
                spans: spans.to_vec(),
            };
            moa_attn(&q, &k, &v, &plan, case.scale)
        }
        (Visibility::Sparse(_), _) | (_, Some(_)) => {
            flash_attn_with_visibility(&q, &k, &v, scale, visibility.clone())
        }
        (_, None) => flash_attn(
            &q,
            &k,
            &v,
            &AttnParams {
                softmax_scale: None,
                causal: matches!(visibility, Visibility::Causal),
            },
        ),
    };
    let out = match result {
        Ok(out) => out,
        Err(e) if dev.is_cuda() && is_unsupported_head_dim(&e) => {
            return Ok(Outcome::Skipped(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    if out.dims() != [b, hq, nq, d] || out.dtype() != dtype {
        candle::bail!("output {:?} {:?}", out.dims(), out.dtype())
    }
    let grads = (&out * &g)?.sum_all()?.backward()?;

    let f64_var = |x: &Var| -> Result<Var> {
        Var::from_tensor(&x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
    };
    let (q64, k64, v64) = (f64_var(&q)?, f64_var(&k)?, f64_var(&v)?);
    let mask = reference::mask(&visibility, (b, hq, hkv, nq, nk))?;
    let r = reference::attention(&q64, &k64, &v64, scale as f64, Some(&mask))?;
    // The kernels take delta = rowsum(dO·O) from the stored output, rounded to its dtype (as
    // FlashAttention does): their gradients are the exact gradients of Σ g·O + Σ_i c_i·LSE_i with
    // c_i = rowsum(g·(O − round(O)))_i held constant. The reference adds that term, so that cases
    // whose dq / dk cancel strongly (a query seeing two or three keys) are compared like for like
    // in bf16 / f16; it is ~1e-7 relative in f32.
    let g64 = g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let stored = out.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let c = (&g64 * (r.detach() - stored)?)?.sum_keepdim(candle::D::Minus1)?;
    let lse = reference::log_sum_exp(&q64, &k64, scale as f64, Some(&mask))?;
    let rgrads = ((&r * &g64)?.sum_all()? + (lse * c)?.sum_all()?)?.backward()?;

    let tol = tolerance(dtype, dev);
    let grad = |store: &candle::backprop::GradStore, x: &Var, name: &str| -> Result<Tensor> {
        match store.get(x) {
            Some(g) => Ok(g.clone()),
            None => candle::bail!("no gradient for {name}"),
        }
    };
    let pairs = [
        ("out", out.clone(), r.clone()),
        ("dq", grad(&grads, &q, "q")?, grad(&rgrads, &q64, "q")?),
        ("dk", grad(&grads, &k, "k")?, grad(&rgrads, &k64, "k")?),
        ("dv", grad(&grads, &v, "v")?, grad(&rgrads, &v64, "v")?),
    ];
    for (name, got, want) in &pairs {
        if got.dims() != want.dims() || got.dtype() != dtype {
            candle::bail!("{name}: shape {:?} dtype {:?}", got.dims(), got.dtype())
        }
        let err = reference::rel_err(got, want)?;
        if !err.is_finite() || err > tol {
            candle::bail!("{name}: rel err {err:e} > {tol:e}")
        }
    }

    // Exact zeros: query rows with no visible key; key rows no query sees.
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
    };
    let m = mask.flatten_all()?.to_vec1::<u8>()?;
    let query_sees: Vec<bool> = m.chunks(nk).map(|r| r.contains(&1)).collect();
    let mut key_seen = vec![false; b * hkv * nk];
    for (r, row) in m.chunks(nk).enumerate() {
        let bh = r / nq;
        let kv = bh / hq * hkv + bh % hq / (hq / hkv);
        for (j, &x) in row.iter().enumerate() {
            key_seen[kv * nk + j] |= x == 1;
        }
    }
    let zero_rows = |name: &str, t: &Tensor, seen: &[bool]| -> Result<()> {
        for (r, (row, &s)) in host(t)?.chunks(d).zip(seen).enumerate() {
            if !s && row.iter().any(|&x| x != 0.0) {
                candle::bail!("{name}: row {r} sees nothing but is not exactly 0: {row:?}")
            }
        }
        Ok(())
    };
    zero_rows("out", &pairs[0].1, &query_sees)?;
    zero_rows("dq", &pairs[1].1, &query_sees)?;
    zero_rows("dk", &pairs[2].1, &key_seen)?;
    zero_rows("dv", &pairs[3].1, &key_seen)?;
    Ok(Outcome::Passed)
}

/// Runs every case on every device; panics listing every failing case (with its seed).
pub fn run_cases(cases: &[Case]) {
    let mut failures = vec![];
    let mut skipped = 0;
    let devices = devices();
    for dev in &devices {
        for case in cases {
            match check(case, dev) {
                Ok(Outcome::Passed) => {}
                Ok(Outcome::Skipped(why)) => {
                    skipped += 1;
                    notice(&format!("SKIP {:?} {case}: {why}", dev.location()));
                }
                Err(e) => failures.push(format!("{:?} {case}: {e}", dev.location())),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed ({skipped} skipped):\n{}",
        failures.len(),
        cases.len() * devices.len(),
        failures.join("\n")
    );
}
