//! The arranged attention of the SCFA schemes as one differentiable op: gathers of q, k, v into
//! the arranged orders, the sparse flash kernel, and the scatter of the output back to the
//! original order, with a backward that returns dq, dk, dv in the original order directly.
//!
//! Composing differentiable gathers, the flash op and a differentiable scatter costs candle's
//! autograd one `zeros_like + add` per intermediate gradient (the arranged q, k, v and output:
//! four passes over `(batch, heads, t, head_dim)` tensors, ≈ 1 ms each at B4 H48 t16k D64 on the
//! H100); this op hands autograd the three gradients of its inputs only. [`arranged_taped`]
//! runs the same forward outside autograd for [`AttentionTape`].

use candle::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::permute::{gather_detached, gather_storage_cpu};
use super::{RowOrder, ScfaParams};
use crate::flash::{self, Dims};
use crate::mask::{SparseLayout, Visibility};
use crate::tape::{check_grad, AttentionTape};

/// `scatter(attention(gather(q), gather(k), gather(v)))` over the orders' rows, differentiable
/// in q, k and v (see the module docs).
pub(super) fn arranged_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_order: &RowOrder,
    k_order: &RowOrder,
    params: &ScfaParams,
    dims: Dims,
) -> Result<Tensor> {
    let op = ArrangedAttn::forward(q, k, v, q_order, k_order, params, dims)?;
    // The op reads none of its inputs' storages: they only connect it to the graph.
    q.apply_op3(k, v, op)
}

/// [`arranged_attention`] outside autograd: the output and its [`AttentionTape`].
pub(super) fn arranged_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_order: &RowOrder,
    k_order: &RowOrder,
    params: &ScfaParams,
    dims: Dims,
) -> Result<(Tensor, AttentionTape)> {
    AttentionTape::arranged(ArrangedAttn::forward(
        q, k, v, q_order, k_order, params, dims,
    )?)
}

/// The arranged rows and the forward results the backward needs.
struct Saved {
    /// Arranged q, k, v, output, `(batch, heads, t, head_dim)`, and the f32 log-sum-exp
    /// `(batch, q_heads, t)`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
}

/// The op: inputs q, k, v in the original order; its forward only scatters the arranged output
/// computed by [`ArrangedAttn::forward`] (held in `saved`), its backward runs the whole chain's.
pub(crate) struct ArrangedAttn {
    /// Inverse orders (arranged row of every step, `-1` for dropped steps), `(batch, heads, t)`.
    q_inv: Tensor,
    k_inv: Tensor,
    /// Arranged query rows' original steps (padding rows out of range), `(batch, q_heads, t)`.
    q_pos: Tensor,
    scale: f32,
    visibility: Visibility,
    saved: Saved,
}

impl ArrangedAttn {
    /// Gathers q, k, v into the orders and runs the sparse flash forward on them.
    fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_order: &RowOrder,
        k_order: &RowOrder,
        params: &ScfaParams,
        dims: Dims,
    ) -> Result<Self> {
        let q_s = gather_detached(q, &q_order.pos)?;
        let k_s = gather_detached(k, &k_order.pos)?;
        let v_s = gather_detached(v, &k_order.pos)?;
        let buckets = match (&q_order.bucket, &k_order.bucket) {
            (Some(qb), Some(kb)) => Some((qb.clone(), kb.clone())),
            _ => None,
        };
        let visibility = Visibility::Sparse(SparseLayout {
            q_pos: q_order.pos.clone(),
            k_pos: k_order.pos.clone(),
            buckets,
            strict: params.strict,
        });
        let scale = params.scale(dims.d);
        let (out, lse) = flash::forward_with_lse(&q_s, &k_s, &v_s, scale, visibility.clone())?;
        Ok(Self {
            q_inv: q_order.inv.clone(),
            k_inv: k_order.inv.clone(),
            q_pos: q_order.pos.clone(),
            scale,
            visibility,
            saved: Saved {
                q: q_s,
                k: k_s,
                v: v_s,
                out,
                lse,
            },
        })
    }

    /// The output in the original order (zero rows for dropped queries).
    pub(crate) fn output(&self) -> Result<Tensor> {
        gather_detached(&self.saved.out, &self.q_inv)
    }

    /// Gradients `(dq, dk, dv)` in the original order for the output gradient `grad_out`
    /// (original order).
    pub(crate) fn grads(&self, grad_out: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let s = &self.saved;
        check_grad(grad_out, &s.out)?;
        let grad_s = gather_detached(grad_out, &self.q_pos)?;
        let (dq, dk, dv) = flash::backward(
            &s.q,
            &s.k,
            &s.v,
            &s.out,
            &grad_s,
            s.lse.clone(),
            self.scale,
            self.visibility.clone(),
        )?;
        Ok((
            gather_detached(&dq, &self.q_inv)?,
            gather_detached(&dk, &self.k_inv)?,
            gather_detached(&dv, &self.k_inv)?,
        ))
    }
}

impl CustomOp3 for ArrangedAttn {
    fn name(&self) -> &'static str {
        "scfa-arranged-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        gather_storage_cpu(&self.saved.out, &self.q_inv)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        super::permute::gather_storage_cuda(&self.saved.out, &self.q_inv)
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.grads(grad_out)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
