//! Which (query, key) pairs may attend: the one notion of visibility shared by the dense op,
//! the sparse kernels, the reference and the tests.

use candle::{bail, DType, Result, Tensor};

/// Padding query rows carry this position: no key is visible to them.
pub const QUERY_PAD_POS: i32 = -1;
/// Padding key rows carry this position: no query can see them.
pub const KEY_PAD_POS: i32 = i32::MAX;
/// Bucket id of padding query rows (differs from [`KEY_PAD_BUCKET`] so padding never matches).
pub const QUERY_PAD_BUCKET: i32 = -1;
/// Bucket id of padding key rows.
pub const KEY_PAD_BUCKET: i32 = -2;

/// The visibility structure of one attention call.
#[derive(Clone, Debug)]
pub enum Visibility {
    /// Every query sees every key.
    Full,
    /// Causal, aligned bottom-right: query row `i` sees key row `j` iff `j <= i + kv_len - q_len`
    /// (the KV-cache convention; the usual triangle when `q_len == kv_len`). Query rows with no
    /// visible key output 0.
    Causal,
    /// Sparse causal on original positions, rows already arranged (see [`SparseLayout`]).
    Sparse(SparseLayout),
    /// Causal sink + sliding band on blocks of [`SINK_BAND_BLOCK`] tokens, one span per kv head
    /// (MoA prefill, see [`SinkBand`]). Requires `q_len == kv_len`.
    SinkBand(SinkBand),
}

/// Tokens per block of [`Visibility::SinkBand`] (the MoA block, whatever the kernels' tiles).
pub const SINK_BAND_BLOCK: usize = 64;

/// Per-kv-head sink and band, in blocks of [`SINK_BAND_BLOCK`] tokens.
///
/// With query block `qb = i / 64` and key block `kb = j / 64`, query `i` of a head whose kv head
/// has `(sink, band)` blocks sees key `j` iff `j <= i` and (`kb < sink` or `kb > qb − band`):
/// the sink blocks plus the `band` newest blocks up to the diagonal, which is masked element-wise.
/// `blocks` is `(kv_heads, 2)` i32, contiguous, on the attention inputs' device: row `h` holds
/// `[sink_blocks, band_blocks]` of kv head `h` (every batch row shares them; negative values count
/// as 0).
#[derive(Clone, Debug)]
pub struct SinkBand {
    /// `(kv_heads, 2)` i32: sink blocks and band blocks of every kv head.
    pub blocks: Tensor,
}

impl SinkBand {
    /// Checks dtype and shape against the attention dims `(hkv, nq, nk)`.
    pub(crate) fn validate(&self, hkv: usize, nq: usize, nk: usize) -> Result<()> {
        if self.blocks.dtype() != DType::I32 || self.blocks.dims() != [hkv, 2] {
            bail!(
                "sink-band visibility: blocks must be i32 of shape [{hkv}, 2] (kv heads, \
                 [sink, band]), got {:?} {:?}",
                self.blocks.dtype(),
                self.blocks.dims()
            )
        }
        if nq != nk {
            bail!("sink-band visibility: q_len {nq} and kv_len {nk} must be equal (prefill)")
        }
        Ok(())
    }

    /// `(sink_blocks, band_blocks)` of every kv head, read to the host.
    pub fn host_blocks(&self) -> Result<Vec<(usize, usize)>> {
        let v = self.blocks.flatten_all()?.to_vec1::<i32>()?;
        Ok(v.chunks(2)
            .map(|c| (c[0].max(0) as usize, c[1].max(0) as usize))
            .collect())
    }

    /// Whether query `i` sees key `j` under a kv head's `(sink_blocks, band_blocks)`.
    pub fn sees(i: usize, j: usize, (sink, band): (usize, usize)) -> bool {
        let (qb, kb) = (i / SINK_BAND_BLOCK, j / SINK_BAND_BLOCK);
        j <= i && (kb < sink || kb + band > qb)
    }
}

/// Per-row positions (and optional bucket ids) of queries and keys that were compacted or sorted.
///
/// Query row `i` of head `h` sees key row `j` of its kv head iff
/// `q_pos[i] >= k_pos[j]` (`>` when `strict`) and, with buckets, `q_bucket[i] == k_bucket[j]`.
/// All tensors are `i32`, contiguous, on the attention inputs' device:
/// `q_pos`, `q_bucket`: `(batch, q_heads, q_len)`; `k_pos`, `k_bucket`: `(batch, kv_heads, kv_len)`.
/// Padding rows use [`QUERY_PAD_POS`] / [`KEY_PAD_POS`] (and the bucket sentinels); the sparse
/// kernels assume key positions increase within a bucket (QK dropping: within the row).
#[derive(Clone, Debug)]
pub struct SparseLayout {
    /// Original time index of every query row, `(batch, q_heads, q_len)` i32.
    pub q_pos: Tensor,
    /// Original time index of every key row, `(batch, kv_heads, kv_len)` i32.
    pub k_pos: Tensor,
    /// Optional `(q_bucket, k_bucket)` ids, non-decreasing along the row axis.
    pub buckets: Option<(Tensor, Tensor)>,
    /// Strict causality (`q_pos > k_pos`), for shared query/key projections.
    pub strict: bool,
}

impl SparseLayout {
    /// Checks dtypes and shapes against the attention dims `(b, hq, hkv, nq, nk)`.
    pub(crate) fn validate(
        &self,
        b: usize,
        hq: usize,
        hkv: usize,
        nq: usize,
        nk: usize,
    ) -> Result<()> {
        let check = |t: &Tensor, name: &str, dims: [usize; 3]| -> Result<()> {
            if t.dtype() != DType::I32 {
                bail!("sparse layout: {name} must be i32, got {:?}", t.dtype())
            }
            if t.dims() != dims {
                bail!(
                    "sparse layout: {name} must have shape {dims:?}, got {:?}",
                    t.dims()
                )
            }
            Ok(())
        };
        check(&self.q_pos, "q_pos", [b, hq, nq])?;
        check(&self.k_pos, "k_pos", [b, hkv, nk])?;
        if let Some((qb, kb)) = &self.buckets {
            check(qb, "q_bucket", [b, hq, nq])?;
            check(kb, "k_bucket", [b, hkv, nk])?;
        }
        Ok(())
    }

    /// All side tensors, for device checks.
    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.q_pos, &self.k_pos];
        if let Some((qb, kb)) = &self.buckets {
            v.push(qb);
            v.push(kb);
        }
        v
    }
}
