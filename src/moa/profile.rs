//! MoA profiling (spec §8): the attention influence `E_ij`, the first-order loss change when entry
//! `(i, j)` of a head's attention matrix is masked and its row renormalised, summed as `|E|` into
//! 64×64 blocks and accumulated over calibration items.
//!
//! With `A = softmax(scale · q kᵀ)` (causal), `O = A v` and `dO = ∂L/∂O`:
//! `G_ij = dO_i · v_j`, `Delta_i = Σ_n G_in A_in` and
//! `E_ij = A_ij / (1 − A_ij + eps) · (Delta_i − G_ij)` (the renormalisation term included), with
//! row 0 (where `A_00 = 1`) special-cased to `−G_00 · A_00` as in the reference. f32, `eps = 1e-6`.
//! The computation walks one 64-row query block at a time, so memory is `O(64 · N)` per head,
//! never `N × N`.
//!
//! In a model, [`profiled_attention`] is dense causal attention whose backward pass also adds the
//! influence of that call into a shared per-layer [`InfluenceTap`]; one forward and
//! `loss.backward()` profile every layer.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle::backend::{BackendDevice, BackendStorage};
use candle::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::plan::MOA_BLOCK;
use crate::flash::flash_attn_with_visibility;
use crate::mask::Visibility;

/// The `eps` of the renormalisation term `A / (1 − A + eps)`.
pub const INFLUENCE_EPS: f32 = 1e-6;

/// Calls `f(i, j, E_ij)` for every causal entry of one `(batch, head)` slice, one 64-row query
/// block at a time. `q`, `k`, `v`, `d_o`: rows of `d` f32 (`n` rows each); `scale` multiplies
/// `q·k`.
fn for_each_influence(
    (q, k, v, d_o): (&[f32], &[f32], &[f32], &[f32]),
    n: usize,
    d: usize,
    scale: f32,
    mut f: impl FnMut(usize, usize, f32),
) {
    let row = |x: &[f32], i: usize| -> Vec<f32> { x[i * d..(i + 1) * d].to_vec() };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut a = vec![0f32; n];
    let mut g = vec![0f32; n];
    for qb in 0..n.div_ceil(MOA_BLOCK) {
        for i in qb * MOA_BLOCK..((qb + 1) * MOA_BLOCK).min(n) {
            let (qi, doi) = (row(q, i), row(d_o, i));
            let mut mx = f32::NEG_INFINITY;
            for j in 0..=i {
                a[j] = scale * dot(&qi, &k[j * d..(j + 1) * d]);
                mx = mx.max(a[j]);
            }
            let mut sum = 0f32;
            for x in &mut a[..=i] {
                *x = (*x - mx).exp();
                sum += *x;
            }
            let mut delta = 0f32;
            for j in 0..=i {
                a[j] /= sum;
                g[j] = dot(&doi, &v[j * d..(j + 1) * d]);
                delta += a[j] * g[j];
            }
            for j in 0..=i {
                let e = if i == 0 {
                    -g[j] * a[j]
                } else {
                    a[j] / (1.0 - a[j] + INFLUENCE_EPS) * (delta - g[j])
                };
                f(i, j, e);
            }
        }
    }
}

/// Host f32 copy of a `(b, h, n, d)` tensor.
fn host(x: &Tensor) -> Result<Vec<f32>> {
    x.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// Checks q `(b, hq, n, d)`, k/v `(b, hkv, n, d)` with `hkv | hq`, and `d_o` like q.
fn check_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, hq, n, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    if k.dims() != v.dims()
        || k.dims() != [b, hkv, n, d]
        || d_o.dims() != q.dims()
        || hkv == 0
        || hq % hkv != 0
    {
        bail!(
            "moa influence: q {:?}, k {:?}, v {:?}, dO {:?} must be (b, hq, n, d), (b, hkv, n, d) twice \
             with hkv dividing hq, and dO like q",
            q.dims(),
            k.dims(),
            v.dims(),
            d_o.dims()
        )
    }
    Ok((b, hq, hkv, n, d))
}

/// Runs [`for_each_influence`] over every `(batch, query head)` in parallel; `per_head(bh, i, j,
/// e)` accumulates into that head's own state `S`, returned in `(batch, head)` order.
fn per_head_influence<S: Send>(
    (q, k, v, d_o): (&Tensor, &Tensor, &Tensor, &Tensor),
    scale: f32,
    init: impl Fn() -> S + Sync,
    acc: impl Fn(&mut S, usize, usize, f32) + Sync,
) -> Result<Vec<S>> {
    let (b, hq, hkv, n, d) = check_shapes(q, k, v, d_o)?;
    let (q, k, v, d_o) = (host(q)?, host(k)?, host(v)?, host(d_o)?);
    let group = hq / hkv;
    let len = n * d;
    Ok((0..b * hq)
        .into_par_iter()
        .map(|r| {
            let kv = r / hq * hkv + r % hq / group;
            let mut s = init();
            for_each_influence(
                (
                    &q[r * len..(r + 1) * len],
                    &k[kv * len..(kv + 1) * len],
                    &v[kv * len..(kv + 1) * len],
                    &d_o[r * len..(r + 1) * len],
                ),
                n,
                d,
                scale,
                |i, j, e| acc(&mut s, i, j, e),
            );
            s
        })
        .collect())
}

/// Block influence of one attention call: `Σ |E_ij|` over each 64×64 block `(qb, kb)`, summed
/// over the batch. Inputs `q`, `d_o` `(b, q_heads, n, d)`, `k`, `v` `(b, kv_heads, n, d)`, any
/// float dtype and device (computed in f32 on the CPU). Returns `(q_heads, nb, nb)` f32 with `nb =
/// ceil(n / 64)`; blocks above the diagonal are 0.
pub fn block_influence(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (_, hq, _, n, _) = check_shapes(q, k, v, d_o)?;
    let nb = n.div_ceil(MOA_BLOCK);
    let heads = per_head_influence(
        (q, k, v, d_o),
        scale,
        || vec![0f32; nb * nb],
        |s, i, j, e| s[i / MOA_BLOCK * nb + j / MOA_BLOCK] += e.abs(),
    )?;
    let mut out = vec![0f32; hq * nb * nb];
    for (r, s) in heads.iter().enumerate() {
        for (o, x) in out[r % hq * nb * nb..][..nb * nb].iter_mut().zip(s) {
            *o += x;
        }
    }
    Tensor::from_vec(out, (hq, nb, nb), &Device::Cpu)
}

/// The signed entry influence `E` `(b, q_heads, n, n)` f32, materialised (0 above the diagonal):
/// `O(N²)` memory, for tests and small analyses. Inputs as in [`block_influence`].
pub fn entry_influence(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (b, hq, _, n, _) = check_shapes(q, k, v, d_o)?;
    let heads = per_head_influence(
        (q, k, v, d_o),
        scale,
        || vec![0f32; n * n],
        |s, i, j, e| s[i * n + j] = e,
    )?;
    Tensor::from_vec(heads.concat(), (b, hq, n, n), &Device::Cpu)
}

/// Per-layer accumulator of block influence at one profile length, shared between the attention
/// calls of a layer (through [`profiled_attention`]) and the caller.
#[derive(Clone, Debug, Default)]
pub struct InfluenceTap(Arc<Mutex<Accum>>);

#[derive(Debug, Default)]
struct Accum {
    /// `(q_heads, nb, nb)` sums, `None` until the first call.
    sums: Option<Tensor>,
    items: usize,
}

impl InfluenceTap {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the block influence of one attention call (`items` = its batch size).
    pub fn add(&self, blocks: &Tensor, items: usize) -> Result<()> {
        let mut acc = self.0.lock().expect("influence tap poisoned");
        acc.sums = Some(match acc.sums.take() {
            None => blocks.clone(),
            Some(s) if s.dims() == blocks.dims() => (s + blocks)?,
            Some(s) => bail!(
                "moa influence: a call of shape {:?} into a tap holding {:?} (one length per tap)",
                blocks.dims(),
                s.dims()
            ),
        });
        acc.items += items;
        Ok(())
    }

    /// The mean block influence over the items so far, `(q_heads, nb, nb)` f32, and the item count.
    pub fn mean(&self) -> Result<(Tensor, usize)> {
        let acc = self.0.lock().expect("influence tap poisoned");
        match &acc.sums {
            Some(s) => Ok(((s / acc.items as f64)?, acc.items)),
            None => bail!("moa influence: nothing was profiled (no backward pass reached the tap)"),
        }
    }
}

/// Dense causal attention (the flash op, gradients unchanged) whose backward pass also adds the
/// block influence of this call to `tap`. Shapes and dtypes as in [`crate::flash_attn`]; the
/// influence is computed in f32 on the CPU (a profiler, not a fast path).
pub fn profiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    tap: &InfluenceTap,
) -> Result<Tensor> {
    let o = flash_attn_with_visibility(q, k, v, scale, Visibility::Causal)?;
    let (k, v) = (k.detach(), v.detach());
    let kv = Tensor::stack(&[&k, &v], 0)?;
    o.apply_op3(
        &q.detach(),
        &kv,
        Tap {
            scale,
            tap: tap.clone(),
        },
    )
}

/// Identity on the attention output whose backward adds the influence (see
/// [`profiled_attention`]): operands `(o, q, stack(k, v))`.
struct Tap {
    scale: f32,
    tap: InfluenceTap,
}

impl CustomOp3 for Tap {
    fn name(&self) -> &'static str {
        "moa-influence-tap"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((copy_storage(s1, l1)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((copy_storage(s1, l1)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _o: &Tensor,
        q: &Tensor,
        kv: &Tensor,
        _res: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, v) = (kv.get(0)?, kv.get(1)?);
        let blocks = block_influence(q, &k, &v, d_o, self.scale)?;
        self.tap.add(&blocks, q.dim(0)?)?;
        Ok((Some(d_o.clone()), None, None))
    }
}

/// A contiguous copy of a storage behind a layout.
fn copy_storage<S: BackendStorage>(s: &S, l: &Layout) -> Result<S>
where
    S::Device: BackendDevice<Storage = S>,
{
    let mut dst = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

/// Influence of a whole model at one profile length: `(layers, q_heads, nb, nb)` f32 block means
/// over `items` calibration items.
#[derive(Clone, Debug)]
pub struct MoaInfluence {
    /// `(layers, q_heads, nb, nb)` f32 on the CPU.
    pub blocks: Tensor,
    /// Profiled sequence length in tokens.
    pub length: usize,
    /// Calibration items averaged.
    pub items: usize,
}

impl MoaInfluence {
    /// Collects the means of one tap per layer.
    pub fn from_taps(taps: &[InfluenceTap], length: usize) -> Result<Self> {
        let mut items = 0;
        let means = taps
            .iter()
            .map(|t| {
                let (m, n) = t.mean()?;
                items = n;
                Ok(m)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks: Tensor::stack(&means, 0)?,
            length,
            items,
        })
    }

    /// Max over the query heads of each kv group (spec §7): `(layers, kv_heads, nb, nb)`.
    pub fn reduce_gqa(&self, kv_heads: usize) -> Result<Tensor> {
        let (l, hq, nb, _) = self.blocks.dims4()?;
        if kv_heads == 0 || hq % kv_heads != 0 {
            bail!("moa influence: kv heads {kv_heads} must divide the {hq} query heads")
        }
        self.blocks
            .reshape((l, kv_heads, hq / kv_heads, nb, nb))?
            .max(2)
    }

    /// Writes the influence as safetensors (`blocks`, plus `length` and `items` as u32 scalars).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let meta = Tensor::new(&[self.length as u32, self.items as u32], &Device::Cpu)?;
        candle::safetensors::save(
            &[
                ("blocks".to_string(), self.blocks.clone()),
                ("length_items".to_string(), meta),
            ]
            .into(),
            path,
        )
    }

    /// Reads a file written by [`Self::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut t = candle::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle::Error::Msg(format!("moa influence {}: {e}", path.display())))?;
        let (Some(blocks), Some(meta)) = (t.remove("blocks"), t.remove("length_items")) else {
            bail!(
                "moa influence {}: missing `blocks` or `length_items`",
                path.display()
            )
        };
        let meta = meta.to_vec1::<u32>()?;
        blocks.dims4()?;
        Ok(Self {
            blocks,
            length: meta[0] as usize,
            items: meta[1] as usize,
        })
    }
}
