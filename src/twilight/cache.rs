//! The per-layer Twilight KV cache: full-precision K and V, per-page key bounds (Quest) and an
//! INT4 copy of the keys (the pruner's estimator), all kept in sync on append, on the device.

use candle::{bail, DType, Device, Result, Tensor};

use crate::flash::SUPPORTED_HEAD_DIMS;

/// A preallocated, paged KV cache of one layer.
///
/// Buffers (all contiguous, allocated once for `capacity` tokens, written in place on append):
/// - `k`, `v`: `(batch, kv_heads, capacity, head_dim)` in the cache dtype (f32, f16 or bf16).
/// - `page_min`, `page_max`: `(batch, kv_heads, pages, head_dim)` in the cache dtype, the
///   per-channel min and max of the keys of each `page_size`-token page (`pages =
///   ceil(capacity / page_size)`). A partial last page covers only its valid tokens. Min and max
///   are exact in the key dtype.
/// - `k_codes`: `(batch, kv_heads, capacity, head_dim / 2)` u8, the INT4 keys. Byte `j` holds
///   channel `2j` in its **low nibble** and channel `2j + 1` in its high nibble.
/// - `k_scale_min`: `(batch, kv_heads, capacity, 2)` f16, `[scale, min]` per (token, kv head):
///   asymmetric min-max quantisation over the channels, `scale = max(max − min, 1e-9) / 15`,
///   `code = clamp(round((k − min) / scale), 0, 15)` (computed in f32), `k̂ = code · scale + min`.
///
/// All sequences of the batch share one length.
#[derive(Clone, Debug)]
pub struct TwilightCache {
    k: Tensor,
    v: Tensor,
    page_min: Tensor,
    page_max: Tensor,
    k_codes: Tensor,
    k_scale_min: Tensor,
    len: usize,
    page_size: usize,
}

impl TwilightCache {
    /// An empty cache for `capacity` tokens of `(batch, kv_heads, ·, head_dim)` keys and values.
    ///
    /// `head_dim` must be one of [`SUPPORTED_HEAD_DIMS`]; dtype f32, f16 or bf16.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        page_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if page_size == 0 {
            bail!("twilight cache: page_size must be > 0 tokens, got 0")
        }
        if batch == 0 || kv_heads == 0 || capacity == 0 {
            bail!(
                "twilight cache: batch, kv_heads and capacity must be > 0, got ({batch}, {kv_heads}, {capacity})"
            )
        }
        if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            bail!(
                "twilight cache: head_dim {head_dim} is not supported (supported: {SUPPORTED_HEAD_DIMS:?})"
            )
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("twilight cache: dtype {dtype:?} is not supported (f32, f16, bf16)")
        }
        if capacity > u32::MAX as usize - 1 {
            bail!("twilight cache: capacity {capacity} does not fit u32 token ids")
        }
        let pages = capacity.div_ceil(page_size);
        let kv = (batch, kv_heads, capacity, head_dim);
        let bounds = (batch, kv_heads, pages, head_dim);
        Ok(Self {
            k: Tensor::zeros(kv, dtype, device)?,
            v: Tensor::zeros(kv, dtype, device)?,
            page_min: Tensor::zeros(bounds, dtype, device)?,
            page_max: Tensor::zeros(bounds, dtype, device)?,
            k_codes: Tensor::zeros((batch, kv_heads, capacity, head_dim / 2), DType::U8, device)?,
            k_scale_min: Tensor::zeros((batch, kv_heads, capacity, 2), DType::F16, device)?,
            len: 0,
            page_size,
        })
    }

    /// Appends `n ≥ 1` tokens: `k`, `v` `(batch, kv_heads, n, head_dim)` in the cache dtype, on its
    /// device (prefill appends the prompt, decode one token). Writes K, V, the INT4 keys and the
    /// bounds of the pages the new tokens touch (only the last page when decoding), all on the
    /// device.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, h, cap, d) = self.k.dims4()?;
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype() != self.dtype() {
                bail!(
                    "twilight cache: appended {name} has dtype {:?}, the cache {:?}",
                    t.dtype(),
                    self.dtype()
                )
            }
            if !t.device().same_device(self.k.device()) {
                bail!(
                    "twilight cache: appended {name} is on {:?}, the cache on {:?}",
                    t.device().location(),
                    self.k.device().location()
                )
            }
            match t.dims() {
                &[tb, th, n, td] if tb == b && th == h && td == d && n > 0 => {}
                dims => bail!(
                    "twilight cache: appended {name} must be ({b}, {h}, n > 0, {d}), got {dims:?}"
                ),
            }
        }
        if k.dims() != v.dims() {
            bail!(
                "twilight cache: appended k {:?} and v {:?} differ",
                k.dims(),
                v.dims()
            )
        }
        let n = k.dim(2)?;
        let (t0, t1) = (self.len, self.len + n);
        if t1 > cap {
            bail!(
                "twilight cache: appending {n} tokens to {t0} exceeds the capacity {cap}, k {:?}",
                k.dims()
            )
        }
        let k = k.contiguous()?;
        self.k.slice_set(&k, 2, t0)?;
        self.v.slice_set(&v.contiguous()?, 2, t0)?;
        let (codes, scale_min) = quantize_int4(&k)?;
        self.k_codes.slice_set(&codes, 2, t0)?;
        self.k_scale_min.slice_set(&scale_min, 2, t0)?;
        self.len = t1;
        self.update_pages(t0, t1)
    }

    /// Recomputes the bounds of the pages holding tokens `[t0, t1)` from the stored keys.
    fn update_pages(&mut self, t0: usize, t1: usize) -> Result<()> {
        let ps = self.page_size;
        let (b, h, _, d) = self.k.dims4()?;
        let first = t0 / ps;
        let rows = self
            .k
            .narrow(2, first * ps, t1 - first * ps)?
            .contiguous()?;
        let (full, rest) = (rows.dim(2)? / ps, rows.dim(2)? % ps);
        let mut mins = Vec::new();
        let mut maxs = Vec::new();
        if full > 0 {
            let paged = rows.narrow(2, 0, full * ps)?.reshape((b, h, full, ps, d))?;
            mins.push(paged.min(3)?);
            maxs.push(paged.max(3)?);
        }
        if rest > 0 {
            let tail = rows.narrow(2, full * ps, rest)?;
            mins.push(tail.min_keepdim(2)?);
            maxs.push(tail.max_keepdim(2)?);
        }
        self.page_min
            .slice_set(&Tensor::cat(&mins, 2)?.contiguous()?, 2, first)?;
        self.page_max
            .slice_set(&Tensor::cat(&maxs, 2)?.contiguous()?, 2, first)
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages holding at least one stored token, `ceil(len / page_size)`.
    pub fn num_pages(&self) -> usize {
        self.len.div_ceil(self.page_size)
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.k.dims()[0]
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.k.dims()[1]
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.k.dims()[3]
    }

    /// Dtype of K, V and the page bounds.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }

    /// Device of every buffer.
    pub fn device(&self) -> &Device {
        self.k.device()
    }

    /// Checks the 3-D query `(batch, q_heads, head_dim)` a pipeline stage takes against the cache
    /// (batch, head dim, kv heads dividing q heads, dtype, device); returns its sizes.
    /// [`Self::check_query`] validates the 4-D decode query of the whole step.
    pub(crate) fn check_stage_query(
        &self,
        q: &Tensor,
        stage: &str,
    ) -> Result<(usize, usize, usize)> {
        let (b, hq, d) = q.dims3()?;
        if b != self.batch() || d != self.head_dim() || hq % self.kv_heads() != 0 {
            bail!(
                "twilight: {stage} q {:?} does not fit the cache (batch {}, {} kv heads, head_dim {})",
                q.dims(),
                self.batch(),
                self.kv_heads(),
                self.head_dim()
            )
        }
        if q.dtype() != self.dtype() || !q.device().same_device(self.device()) {
            bail!(
                "twilight: {stage} q ({:?} on {:?}) must match the cache ({:?} on {:?})",
                q.dtype(),
                q.device().location(),
                self.dtype(),
                self.device().location()
            )
        }
        Ok((b, hq, d))
    }

    /// The full K buffer `(batch, kv_heads, capacity, head_dim)`; tokens `≥ len` are unset.
    pub fn k_buffer(&self) -> &Tensor {
        &self.k
    }

    /// The full V buffer `(batch, kv_heads, capacity, head_dim)`.
    pub fn v_buffer(&self) -> &Tensor {
        &self.v
    }

    /// Stored keys `(batch, kv_heads, len, head_dim)` (a view; contiguous when `len == capacity`).
    pub fn keys(&self) -> Result<Tensor> {
        self.k.narrow(2, 0, self.len)
    }

    /// Stored values `(batch, kv_heads, len, head_dim)` (a view).
    pub fn values(&self) -> Result<Tensor> {
        self.v.narrow(2, 0, self.len)
    }

    /// Page minima `(batch, kv_heads, pages, head_dim)` (all pages of the capacity; see the
    /// type docs).
    pub fn page_min(&self) -> &Tensor {
        &self.page_min
    }

    /// Page maxima, like [`Self::page_min`].
    pub fn page_max(&self) -> &Tensor {
        &self.page_max
    }

    /// INT4 key codes `(batch, kv_heads, capacity, head_dim / 2)` u8 (low nibble = even channel).
    pub fn k_codes(&self) -> &Tensor {
        &self.k_codes
    }

    /// INT4 `[scale, min]` `(batch, kv_heads, capacity, 2)` f16.
    pub fn k_scale_min(&self) -> &Tensor {
        &self.k_scale_min
    }

    /// Dequantised stored keys `(batch, kv_heads, len, head_dim)` f32 (for tests and analysis).
    pub fn dequantized_keys(&self) -> Result<Tensor> {
        let (b, h, _, d) = self.k.dims4()?;
        let codes = self.k_codes.narrow(2, 0, self.len)?.to_dtype(DType::F32)?;
        let lo = (&codes - ((&codes / 16.0)?.floor()? * 16.0)?)?;
        let hi = ((&codes - &lo)? / 16.0)?;
        let codes = Tensor::stack(&[lo, hi], 4)?.reshape((b, h, self.len, d))?;
        let sm = self
            .k_scale_min
            .narrow(2, 0, self.len)?
            .to_dtype(DType::F32)?;
        codes
            .broadcast_mul(&sm.narrow(3, 0, 1)?)?
            .broadcast_add(&sm.narrow(3, 1, 1)?)
    }

    /// Validates a decode query against this cache and returns it as `(batch, q_heads,
    /// head_dim)`, contiguous.
    pub(crate) fn check_query(&self, q: &Tensor) -> Result<Tensor> {
        let (b, h, _, d) = self.k.dims4()?;
        if self.len == 0 {
            bail!("twilight: the cache is empty; append the prompt first")
        }
        if q.dtype() != self.dtype() {
            bail!(
                "twilight: q has dtype {:?}, the cache {:?}",
                q.dtype(),
                self.dtype()
            )
        }
        if !q.device().same_device(self.device()) {
            bail!(
                "twilight: q is on {:?}, the cache on {:?}",
                q.device().location(),
                self.device().location()
            )
        }
        let (qb, qh, ql, qd) = match q.dims() {
            &[qb, qh, ql, qd] => (qb, qh, ql, qd),
            dims => bail!(
                "twilight: q must be (batch, q_heads, 1, head_dim) = ({b}, q_heads, 1, {d}), got {dims:?}"
            ),
        };
        if ql != 1 {
            bail!(
                "twilight: only decoding is supported (query length 1), got q {:?}; run prefill densely",
                q.dims()
            )
        }
        if qb != b || qd != d || qh == 0 || qh % h != 0 {
            bail!(
                "twilight: q {:?} does not fit the cache (batch {b}, {h} kv heads, head_dim {d}); q heads must be a multiple of kv heads",
                q.dims()
            )
        }
        q.squeeze(2)?.contiguous()
    }
}

/// INT4-quantises keys `(batch, heads, n, head_dim)` per (token, head) on their device: returns
/// the packed codes `(batch, heads, n, head_dim / 2)` u8 (low nibble = even channel) and
/// `[scale, min]` `(batch, heads, n, 2)` f16 (see [`TwilightCache`]).
pub fn quantize_int4(k: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, n, d) = k.dims4()?;
    if d % 2 != 0 {
        bail!(
            "twilight: INT4 packing needs an even head_dim, got k {:?}",
            k.dims()
        )
    }
    let kf = k.to_dtype(DType::F32)?;
    let mn = kf.min_keepdim(3)?;
    let mx = kf.max_keepdim(3)?;
    let scale = ((mx - &mn)?.maximum(1e-9)? / 15.0)?;
    let codes = kf
        .broadcast_sub(&mn)?
        .broadcast_div(&scale)?
        .round()?
        .clamp(0f32, 15f32)?
        .reshape((b, h, n, d / 2, 2))?;
    let packed = (codes.narrow(4, 0, 1)? + (codes.narrow(4, 1, 1)? * 16.0)?)?
        .squeeze(4)?
        .to_dtype(DType::U8)?;
    let scale_min = Tensor::cat(&[scale, mn], 3)?.to_dtype(DType::F16)?;
    Ok((packed, scale_min))
}
