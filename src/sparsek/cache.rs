//! Decode-time KV cache for SparseK attention with exact eviction.

use std::collections::VecDeque;

use candle::{bail, DType, Device, Result, Tensor, D};

use super::{sparsek_attn, tau_sorted, SparseKConfig};

/// Bookkeeping of one `(batch, kv_head)`: which token sits in which slot.
#[derive(Clone, Debug, Default)]
struct HeadState {
    /// Window tokens, oldest first: `(score, position, slot)`.
    window: VecDeque<(f32, usize, usize)>,
    /// Candidate pool: `(score, position, slot)`, at most `K′` entries.
    pool: Vec<(f32, usize, usize)>,
    /// Free slots.
    free: Vec<usize>,
}

/// KV cache for generating with [`sparsek_attn`]: per `(batch, kv_head)` a window of the `window`
/// newest tokens plus a candidate pool of at most `K′` older tokens (keys, values, scores), in
/// `window + K′ + 1` slots, so memory stays `O(window + K′)` per head whatever the length.
///
/// Eviction after each step (spec §6): the token leaving the window joins the pool; the pool keeps
/// its top-`K′` by `(u, position)`; then every entry with `p = 0` (`u ≤ τ_i`) is dropped. Scores
/// are fixed and τ is non-decreasing, so a dropped key could never be selected again: outputs are
/// **identical** to [`sparsek_attn`] over the full sequence (same top-`K′` cap semantics).
///
/// Keys must be stored after RoPE (no positions are needed). Bookkeeping (scores, slots) lives
/// on the host: each step reads the new scores back (`batch × kv_heads` floats), so this is for
/// decoding, not for the training benchmark.
#[derive(Debug)]
pub struct SparseKCache {
    cfg: SparseKConfig,
    heads: Vec<HeadState>,
    /// `(batch, kv_heads, slots, head_dim)` keys and values.
    kv: Option<(Tensor, Tensor)>,
    /// Tokens seen so far.
    len: usize,
}

impl SparseKCache {
    /// An empty cache for `cfg` (validated).
    pub fn new(cfg: SparseKConfig) -> Result<Self> {
        cfg.validate(None)?;
        Ok(Self {
            cfg,
            heads: Vec::new(),
            kv: None,
            len: 0,
        })
    }

    /// Tokens seen so far (prefill plus decode steps).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots per `(batch, kv_head)`: `window + K′ + 1`.
    pub fn slots(&self) -> usize {
        self.cfg.window + self.cfg.cap() + 1
    }

    /// Tokens currently retained by each `(batch, kv_head)` (window plus pool), row-major.
    pub fn retained(&self) -> Vec<usize> {
        self.heads
            .iter()
            .map(|h| h.window.len() + h.pool.len())
            .collect()
    }

    fn init(&mut self, b: usize, hkv: usize, d: usize, dtype: DType, dev: &Device) -> Result<()> {
        let slots = self.slots();
        self.heads = (0..b * hkv)
            .map(|_| HeadState {
                free: (0..slots).rev().collect(),
                ..Default::default()
            })
            .collect();
        let z = Tensor::zeros((b, hkv, slots, d), dtype, dev)?;
        self.kv = Some((z.clone(), z.copy()?));
        Ok(())
    }

    /// Admits token `pos` with score `u` into head `h` and evicts what can never be selected again.
    /// Returns the slot the token's key and value go to (freed again if the token was not
    /// retained; writing there is harmless) and the weights of query `pos` per slot: `(slot, w)`.
    fn admit(&mut self, h: usize, pos: usize, u: f32) -> Result<(usize, Vec<(usize, f32)>)> {
        let (k, window, cap) = (self.cfg.k, self.cfg.window, self.cfg.cap());
        let st = &mut self.heads[h];
        let slot = st
            .free
            .pop()
            .ok_or_else(|| candle::Error::Msg("sparsek cache: out of slots".into()))?;
        st.window.push_back((u, pos, slot));
        while st.window.len() > window {
            if let Some(e) = st.window.pop_front() {
                st.pool.push(e);
            }
        }
        // Top-K′ by (u, position), descending (newer wins ties).
        st.pool
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        while st.pool.len() > cap {
            if let Some((_, _, s)) = st.pool.pop() {
                st.free.push(s);
            }
        }
        let z: Vec<f64> = st.pool.iter().map(|e| e.0 as f64).collect();
        let tau = tau_sorted(&z, k as f64);
        let mut weights: Vec<(usize, f32)> = st.window.iter().map(|e| (e.2, 1.0)).collect();
        let mut kept = Vec::with_capacity(st.pool.len());
        for &(score, p, s) in &st.pool {
            let w = tau.map_or(1.0, |t| (score as f64 - t).clamp(0.0, 1.0) as f32);
            if w > 0.0 {
                weights.push((s, w));
                kept.push((score, p, s));
            } else {
                st.free.push(s);
            }
        }
        st.pool = kept;
        Ok((slot, weights))
    }

    /// One decode step: the new token's query `q` `(batch, q_heads, 1, head_dim)`, key and value
    /// `(batch, kv_heads, 1, head_dim)` and score `(batch, kv_heads, 1)` f32 (from the scorer at
    /// this position). Returns the attention output `(batch, q_heads, 1, head_dim)` in q's dtype,
    /// equal to row `len()` of [`sparsek_attn`] over the whole sequence.
    pub fn step(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, u: &Tensor) -> Result<Tensor> {
        let (b, hq, tq, d) = q.dims4()?;
        let (bk, hkv, tk, dk) = k.dims4()?;
        if tq != 1 || tk != 1 || bk != b || dk != d || k.dims() != v.dims() {
            bail!(
                "sparsek cache: step needs q (b, hq, 1, d) and k, v (b, hkv, 1, d), got q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        if hkv == 0 || hq % hkv != 0 {
            bail!(
                "sparsek cache: kv heads must divide q heads, got q {:?} and k {:?}",
                q.dims(),
                k.dims()
            )
        }
        if u.dims() != [b, hkv, 1] || u.dtype() != DType::F32 {
            bail!(
                "sparsek cache: scores must be f32 {:?}, got {:?} {:?}",
                [b, hkv, 1],
                u.dtype(),
                u.dims()
            )
        }
        if self.kv.is_none() {
            self.init(b, hkv, d, k.dtype(), k.device())?;
        }
        if self.heads.len() != b * hkv {
            bail!(
                "sparsek cache: built for {} (batch × kv_heads) rows, got k {:?}",
                self.heads.len(),
                k.dims()
            )
        }
        let scores = u.flatten_all()?.to_vec1::<f32>()?;
        if scores.iter().any(|x| x.is_nan()) {
            bail!("sparsek cache: NaN in the scores {:?}", u.dims())
        }
        let slots = self.slots();
        let pos = self.len;
        let mut new_slot = Vec::with_capacity(b * hkv);
        let mut weight = vec![0f32; b * hkv * slots];
        let mut bias = vec![f32::NEG_INFINITY; b * hkv * slots];
        for (h, &score) in scores.iter().enumerate() {
            let (slot, ws) = self.admit(h, pos, score)?;
            new_slot.push(slot as u32);
            for (s, w) in ws {
                weight[h * slots + s] = w;
                bias[h * slots + s] = 0.0;
            }
        }
        let dev = q.device();
        let (kc, vc) = match &self.kv {
            Some(kv) => kv,
            None => bail!("sparsek cache: not initialised"),
        };
        let idx = Tensor::from_vec(new_slot, (b, hkv, 1, 1), dev)?
            .broadcast_as((b, hkv, 1, d))?
            .contiguous()?;
        kc.scatter_set(&idx, &k.to_dtype(kc.dtype())?.contiguous()?, 2)?;
        vc.scatter_set(&idx, &v.to_dtype(vc.dtype())?.contiguous()?, 2)?;
        self.len += 1;

        let group = hq / hkv;
        let scale = self.cfg.scale(d) as f64;
        let weight = Tensor::from_vec(weight, (b, hkv, 1, slots), dev)?;
        let bias = Tensor::from_vec(bias, (b, hkv, 1, slots), dev)?;
        let qf = q.to_dtype(DType::F32)?.reshape((b, hkv, group, d))?;
        let kf = kc.to_dtype(DType::F32)?;
        let vf = vc.to_dtype(DType::F32)?;
        let s = (qf.matmul(&kf.t()?)? * scale)?.broadcast_add(&bias)?;
        let a = candle_nn::ops::softmax_last_dim(&s)?.broadcast_mul(&weight)?;
        a.matmul(&vf)?.reshape((b, hq, 1, d))?.to_dtype(q.dtype())
    }

    /// Prefill: runs [`sparsek_attn`] over the prompt (`q` `(b, hq, t, d)`, `k`, `v`
    /// `(b, hkv, t, d)`, `u` `(b, hkv, t)` f32, `t ≥ window`) on an empty cache and keeps the
    /// tokens later queries may still select. Returns the prompt's attention output.
    pub fn prefill(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, u: &Tensor) -> Result<Tensor> {
        if !self.is_empty() {
            bail!(
                "sparsek cache: prefill needs an empty cache, it holds {} tokens",
                self.len
            )
        }
        let out = sparsek_attn(q, k, v, u, &self.cfg)?;
        let (b, hkv, t, d) = k.dims4()?;
        self.init(b, hkv, d, k.dtype(), k.device())?;
        let scores = u.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let slots = self.slots();
        // Source position of every slot (0 for free slots, whose weight is always 0).
        let mut src = vec![0u32; b * hkv * slots];
        for h in 0..b * hkv {
            for pos in 0..t {
                self.admit(h, pos, scores[h * t + pos])?;
            }
            let st = &self.heads[h];
            for &(_, p, s) in st.window.iter().chain(&st.pool) {
                src[h * slots + s] = p as u32;
            }
        }
        self.len = t;
        let idx = Tensor::from_vec(src, (b, hkv, slots, 1), k.device())?
            .broadcast_as((b, hkv, slots, d))?
            .contiguous()?;
        let kc = k.contiguous()?.gather(&idx, D::Minus2)?;
        let vc = v.contiguous()?.gather(&idx, D::Minus2)?;
        self.kv = Some((kc, vc));
        Ok(out)
    }
}
