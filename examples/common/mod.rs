//! Helpers shared by the benchmark examples (`mod common;` in each).
// Each example compiles this module on its own and uses a subset of it.
#![allow(dead_code)]

use std::time::Instant;

use anyhow::Result;
use candle::{Device, Tensor};
use candle_sparse_attn::{flash_attn, AttnParams};

/// Median wall time in ms of `f` over `reps` runs after `warmup` runs, synchronising the device
/// around each run.
pub fn time_ms(
    dev: &Device,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Median ms of dense decode over a full cache: `flash_attn` with q `(b, hq, 1, d)` against keys
/// and values `(b, hkv, n, d)`, no causal mask (the baseline of the decode benchmarks).
pub fn dense_decode_ms(
    dev: &Device,
    warmup: usize,
    reps: usize,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
) -> Result<f64> {
    let params = AttnParams {
        softmax_scale: None,
        causal: false,
    };
    time_ms(dev, warmup, reps, || {
        flash_attn(q, keys, values, &params)?;
        Ok(())
    })
}
