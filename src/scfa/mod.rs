//! Sparse causal flash attention (SCFA, Pagliardini et al. 2023): dynamic sparsity turned into a
//! reordering of rows plus per-row original positions, run through the flash-attention kernel.
//!
//! - [`sparse_causal_attn`]: the core op, on rows the caller already arranged.
//! - [`qk_sparse_attn`]: query/key dropping. Kept rows are compacted in time order (exclusive
//!   prefix sum), attended to causally on original positions, and scattered back; dropped
//!   queries output 0.
//! - [`hash_sparse_attn`]: angular-LSH bucket attention. Rows are sorted by (bucket, position)
//!   with a stable counting sort; a query sees the causally visible keys of its own bucket.
//!   [`hash_sparse_attn_with_buckets`] takes caller-made bucket ids instead.
//!
//! All pre- and post-processing (compaction, hashing, sorting, gathers, scatters) runs on the
//! tensors' device with O(t) work per `(batch, head)` and no device-to-host copy; the padded
//! length is `t` itself (trailing padding tiles are skipped by the kernel). The arrangement is a
//! [`RowOrder`] (positions and their inverse, computed once); every gather and scatter, forward
//! and backward, is one gather pass by one of its two indices that writes each row once (zero
//! rows included).
//!
//! Layout everywhere: q `(batch, q_heads, t, head_dim)`, k and v `(batch, kv_heads, t, head_dim)`
//! (GQA when `kv_heads` divides `q_heads`), output like q.

mod arranged;
mod hash;
mod index;
#[cfg(feature = "cuda")]
mod launch;
mod permute;
mod qk;
mod random;

use candle::{bail, Device, Result, Tensor};

pub(crate) use arranged::ArrangedAttn;
use arranged::{arranged_attention, arranged_taped};
pub use hash::{check_lsh_buckets, lsh_buckets, random_rotations, sort_by_bucket, MAX_BUCKETS};
use permute::permute_rows;
pub use permute::{gather_rows, scatter_rows};
pub use qk::compact_kept;
pub use random::random_keep;

use crate::flash::{self, Dims};
use crate::mask::{
    SparseLayout, Visibility, KEY_PAD_BUCKET, KEY_PAD_POS, QUERY_PAD_BUCKET, QUERY_PAD_POS,
};
use crate::tape::AttentionTape;

/// Whether a set of rows are queries or keys: selects the padding sentinels they get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// Query rows: padding position [`QUERY_PAD_POS`], padding bucket [`QUERY_PAD_BUCKET`].
    Query,
    /// Key/value rows: padding position [`KEY_PAD_POS`], padding bucket [`KEY_PAD_BUCKET`].
    Key,
}

impl RowKind {
    /// Position written into padding rows.
    pub fn pad_pos(self) -> i32 {
        match self {
            Self::Query => QUERY_PAD_POS,
            Self::Key => KEY_PAD_POS,
        }
    }

    /// Bucket id written into padding rows.
    pub fn pad_bucket(self) -> i32 {
        match self {
            Self::Query => QUERY_PAD_BUCKET,
            Self::Key => KEY_PAD_BUCKET,
        }
    }
}

/// An arrangement of the rows of every `(batch, head)`: compacted ([`compact_kept`]) or sorted
/// by bucket ([`sort_by_bucket`]). All tensors are `(batch, heads, t)` i32, contiguous, on the
/// device of the rows they arrange.
#[derive(Clone, Debug)]
pub struct RowOrder {
    /// Original step of every arranged row; padding rows hold the [`RowKind`]'s padding position.
    pub pos: Tensor,
    /// Arranged row of every original step, `-1` for dropped steps (the inverse of `pos`).
    pub inv: Tensor,
    /// Bucket id of every arranged row (sorted orders only); padding rows hold the
    /// [`RowKind`]'s padding bucket.
    pub bucket: Option<Tensor>,
}

impl RowOrder {
    /// Rows of `x` `(batch, heads, t, head_dim)` in this order (zero padding rows), one pass;
    /// differentiable in `x` (the backward is [`RowOrder::scatter`]).
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        permute_rows(x, &self.pos, &self.inv)
    }

    /// Arranged rows `x` `(batch, heads, t, head_dim)` back in original order, zero rows for
    /// dropped steps, one pass; differentiable in `x` (the backward is [`RowOrder::gather`]).
    pub fn scatter(&self, x: &Tensor) -> Result<Tensor> {
        permute_rows(x, &self.inv, &self.pos)
    }
}

/// Parameters shared by the SCFA entry points.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScfaParams {
    /// Multiplier of `q·k`; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Strict causality `q_pos > k_pos` (a query never sees its own step), for shared
    /// query/key projections; otherwise `q_pos >= k_pos`.
    pub strict: bool,
}

impl ScfaParams {
    fn scale(&self, head_dim: usize) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (head_dim as f32).sqrt())
    }
}

/// Configuration of [`hash_sparse_attn`].
#[derive(Clone, Debug)]
pub struct HashConfig {
    /// Number of buckets: even, in `2..=`[`MAX_BUCKETS`].
    pub n_buckets: usize,
    /// Seed of the random rotations when `rotations` is `None` ([`random_rotations`]). The
    /// rotations are a pure function of the seed: pass a new seed per call to re-draw them (the
    /// reference model does), or keep it to fix them.
    pub seed: u64,
    /// Caller rotations `(1 or kv_heads, head_dim, n_buckets / 2)` f32 on the device of q
    /// (columns should be L2-normalised); overrides `seed` and `per_head`.
    pub rotations: Option<Tensor>,
    /// One rotation per kv head (query heads use their kv head's); otherwise one for all heads.
    pub per_head: bool,
    /// Strict causality, see [`ScfaParams::strict`].
    pub strict: bool,
    /// Softmax scale, see [`ScfaParams::softmax_scale`].
    pub softmax_scale: Option<f32>,
}

impl HashConfig {
    /// `n_buckets` buckets, rotations per kv head drawn from `seed`, non-strict, default scale.
    pub fn new(n_buckets: usize, seed: u64) -> Self {
        Self {
            n_buckets,
            seed,
            rotations: None,
            per_head: true,
            strict: false,
            softmax_scale: None,
        }
    }

    fn params(&self) -> ScfaParams {
        ScfaParams {
            softmax_scale: self.softmax_scale,
            strict: self.strict,
        }
    }
}

/// The core SCFA op: attention over rows already arranged (compacted or sorted), masked on their
/// original positions and optional bucket ids.
///
/// - `q`: `(batch, q_heads, n_q, head_dim)`; `k`, `v`: `(batch, kv_heads, n_k, head_dim)`;
///   f32, f16 or bf16. Returns `(batch, q_heads, n_q, head_dim)` in the arranged order.
/// - `q_pos`: `(batch, q_heads, n_q)`, `k_pos`: `(batch, kv_heads, n_k)`, u8/u32/i32/i64:
///   original step of every row; query padding rows hold [`QUERY_PAD_POS`] (-1), key padding
///   rows [`KEY_PAD_POS`] (`i32::MAX`); real positions lie in `[0, i32::MAX)`.
/// - `buckets`: optional `(q_bucket, k_bucket)` ids with the shapes of `q_pos` / `k_pos`.
/// - Query `i` sees key `j` iff `q_pos[i] >= k_pos[j]` (`>` when `params.strict`) and, with
///   buckets, `q_bucket[i] == k_bucket[j]`. Rows that see no key output exactly 0 and get zero
///   gradients.
///
/// Arrangement (what the CUDA kernels' tile ranges rely on): in every `(batch, head)`, real rows
/// come first, ordered by (bucket, position) non-decreasing, then padding rows. On the CPU the
/// positions' ranges and this arrangement are validated; on CUDA, where that would need a host
/// sync, out-of-range positions become padding and the arrangement is the caller's promise.
///
/// Differentiable in q, k and v.
pub fn sparse_causal_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &Tensor,
    k_pos: &Tensor,
    buckets: Option<(&Tensor, &Tensor)>,
    params: &ScfaParams,
) -> Result<Tensor> {
    let dims = flash::validate(q, k, v)?;
    check_side(q_pos, "q_pos", q, (dims.b, dims.hq, dims.nq))?;
    check_side(k_pos, "k_pos", q, (dims.b, dims.hkv, dims.nk))?;
    let max = i32::MAX as i64;
    let q_pos = index::to_i32(q_pos, "q_pos", -1, max - 1, QUERY_PAD_POS)?;
    let k_pos = index::to_i32(k_pos, "k_pos", 0, max, KEY_PAD_POS)?;
    let buckets = match buckets {
        Some((qb, kb)) => {
            check_side(qb, "q_bucket", q, (dims.b, dims.hq, dims.nq))?;
            check_side(kb, "k_bucket", q, (dims.b, dims.hkv, dims.nk))?;
            Some((
                index::to_i32(qb, "q_bucket", i32::MIN as i64, max, QUERY_PAD_BUCKET)?,
                index::to_i32(kb, "k_bucket", i32::MIN as i64, max, KEY_PAD_BUCKET)?,
            ))
        }
        None => None,
    };
    if q.device().is_cpu() {
        let (qb, kb) = match &buckets {
            Some((qb, kb)) => (Some(qb), Some(kb)),
            None => (None, None),
        };
        check_arrangement(&q_pos, qb, RowKind::Query)?;
        check_arrangement(&k_pos, kb, RowKind::Key)?;
    }
    let layout = SparseLayout {
        q_pos,
        k_pos,
        buckets,
        strict: params.strict,
    };
    flash::attention(q, k, v, params.scale(dims.d), Visibility::Sparse(layout))
}

/// Query/key dropping attention (the paper's QK-sparse scheme).
///
/// - `q`: `(batch, q_heads, t, head_dim)`; `k`, `v`: `(batch, kv_heads, t, head_dim)`; f32, f16
///   or bf16. Returns `(batch, q_heads, t, head_dim)` in the original order.
/// - `q_keep`: `(batch, q_heads, t)` u8, `k_keep`: `(batch, kv_heads, t)` u8; non-zero = keep.
/// - Query `s` sees key `s'` iff both are kept and `s >= s'` (`>` when `params.strict`).
///   Dropped queries, and kept queries with no kept visible key, output 0.
///
/// Kept rows are compacted in time order ([`compact_kept`]), padded to `t` with zero rows,
/// attended with [`sparse_causal_attn`]'s kernel and scattered back, as one differentiable op
/// whose backward returns the gradients in the original order.
/// Differentiable in q, k and v; the masks get no gradient.
pub fn qk_sparse_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_keep: &Tensor,
    k_keep: &Tensor,
    params: &ScfaParams,
) -> Result<Tensor> {
    let (q_order, k_order, dims) = qk_orders(q, k, v, q_keep, k_keep)?;
    arranged_attention(q, k, v, &q_order, &k_order, params, dims)
}

/// [`qk_sparse_attn`] outside candle's autograd: the same output and an [`AttentionTape`] whose
/// backward gives the same `(dq, dk, dv)` (see [`crate::tape`]).
pub fn qk_sparse_attn_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_keep: &Tensor,
    k_keep: &Tensor,
    params: &ScfaParams,
) -> Result<(Tensor, AttentionTape)> {
    let (q_order, k_order, dims) = qk_orders(q, k, v, q_keep, k_keep)?;
    arranged_taped(q, k, v, &q_order, &k_order, params, dims)
}

/// Validates the inputs of [`qk_sparse_attn`] and compacts the kept rows.
fn qk_orders(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_keep: &Tensor,
    k_keep: &Tensor,
) -> Result<(RowOrder, RowOrder, Dims)> {
    let dims = flash::validate(q, k, v)?;
    let t = self_attention_len(&dims, q, k)?;
    for (mask, name, heads) in [(q_keep, "q_keep", dims.hq), (k_keep, "k_keep", dims.hkv)] {
        check_side(mask, name, q, (dims.b, heads, t))?;
        if mask.dtype() != candle::DType::U8 {
            bail!(
                "qk_sparse_attn: {name} must be u8, got {:?} with shape {:?}",
                mask.dtype(),
                mask.dims()
            )
        }
    }
    let q_order = compact_kept(q_keep, RowKind::Query)?;
    let k_order = compact_kept(k_keep, RowKind::Key)?;
    Ok((q_order, k_order, dims))
}

/// Hash-bucket attention with angular LSH (the paper's hash-sparse scheme).
///
/// - `q`: `(batch, q_heads, t, head_dim)`; `k`, `v`: `(batch, kv_heads, t, head_dim)`; f32, f16
///   or bf16. Returns `(batch, q_heads, t, head_dim)` in the original order.
/// - Buckets: `argmax([x·R, −x·R])` ([`lsh_buckets`]) for queries and keys with the same
///   rotation R (per kv head when `config.per_head`; a query head uses its kv head's), R from
///   `config.rotations` or drawn on the device from `config.seed` ([`random_rotations`]).
/// - Query `s` sees key `s'` iff they share a bucket and `s >= s'` (`>` when strict); queries
///   with no such key output 0.
///
/// Rows are sorted by (bucket, position) with a stable counting sort ([`sort_by_bucket`]),
/// attended, and scattered back. Differentiable in q, k and v (the bucket ids are not).
pub fn hash_sparse_attn(q: &Tensor, k: &Tensor, v: &Tensor, config: &HashConfig) -> Result<Tensor> {
    let (q_order, k_order, dims) = hash_orders(q, k, v, config)?;
    arranged_attention(q, k, v, &q_order, &k_order, &config.params(), dims)
}

/// [`hash_sparse_attn`] outside candle's autograd: the same output and an [`AttentionTape`]
/// whose backward gives the same `(dq, dk, dv)` (see [`crate::tape`]).
pub fn hash_sparse_attn_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    config: &HashConfig,
) -> Result<(Tensor, AttentionTape)> {
    let (q_order, k_order, dims) = hash_orders(q, k, v, config)?;
    arranged_taped(q, k, v, &q_order, &k_order, &config.params(), dims)
}

/// Validates the inputs of [`hash_sparse_attn`], hashes queries and keys and sorts them by
/// bucket.
fn hash_orders(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    config: &HashConfig,
) -> Result<(RowOrder, RowOrder, Dims)> {
    let dims = flash::validate(q, k, v)?;
    self_attention_len(&dims, q, k)?;
    hash::check_lsh_buckets(config.n_buckets)?;
    let rotations = match &config.rotations {
        Some(r) => {
            let half = config.n_buckets / 2;
            let heads = r.dims().first().copied().unwrap_or(0);
            if r.rank() != 3
                || r.dims()[1..] != [dims.d, half]
                || !(heads == 1 || heads == dims.hkv)
            {
                bail!(
                    "hash_sparse_attn: rotations must have shape (1 or {}, {}, {half}) for k {:?} and {} buckets, got {:?}",
                    dims.hkv,
                    dims.d,
                    k.dims(),
                    config.n_buckets,
                    r.dims()
                )
            }
            if !r.device().same_device(q.device()) {
                bail!(
                    "hash_sparse_attn: rotations are on {:?} but q is on {:?}",
                    r.device().location(),
                    q.device().location()
                )
            }
            r.clone()
        }
        None => {
            let heads = if config.per_head { dims.hkv } else { 1 };
            random_rotations(heads, dims.d, config.n_buckets, config.seed, q.device())?
        }
    };
    let q_ids = lsh_buckets(q, &rotations)?;
    let k_ids = lsh_buckets(k, &rotations)?;
    let (q_order, k_order) = bucket_orders(&q_ids, &k_ids, config.n_buckets)?;
    Ok((q_order, k_order, dims))
}

/// Hash-bucket attention with caller-made bucket ids.
///
/// - `q`, `k`, `v` as in [`hash_sparse_attn`].
/// - `q_bucket`: `(batch, q_heads, t)`, `k_bucket`: `(batch, kv_heads, t)`, u8/u32/i32/i64
///   ids in `[0, n_buckets)`, `n_buckets` in `1..=`[`MAX_BUCKETS`]. Out-of-range ids are an
///   error on the CPU; on CUDA (no host sync) such rows are dropped: they output 0 and are seen
///   by no query.
/// - Query `s` sees key `s'` iff `q_bucket[s] == k_bucket[s']` and `s >= s'` (`>` when strict).
pub fn hash_sparse_attn_with_buckets(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_bucket: &Tensor,
    k_bucket: &Tensor,
    n_buckets: usize,
    params: &ScfaParams,
) -> Result<Tensor> {
    let dims = flash::validate(q, k, v)?;
    let t = self_attention_len(&dims, q, k)?;
    if n_buckets == 0 || n_buckets > MAX_BUCKETS {
        bail!("hash_sparse_attn_with_buckets: n_buckets must be in 1..={MAX_BUCKETS}, got {n_buckets}")
    }
    check_side(q_bucket, "q_bucket", q, (dims.b, dims.hq, t))?;
    check_side(k_bucket, "k_bucket", q, (dims.b, dims.hkv, t))?;
    let hi = n_buckets as i64 - 1;
    let q_ids = index::to_i32(q_bucket, "q_bucket", 0, hi, -1)?;
    let k_ids = index::to_i32(k_bucket, "k_bucket", 0, hi, -1)?;
    let (q_order, k_order) = bucket_orders(&q_ids, &k_ids, n_buckets)?;
    arranged_attention(q, k, v, &q_order, &k_order, params, dims)
}

/// Query and key rows sorted by (bucket, position).
fn bucket_orders(q_ids: &Tensor, k_ids: &Tensor, n_buckets: usize) -> Result<(RowOrder, RowOrder)> {
    let q_order = sort_by_bucket(q_ids, n_buckets, RowKind::Query)?;
    let k_order = sort_by_bucket(k_ids, n_buckets, RowKind::Key)?;
    Ok((q_order, k_order))
}

/// The common length of q and k for the self-attention schemes.
fn self_attention_len(dims: &Dims, q: &Tensor, k: &Tensor) -> Result<usize> {
    if dims.nq != dims.nk {
        bail!(
            "sparse attention schemes need q and k of one length, got q {:?} and k {:?}",
            q.dims(),
            k.dims()
        )
    }
    if dims.nq >= i32::MAX as usize {
        bail!(
            "sequence length of q {:?} does not fit i32 positions",
            q.dims()
        )
    }
    Ok(dims.nq)
}

/// Shape and device of a side tensor (positions, bucket ids, keep mask).
fn check_side(t: &Tensor, name: &str, q: &Tensor, dims: (usize, usize, usize)) -> Result<()> {
    let expected = [dims.0, dims.1, dims.2];
    if t.dims() != expected {
        bail!(
            "{name} must have shape {expected:?} for q {:?}, got {:?}",
            q.dims(),
            t.dims()
        )
    }
    if !t.device().same_device(q.device()) {
        bail!(
            "{name} is on {:?} but q is on {:?}",
            t.device().location(),
            q.device().location()
        )
    }
    Ok(())
}

/// CPU check of the arrangement contract of [`sparse_causal_attn`]: per `(batch, head)`, real
/// rows first, ordered by (bucket, position), then padding rows.
fn check_arrangement(pos: &Tensor, bucket: Option<&Tensor>, kind: RowKind) -> Result<()> {
    let (b, h, n) = pos.dims3()?;
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<i32>();
    let p = host(pos)?;
    let bk = bucket.map(host).transpose()?;
    let name = match kind {
        RowKind::Query => "q",
        RowKind::Key => "k",
    };
    for row in 0..b * h {
        let mut prev: Option<(i32, i32)> = None;
        let mut padding = false;
        for i in row * n..(row + 1) * n {
            if p[i] == kind.pad_pos() {
                padding = true;
                continue;
            }
            let key = (bk.as_ref().map_or(0, |bk| bk[i]), p[i]);
            if padding || prev.is_some_and(|prev| prev > key) {
                bail!(
                    "sparse_causal_attn: {name} rows of (batch, head) {:?} in {:?} are not arranged: real rows must come first, ordered by (bucket, position), found (bucket, position) {key:?} at row {} after {}",
                    (row / h, row % h),
                    pos.dims(),
                    i - row * n,
                    if padding { "a padding row".to_string() } else { format!("{prev:?}") }
                )
            }
            prev = Some(key);
        }
    }
    Ok(())
}
