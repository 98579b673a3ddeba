"""Triton path of softmax attention: ``torch.library`` custom ops over ``fastscore.kernels.attention``.

Four custom ops (namespace ``fastscore``), each with a fake (meta) implementation so that
``torch.compile`` traces models that use them without graph breaks:

* ``attention_fwd(q, k, v, scale) -> (out, lse)`` with autograd registered through
  ``register_autograd`` (the backward calls ``attention_bwd``);
* ``attention_bwd(q, k, v, out, lse, dout, scale) -> (dq, dk, dv)``;
* ``identity_attention_fwd(z, scale) -> (out, lse)`` / ``identity_attention_bwd(...) -> dz``.

Arguments are validated by ``fastscore.ops.attention`` before these functions are called.
"""
from __future__ import annotations

import torch

from fastscore.kernels import attention as _k


# ---------------------------------------------------------------------------------------------
# softmax attention
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastscore::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.attention_forward(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale):
    B, NQ, _ = q.shape
    return q.new_empty((B, NQ, v.shape[2])), q.new_empty((B, NQ), dtype=torch.float32)


@torch.library.custom_op("fastscore::attention_bwd", mutates_args=())
def _attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k.attention_backward(q, k, v, out, lse, dout, scale)


@_attention_bwd.register_fake
def _(q, k, v, out, lse, dout, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    dq, dk, dv = _attention_bwd(q, k, v, out, lse, dout, ctx.scale)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------
# identity attention (q = k = v = z)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastscore::identity_attention_fwd", mutates_args=())
def _identity_fwd(z: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.identity_forward(z, scale)


@_identity_fwd.register_fake
def _(z, scale):
    return torch.empty_like(z), z.new_empty(z.shape[:2], dtype=torch.float32)


@torch.library.custom_op("fastscore::identity_attention_bwd", mutates_args=())
def _identity_bwd(z: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  scale: float) -> torch.Tensor:
    return _k.identity_backward(z, out, lse, dout, scale)


@_identity_bwd.register_fake
def _(z, out, lse, dout, scale):
    return torch.empty_like(z)


def _identity_setup(ctx, inputs, output):
    z, scale = inputs
    out, lse = output
    ctx.save_for_backward(z, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _identity_backward(ctx, dout, dlse):
    z, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None
    return _identity_bwd(z, out, lse, dout, ctx.scale), None


_identity_fwd.register_autograd(_identity_backward, setup_context=_identity_setup)


# ---------------------------------------------------------------------------------------------
# functional entry points (called by fastscore.ops.attention after validation)
# ---------------------------------------------------------------------------------------------
def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale q k^T) v`` on the Triton kernels; differentiable in q, k and v."""
    _k.check_inputs(q, k, v)
    return _attention_fwd(q, k, v, float(scale))[0]


def identity_attention(z: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale z z^T) z`` on the identity-specialised kernels; one gradient, dz."""
    _k.check_inputs(z, z, z)
    return _identity_fwd(z, float(scale))[0]
