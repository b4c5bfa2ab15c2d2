//! The fused training pass of a [`Gpt`]: the forward pass keeping what the backward needs, then
//! a hand-written backward through the blocks, without candle's autograd for the model body.
//!
//! candle's autograd gives every node's input gradient a zero fill and an add, and every op of the
//! model body is a node (the residual adds, the position broadcast, the casts of the weights, the
//! head's cast and cross-entropy). This pass calls the fused ops' backward kernels directly
//! ([`fused::layer_norm_backward_add`], [`fused::gelu_linear_backward`],
//! [`fused::linear_backward`], [`fused::embedding_backward`]; the MLP's GELU and its gradient
//! ride in the GEMMs' epilogues, [`fused::linear_gelu`]): the residual gradient is passed along
//! (each LayerNorm's input gradient added to it in the LayerNorm's backward kernel), each weight
//! gradient is one matmul (returned as f32), and the loss and the logit gradient come from one
//! softmax cross-entropy kernel ([`fused::cross_entropy_with_grad`]).
//!
//! The attention stays pluggable. Kinds with a taped path
//! ([`AttentionBackend::forward_taped`](crate::attention::AttentionBackend::forward_taped): dense,
//! hash-sparse, QK-sparse, SparseK) run outside autograd when the layer has no RoPE, and their
//! tape returns dq, dk, dv directly. A layer with a key scorer (SparseK) has the scorer's weight
//! rows folded into its q/k/v projection (one GEMM gives q, k, v and the scores' linear part,
//! [`SparseKScorer::scores_from_linear`]); the tape's scores' gradient joins the projection's
//! gradient ([`SparseKScorer::backward_linear`], [`fused::merge_qkv_with`]), so the backward GEMMs
//! give the scorer's input and weight their gradients. Kinds with a packed path
//! ([`AttentionBackend::forward_taped_qkvpacked`](crate::attention::AttentionBackend::forward_taped_qkvpacked):
//! SparseK) take the projection's rows as they are: no head split before the attention and no
//! merge after it, in either pass; their tape's `dqkv` has the projection's layout, and the
//! scorer's gradient columns are written into it. Otherwise (RoPE, or a kind
//! without a taped path) each layer runs its
//! [`AttentionBackend`](crate::attention::AttentionBackend) (with RoPE and the kind's key scorer)
//! under a local candle autograd on detached queries, keys and values (fresh leaves written by
//! [`fused::split_qkv`], their gradients merged back by [`fused::merge_qkv`]; and the scorer's
//! input), differentiated by [`fused::backward_from`] seeded with the attention output's gradient.
//! So every attention kind, a user's own included, trains through it, and the scorer's
//! parameters get their gradients from that local graph.
//!
//! [`SparseKScorer::scores_from_linear`]: candle_sparse_attn::SparseKScorer::scores_from_linear
//! [`SparseKScorer::backward_linear`]: candle_sparse_attn::SparseKScorer::backward_linear
//!
//! The loss and gradients are those of `Gpt::loss(..).backward()` (the reference, which the tests
//! compare against for every attention kind), with the same dropout masks and random attention
//! decisions for a seed. The pass covers what training does (whole sequences from position 0,
//! no KV cache); inference and evaluation use [`Gpt::forward`] / [`Gpt::loss`].

use candle::backprop::GradStore;
use candle::{bail, DType, Result, Tensor, Var};
use candle_sparse_attn::fused;

use candle_sparse_attn::tape::{AttentionGrads, AttentionTape};
use candle_sparse_attn::PackedHeads;

use crate::gpt::{Block, Gpt, LN_EPS};
use crate::layers::{apply_dropout, dropout_keep, mix_seed};

/// One block's parameters in the compute dtype, detached from autograd.
#[derive(Clone)]
struct BlockWeights {
    ln_1: Tensor,
    c_attn: Tensor,
    attn_proj: Tensor,
    ln_2: Tensor,
    c_fc: Tensor,
    mlp_proj: Tensor,
}

/// One layer's attention as the backward needs it.
enum LayerAttention {
    /// Run outside autograd
    /// ([`AttentionBackend::forward_taped`](crate::attention::AttentionBackend::forward_taped)):
    /// the output `(b, h, t, d)` and the tape its gradients come from; for kinds with a key
    /// scorer the tape also returns the scores' gradient, which the scorer's own backward
    /// ([`SparseKScorer::backward`](candle_sparse_attn::SparseKScorer::backward)) takes on.
    Taped { y: Tensor, tape: AttentionTape },
    /// Run outside autograd on the q/k/v projection's rows in place
    /// ([`AttentionBackend::forward_taped_qkvpacked`](crate::attention::AttentionBackend::forward_taped_qkvpacked)):
    /// the output with heads merged `(b, t, h·d)` and the tape its `dqkv` comes from.
    Packed { y: Tensor, tape: AttentionTape },
    /// Run under a local autograd graph (RoPE, or a kind without a taped path).
    Graph {
        /// Queries, keys, values `(b, h, t, d)` before RoPE.
        q: Var,
        k: Var,
        v: Var,
        /// The key scorer's input (the attention LayerNorm's output), for kinds with a scorer.
        h: Option<Var>,
        /// The attention output `(b, h, t, d)`, tracked back to the leaves.
        y: Tensor,
    },
}

impl LayerAttention {
    /// The attention output with heads merged, `(b, t, h·d)`, detached.
    fn merged_output(&self) -> Result<Tensor> {
        match self {
            Self::Packed { y, .. } => Ok(y.detach()),
            Self::Taped { y, .. } | Self::Graph { y, .. } => fused::merge_heads(&y.detach()),
        }
    }
}

/// The scorer's share of a local backward `local` whose graph holds the scorer's input `h`: adds
/// `h`'s gradient to `dh1` (the attention LayerNorm's output gradient, `(b, t, c)` in its dtype)
/// and inserts the scorer parameters' gradients (f32) into `grads`.
fn local_scorer_grads(
    local: &GradStore,
    h: &Var,
    blk: &Block,
    mut dh1: Tensor,
    grads: &mut GradStore,
) -> Result<Tensor> {
    if let Some(g) = local.get(h.as_tensor()) {
        let g = g.to_dtype(dh1.dtype())?;
        dh1 = (dh1 + g)?;
    }
    for (_, var) in &blk.scorer_params {
        if let Some(g) = local.get(var.as_tensor()) {
            grads.insert(var.as_tensor(), g.to_dtype(DType::F32)?);
        }
    }
    Ok(dh1)
}

/// The gradient of the q/k/v projection from q, k and v's `(b, h, t, d)`, with `fold` zero
/// columns after them when the projection has a folded scorer whose scores got no gradient.
fn qkv_grad(dq: &Tensor, dk: &Tensor, dv: &Tensor, fold: usize) -> Result<Tensor> {
    if fold == 0 {
        return fused::merge_qkv(dq, dk, dv);
    }
    let (b, _, t, _) = dq.dims4()?;
    let zeros = Tensor::zeros((b, t, fold), dq.dtype(), dq.device())?;
    fused::merge_qkv_with(dq, dk, dv, &zeros)
}

/// What the backward of one block needs (all `(b, t, ·)` in the compute dtype).
struct SavedBlock {
    w: BlockWeights,
    /// Block input (the attention LayerNorm's input).
    x_in: Tensor,
    /// The attention LayerNorm's output.
    h1: Tensor,
    attn: LayerAttention,
    /// The attention output with heads merged, `(b, t, c)`.
    y_merged: Tensor,
    keep_attn: Option<Tensor>,
    /// The residual stream after the attention (the MLP LayerNorm's input).
    x_mid: Tensor,
    /// The MLP LayerNorm's output.
    h2: Tensor,
    /// The MLP up projection before and after GELU, `(b, t, 4c)`.
    fc: Tensor,
    act: Tensor,
    keep_mlp: Option<Tensor>,
}

/// A forward pass of [`Gpt::training_pass`] waiting for its [`TrainingPass::backward`].
pub struct TrainingPass<'a> {
    model: &'a Gpt,
    loss: Tensor,
    /// Token ids `(b·t,)`.
    ids: Tensor,
    dims: (usize, usize),
    dropout: f32,
    /// Token embeddings (and head) in the compute dtype.
    wte: Tensor,
    keep_emb: Option<Tensor>,
    blocks: Vec<SavedBlock>,
    /// Input and output of the final LayerNorm, and its gain.
    xf_in: Tensor,
    xf: Tensor,
    ln_f: Tensor,
    /// Gradient of the mean loss with respect to the logits, `(b, t, vocab)`.
    dlogits: Tensor,
}

impl std::fmt::Debug for TrainingPass<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingPass")
            .field("dims", &self.dims)
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl Gpt {
    /// The forward pass of training on `inputs` and `targets` `(batch, seq)` u32 (positions
    /// `0..seq`, `seq ≤ block_size`), keeping the activations the backward needs: the mean
    /// cross-entropy is [`TrainingPass::loss`], the parameters' gradients come from
    /// [`TrainingPass::backward`]. Same loss, gradients, dropout masks (`seed`, when `train`) and
    /// random attention decisions as [`Gpt::loss`] followed by candle's `backward`, which stays
    /// the reference (see the module docs).
    pub fn training_pass(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        train: bool,
        seed: u64,
    ) -> Result<TrainingPass<'_>> {
        let (b, t) = inputs.dims2()?;
        let cfg = &self.config;
        if targets.dims() != [b, t] {
            bail!(
                "gpt training pass: targets {:?} must match inputs {:?}",
                targets.dims(),
                inputs.dims()
            )
        }
        if t > cfg.block_size {
            bail!(
                "gpt training pass: sequence length {t} exceeds block_size {}",
                cfg.block_size
            )
        }
        let (dt, dev, c) = (self.compute_dtype, &self.device, cfg.n_embd);
        let p = if train { cfg.dropout } else { 0.0 };
        let ids = inputs.flatten_all()?;
        // Every weight in the compute dtype, cast in one launch into one buffer: the token table;
        // per block ln_1, c_attn, then (with a key scorer) the scorer's weight rows and zero rows
        // up to a row width that is a multiple of 64 (128-byte rows in bf16: SparseK's kernels read
        // q, k, v and write their gradients in place, and rows that straddle 128-byte lines cost
        // them extra memory transactions), attn_proj, ln_2, c_fc, mlp_proj; ln_f; the positions.
        // c_attn with the rows after it is the folded projection: one GEMM gives q, k, v and the
        // scores' linear part ([`SparseKScorer::scores_from_linear`]), and its backward GEMMs the
        // scorer input's and weight's gradients, instead of the scorer's own three kernels.
        let detached = |v: &Var| v.as_tensor().detach();
        let fold_pad = |rows: usize| (64 - rows % 64) % 64;
        let mut params: Vec<Tensor> = vec![detached(&self.wte)];
        for blk in &self.blocks {
            params.extend([detached(&blk.ln_1), detached(&blk.c_attn)]);
            if let Some(scorer) = &blk.scorer {
                params.push(scorer.params()[0].detach());
                let pad = fold_pad(blk.c_attn.dim(0)? + scorer.kv_heads());
                if pad > 0 {
                    params.push(Tensor::zeros((pad, c), DType::F32, dev)?);
                }
            }
            params.extend([&blk.attn_proj, &blk.ln_2, &blk.c_fc, &blk.mlp_proj].map(detached));
        }
        params.push(detached(&self.ln_f));
        params.extend(self.wpe.iter().map(detached));
        let all = fused::cast_concat(&params, dt)?;
        let mut at = 0;
        let mut take = |dims: &[usize]| -> Result<Tensor> {
            let n = dims.iter().product();
            let t = all.narrow(0, at, n)?.reshape(dims)?;
            at += n;
            Ok(t)
        };
        let wte = take(self.wte.dims())?;
        let weights = self
            .blocks
            .iter()
            .map(|blk| {
                let ln_1 = take(blk.ln_1.dims())?;
                let rows = blk.c_attn.dim(0)?;
                let fold = blk.scorer.as_ref().map_or(0, |s| {
                    let h = s.kv_heads();
                    h + fold_pad(rows + h)
                });
                let c_attn = take(&[rows + fold, c])?;
                Ok(BlockWeights {
                    ln_1,
                    c_attn,
                    attn_proj: take(blk.attn_proj.dims())?,
                    ln_2: take(blk.ln_2.dims())?,
                    c_fc: take(blk.c_fc.dims())?,
                    mlp_proj: take(blk.mlp_proj.dims())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = take(self.ln_f.dims())?;
        let wpe = self.wpe.as_ref().map(|v| take(v.dims())).transpose()?;
        // The gain of the LayerNorm after each residual add: the next block's ln_1, then ln_f.
        let next_gain = |i: usize| weights.get(i).map_or(&ln_f, |w| &w.ln_1);
        let emb = fused::embedding(&wte, &ids)?.reshape((b, t, c))?;
        let keep_emb = dropout_keep(emb.shape(), dt, p, mix_seed(&[seed, 0]), dev)?;
        // x: the residual stream; h: its LayerNorm by the next gain (computed with the add).
        let (mut x, mut h) = match (&wpe, &keep_emb) {
            (Some(wpe), None) => {
                let pos = wpe.narrow(0, 0, t)?;
                fused::add_layer_norm(&emb, &pos, next_gain(0), LN_EPS)?
            }
            _ => {
                let x = match &wpe {
                    Some(wpe) => emb.broadcast_add(&wpe.narrow(0, 0, t)?)?,
                    None => emb,
                };
                let x = apply_dropout(&x, keep_emb.as_ref(), p)?;
                let h = fused::layer_norm(&x, next_gain(0), LN_EPS)?;
                (x, h)
            }
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, (blk, w)) in self.blocks.iter().zip(weights.iter()).enumerate() {
            let layer_seed = |k: u64| mix_seed(&[seed, 1 + i as u64, k]);
            let h1 = h;
            let qkv = fused::linear(&h1, &w.c_attn)?;
            let attn = self.attend(blk, i, &h1, &qkv, train, layer_seed(0))?;
            let y_merged = attn.merged_output()?;
            let y = fused::linear(&y_merged, &w.attn_proj)?;
            let keep_attn = dropout_keep(y.shape(), dt, p, layer_seed(1), dev)?;
            let y = apply_dropout(&y, keep_attn.as_ref(), p)?;
            let (x_mid, h2) = fused::add_layer_norm(&x, &y, &w.ln_2, LN_EPS)?;
            let (fc, act) = fused::linear_gelu(&h2, &w.c_fc)?;
            let m = fused::linear(&act, &w.mlp_proj)?;
            let keep_mlp = dropout_keep(m.shape(), dt, p, layer_seed(2), dev)?;
            let m = apply_dropout(&m, keep_mlp.as_ref(), p)?;
            let (x_out, h_next) = fused::add_layer_norm(&x_mid, &m, next_gain(i + 1), LN_EPS)?;
            h = h_next;
            blocks.push(SavedBlock {
                w: w.clone(),
                x_in: std::mem::replace(&mut x, x_out),
                h1,
                attn,
                y_merged,
                keep_attn,
                x_mid,
                h2,
                fc,
                act,
                keep_mlp,
            });
        }
        let xf = h;
        let logits = fused::linear(&xf, &wte)?.reshape((b * t, cfg.vocab_size))?;
        let scale = 1.0 / (b * t).max(1) as f32;
        let (losses, dlogits) =
            fused::cross_entropy_with_grad(&logits, &targets.flatten_all()?, scale)?;
        Ok(TrainingPass {
            model: self,
            loss: losses.mean_all()?,
            ids,
            dims: (b, t),
            dropout: p,
            wte,
            keep_emb,
            blocks,
            xf_in: x,
            xf,
            ln_f,
            dlogits: dlogits.reshape((b, t, cfg.vocab_size))?,
        })
    }

    /// One layer's attention on queries, keys and values split from `qkv` `(b, t, 3c)`, with the
    /// key scores of the scorer's input `h1` for kinds with a scorer: outside autograd when the
    /// kind has a taped path and the layer needs no RoPE (the scores too), otherwise (RoPE,
    /// backend) under a local graph on fresh leaves q, k, v and `h1` that the scores join.
    fn attend(
        &self,
        blk: &Block,
        layer: usize,
        h1: &Tensor,
        qkv: &Tensor,
        train: bool,
        seed: u64,
    ) -> Result<LayerAttention> {
        let (c, n_head) = (self.config.n_embd, self.config.n_head);
        let qkv_width = 3 * c;
        // Without RoPE the kind's taped paths run (the scores outside autograd too): on the
        // projection's rows as they are where the kind has that path, else on the split heads.
        // The scorer is folded into the projection: its linear part is the next columns.
        let taped_scores = match (&self.rope, &blk.scorer) {
            (None, Some(s)) => {
                let lin = qkv.narrow(2, qkv_width, s.kv_heads())?;
                Some(s.scores_from_linear(&lin, 0)?)
            }
            _ => None,
        };
        if self.rope.is_none() {
            let heads = PackedHeads {
                q_heads: n_head,
                kv_heads: n_head,
                head_dim: c / n_head,
            };
            let packed = self.attention.forward_taped_qkvpacked(
                qkv,
                heads,
                taped_scores.as_ref(),
                layer,
                train,
                seed,
            )?;
            if let Some((y, tape)) = packed {
                return Ok(LayerAttention::Packed { y, tape });
            }
        }
        let [q, k, v] = fused::split_qkv(&qkv.narrow(2, 0, qkv_width)?, n_head)?;
        if self.rope.is_none() {
            let taped = self.attention.forward_taped(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                taped_scores.as_ref(),
                layer,
                train,
                seed,
            )?;
            if let Some((y, tape)) = taped {
                return Ok(LayerAttention::Taped { y, tape });
            }
        }
        let scores = match &blk.scorer {
            Some(scorer) => {
                let h = Var::from_tensor(h1)?;
                let scores = scorer.forward_at(h.as_tensor(), 0)?;
                Some((h, scores))
            }
            None => None,
        };
        let (mut qr, mut kr) = (q.as_tensor().clone(), k.as_tensor().clone());
        if let Some(rope) = &self.rope {
            qr = rope.apply(&qr, 0)?;
            kr = rope.apply(&kr, 0)?;
        }
        let y = self.attention.forward(
            &qr,
            &kr,
            v.as_tensor(),
            scores.as_ref().map(|(_, s)| s),
            None,
            layer,
            train,
            seed,
        )?;
        let h = scores.map(|(h, _)| h);
        Ok(LayerAttention::Graph { q, k, v, h, y })
    }
}

impl TrainingPass<'_> {
    /// The mean cross-entropy (nats per token), a scalar f32.
    pub fn loss(&self) -> &Tensor {
        &self.loss
    }

    /// The gradients of [`Self::loss`] with respect to every parameter of the model (f32, the
    /// parameters' shapes), keyed by the parameters' tensors as candle's `backward` keys them.
    /// Frees the saved activations block by block.
    pub fn backward(self) -> Result<GradStore> {
        let model = self.model;
        let cfg = &model.config;
        let (b, t) = self.dims;
        let (c, nh, p) = (cfg.n_embd, cfg.n_head, self.dropout);
        let mut grads = GradStore::default();

        let (dxf, dwte_head) = fused::linear_backward(&self.xf, &self.wte, &self.dlogits)?;
        let (mut dx, dln_f) = fused::layer_norm_backward(&self.xf_in, &self.ln_f, &dxf, LN_EPS)?;
        grads.insert(model.ln_f.as_tensor(), dln_f);
        for (saved, blk) in self.blocks.into_iter().zip(&model.blocks).rev() {
            let w = &saved.w;
            // MLP: x_out = x_mid + dropout(gelu(h2 · c_fcᵀ) · mlp_projᵀ), h2 = ln_2(x_mid).
            let dm = apply_dropout(&dx, saved.keep_mlp.as_ref(), p)?;
            let (dfc, dw_mlp_proj) =
                fused::gelu_linear_backward(&saved.fc, &saved.act, &w.mlp_proj, &dm)?;
            let (dh2, dw_fc) = fused::linear_backward(&saved.h2, &w.c_fc, &dfc)?;
            let dln_2;
            (dx, dln_2) = fused::layer_norm_backward_add(&saved.x_mid, &w.ln_2, &dh2, &dx, LN_EPS)?;
            // Attention: x_mid = x_in + dropout(merge(attn(q, k, v)) · attn_projᵀ).
            let da = apply_dropout(&dx, saved.keep_attn.as_ref(), p)?;
            let (dy_merged, dw_attn_proj) =
                fused::linear_backward(&saved.y_merged, &w.attn_proj, &da)?;
            let dy = || fused::to_heads(&dy_merged, nh);
            // Rows of c_attn past q, k, v: the folded key scorer's (see `Gpt::training_pass`).
            let fold = w.c_attn.dim(0)? - 3 * c;
            // The projection's output gradient; the folded scorer's slope gradient where the
            // taped attention gave the scores one; the local graph holding the scorer's input.
            let (dqkv, dslope, local_scorer) = match &saved.attn {
                LayerAttention::Packed { tape, .. } => match &blk.scorer {
                    // The folded scorer's gradient goes into its columns of dqkv (then zeros).
                    Some(scorer) => {
                        let (dqkv, dslope) =
                            tape.grads_qkvpacked_folded(&dy_merged, scorer, 3 * c, 0)?;
                        (dqkv, Some(dslope), None)
                    }
                    // dqkv has q, k, v's columns and zeros past them.
                    None => (tape.grads_qkvpacked(&dy_merged)?.dqkv, None, None),
                },
                LayerAttention::Taped { tape, .. } => {
                    let AttentionGrads {
                        dq,
                        dk,
                        dv,
                        dscores,
                    } = tape.grads(&dy()?)?;
                    // No scores' gradient where the kind ran without them (SparseK's window
                    // covering the sequence: dense attention), as under autograd.
                    // A layer with a scorer has it folded into c_attn (fold > 0).
                    match (&blk.scorer, dscores) {
                        (Some(scorer), Some(dscores)) => {
                            let dt = dq.dtype();
                            let (dlin, dslope) = scorer.backward_linear(&dscores, 0, dt, fold)?;
                            let dqkv = fused::merge_qkv_with(&dq, &dk, &dv, &dlin)?;
                            (dqkv, Some(dslope), None)
                        }
                        _ => (qkv_grad(&dq, &dk, &dv, fold)?, None, None),
                    }
                }
                LayerAttention::Graph { q, k, v, h, y } => {
                    let local = fused::backward_from(y, &dy()?)?;
                    let leaf_grad = |leaf: &Var| match local.get(leaf.as_tensor()) {
                        Some(g) => Ok(g.clone()),
                        None => leaf.zeros_like(),
                    };
                    let dqkv = qkv_grad(&leaf_grad(q)?, &leaf_grad(k)?, &leaf_grad(v)?, fold)?;
                    (dqkv, None, h.as_ref().map(|h| (local, h)))
                }
            };
            let (mut dh1, dw_c_attn) = fused::linear_backward(&saved.h1, &w.c_attn, &dqkv)?;
            if let (Some(dslope), Some(scorer)) = (dslope, &blk.scorer) {
                let [weight, slope] = scorer.params();
                grads.insert(weight, dw_c_attn.narrow(0, 3 * c, scorer.kv_heads())?);
                grads.insert(slope, dslope);
            }
            if let Some((local, h)) = local_scorer {
                dh1 = local_scorer_grads(&local, h, blk, dh1, &mut grads)?;
            }
            let dw_c_attn = dw_c_attn.narrow(0, 0, 3 * c)?;
            let dln_1;
            (dx, dln_1) = fused::layer_norm_backward_add(&saved.x_in, &w.ln_1, &dh1, &dx, LN_EPS)?;
            for (var, g) in [
                (&blk.ln_1, dln_1),
                (&blk.c_attn, dw_c_attn),
                (&blk.attn_proj, dw_attn_proj),
                (&blk.ln_2, dln_2),
                (&blk.c_fc, dw_fc),
                (&blk.mlp_proj, dw_mlp_proj),
            ] {
                grads.insert(var.as_tensor(), g);
            }
        }
        let dx = apply_dropout(&dx, self.keep_emb.as_ref(), p)?;
        if let Some(wpe) = &model.wpe {
            let dpos = fused::batch_sum_f32(&dx)?.pad_with_zeros(0, 0, cfg.block_size - t)?;
            grads.insert(wpe.as_tensor(), dpos);
        }
        let demb = fused::embedding_backward(&dx.reshape((b * t, c))?, &self.ids, cfg.vocab_size)?;
        grads.insert(model.wte.as_tensor(), (demb + dwte_head)?);
        Ok(grads)
    }
}
