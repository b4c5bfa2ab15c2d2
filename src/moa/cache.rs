//! The per-layer MoA decode cache (spec §6): every key/value head keeps a static sink of the first
//! [`MOA_SINK`] tokens plus a ring of its `band` newest tokens, all heads flattened into one
//! buffer per K and V.

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, DType, Device, InplaceOp3, Layout, Result, Tensor};

use super::plan::{MoaLayerPlan, MOA_BLOCK, MOA_SINK};
use crate::flash::SUPPORTED_HEAD_DIMS;

/// Work items (per decode step) the split-KV chunk length aims for: a few waves of blocks on an
/// H100, so that blocks of unequal heads and batch rows balance.
const TARGET_ITEMS: usize = 4096;
/// Bounds of the split-KV chunk length in slots (a multiple of [`MOA_BLOCK`]).
const CHUNK_RANGE: (usize, usize) = (256, 4096);

/// A preallocated MoA KV cache of one layer.
///
/// Buffers (contiguous, allocated once, written in place):
/// - `k`, `v`: `(batch, total, head_dim)` with `total = Σ_h size_h` over the **key/value** heads
///   of the plan, in the cache dtype (f32, f16 or bf16). Keys are stored after RoPE.
/// - Head `h` owns rows `[start_h, start_h + size_h)`: the first [`MOA_SINK`] rows are the static
///   sink (positions `0..64`), the remaining `band_h` rows a ring. Position `t` is stored in slot
///   `t` if `t < 64`, else in slot `64 + (t − 64) mod band_h` (a head without a band keeps only its
///   sink).
/// - A head holds `valid_h = min(len, size_h)` tokens, always its first `valid_h` slots: the sink
///   plus the newest `band_h` positions. All sequences of the batch share one length, so
///   `valid[b, h] = valid_h` for every row `b`.
/// - `meta`: u32 on the cache's device, `starts[kv_heads + 1] | item_offs[kv_heads + 1] |
///   item_head[n_items]`: the head offsets and the split-KV work list of the decode kernel (head
///   `h` is split into `ceil(size_h / chunk)` chunks of `chunk` slots).
#[derive(Clone, Debug)]
pub struct MoaCache {
    k: Tensor,
    v: Tensor,
    meta: Tensor,
    sizes: Vec<usize>,
    starts: Vec<usize>,
    item_offs: Vec<usize>,
    chunk: usize,
    len: usize,
}

impl MoaCache {
    /// An empty cache for the spans of `plan` (one per kv head), `batch` sequences of
    /// `head_dim`-wide keys and values.
    ///
    /// `head_dim` must be one of [`SUPPORTED_HEAD_DIMS`]; dtype f32, f16 or bf16.
    pub fn new(
        plan: &MoaLayerPlan,
        batch: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        plan.validate()?;
        if batch == 0 {
            bail!("moa cache: batch must be > 0")
        }
        if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            bail!(
                "moa cache: head_dim {head_dim} is not supported (supported: {SUPPORTED_HEAD_DIMS:?})"
            )
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("moa cache: dtype {dtype:?} is not supported (f32, f16, bf16)")
        }
        let sizes: Vec<usize> = plan.spans.iter().map(|s| s.size()).collect();
        let mut starts = vec![0];
        for s in &sizes {
            starts.push(starts.last().unwrap() + s);
        }
        let total = *starts.last().unwrap();
        if total > u32::MAX as usize {
            bail!("moa cache: {total} slots per sequence do not fit u32 offsets")
        }
        let chunk = (batch * total)
            .div_ceil(TARGET_ITEMS)
            .div_ceil(MOA_BLOCK)
            .saturating_mul(MOA_BLOCK)
            .clamp(CHUNK_RANGE.0, CHUNK_RANGE.1);
        let (item_offs, meta) = work_list(&starts, chunk, device)?;
        Ok(Self {
            k: Tensor::zeros((batch, total, head_dim), dtype, device)?,
            v: Tensor::zeros((batch, total, head_dim), dtype, device)?,
            meta,
            sizes,
            starts,
            item_offs,
            chunk,
            len: 0,
        })
    }

    /// The same cache with split-KV work items of `chunk` slots (a positive multiple of
    /// [`MOA_BLOCK`]) instead of the default, which aims at about 4096 work items per decode step.
    pub fn with_chunk(mut self, chunk: usize) -> Result<Self> {
        if chunk == 0 || !chunk.is_multiple_of(MOA_BLOCK) || chunk > u32::MAX as usize {
            bail!("moa cache: the split-KV chunk must be a positive multiple of {MOA_BLOCK}, got {chunk}")
        }
        (self.item_offs, self.meta) = work_list(&self.starts, chunk, self.device())?;
        self.chunk = chunk;
        Ok(self)
    }

    /// Appends `n ≥ 1` tokens at positions `len..len + n`: `k`, `v` `(batch, kv_heads, n,
    /// head_dim)` in the cache dtype, on its device, keys after RoPE. Only what decoding needs is
    /// stored: positions below [`MOA_SINK`] and, per head, the newest `band_h` positions. One
    /// token (a decode step) is scattered by an in-place kernel, with no host round trip; a
    /// prompt is written with one copy per contiguous run of slots.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, _, d) = self.k.dims3()?;
        let h = self.kv_heads();
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype() != self.dtype() {
                bail!(
                    "moa cache: appended {name} has dtype {:?}, the cache {:?}",
                    t.dtype(),
                    self.dtype()
                )
            }
            if !t.device().same_device(self.device()) {
                bail!(
                    "moa cache: appended {name} is on {:?}, the cache on {:?}",
                    t.device().location(),
                    self.device().location()
                )
            }
            match t.dims() {
                &[tb, th, n, td] if tb == b && th == h && td == d && n > 0 => {}
                dims => {
                    bail!("moa cache: appended {name} must be ({b}, {h}, n > 0, {d}), got {dims:?}")
                }
            }
        }
        if k.dims() != v.dims() {
            bail!(
                "moa cache: appended k {:?} and v {:?} differ",
                k.dims(),
                v.dims()
            )
        }
        let n = k.dim(2)?;
        let end = self.len + n;
        if end > u32::MAX as usize {
            bail!("moa cache: position {end} does not fit u32")
        }
        if n == 1 {
            let op = AppendRow { pos: self.len };
            self.k.inplace_op3(&k.contiguous()?, &self.meta, &op)?;
            self.v.inplace_op3(&v.contiguous()?, &self.meta, &op)?;
        } else {
            for hd in 0..h {
                for (pos, slot, count) in self.runs(hd, self.len, end) {
                    let row = self.starts[hd] + slot;
                    let src = |t: &Tensor| -> Result<Tensor> {
                        t.narrow(1, hd, 1)?
                            .narrow(2, pos - self.len, count)?
                            .squeeze(1)?
                            .contiguous()
                    };
                    self.k.slice_set(&src(k)?, 1, row)?;
                    self.v.slice_set(&src(v)?, 1, row)?;
                }
            }
        }
        self.len = end;
        Ok(())
    }

    /// The runs `(first position, first slot, count)` of positions `[from, to)` that head `h`
    /// keeps, each mapping to consecutive slots.
    fn runs(&self, h: usize, from: usize, to: usize) -> Vec<(usize, usize, usize)> {
        let size = self.sizes[h];
        let band = size - size.min(MOA_SINK);
        let mut runs = Vec::new();
        if from < MOA_SINK {
            runs.push((from, from, to.min(MOA_SINK) - from));
        }
        if band > 0 {
            let mut pos = from.max(MOA_SINK).max(to.saturating_sub(band));
            while pos < to {
                let offset = (pos - MOA_SINK) % band;
                let count = (band - offset).min(to - pos);
                runs.push((pos, MOA_SINK + offset, count));
                pos += count;
            }
        }
        runs.retain(|r| r.2 > 0);
        runs
    }

    /// Tokens appended so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token was appended.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots of each kv head, `size_h = sink + band`.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// First row of each kv head in the buffers, plus the total as a last entry.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// Tokens each kv head holds, `min(len, size_h)` (the same for every batch row).
    pub fn valid(&self) -> Vec<usize> {
        self.sizes.iter().map(|&s| s.min(self.len)).collect()
    }

    /// Slots per split-KV work item of the CUDA decode kernel.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// First work item of each kv head, plus the item count as a last entry.
    pub fn item_offsets(&self) -> &[usize] {
        &self.item_offs
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.k.dims()[0]
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.sizes.len()
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.k.dims()[2]
    }

    /// Dtype of K and V.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }

    /// Device of every buffer.
    pub fn device(&self) -> &Device {
        self.k.device()
    }

    /// The K buffer `(batch, total, head_dim)` (see the type docs).
    pub fn k_buffer(&self) -> &Tensor {
        &self.k
    }

    /// The V buffer `(batch, total, head_dim)`.
    pub fn v_buffer(&self) -> &Tensor {
        &self.v
    }

    /// The u32 offsets and work list (see the type docs).
    #[cfg(feature = "cuda")]
    pub(crate) fn meta(&self) -> &Tensor {
        &self.meta
    }

    /// Bytes of K and V a decode step reads: `2 · batch · Σ_h valid_h · head_dim · dtype size`.
    pub fn bytes_read(&self) -> usize {
        2 * self.batch()
            * self.valid().iter().sum::<usize>()
            * self.head_dim()
            * self.dtype().size_in_bytes()
    }
}

/// The split-KV work list of heads at row offsets `starts` (`kv_heads + 1` entries) in chunks of
/// `chunk` slots: the first item of each head (plus the count) and the u32 `meta` tensor on
/// `device` (see [`MoaCache`]).
fn work_list(starts: &[usize], chunk: usize, device: &Device) -> Result<(Vec<usize>, Tensor)> {
    let mut item_offs = vec![0];
    let mut item_head = Vec::new();
    for (h, w) in starts.windows(2).enumerate() {
        let n = (w[1] - w[0]).div_ceil(chunk);
        item_head.extend(std::iter::repeat_n(h as u32, n));
        item_offs.push(item_offs.last().unwrap() + n);
    }
    let meta: Vec<u32> = starts
        .iter()
        .chain(&item_offs)
        .map(|&x| x as u32)
        .chain(item_head)
        .collect();
    let n = meta.len();
    Ok((item_offs, Tensor::from_vec(meta, n, device)?))
}

/// The in-place scatter of one decode step: row `(b, h)` of the new `(batch, kv_heads, 1,
/// head_dim)` tensor goes to the slot of position `pos` in head `h`'s region (see [`MoaCache`]).
/// Applied to the K or V buffer, with the cache's `meta` as third operand.
struct AppendRow {
    pos: usize,
}

/// The slot of position `pos` in a region of `size` slots, `None` when the head keeps no band and
/// `pos` is past the sink.
fn slot(pos: usize, size: usize) -> Option<usize> {
    let band = size - size.min(MOA_SINK);
    if pos < MOA_SINK {
        Some(pos)
    } else if band == 0 {
        None
    } else {
        Some(MOA_SINK + (pos - MOA_SINK) % band)
    }
}

/// The CPU scatter over contiguous slices: `cache` `(batch, total, d)`, `rows` `(batch, hkv, d)`.
fn scatter_rows<T: Copy>(
    cache: &mut [T],
    rows: &[T],
    starts: &[u32],
    (total, d): (usize, usize),
    pos: usize,
) {
    let hkv = starts.len() - 1;
    for (i, row) in rows.chunks_exact(d).enumerate() {
        let (b, h) = (i / hkv, i % hkv);
        let size = (starts[h + 1] - starts[h]) as usize;
        if let Some(s) = slot(pos, size) {
            let at = (b * total + starts[h] as usize + s) * d;
            cache[at..at + d].copy_from_slice(row);
        }
    }
}

impl InplaceOp3 for AppendRow {
    fn name(&self) -> &'static str {
        "moa-append-row"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        lc: &Layout,
        rows: &CpuStorage,
        lr: &Layout,
        meta: &CpuStorage,
        lm: &Layout,
    ) -> Result<()> {
        let (Some((c0, c1)), Some((r0, r1)), Some((m0, m1))) = (
            lc.contiguous_offsets(),
            lr.contiguous_offsets(),
            lm.contiguous_offsets(),
        ) else {
            bail!("moa cache append (cpu): operands must be contiguous, got {lc:?}, {lr:?}, {lm:?}")
        };
        let (total, d, hkv) = (lc.dims()[1], lc.dims()[2], lr.dims()[1]);
        let starts = &meta.as_slice::<u32>()?[m0..m1][..hkv + 1];
        match (cache, rows) {
            (CpuStorage::F32(c), CpuStorage::F32(r)) => {
                scatter_rows(&mut c[c0..c1], &r[r0..r1], starts, (total, d), self.pos)
            }
            (CpuStorage::F16(c), CpuStorage::F16(r)) => {
                scatter_rows(&mut c[c0..c1], &r[r0..r1], starts, (total, d), self.pos)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(r)) => {
                scatter_rows(&mut c[c0..c1], &r[r0..r1], starts, (total, d), self.pos)
            }
            (c, r) => bail!(
                "moa cache append (cpu): cache {:?} and rows {:?} must be the same float dtype",
                c.dtype(),
                r.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle::CudaStorage,
        lc: &Layout,
        rows: &candle::CudaStorage,
        lr: &Layout,
        meta: &candle::CudaStorage,
        lm: &Layout,
    ) -> Result<()> {
        super::cuda::append_row(cache, lc, rows, lr, meta, lm, self.pos)
    }
}
