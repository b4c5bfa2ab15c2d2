//! Pluggable attention shared by every model of this crate.
//!
//! The pieces, from the outside in:
//! - [`AttentionKind`]: the serde-able choice stored in a model config (`{"kind": "dense"}`,
//!   `{"kind": "hash_sparse", "n_buckets": 8}`, ...), also parsed from the command line.
//! - [`AttentionBackend`]: the trait one attention method implements. Users can plug their own
//!   through [`Attention::with_backend`].
//! - [`Attention`]: what a model layer calls with already projected (and, for RoPE models,
//!   already rotated) queries, keys and values. It owns the backend and passes the layer's
//!   decode cache to it.
//! - Key scorers: a kind may need learned per-key scores computed from the layer input (SparseK:
//!   [`AttentionBackend::key_scorer`]). Each model layer then **owns** a [`SparseKScorer`]
//!   (created by [`Attention::new_scorer`] through the layer's VarBuilder, so it is trained and
//!   checkpointed with the model) and passes its scores to [`Attention::forward`]. Kinds without
//!   a scorer add no parameters.
//! - [`LayerCache`]: the decode state of one layer, **owned by the attention kind**. A backend
//!   creates one per layer ([`AttentionBackend::new_cache`], which receives the layer index) and
//!   receives it back on every cached call ([`AttentionBackend::forward_cached`]): the backend
//!   appends the new keys and values (the prompt at prefill, one token per decode step) and
//!   attends over everything cached. The default is the growing [`KvCache`] with the backend's
//!   own `forward`; methods with their own decode state (Twilight's paged INT4 cache, a per-head
//!   sink + ring buffer, ...) implement both methods with their own [`LayerCache`] type.
//! - [`KvCache`] and [`RotaryEmbedding`]: the dense decoding cache and RoPE, both
//!   differentiable where it matters (composite tensor ops only).
//!
//! Layout everywhere: `(batch, heads, seq, head_dim)`. Keys and values may have fewer heads than
//! the queries (grouped-query attention) as long as they divide the query heads.

use std::any::Any;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use candle::{bail, DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use candle_sparse_attn::moa::MoaPlan;
use candle_sparse_attn::scfa::random_keep;
use candle_sparse_attn::tape::AttentionTape;
use candle_sparse_attn::{
    flash_attn, flash_attn_taped, hash_sparse_attn, hash_sparse_attn_taped, qk_sparse_attn,
    qk_sparse_attn_taped, AttnParams, HashConfig, PackedHeads, ScfaParams, SparseKConfig,
    SparseKScorer, SparseKScorerConfig, TwilightConfig,
};
use serde::{Deserialize, Serialize};

use crate::moa::MoaAttention;
use crate::sparsek::SparseKAttention;
use crate::twilight::TwilightAttention;

/// Which attention method a model uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AttentionKind {
    /// Dense causal flash attention ([`candle_sparse_attn::flash_attn`]).
    Dense,
    /// Hash-sparse attention (SCFA): queries and keys are hashed into `n_buckets` buckets and
    /// attend only within their bucket (plus causality).
    HashSparse {
        /// Number of hash buckets, at least 1.
        n_buckets: usize,
    },
    /// QK-sparse attention (SCFA): a fraction of the query and key rows of every head is
    /// dropped, the rest attend causally.
    QkSparse {
        /// Fraction of query rows dropped per head, in `[0, 1)`.
        drop_q: f32,
        /// Fraction of key rows dropped per head, in `[0, 1)`.
        drop_k: f32,
    },
    /// Twilight decoding ([`crate::twilight`]): dense prefill, then per decode step a Quest base
    /// selector (top `base_budget` tokens by page bounds) pruned to the smallest set holding a
    /// fraction `p` of the estimated attention mass. Dense without a cache (training,
    /// full-sequence evaluation).
    Twilight {
        /// Top-p threshold in `(0, 1]` (`1`: no pruning, plain Quest).
        p: f32,
        /// Base selector budget `B0` in tokens, at least 1.
        base_budget: usize,
        /// Tokens per cache page (Quest granularity), at least 1.
        page_size: usize,
        /// The first `dense_layers` layers decode densely.
        dense_layers: usize,
        /// Leading pages Quest always keeps (the attention sink), inside the budget (default 1).
        #[serde(default = "default_sink_pages")]
        sink_pages: usize,
        /// Trailing pages Quest always keeps (the current page and those before it; default 1).
        #[serde(default = "default_recent_pages")]
        recent_pages: usize,
    },
    /// MoA ([`crate::moa`]): per kv head a sink plus a sliding band whose lengths come from a plan
    /// file resolved at `N = prompt + max_new_tokens`; the prompt uses the sink + band pattern,
    /// decoding a per-head sink + ring cache. Dense without a cache (training, full-sequence
    /// evaluation).
    Moa {
        /// Path of the plan JSON (the reference's `{"alphas": .., "betas": ..}` format).
        plan: PathBuf,
        /// New tokens the spans are resolved for (the reference's default is 1024).
        max_new_tokens: usize,
    },
    /// SparseK ([`crate::sparsek`]): each query attends to its last `window` keys plus the older
    /// keys that SPARSEK selects from learned per-kv-head key scores (budget `k`,
    /// [`candle_sparse_attn::sparsek_attn`]); every layer owns its scoring network. Trains end to
    /// end; decodes with a cache that evicts keys that can never be selected again. Refused by
    /// pretrained checkpoints, which have no trained scorer.
    #[serde(rename = "sparsek")]
    SparseK {
        /// SPARSEK budget: the soft selection over the older keys sums to `k` (at least 1).
        k: usize,
        /// Sliding window (the query's own key included); 0 means no window.
        window: usize,
    },
}

impl AttentionKind {
    /// Checks the parameters (bucket count at least 1, drop fractions in `[0, 1)`).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Dense => Ok(()),
            Self::HashSparse { n_buckets } => {
                candle_sparse_attn::scfa::check_lsh_buckets(*n_buckets)
            }
            Self::QkSparse { drop_q, drop_k } => {
                for (name, p) in [("drop_q", drop_q), ("drop_k", drop_k)] {
                    if !(0.0..1.0).contains(p) {
                        bail!("attention qk_sparse: {name} must be in [0, 1), got {p}")
                    }
                }
                Ok(())
            }
            Self::Twilight { .. } => self.twilight_config().map_or(Ok(()), |c| c.validate()),
            Self::Moa { plan, .. } => MoaPlan::load(plan).map(|_| ()),
            Self::SparseK { .. } => self
                .sparsek_config()
                .map_or(Ok(()), |c| c.validate(None))
                .map_err(|e| candle::Error::Msg(format!("attention {self}: {e}"))),
        }
    }

    /// The library configuration of a [`Self::SparseK`] kind (`K′ = 2k`, default scale; `None`
    /// for other kinds).
    pub fn sparsek_config(&self) -> Option<SparseKConfig> {
        match *self {
            Self::SparseK { k, window } => Some(SparseKConfig::new(k, window)),
            _ => None,
        }
    }

    /// The library configuration of a [`Self::Twilight`] kind (`None` for other kinds).
    pub fn twilight_config(&self) -> Option<TwilightConfig> {
        match *self {
            Self::Twilight {
                p,
                base_budget,
                page_size,
                dense_layers,
                sink_pages,
                recent_pages,
            } => Some(TwilightConfig {
                p,
                base_budget,
                page_size,
                dense_layers,
                sink_pages,
                recent_pages,
            }),
            _ => None,
        }
    }

    /// The backend implementing this kind (after [`Self::validate`]).
    pub fn backend(&self) -> Result<Arc<dyn AttentionBackend>> {
        self.validate()?;
        Ok(match self {
            Self::Dense => Arc::new(DenseAttention),
            Self::HashSparse { n_buckets } => Arc::new(HashSparseAttention {
                n_buckets: *n_buckets,
            }),
            Self::QkSparse { drop_q, drop_k } => Arc::new(QkSparseAttention {
                drop_q: *drop_q,
                drop_k: *drop_k,
            }),
            Self::Twilight { .. } => Arc::new(TwilightAttention::new(
                self.twilight_config().expect("twilight kind"),
            )?),
            Self::Moa {
                plan,
                max_new_tokens,
            } => Arc::new(MoaAttention {
                plan: Arc::new(MoaPlan::load(plan)?),
                max_new_tokens: *max_new_tokens,
            }),
            Self::SparseK { .. } => Arc::new(SparseKAttention {
                config: self.sparsek_config().expect("sparsek kind"),
            }),
        })
    }
}

/// Sink pages pinned by Twilight's Quest selector when a config leaves them out.
fn default_sink_pages() -> usize {
    TwilightConfig::default().sink_pages
}

/// Recent pages pinned by Twilight's Quest selector when a config leaves them out.
fn default_recent_pages() -> usize {
    TwilightConfig::default().recent_pages
}

/// The command-line spelling: `dense`, `hash_sparse:N_BUCKETS`, `qk_sparse:DROP_Q,DROP_K`,
/// `twilight:P,BASE_BUDGET,PAGE_SIZE,DENSE_LAYERS,SINK_PAGES,RECENT_PAGES`, `moa:PLAN_JSON,MAX_NEW_TOKENS`,
/// `sparsek:K,WINDOW`.
impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dense => write!(f, "dense"),
            Self::HashSparse { n_buckets } => write!(f, "hash_sparse:{n_buckets}"),
            Self::QkSparse { drop_q, drop_k } => write!(f, "qk_sparse:{drop_q},{drop_k}"),
            Self::Twilight {
                p,
                base_budget,
                page_size,
                dense_layers,
                sink_pages,
                recent_pages,
            } => write!(
                f,
                "twilight:{p},{base_budget},{page_size},{dense_layers},{sink_pages},{recent_pages}"
            ),
            Self::Moa {
                plan,
                max_new_tokens,
            } => write!(f, "moa:{},{max_new_tokens}", plan.display()),
            Self::SparseK { k, window } => write!(f, "sparsek:{k},{window}"),
        }
    }
}

/// Parses the [`Display`](fmt::Display) spelling (`-` may replace `_`), validating the values.
/// Twilight's last values may be left out: `twilight:P,BASE_BUDGET` means page size 16, 2 dense
/// layers (the paper's setting) and one pinned sink and recent page each; `moa:PLAN_JSON` means 1024 new tokens.
impl FromStr for AttentionKind {
    type Err = candle::Error;

    fn from_str(s: &str) -> Result<Self> {
        const FORMS: &str = "dense, hash_sparse:N_BUCKETS, qk_sparse:DROP_Q,DROP_K, \
                             twilight:P,BASE_BUDGET[,PAGE_SIZE[,DENSE_LAYERS[,SINK,RECENT]]], \
                             moa:PLAN_JSON[,MAX_NEW_TOKENS], sparsek:K,WINDOW";
        // A plan path is taken verbatim (no `-` to `_` normalisation).
        if let Some(a) = s.trim().strip_prefix("moa:") {
            let (plan, max_new_tokens) = match a.rsplit_once(',') {
                Some((p, n)) => (
                    p,
                    n.trim().parse().map_err(|e| {
                        candle::Error::Msg(format!("attention {s:?}: bad token count {n:?}: {e}"))
                    })?,
                ),
                None => (a, 1024),
            };
            let kind = Self::Moa {
                plan: PathBuf::from(plan.trim()),
                max_new_tokens,
            };
            kind.validate()?;
            return Ok(kind);
        }
        let normalized = s.trim().replace('-', "_");
        let (name, args) = match normalized.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (normalized.as_str(), None),
        };
        let kind = match (name, args) {
            ("dense", None) => Self::Dense,
            ("hash_sparse", Some(a)) => Self::HashSparse {
                n_buckets: a.trim().parse().map_err(|e| {
                    candle::Error::Msg(format!("attention {s:?}: bad bucket count {a:?}: {e}"))
                })?,
            },
            ("qk_sparse", Some(a)) => {
                let parts: Vec<&str> = a.split(',').map(str::trim).collect();
                let parse = |p: &str| {
                    p.parse::<f32>().map_err(|e| {
                        candle::Error::Msg(format!("attention {s:?}: bad drop fraction {p:?}: {e}"))
                    })
                };
                match parts.as_slice() {
                    [q, k] => Self::QkSparse {
                        drop_q: parse(q)?,
                        drop_k: parse(k)?,
                    },
                    _ => bail!("attention {s:?}: qk_sparse needs two fractions DROP_Q,DROP_K"),
                }
            }
            ("twilight", Some(a)) => {
                let parts: Vec<&str> = a.split(',').map(str::trim).collect();
                if !matches!(parts.len(), 2..=4 | 6) {
                    bail!(
                        "attention {s:?}: twilight needs \
                         P,BASE_BUDGET[,PAGE_SIZE[,DENSE_LAYERS[,SINK_PAGES,RECENT_PAGES]]]"
                    )
                }
                let count = |i: usize, what: &str, default: usize| -> Result<usize> {
                    parts.get(i).map_or(Ok(default), |p| {
                        p.parse().map_err(|e| {
                            candle::Error::Msg(format!("attention {s:?}: bad {what} {p:?}: {e}"))
                        })
                    })
                };
                let defaults = TwilightConfig::default();
                Self::Twilight {
                    p: parts[0].parse().map_err(|e| {
                        candle::Error::Msg(format!("attention {s:?}: bad p {:?}: {e}", parts[0]))
                    })?,
                    base_budget: count(1, "base budget", defaults.base_budget)?,
                    page_size: count(2, "page size", defaults.page_size)?,
                    dense_layers: count(3, "dense layer count", defaults.dense_layers)?,
                    sink_pages: count(4, "sink page count", defaults.sink_pages)?,
                    recent_pages: count(5, "recent page count", defaults.recent_pages)?,
                }
            }
            ("sparsek" | "sparse_k", Some(a)) => {
                let parts: Vec<&str> = a.split(',').map(str::trim).collect();
                let [k, window] = parts.as_slice() else {
                    bail!("attention {s:?}: sparsek needs K,WINDOW (e.g. sparsek:64,64)")
                };
                let count = |p: &str, what: &str| -> Result<usize> {
                    p.parse().map_err(|e| {
                        candle::Error::Msg(format!(
                            "attention {s:?}: bad sparsek {what} {p:?}: {e}"
                        ))
                    })
                };
                Self::SparseK {
                    k: count(k, "budget K")?,
                    window: count(window, "window")?,
                }
            }
            _ => bail!("unknown attention kind {s:?}; expected one of: {FORMS}"),
        };
        kind.validate()?;
        Ok(kind)
    }
}

/// Per-call settings handed to an [`AttentionBackend`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionCall<'a> {
    /// Multiplier of `q·k`; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Causal masking, aligned bottom-right when `q_len != kv_len` (KV-cache decoding).
    pub causal: bool,
    /// Whether the call is part of training (methods with random decisions may differ).
    pub train: bool,
    /// Deterministic seed for methods with random decisions (derived by the model from the run
    /// seed, the step and the layer, so resumed runs repeat them).
    pub seed: u64,
    /// Index of the calling layer in the model (kinds with per-layer settings, e.g. MoA plans).
    pub layer: usize,
    /// The layer's key scores `(batch, kv_heads, new_len)` f32 from its scorer, for kinds with a
    /// [key scorer](AttentionBackend::key_scorer) (`None` for the others).
    pub key_scores: Option<&'a Tensor>,
}

/// One attention method.
///
/// `forward` receives `q`: `(batch, q_heads, q_len, head_dim)` and `k`, `v`:
/// `(batch, kv_heads, kv_len, head_dim)` (kv_heads dividing q_heads, one dtype, one device) and
/// returns `(batch, q_heads, q_len, head_dim)` in the input dtype. It must be differentiable
/// (candle autograd) if the model is trained with it.
pub trait AttentionBackend: Send + Sync + fmt::Debug {
    /// A short human-readable name, used in errors and logs.
    fn name(&self) -> String;
    /// Whether `forward` accepts `q_len < kv_len` with keys and values from a KV cache.
    fn supports_kv_cache(&self) -> bool;
    /// Computes the attention output.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor>;

    /// [`Self::forward`] outside candle's autograd, for training passes that run their own
    /// backward (the GPT's fused pass): the same output and an [`AttentionTape`] whose
    /// [`grads`](AttentionTape::grads) give `dq`, `dk`, `dv` (and, for kinds with a
    /// [key scorer](Self::key_scorer), the gradient of [`AttentionCall::key_scores`], which the
    /// caller passes detached) directly, without autograd's zero fill and add per input gradient.
    /// `None` (the default) where the kind has no such path; the caller then differentiates
    /// [`Self::forward`] with autograd.
    fn forward_taped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        let _ = (q, k, v, call);
        Ok(None)
    }

    /// [`Self::forward_taped`] on queries, keys and values packed in the rows of one projection
    /// `qkv` `(batch, seq, width)` (layout [`PackedHeads`]), without splitting the heads out:
    /// the output `(batch, seq, q_heads·head_dim)` (heads merged) and a tape whose
    /// [`grads_qkvpacked`](AttentionTape::grads_qkvpacked) gives `dqkv` `(batch, seq, width)`.
    /// `None` (the default) where the kind has no such path; the caller then splits the heads and
    /// calls [`Self::forward_taped`].
    fn forward_taped_qkvpacked(
        &self,
        qkv: &Tensor,
        heads: PackedHeads,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        let _ = (qkv, heads, call);
        Ok(None)
    }

    /// The key scorer this kind needs in every layer of width `d_model` with `kv_heads` kv
    /// heads, or `None` (the default): the kind reads no [`AttentionCall::key_scores`] and adds
    /// no parameters. With `Some`, each model layer owns a [`SparseKScorer`] built from this
    /// config ([`Attention::new_scorer`]) and passes its scores of the layer input.
    fn key_scorer(&self, d_model: usize, kv_heads: usize) -> Option<SparseKScorerConfig> {
        let _ = (d_model, kv_heads);
        None
    }

    /// A new, empty decode cache for layer `layer` (0-based; kinds that treat layers differently,
    /// such as Twilight's dense first layers, read it here). The default, for backends that
    /// [support a KV cache](Self::supports_kv_cache), is a growing [`KvCache`]; otherwise an
    /// error.
    fn new_cache(&self, layer: usize) -> Result<Box<dyn LayerCache>> {
        if !self.supports_kv_cache() {
            bail!(
                "attention {} does not support a KV cache (layer {layer}); decode without one",
                self.name()
            )
        }
        Ok(Box::new(KvCache::new()))
    }

    /// Cached attention: appends `k`, `v` `(batch, kv_heads, new_len, head_dim)` to `cache` (made
    /// by [`Self::new_cache`]) and attends `q` `(batch, q_heads, q_len, head_dim)`, the last
    /// `q_len` positions, over everything cached (bottom-right causal alignment). The first call
    /// on an empty cache is the prefill. The default appends to a [`KvCache`] and calls
    /// [`Self::forward`] on the full keys and values.
    fn forward_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut dyn LayerCache,
        call: &AttentionCall,
    ) -> Result<Tensor> {
        let name = self.name();
        let cache = downcast_cache::<KvCache>(cache, &name)?;
        let (k, v) = cache.append(k, v)?;
        self.forward(q, &k, &v, call)
    }
}

/// The decode state of one attention layer, owned by its attention kind (see the module docs).
/// Created by [`AttentionBackend::new_cache`], filled and read by
/// [`AttentionBackend::forward_cached`].
pub trait LayerCache: fmt::Debug + Send + Sync {
    /// Number of cached positions (the position of the next token).
    fn len(&self) -> usize;

    /// Whether nothing is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything cached; the next call is a prefill at position 0.
    fn reset(&mut self);

    /// For sparse decoders: the fraction of the cached positions the last decode step attended
    /// to, averaged over batch and query heads, as a 0-dim f32 tensor on the device (reading it
    /// is the caller's sync point). `None` when the layer attends to everything (dense caches,
    /// dense layers) or no decode step ran since the last prefill.
    fn kept_fraction(&self) -> Option<Tensor> {
        None
    }

    /// The cache as [`Any`], so its backend can [downcast](downcast_cache) it.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// `cache` as the concrete type `T` its backend `backend` created, or an error naming both
/// (a cache from another attention kind was passed).
pub fn downcast_cache<'a, T: LayerCache + 'static>(
    cache: &'a mut dyn LayerCache,
    backend: &str,
) -> Result<&'a mut T> {
    let found = format!("{cache:?}");
    cache.as_any_mut().downcast_mut::<T>().ok_or_else(|| {
        let found: String = found.chars().take(80).collect();
        candle::Error::Msg(format!(
            "attention {backend}: expected a {} layer cache, got {found}",
            std::any::type_name::<T>()
        ))
    })
}

/// Dense flash attention from `candle_sparse_attn` (CPU and CUDA, with backward).
#[derive(Clone, Copy, Debug, Default)]
pub struct DenseAttention;

impl AttentionBackend for DenseAttention {
    fn name(&self) -> String {
        "dense".to_string()
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        flash_attn(q, k, v, &Self::params(call))
    }

    fn forward_taped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        flash_attn_taped(q, k, v, &Self::params(call)).map(Some)
    }
}

impl DenseAttention {
    fn params(call: &AttentionCall) -> AttnParams {
        AttnParams {
            softmax_scale: call.softmax_scale,
            causal: call.causal,
        }
    }
}

/// Hash-sparse attention (SCFA hash variant).
#[derive(Clone, Copy, Debug)]
pub struct HashSparseAttention {
    /// Number of hash buckets.
    pub n_buckets: usize,
}

impl AttentionBackend for HashSparseAttention {
    fn name(&self) -> String {
        format!("hash_sparse (n_buckets {})", self.n_buckets)
    }

    fn supports_kv_cache(&self) -> bool {
        false
    }

    /// Angular-LSH buckets with rotations drawn from `call.seed` (re-drawn every step, as in
    /// the reference model), then sparse causal flash attention inside each bucket.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        hash_sparse_attn(q, k, v, &self.config(call))
    }

    fn forward_taped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        hash_sparse_attn_taped(q, k, v, &self.config(call)).map(Some)
    }
}

impl HashSparseAttention {
    fn config(&self, call: &AttentionCall) -> HashConfig {
        let mut config = HashConfig::new(self.n_buckets, call.seed);
        config.softmax_scale = call.softmax_scale;
        config
    }
}

/// QK-sparse attention (SCFA query/key dropping).
#[derive(Clone, Copy, Debug)]
pub struct QkSparseAttention {
    /// Fraction of query rows dropped per head.
    pub drop_q: f32,
    /// Fraction of key rows dropped per head.
    pub drop_k: f32,
}

impl AttentionBackend for QkSparseAttention {
    fn name(&self) -> String {
        format!("qk_sparse (drop_q {}, drop_k {})", self.drop_q, self.drop_k)
    }

    fn supports_kv_cache(&self) -> bool {
        false
    }

    /// Drops `drop_q` / `drop_k` of the (token, head) rows at random (seeded by `call.seed`, so
    /// resumed runs repeat the choice; in training and evaluation alike, as in the reference),
    /// then runs sparse causal flash attention over the kept rows. Dropped queries output 0.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, call: &AttentionCall) -> Result<Tensor> {
        let (q_keep, k_keep, params) = self.masks(q, k, call)?;
        qk_sparse_attn(q, k, v, &q_keep, &k_keep, &params)
    }

    fn forward_taped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &AttentionCall,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        let (q_keep, k_keep, params) = self.masks(q, k, call)?;
        qk_sparse_attn_taped(q, k, v, &q_keep, &k_keep, &params).map(Some)
    }
}

impl QkSparseAttention {
    /// The keep masks of queries and keys (drawn on the device: no host generator, no copy in
    /// the middle of the forward pass) and the SCFA parameters.
    fn masks(
        &self,
        q: &Tensor,
        k: &Tensor,
        call: &AttentionCall,
    ) -> Result<(Tensor, Tensor, ScfaParams)> {
        let keep = |x: &Tensor, drop: f32, seed: u64| -> Result<Tensor> {
            let (b, h, t, _) = x.dims4()?;
            random_keep((b, h, t), drop, seed, x.device())
        };
        let q_keep = keep(q, self.drop_q, call.seed)?;
        let k_keep = keep(k, self.drop_k, call.seed.wrapping_add(1))?;
        let params = ScfaParams {
            softmax_scale: call.softmax_scale,
            strict: false,
        };
        Ok((q_keep, k_keep, params))
    }
}

/// A growing key/value cache for one attention layer: `(batch, kv_heads, len, head_dim)` each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything cached.
    pub fn reset(&mut self) {
        self.kv = None;
    }

    /// Appends `k`, `v` (`(batch, kv_heads, new_len, head_dim)`) along the sequence axis and
    /// returns the full cached keys and values.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.kv {
            None => (k.contiguous()?, v.contiguous()?),
            Some((ck, cv)) => {
                if ck.dims()[..2] != k.dims()[..2] || ck.dim(3)? != k.dim(3)? {
                    bail!(
                        "kv cache: new keys {:?} do not match the cached keys {:?}",
                        k.dims(),
                        ck.dims()
                    )
                }
                (Tensor::cat(&[ck, k], 2)?, Tensor::cat(&[cv, v], 2)?)
            }
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

impl LayerCache for KvCache {
    fn len(&self) -> usize {
        KvCache::len(self)
    }

    fn reset(&mut self) {
        KvCache::reset(self)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Rotary position embedding (rotate-half convention of Llama / Hugging Face), computed as
/// composite tensor ops so it is differentiable. Tables are plain tensors, never parameters.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    /// `(max_len, head_dim / 2)` f32.
    cos: Tensor,
    /// `(max_len, head_dim / 2)` f32.
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for positions `0..max_len` with frequencies `theta^(-2i/head_dim)`.
    pub fn new(head_dim: usize, max_len: usize, theta: f32, device: &Device) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            bail!("rotary embedding: head_dim must be even, got {head_dim}")
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| theta.powf(-((2 * i) as f32) / head_dim as f32))
            .collect();
        Self::from_inv_freq(&inv_freq, max_len, device)
    }

    /// Tables for positions `0..max_len` with the given per-pair frequencies (`head_dim / 2` of
    /// them), for scaled variants such as Llama 3's frequency-dependent scaling.
    pub fn from_inv_freq(inv_freq: &[f32], max_len: usize, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        if half == 0 {
            bail!("rotary embedding: no frequencies given")
        }
        let inv_freq = Tensor::from_vec(inv_freq.to_vec(), (1, half), device)?;
        let positions = Tensor::arange(0u32, max_len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// Rotates `x`: `(batch, heads, seq, head_dim)` at positions `offset..offset + seq`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, seq, head_dim) = x.dims4()?;
        let max_len = self.cos.dim(0)?;
        if offset + seq > max_len {
            bail!(
                "rotary embedding: positions {offset}..{} exceed the table length {max_len}",
                offset + seq
            )
        }
        if head_dim != 2 * self.cos.dim(1)? {
            bail!(
                "rotary embedding: head_dim {head_dim} does not match the table ({})",
                2 * self.cos.dim(1)?
            )
        }
        let half = head_dim / 2;
        let cos = self.cos.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)
    }
}

/// The attention step of a transformer layer: backend dispatch plus KV-cache handling.
#[derive(Clone, Debug)]
pub struct Attention {
    backend: Arc<dyn AttentionBackend>,
    softmax_scale: Option<f32>,
}

impl Attention {
    /// Attention of the given kind with the default `1/sqrt(head_dim)` scale.
    pub fn new(kind: &AttentionKind) -> Result<Self> {
        Ok(Self::with_backend(kind.backend()?))
    }

    /// Attention through a user-supplied backend.
    pub fn with_backend(backend: Arc<dyn AttentionBackend>) -> Self {
        Self {
            backend,
            softmax_scale: None,
        }
    }

    /// Overrides the softmax scale (`None`: `1/sqrt(head_dim)`).
    pub fn with_softmax_scale(mut self, softmax_scale: Option<f32>) -> Self {
        self.softmax_scale = softmax_scale;
        self
    }

    /// The backend in use.
    pub fn backend(&self) -> &Arc<dyn AttentionBackend> {
        &self.backend
    }

    /// Whether decoding may use a cache ([`Self::new_cache`]).
    pub fn supports_kv_cache(&self) -> bool {
        self.backend.supports_kv_cache()
    }

    /// A new, empty decode cache for layer `layer` (see [`AttentionBackend::new_cache`]).
    pub fn new_cache(&self, layer: usize) -> Result<Box<dyn LayerCache>> {
        self.backend.new_cache(layer)
    }

    /// The key scorer of one layer (width `d_model`, `kv_heads` kv heads), its parameters created
    /// or loaded through `vb` (the layer's attention prefix; names `weight`, `bias`, `slope`), or
    /// `None` for kinds without one ([`AttentionBackend::key_scorer`]).
    pub fn new_scorer(
        &self,
        d_model: usize,
        kv_heads: usize,
        vb: VarBuilder,
    ) -> Result<Option<SparseKScorer>> {
        self.backend
            .key_scorer(d_model, kv_heads)
            .map(|cfg| SparseKScorer::new(cfg, vb))
            .transpose()
    }

    /// Attention of `kind` for a pretrained checkpoint of `model` (width `d_model`, `kv_heads` kv
    /// heads). Kinds with a key scorer (SparseK) are refused: the checkpoint has no trained
    /// scorer, and an untrained one (random, or zero, which leaves only the position slope: a
    /// soft recency ramp over the `2k` newest older keys) would silently change what the model
    /// attends to; these models are not trained here either, so it could not be fine-tuned.
    pub fn for_pretrained(
        kind: &AttentionKind,
        model: &str,
        d_model: usize,
        kv_heads: usize,
    ) -> Result<Self> {
        let attention = Self::new(kind)?;
        if attention.backend.key_scorer(d_model, kv_heads).is_some() {
            bail!(
                "{model}: attention {kind} needs a key scoring network trained with the model, \
                 and pretrained checkpoints have none; train a model with it (the char-level \
                 GPT, examples/train_char_lm.rs) or pick another attention kind"
            )
        }
        Ok(attention)
    }

    /// Causal attention of `q` `(batch, q_heads, seq, head_dim)` over `k`, `v`
    /// `(batch, kv_heads, seq, head_dim)` of the same positions, without a cache and outside
    /// candle's autograd ([`AttentionBackend::forward_taped`]): the output and its tape, or
    /// `None` for kinds without that path. `key_scores` `(batch, kv_heads, seq)` f32, detached,
    /// are the layer scorer's scores, required by kinds with a
    /// [key scorer](AttentionBackend::key_scorer); their gradient is the tape's `dscores`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_taped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_scores: Option<&Tensor>,
        layer: usize,
        train: bool,
        seed: u64,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        let call = self.whole_sequence_call(key_scores, layer, train, seed);
        self.backend.forward_taped(q, k, v, &call)
    }

    /// The [`AttentionCall`] of a causal call over one whole sequence (the taped paths).
    fn whole_sequence_call<'a>(
        &self,
        key_scores: Option<&'a Tensor>,
        layer: usize,
        train: bool,
        seed: u64,
    ) -> AttentionCall<'a> {
        AttentionCall {
            softmax_scale: self.softmax_scale,
            causal: true,
            train,
            seed,
            layer,
            key_scores,
        }
    }

    /// [`Self::forward_taped`] on heads packed in the rows of `qkv` `(batch, seq, width)`
    /// ([`AttentionBackend::forward_taped_qkvpacked`]): the output `(batch, seq,
    /// q_heads·head_dim)` and its tape, or `None` for kinds without that path.
    pub fn forward_taped_qkvpacked(
        &self,
        qkv: &Tensor,
        heads: PackedHeads,
        key_scores: Option<&Tensor>,
        layer: usize,
        train: bool,
        seed: u64,
    ) -> Result<Option<(Tensor, AttentionTape)>> {
        let call = self.whole_sequence_call(key_scores, layer, train, seed);
        self.backend.forward_taped_qkvpacked(qkv, heads, &call)
    }

    /// Causal attention of `q` `(batch, q_heads, q_len, head_dim)` over `k`, `v`
    /// `(batch, kv_heads, new_len, head_dim)` (RoPE already applied). With a cache (from
    /// [`Self::new_cache`]), the backend appends `k`, `v` to it and the queries are the last
    /// `q_len` positions (bottom-right causal alignment). `key_scores` `(batch, kv_heads,
    /// new_len)` f32 are the layer scorer's scores of the new tokens, required by kinds with a
    /// [key scorer](AttentionBackend::key_scorer); `layer` is the calling layer's index.
    /// Returns `(batch, q_heads, q_len, head_dim)`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_scores: Option<&Tensor>,
        cache: Option<&mut dyn LayerCache>,
        layer: usize,
        train: bool,
        seed: u64,
    ) -> Result<Tensor> {
        let call = AttentionCall {
            softmax_scale: self.softmax_scale,
            causal: true,
            train,
            seed,
            layer,
            key_scores,
        };
        match cache {
            None => self.backend.forward(q, k, v, &call),
            Some(cache) => {
                if !self.backend.supports_kv_cache() {
                    bail!(
                        "attention {} does not support a KV cache; decode without one",
                        self.backend.name()
                    )
                }
                self.backend.forward_cached(q, k, v, cache, &call)
            }
        }
    }
}
