//! Attention outside candle's autograd, for hand-written training passes.
//!
//! [`flash_attn`](crate::flash_attn), [`hash_sparse_attn`](crate::hash_sparse_attn),
//! [`qk_sparse_attn`](crate::qk_sparse_attn) and [`sparsek_attn`](crate::sparsek_attn) are
//! differentiable ops: candle's `backward` calls their backward kernels, and gives each input's
//! gradient a zero fill and an add on the way (`GradStore::or_insert`), three passes over
//! `(batch, heads, seq, head_dim)` tensors per call that a training pass with its own backward
//! does not need. Their `_taped` twins ([`crate::flash_attn_taped`],
//! [`crate::hash_sparse_attn_taped`], [`crate::qk_sparse_attn_taped`],
//! [`crate::sparsek_attn_taped`]) run the same forward kernels without building a graph and
//! return an [`AttentionTape`] whose [`AttentionTape::grads`] runs the same backward kernels and
//! returns the inputs' gradients directly: `dq`, `dk`, `dv`, and for SparseK also the scores'
//! `dscores` ([`AttentionGrads`]). [`AttentionTape::backward`] is the `(dq, dk, dv)` shorthand for
//! the tapes without scores. Outputs and gradients are those of the differentiable ops.

use candle::{Result, Tensor};

use crate::flash;
use crate::mask::Visibility;
use crate::scfa::ArrangedAttn;
use crate::sparsek::{ScorerColumns, SparseKPackedRun, SparseKRun, SparseKScorer};

/// What the backward of one attention call needs: made by the `_taped` entry points (see the
/// module docs), consumed by [`AttentionTape::grads`] (or [`AttentionTape::backward`]).
pub struct AttentionTape(Saved);

/// The input gradients of one taped attention call, from [`AttentionTape::grads`].
#[derive(Debug)]
pub struct AttentionGrads {
    /// Gradient of the queries: the shape and dtype of q.
    pub dq: Tensor,
    /// Gradient of the keys: the shape and dtype of k.
    pub dk: Tensor,
    /// Gradient of the values: the shape and dtype of v.
    pub dv: Tensor,
    /// Gradient of the key scores `(batch, kv_heads, seq)` f32 for a
    /// [`sparsek_attn_taped`](crate::sparsek_attn_taped) tape; `None` for the kinds without
    /// scores.
    pub dscores: Option<Tensor>,
}

enum Saved {
    /// Flash attention over q, k, v as given.
    Flash {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        /// f32 log-sum-exp `(batch, q_heads, q_len)`.
        lse: Tensor,
        scale: f32,
        visibility: Visibility,
    },
    /// Flash attention over rows gathered into arranged orders (the SCFA schemes).
    Arranged(ArrangedAttn),
    /// SparseK attention (selection and attention), with the scores.
    SparseK(SparseKRun),
    /// SparseK attention on heads packed in projection rows.
    SparseKPacked(SparseKPackedRun),
}

/// The input gradients of one taped attention call on heads packed in projection rows
/// ([`sparsek_attn_qkvpacked_taped`](crate::sparsek_attn_qkvpacked_taped)), from
/// [`AttentionTape::grads_qkvpacked`].
#[derive(Debug)]
pub struct PackedGrads {
    /// Gradient of the projection rows `(batch, seq, width)` in their dtype: the q, k, v
    /// columns, zero in the columns the attention did not read.
    pub dqkv: Tensor,
    /// Gradient of the key scores `(batch, kv_heads, seq)` f32.
    pub dscores: Tensor,
}

impl std::fmt::Debug for AttentionTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Saved::Flash { .. } => "flash",
            Saved::Arranged(_) => "arranged",
            Saved::SparseK(_) => "sparsek",
            Saved::SparseKPacked(_) => "sparsek (packed rows)",
        };
        f.debug_struct("AttentionTape")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl AttentionTape {
    /// A tape of flash attention: the forward of `q`, `k`, `v` (contiguous) under `visibility`,
    /// the output and the tape.
    pub(crate) fn flash(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        visibility: Visibility,
    ) -> Result<(Tensor, Self)> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (out, lse) = flash::forward_with_lse(&q, &k, &v, scale, visibility.clone())?;
        let saved = Saved::Flash {
            q,
            k,
            v,
            out: out.clone(),
            lse,
            scale,
            visibility,
        };
        Ok((out, Self(saved)))
    }

    /// A tape of an arranged (SCFA) attention whose forward already ran; `out` is its output in
    /// the original order.
    pub(crate) fn arranged(op: ArrangedAttn) -> Result<(Tensor, Self)> {
        let out = op.output()?;
        Ok((out, Self(Saved::Arranged(op))))
    }

    /// A tape of a SparseK attention whose forward already ran.
    pub(crate) fn sparsek(run: SparseKRun) -> Result<(Tensor, Self)> {
        let out = run.output().clone();
        Ok((out, Self(Saved::SparseK(run))))
    }

    /// A tape of a SparseK attention on packed rows whose forward already ran.
    pub(crate) fn sparsek_packed(run: SparseKPackedRun) -> Result<(Tensor, Self)> {
        let out = run.output().clone();
        Ok((out, Self(Saved::SparseKPacked(run))))
    }

    /// The gradients of a tape of
    /// [`sparsek_attn_qkvpacked_taped`](crate::sparsek_attn_qkvpacked_taped) for the output
    /// gradient `dy` `(batch, seq, q_heads·head_dim)` (the output's dtype and device; an error
    /// otherwise, and for every other kind of tape: use [`Self::grads`]).
    pub fn grads_qkvpacked(&self, dy: &Tensor) -> Result<PackedGrads> {
        let Saved::SparseKPacked(run) = &self.0 else {
            candle::bail!(
                "attention tape: grads_qkvpacked needs a tape of sparsek_attn_qkvpacked_taped, \
                 this one is {self:?} (dy {:?}); call grads",
                dy.dims()
            )
        };
        let (dqkv, dscores, _) = run.grads(dy, None)?;
        Ok(PackedGrads { dqkv, dscores })
    }

    /// [`Self::grads_qkvpacked`] for projection rows with `scorer` folded in from column `col`
    /// (its linear part, `kv_heads` columns, then zeros to the rows' end; scores at positions
    /// from `offset`, as [`SparseKScorer::scores_from_linear`] computed them): returns `dqkv` with
    /// the scorer's gradient in those columns and the gradient of its raw slopes `(kv_heads)` f32,
    /// as [`SparseKScorer::backward_linear_into`] would. Where the Hopper kernels run, the
    /// backward's last kernel writes both (no pass of their own).
    pub fn grads_qkvpacked_folded(
        &self,
        dy: &Tensor,
        scorer: &SparseKScorer,
        col: usize,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let Saved::SparseKPacked(run) = &self.0 else {
            candle::bail!(
                "attention tape: grads_qkvpacked_folded needs a tape of \
                 sparsek_attn_qkvpacked_taped, this one is {self:?} (dy {:?}); call grads",
                dy.dims()
            )
        };
        let rho = scorer.raw_slope()?;
        let columns = ScorerColumns {
            rho: &rho,
            col,
            offset,
        };
        let (dqkv, dscores, dslope) = run.grads(dy, Some(&columns))?;
        let dslope = match dslope {
            Some(dslope) => dslope,
            None => scorer.backward_linear_into(&dscores, offset, &dqkv, col)?,
        };
        Ok((dqkv, dslope))
    }

    /// The input gradients for the output gradient `dy` (the output's shape, dtype and device;
    /// an error otherwise): `dq`, `dk`, `dv` in the shapes and dtype of q, k, v, and `dscores`
    /// `(batch, kv_heads, seq)` f32 for a SparseK tape (`None` for the others).
    pub fn grads(&self, dy: &Tensor) -> Result<AttentionGrads> {
        let ((dq, dk, dv), dscores) = match &self.0 {
            Saved::Flash {
                q,
                k,
                v,
                out,
                lse,
                scale,
                visibility,
            } => {
                check_grad(dy, out)?;
                let grads =
                    flash::backward(q, k, v, out, dy, lse.clone(), *scale, visibility.clone())?;
                (grads, None)
            }
            Saved::Arranged(op) => (op.grads(&dy.detach())?, None),
            Saved::SparseK(run) => {
                let (dq, dk, dv, dscores) = run.grads(dy)?;
                ((dq, dk, dv), Some(dscores))
            }
            Saved::SparseKPacked(_) => candle::bail!(
                "attention tape: a tape of sparsek_attn_qkvpacked_taped gives packed gradients; \
                 call grads_qkvpacked (dy {:?})",
                dy.dims()
            ),
        };
        Ok(AttentionGrads {
            dq,
            dk,
            dv,
            dscores,
        })
    }

    /// Gradients `(dq, dk, dv)` (the shapes and dtype of q, k, v) for the output gradient `dy`
    /// (the output's shape and dtype), for the tapes without scores. A SparseK tape is refused
    /// (its scores' gradient would be lost silently, leaving the scorer untrained): use
    /// [`Self::grads`].
    pub fn backward(&self, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if let Saved::SparseK(_) | Saved::SparseKPacked(_) = &self.0 {
            candle::bail!(
                "attention tape: a sparsek tape also gives the scores' gradient; call grads, \
                 not backward (dy {:?})",
                dy.dims()
            )
        }
        let AttentionGrads { dq, dk, dv, .. } = self.grads(dy)?;
        Ok((dq, dk, dv))
    }
}

/// `dy` must match the output it is the gradient of.
pub(crate) fn check_grad(dy: &Tensor, out: &Tensor) -> Result<()> {
    if dy.dims() != out.dims()
        || dy.dtype() != out.dtype()
        || !dy.device().same_device(out.device())
    {
        candle::bail!(
            "attention tape: dy {:?} {:?} on {:?} must match the output {:?} {:?} on {:?}",
            dy.dims(),
            dy.dtype(),
            dy.device().location(),
            out.dims(),
            out.dtype(),
            out.device().location()
        )
    }
    Ok(())
}
