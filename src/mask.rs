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
