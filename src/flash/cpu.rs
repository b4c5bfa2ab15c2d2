//! CPU kernels of [`super::FlashAttn`]: tiled flash attention, forward and backward.
//!
//! Work is split in tiles of [`BLOCK_Q`] query rows × [`BLOCK_K`] key rows. Scores, softmax
//! statistics and accumulators are f32 whatever the storage dtype. The tile products run on the
//! `gemm` crate (runtime SIMD dispatch); the softmax uses a branch-free, vectorisable `exp`.
//! No `N×N` buffer is ever allocated: each rayon task holds a few tiles.
//!
//! - Forward: one task per (batch, q head, query tile); online softmax over the visible key
//!   tiles (causal tiles above the diagonal and sparse tiles failing the range test are skipped).
//! - Backward (FA2 schedule, deterministic, no atomics): `dq` with one task per query tile over
//!   the same key tiles as the forward; `dk`, `dv` with one task per (batch, kv head, key tile)
//!   over the query tiles of every q head of its group that can see it. Both recompute `P`.
//!
//! Under `cfg(debug_assertions)` outputs start as NaN, so an element a kernel forgets to write
//! fails the tests.

use std::borrow::Cow;
use std::ops::Range;

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, DType, Layout, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{contiguous_slice, Dims, FlashAttnBwd};
use crate::mask::{Visibility, KEY_PAD_POS, QUERY_PAD_POS, SINK_BAND_BLOCK};

/// Query rows per tile.
const BLOCK_Q: usize = 64;
/// Key rows per tile.
const BLOCK_K: usize = 64;
// Sink-band visibility treats tiles as its blocks.
const _: () = assert!(BLOCK_Q == SINK_BAND_BLOCK && BLOCK_K == SINK_BAND_BLOCK);

/// The initial value of output buffers: NaN in debug builds (catches unwritten elements).
const OUTPUT_FILL: f32 = if cfg!(debug_assertions) {
    f32::NAN
} else {
    0.0
};

/// Range statistics of one tile of a sparse layout (scfa.md §4.1).
#[derive(Clone, Copy, Debug)]
struct TileStats {
    /// Query tiles: max position; key tiles: min position (padding sentinels included, which
    /// makes all-padding tiles fail every test).
    pos: i32,
    /// Min and max bucket over the tile's real rows (`i32::MAX`, `i32::MIN` when none).
    min_bucket: i32,
    max_bucket: i32,
}

/// Visibility with its side tensors read into host memory.
enum HostVisibility {
    Full,
    /// Query row `i` sees key rows `j <= i + offset` (`offset = nk - nq`).
    Causal {
        offset: isize,
    },
    Sparse(HostSparse),
    /// `(sink_blocks, band_blocks)` per kv head (`hkv` of them); tiles are the blocks.
    SinkBand {
        blocks: Vec<(usize, usize)>,
        hkv: usize,
    },
}

struct HostSparse {
    q_pos: Vec<i32>,
    k_pos: Vec<i32>,
    buckets: Option<(Vec<i32>, Vec<i32>)>,
    strict: bool,
    /// Per query tile, indexed `(b·hq + h)·q_tiles + t`.
    q_tiles: Vec<TileStats>,
    /// Per key tile, indexed `(b·hkv + h)·k_tiles + t`.
    k_tiles: Vec<TileStats>,
}

/// How much of a (query tile, key tile) pair is visible.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TileMask {
    /// Nothing: skip the tile.
    Skip,
    /// Everything: no per-element mask.
    All,
    /// Some pairs: mask per element.
    Partial,
}

/// A tile of `rows` query rows starting at `start` of the flat row index `(b·h)·n + i`.
#[derive(Clone, Copy, Debug)]
struct Tile {
    /// Flat index of the tile's first row.
    row0: usize,
    /// Index of the first row within its sequence.
    start: usize,
    rows: usize,
    /// Tile number within its sequence.
    index: usize,
}

impl Tile {
    fn new(head_row0: usize, index: usize, block: usize, len: usize) -> Self {
        let start = index * block;
        Self {
            row0: head_row0 + start,
            start,
            rows: block.min(len - start),
            index,
        }
    }
}

/// Statistics of every tile of `pos`/`bucket` (rows of length `n`, tiles of `block`).
fn tile_stats(
    pos: &[i32],
    bucket: Option<&[i32]>,
    n: usize,
    block: usize,
    pad: i32,
    query: bool,
) -> Vec<TileStats> {
    let mut stats = vec![];
    for (h, head) in pos.chunks(n).enumerate() {
        for (t, tile) in head.chunks(block).enumerate() {
            let pos = if query {
                tile.iter().copied().max()
            } else {
                tile.iter().copied().min()
            };
            let (mut min_bucket, mut max_bucket) = (i32::MAX, i32::MIN);
            if let Some(bucket) = bucket {
                let row0 = h * n + t * block;
                for (r, &p) in tile.iter().enumerate() {
                    if p != pad {
                        min_bucket = min_bucket.min(bucket[row0 + r]);
                        max_bucket = max_bucket.max(bucket[row0 + r]);
                    }
                }
            }
            stats.push(TileStats {
                pos: pos.unwrap_or(pad),
                min_bucket,
                max_bucket,
            });
        }
    }
    stats
}

impl HostVisibility {
    fn new(vis: &Visibility, dims: Dims) -> Result<Self> {
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<i32>();
        Ok(match vis {
            Visibility::Full => Self::Full,
            Visibility::Causal => Self::Causal {
                offset: dims.nk as isize - dims.nq as isize,
            },
            Visibility::Sparse(l) => {
                let (q_pos, k_pos) = (host(&l.q_pos)?, host(&l.k_pos)?);
                let buckets = match &l.buckets {
                    Some((qb, kb)) => Some((host(qb)?, host(kb)?)),
                    None => None,
                };
                let (qb, kb) = match &buckets {
                    Some((qb, kb)) => (Some(qb.as_slice()), Some(kb.as_slice())),
                    None => (None, None),
                };
                let q_tiles = tile_stats(&q_pos, qb, dims.nq, BLOCK_Q, QUERY_PAD_POS, true);
                let k_tiles = tile_stats(&k_pos, kb, dims.nk, BLOCK_K, KEY_PAD_POS, false);
                Self::Sparse(HostSparse {
                    q_pos,
                    k_pos,
                    buckets,
                    strict: l.strict,
                    q_tiles,
                    k_tiles,
                })
            }
            Visibility::SinkBand(sb) => Self::SinkBand {
                blocks: sb.host_blocks()?,
                hkv: dims.hkv,
            },
        })
    }

    /// The key tiles a query tile may see, as two ranges visited in order (the second starting
    /// at or after the end of the first): the sink, then the band, for [`Visibility::SinkBand`];
    /// every tile otherwise ([`Self::tile_mask`] still skips tiles it proves invisible).
    fn key_tiles(&self, kh: usize, qt: &Tile, k_tiles: usize) -> [Range<usize>; 2] {
        match self {
            Self::SinkBand { blocks, hkv } => {
                let (sink, band) = blocks[kh % hkv];
                let end = (qt.index + 1).min(k_tiles);
                let sink_end = sink.min(end);
                let band_start = (qt.index + 1).saturating_sub(band).max(sink_end);
                [0..sink_end, band_start..end]
            }
            _ => [0..0, 0..k_tiles],
        }
    }

    /// The query tiles that may see a key tile (same convention as [`Self::key_tiles`]).
    fn query_tiles(&self, kh: usize, kt: &Tile, q_tiles: usize) -> Range<usize> {
        match self {
            Self::SinkBand { blocks, hkv } => {
                let (sink, band) = blocks[kh % hkv];
                let end = if kt.index < sink {
                    q_tiles
                } else {
                    (kt.index + band).min(q_tiles)
                };
                kt.index.min(end)..end
            }
            _ => 0..q_tiles,
        }
    }

    /// Classifies a (query tile, key tile) pair. `qh`/`kh` are the flat `(b·h)` head indices.
    fn tile_mask(&self, dims: &Dims, qh: usize, qt: &Tile, kh: usize, kt: &Tile) -> TileMask {
        match self {
            Self::Full => TileMask::All,
            Self::Causal { offset } => {
                let last_row = (qt.start + qt.rows - 1) as isize;
                if kt.start as isize > last_row + offset {
                    TileMask::Skip
                } else if (kt.start + kt.rows - 1) as isize <= qt.start as isize + offset {
                    TileMask::All
                } else {
                    TileMask::Partial
                }
            }
            Self::Sparse(s) => {
                let q_tiles = dims.nq.div_ceil(BLOCK_Q);
                let k_tiles = dims.nk.div_ceil(BLOCK_K);
                let q = s.q_tiles[qh * q_tiles + qt.index];
                let k = s.k_tiles[kh * k_tiles + kt.index];
                let causal = if s.strict {
                    q.pos > k.pos
                } else {
                    q.pos >= k.pos
                };
                let buckets_meet = s.buckets.is_none()
                    || (q.min_bucket <= k.max_bucket && k.min_bucket <= q.max_bucket);
                if causal && buckets_meet {
                    TileMask::Partial
                } else {
                    TileMask::Skip
                }
            }
            Self::SinkBand { blocks, hkv } => {
                // Tiles are the blocks: only the diagonal needs an element mask.
                let (sink, band) = blocks[kh % hkv];
                let (qb, kb) = (qt.index, kt.index);
                if kb > qb || (kb >= sink && kb + band <= qb) {
                    TileMask::Skip
                } else if kb == qb {
                    TileMask::Partial
                } else {
                    TileMask::All
                }
            }
        }
    }

    /// Sets the invisible entries of a score tile (`qt.rows × kt.rows`, row stride `BLOCK_K`)
    /// to `-inf`.
    fn mask_tile(&self, scores: &mut [f32], qt: &Tile, kt: &Tile) {
        for (r, row) in scores.chunks_mut(BLOCK_K).take(qt.rows).enumerate() {
            let row = &mut row[..kt.rows];
            match self {
                Self::Full => {}
                Self::Causal { .. } | Self::SinkBand { .. } => {
                    // Keys j <= i + offset are visible (sink-band: only diagonal tiles get here).
                    let offset = match self {
                        Self::Causal { offset } => *offset,
                        _ => 0,
                    };
                    let end = (qt.start + r) as isize + offset + 1 - kt.start as isize;
                    let end = end.clamp(0, kt.rows as isize) as usize;
                    row[end..].fill(f32::NEG_INFINITY);
                }
                Self::Sparse(s) => {
                    let qp = s.q_pos[qt.row0 + r];
                    let k_pos = &s.k_pos[kt.row0..kt.row0 + kt.rows];
                    for (x, &kp) in row.iter_mut().zip(k_pos) {
                        let visible = if s.strict { qp > kp } else { qp >= kp };
                        if !visible {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                    if let Some((qb, kb)) = &s.buckets {
                        let qb = qb[qt.row0 + r];
                        for (x, &kb) in row.iter_mut().zip(&kb[kt.row0..kt.row0 + kt.rows]) {
                            if kb != qb {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `exp(x)` for `x <= 88`, branch-free so loops over it vectorise: `2^n · p(r)` with
/// `x = n·ln2 + r`, `|r| <= ln2/2`, a degree-6 Taylor polynomial (relative error ~2e-7).
/// Gives exactly 0 below -87 (so `exp(-inf) = 0`).
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer.
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * pow2
    }
}

/// A read-only matrix operand: `data[r·row_stride + c·col_stride]` for `r < rows`, `c < cols`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows × cols` with row stride `row_stride`.
    fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of [`Mat::rows`].
    fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// Panics unless every element of a `rows × cols` view lies inside `data` (an internal
    /// invariant, never input-dependent: it keeps the `gemm` call sound).
    fn check(&self, rows: usize, cols: usize) {
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(last < self.data.len(), "tile out of bounds");
    }
}

/// `dst[m×n] = alpha·(lhs[m×k] · rhs[k×n])`, or `dst += alpha·(lhs · rhs)` when `accumulate`;
/// `dst` is row-major with row stride `dst_stride`. All sizes must be non-zero.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    lhs.check(m, k);
    rhs.check(k, n);
    Mat::rows(dst, dst_stride).check(m, n);
    // SAFETY: the three checks above keep every element the call touches inside its slice;
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A storage's contiguous data as f32 (borrowed when it already is f32).
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<Cow<'a, [f32]>> {
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(contiguous_slice(v, l, name)?),
        CpuStorage::F16(v) => Cow::Owned(
            contiguous_slice(v, l, name)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        ),
        CpuStorage::BF16(v) => Cow::Owned(
            contiguous_slice(v, l, name)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        ),
        other => bail!(
            "flash attention: {name} has unsupported dtype {:?}",
            other.dtype()
        ),
    })
}

/// f32 results in the storage dtype `dtype`.
fn from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        other => bail!("flash attention: unsupported dtype {other:?}"),
    })
}

/// The inputs of one call, as f32, with the geometry shared by every kernel.
struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dims: Dims,
    scale: f32,
    vis: HostVisibility,
}

impl Problem<'_> {
    fn q_tiles(&self) -> usize {
        self.dims.nq.div_ceil(BLOCK_Q)
    }

    fn k_tiles(&self) -> usize {
        self.dims.nk.div_ceil(BLOCK_K)
    }

    /// The flat kv head `(b·hkv + h)` serving the flat q head `qh = b·hq + h`.
    fn kv_head(&self, qh: usize) -> usize {
        let Dims { hq, hkv, .. } = self.dims;
        qh / hq * hkv + qh % hq / self.dims.group()
    }

    fn q_tile(&self, qh: usize, t: usize) -> Tile {
        Tile::new(qh * self.dims.nq, t, BLOCK_Q, self.dims.nq)
    }

    fn k_tile(&self, kh: usize, t: usize) -> Tile {
        Tile::new(kh * self.dims.nk, t, BLOCK_K, self.dims.nk)
    }

    /// Rows `tile` of a row-major `(rows, d)` matrix.
    fn rows<'b>(&self, x: &'b [f32], tile: &Tile) -> &'b [f32] {
        let d = self.dims.d;
        &x[tile.row0 * d..(tile.row0 + tile.rows) * d]
    }

    /// `scores = scale · q_tile · k_tileᵀ` (row stride `BLOCK_K`), masked with `-inf`.
    fn scores(&self, scores: &mut [f32], qt: &Tile, kt: &Tile, mask: TileMask) {
        let d = self.dims.d;
        matmul(
            (qt.rows, kt.rows, d),
            scores,
            BLOCK_K,
            false,
            Mat::rows(self.rows(self.q, qt), d),
            Mat::transposed(self.rows(self.k, kt), d),
            self.scale,
        );
        if mask == TileMask::Partial {
            self.vis.mask_tile(scores, qt, kt);
        }
    }
}

/// Forward: returns the output (input dtype) and the log-sum-exp per query row (`-inf` when no
/// key is visible; such rows output 0).
pub(crate) fn forward(
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
    dims: Dims,
    scale: f32,
    visibility: &Visibility,
) -> Result<(CpuStorage, Vec<f32>)> {
    let (q, k, v) = (
        as_f32(sq, lq, "q")?,
        as_f32(sk, lk, "k")?,
        as_f32(sv, lv, "v")?,
    );
    let p = Problem {
        q: &q,
        k: &k,
        v: &v,
        dims,
        scale,
        vis: HostVisibility::new(visibility, dims)?,
    };
    let d = dims.d;
    let mut out = vec![OUTPUT_FILL; q.len()];
    let mut lse = vec![OUTPUT_FILL; dims.b * dims.hq * dims.nq];
    // Heads, then query tiles (the last tile of a head may be short).
    out.par_chunks_mut(dims.nq * d)
        .zip(lse.par_chunks_mut(dims.nq))
        .enumerate()
        .for_each(|(qh, (out, lse))| {
            out.par_chunks_mut(BLOCK_Q * d)
                .zip(lse.par_chunks_mut(BLOCK_Q))
                .enumerate()
                .for_each(|(t, (out, lse))| forward_tile(&p, qh, t, out, lse));
        });
    Ok((from_f32(out, sq.dtype())?, lse))
}

/// One query tile of the forward: online softmax over its visible key tiles.
fn forward_tile(p: &Problem, qh: usize, t: usize, out: &mut [f32], lse: &mut [f32]) {
    let d = p.dims.d;
    let qt = p.q_tile(qh, t);
    let kh = p.kv_head(qh);
    let mut acc = vec![0f32; qt.rows * d];
    let mut scores = vec![0f32; qt.rows * BLOCK_K];
    let mut max = vec![f32::NEG_INFINITY; qt.rows];
    let mut sum = vec![0f32; qt.rows];
    for j in p.vis.key_tiles(kh, &qt, p.k_tiles()).into_iter().flatten() {
        let kt = p.k_tile(kh, j);
        let mask = p.vis.tile_mask(&p.dims, qh, &qt, kh, &kt);
        if mask == TileMask::Skip {
            continue;
        }
        p.scores(&mut scores, &qt, &kt, mask);
        for (r, row) in scores.chunks_mut(BLOCK_K).enumerate() {
            let row = &mut row[..kt.rows];
            let new_max = row.iter().fold(max[r], |m, &x| m.max(x));
            if new_max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let alpha = fast_exp(max[r] - new_max);
            let mut row_sum = 0f32;
            for x in row.iter_mut() {
                *x = fast_exp(*x - new_max);
                row_sum += *x;
            }
            sum[r] = sum[r] * alpha + row_sum;
            max[r] = new_max;
            if alpha != 1.0 {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= alpha);
            }
        }
        matmul(
            (qt.rows, d, kt.rows),
            &mut acc,
            d,
            true,
            Mat::rows(&scores, BLOCK_K),
            Mat::rows(p.rows(p.v, &kt), d),
            1.0,
        );
    }
    for (r, (o, a)) in out.chunks_mut(d).zip(acc.chunks(d)).enumerate() {
        if sum[r] > 0.0 {
            let inv = 1.0 / sum[r];
            o.iter_mut().zip(a).for_each(|(o, a)| *o = a * inv);
            lse[r] = max[r] + sum[r].ln();
        } else {
            o.fill(0.0);
            lse[r] = f32::NEG_INFINITY;
        }
    }
}

/// Backward: returns `[dq | dk | dv]` flattened, in the input dtype.
pub(crate) fn backward(
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
    dims: Dims,
    op: &FlashAttnBwd,
) -> Result<CpuStorage> {
    let (q, k, v) = (
        as_f32(sq, lq, "q")?,
        as_f32(sk, lk, "k")?,
        as_f32(sv, lv, "v")?,
    );
    let to_f32 =
        |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let (out, grad_out, lse) = (to_f32(&op.out)?, to_f32(&op.grad_out)?, to_f32(&op.lse)?);
    let p = Problem {
        q: &q,
        k: &k,
        v: &v,
        dims,
        scale: op.scale,
        vis: HostVisibility::new(&op.visibility, dims)?,
    };
    let d = dims.d;
    // Delta_i = dO_i · O_i.
    let delta: Vec<f32> = out
        .par_chunks(d)
        .zip(grad_out.par_chunks(d))
        .map(|(o, g)| o.iter().zip(g).map(|(o, g)| o * g).sum())
        .collect();
    let grads = Grads {
        p: &p,
        grad_out: &grad_out,
        lse: &lse,
        delta: &delta,
    };

    let mut packed = vec![OUTPUT_FILL; q.len() + 2 * k.len()];
    let (dq, dkv) = packed.split_at_mut(q.len());
    let (dk, dv) = dkv.split_at_mut(k.len());
    dq.par_chunks_mut(dims.nq * d)
        .enumerate()
        .for_each(|(qh, dq)| {
            dq.par_chunks_mut(BLOCK_Q * d)
                .enumerate()
                .for_each(|(t, dq)| grads.dq_tile(qh, t, dq));
        });
    dk.par_chunks_mut(dims.nk * d)
        .zip(dv.par_chunks_mut(dims.nk * d))
        .enumerate()
        .for_each(|(kh, (dk, dv))| {
            dk.par_chunks_mut(BLOCK_K * d)
                .zip(dv.par_chunks_mut(BLOCK_K * d))
                .enumerate()
                .for_each(|(t, (dk, dv))| grads.dkv_tile(kh, t, dk, dv));
        });
    from_f32(packed, sq.dtype())
}

/// Everything the backward tiles read.
struct Grads<'a> {
    p: &'a Problem<'a>,
    /// Upstream gradient `dO`, `(b, hq, nq, d)`.
    grad_out: &'a [f32],
    /// Forward log-sum-exp per query row.
    lse: &'a [f32],
    /// `rowsum(dO ⊙ O)` per query row.
    delta: &'a [f32],
}

impl Grads<'_> {
    /// Recomputes `P` of a tile pair into `probs` and turns `dp` into `dS = P ⊙ (dP − Delta)`
    /// (both `qt.rows × kt.rows`, row stride `BLOCK_K`).
    fn probs_and_ds(
        &self,
        probs: &mut [f32],
        ds: &mut [f32],
        qt: &Tile,
        kt: &Tile,
        mask: TileMask,
    ) {
        let p = self.p;
        let d = p.dims.d;
        p.scores(probs, qt, kt, mask);
        matmul(
            (qt.rows, kt.rows, d),
            ds,
            BLOCK_K,
            false,
            Mat::rows(p.rows(self.grad_out, qt), d),
            Mat::transposed(p.rows(p.v, kt), d),
            1.0,
        );
        for r in 0..qt.rows {
            let (lse, delta) = (self.lse[qt.row0 + r], self.delta[qt.row0 + r]);
            let row = r * BLOCK_K..r * BLOCK_K + kt.rows;
            let (pr, dr) = (&mut probs[row.clone()], &mut ds[row]);
            if lse == f32::NEG_INFINITY {
                pr.fill(0.0);
                dr.fill(0.0);
                continue;
            }
            for (p, dp) in pr.iter_mut().zip(dr.iter_mut()) {
                *p = fast_exp(*p - lse);
                *dp = *p * (*dp - delta);
            }
        }
    }

    /// `dq` of one query tile: `scale · Σ_j dS_ij K_j` over the forward's key tiles.
    fn dq_tile(&self, qh: usize, t: usize, dq: &mut [f32]) {
        let p = self.p;
        let d = p.dims.d;
        let qt = p.q_tile(qh, t);
        let kh = p.kv_head(qh);
        dq.fill(0.0);
        let mut probs = vec![0f32; qt.rows * BLOCK_K];
        let mut ds = vec![0f32; qt.rows * BLOCK_K];
        for j in p.vis.key_tiles(kh, &qt, p.k_tiles()).into_iter().flatten() {
            let kt = p.k_tile(kh, j);
            let mask = p.vis.tile_mask(&p.dims, qh, &qt, kh, &kt);
            if mask == TileMask::Skip {
                continue;
            }
            self.probs_and_ds(&mut probs, &mut ds, &qt, &kt, mask);
            matmul(
                (qt.rows, d, kt.rows),
                dq,
                d,
                true,
                Mat::rows(&ds, BLOCK_K),
                Mat::rows(p.rows(p.k, &kt), d),
                p.scale,
            );
        }
    }

    /// `dk`, `dv` of one key tile: `dV_j = Σ_i P_ij dO_i`, `dK_j = scale · Σ_i dS_ij Q_i` over the
    /// query tiles of every q head of the kv group that see it.
    fn dkv_tile(&self, kh: usize, t: usize, dk: &mut [f32], dv: &mut [f32]) {
        let p = self.p;
        let Dims { hq, hkv, d, .. } = p.dims;
        let kt = p.k_tile(kh, t);
        let group = p.dims.group();
        dk.fill(0.0);
        dv.fill(0.0);
        let mut probs = vec![0f32; BLOCK_Q * BLOCK_K];
        let mut ds = vec![0f32; BLOCK_Q * BLOCK_K];
        let first_head = kh / hkv * hq + kh % hkv * group;
        for qh in first_head..first_head + group {
            for i in p.vis.query_tiles(kh, &kt, p.q_tiles()) {
                let qt = p.q_tile(qh, i);
                let mask = p.vis.tile_mask(&p.dims, qh, &qt, kh, &kt);
                if mask == TileMask::Skip {
                    continue;
                }
                self.probs_and_ds(&mut probs, &mut ds, &qt, &kt, mask);
                matmul(
                    (kt.rows, d, qt.rows),
                    dv,
                    d,
                    true,
                    Mat::transposed(&probs, BLOCK_K),
                    Mat::rows(p.rows(self.grad_out, &qt), d),
                    1.0,
                );
                matmul(
                    (kt.rows, d, qt.rows),
                    dk,
                    d,
                    true,
                    Mat::transposed(&ds, BLOCK_K),
                    Mat::rows(p.rows(p.q, &qt), d),
                    p.scale,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use candle::{CustomOp3, Device, Tensor};

    use super::fast_exp;
    use crate::flash::FlashAttn;
    use crate::mask::Visibility;
    use crate::reference::rel_err;

    #[test]
    fn fast_exp_matches_exp() {
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        for i in -8600..=8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    /// The backward reading the stashed LSE and the backward recomputing it give the same
    /// gradients.
    #[test]
    fn stashed_and_recomputed_lse_agree() -> candle::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 4, 70, 64), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 2, 90, 64), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 2, 90, 64), &dev)?;
        let g = Tensor::randn(0f32, 1., (2, 4, 70, 64), &dev)?;
        let op = |lse| FlashAttn {
            scale: 0.125,
            visibility: Visibility::Causal,
            lse,
        };
        let stashed = op(Arc::new(Mutex::new(None)));
        let out = q.apply_op3_no_bwd(&k, &v, &stashed)?;
        assert!(stashed.lse.lock().unwrap().is_some());
        let from_stash = stashed.bwd(&q, &k, &v, &out, &g)?;
        let recomputed = op(Arc::new(Mutex::new(None))).bwd(&q, &k, &v, &out, &g)?;
        for (a, b) in [
            (from_stash.0, recomputed.0),
            (from_stash.1, recomputed.1),
            (from_stash.2, recomputed.2),
        ] {
            let (a, b) = (a.expect("gradient"), b.expect("gradient"));
            assert_eq!(rel_err(&a, &b)?, 0.0);
        }
        Ok(())
    }
}
