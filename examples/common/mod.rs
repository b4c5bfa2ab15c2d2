//! Helpers shared by the benchmark examples (`mod common;` in each).

use std::time::Instant;

use anyhow::Result;
use candle::Device;

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
