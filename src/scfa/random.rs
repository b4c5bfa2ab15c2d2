//! Counter-based random numbers for the SCFA schemes' per-call random decisions (query/key keep
//! masks, LSH rotations), drawn on the tensors' device: no host generator and no host-to-device
//! copy, which on CUDA would wait for the device's queue in the middle of a forward pass.
//!
//! Value `i` of a stream keyed by `seed` is `mix64(mix64(seed) + (i + 1)·γ)` (the SplitMix64
//! sequence started at `mix64(seed)`); the CPU and the CUDA kernels (`cuda/scfa_prep.cu`) compute
//! the same integers, so keep masks are identical on both devices.

use candle::{bail, Device, Result, Tensor};

/// The SplitMix64 increment γ.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Value `i` of the stream keyed by `key = mix64(seed)`.
fn value(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Out of 2^24, how many 24-bit draws are dropped for a drop fraction `drop` in `[0, 1)`.
fn drop_threshold(drop: f32) -> u32 {
    (f64::from(drop) * f64::from(1u32 << 24)).round() as u32
}

/// A random keep mask: `(batch, heads, t)` u8 on `device`, each entry 1 with probability
/// `1 − drop` (to 2^-24), independently, as a pure function of `seed` (the same mask on the CPU
/// and on CUDA). `drop` must be in `[0, 1)`.
///
/// The masks [`crate::qk_sparse_attn`] takes, drawn on the device (one kernel on CUDA).
pub fn random_keep(
    (b, h, t): (usize, usize, usize),
    drop: f32,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&drop) {
        bail!(
            "random_keep: drop must be in [0, 1), got {drop} for shape {:?}",
            (b, h, t)
        )
    }
    let n = b * h * t;
    let (key, threshold) = (mix64(seed), drop_threshold(drop));
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::keep(dev, n, key, threshold)?.reshape((b, h, t)),
        _ => {
            let mask: Vec<u8> = (0..n as u64)
                .map(|i| u8::from((value(key, i) >> 40) as u32 >= threshold))
                .collect();
            Tensor::from_vec(mask, (b, h, t), &Device::Cpu)?.to_device(device)
        }
    }
}

/// Column-normalised Gaussian matrices `(heads, dim, cols)` f32 on `device`: entry
/// `(h, k, c)` is a standard normal (Box–Muller in f64 from draws `2e` and `2e + 1` of the stream
/// keyed by `seed`, `e` its flat index), then each column is divided by its f64 L2 norm over `k`.
/// CPU and CUDA agree up to the last bits of their f64 `ln` / `cos`.
pub(crate) fn normalised_gaussian(
    (heads, dim, cols): (usize, usize, usize),
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let key = mix64(seed);
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::gaussian(dev, (heads, dim, cols), key),
        _ => {
            let mut out = vec![0f32; heads * dim * cols];
            let mut column = vec![0f64; dim];
            for h in 0..heads {
                for c in 0..cols {
                    for (k, z) in column.iter_mut().enumerate() {
                        *z = gaussian(key, ((h * dim + k) * cols + c) as u64);
                    }
                    let norm = column.iter().map(|z| z * z).sum::<f64>().sqrt();
                    for (k, z) in column.iter().enumerate() {
                        let z = if norm > 0.0 { z / norm } else { *z };
                        out[(h * dim + k) * cols + c] = z as f32;
                    }
                }
            }
            Tensor::from_vec(out, (heads, dim, cols), &Device::Cpu)?.to_device(device)
        }
    }
}

/// Standard normal number `e` of the stream keyed by `key` (Box–Muller, f64).
fn gaussian(key: u64, e: u64) -> f64 {
    const UNIT: f64 = 1.0 / (1u64 << 53) as f64;
    let u1 = ((value(key, 2 * e) >> 11) + 1) as f64 * UNIT;
    let u2 = (value(key, 2 * e + 1) >> 11) as f64 * UNIT;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle::cuda_backend::cudarc::driver::PushKernelArg;
    use candle::cuda_backend::WrapErr;
    use candle::{CudaDevice, Result, Tensor};

    use super::super::launch;
    use crate::cuda_launch::wrap_slice;

    /// `n` keep flags, one thread each.
    pub(super) fn keep(dev: &CudaDevice, n: usize, key: u64, threshold: u32) -> Result<Tensor> {
        let mut out = unsafe { dev.alloc::<u8>(n) }?;
        if n > 0 {
            let f = dev.get_or_load_custom_func("random_keep", launch::MODULE, launch::PTX)?;
            let mut b = f.builder();
            b.arg(&mut out);
            candle::builder_arg!(b, n as u64, key, threshold);
            unsafe { b.launch(launch::elementwise(n)) }.w()?;
        }
        Ok(wrap_slice(out, dev, n))
    }

    /// One warp per `(head, column)`.
    pub(super) fn gaussian(
        dev: &CudaDevice,
        (heads, dim, cols): (usize, usize, usize),
        key: u64,
    ) -> Result<Tensor> {
        let n = heads * dim * cols;
        let mut out = unsafe { dev.alloc::<f32>(n) }?;
        if n > 0 {
            let f =
                dev.get_or_load_custom_func("normalised_gaussian", launch::MODULE, launch::PTX)?;
            let mut b = f.builder();
            b.arg(&mut out);
            candle::builder_arg!(b, heads as u32, dim as u32, cols as u32, key);
            unsafe { b.launch(launch::elementwise(heads * cols * 32)) }.w()?;
        }
        Ok(wrap_slice(out, dev, (heads, dim, cols)))
    }
}
