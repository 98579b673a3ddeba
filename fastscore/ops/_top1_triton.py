"""Triton path of ``top1_attention``: ``torch.library`` custom ops over ``fastscore.kernels.top1``.

``fastscore::top1_attention`` (forward) and ``fastscore::top1_attention_backward`` are custom
ops with fake (meta) implementations, and the backward is attached with ``register_autograd``,
so autograd sees one differentiable op and ``torch.compile`` traces it without graph breaks.
Inputs the kernels do not cover go to the torch reference (``_Top1Reference``, autograd included)
instead: float64, and D or Dv above ``kernels.top1.max_features(dtype)`` (128 for float16/bfloat16, 64 for
float32: wider tiles spill registers on sm_80 / sm_90a).
"""
from __future__ import annotations

import torch

from ..kernels import top1 as _k

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("fastscore::top1_attention", mutates_args=())
def _top1_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float, gumbel: bool,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.top1_forward(q, k, v, gumbel, seed)


@_top1_fwd_op.register_fake
def _(q, k, v, temperature, gumbel, seed):
    b, n, _ = q.shape
    return v.new_empty((b, n, v.shape[2])), q.new_empty((b, n), dtype=torch.int64)


@torch.library.custom_op("fastscore::top1_attention_backward", mutates_args=())
def _top1_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                 temperature: float, gumbel: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k.top1_backward(dout, q, k, v, idx, temperature, gumbel, seed)


@_top1_bwd_op.register_fake
def _(dout, q, k, v, idx, temperature, gumbel, seed):
    c = torch.contiguous_format
    return (torch.empty_like(q, memory_format=c), torch.empty_like(k, memory_format=c),
            torch.empty_like(v, memory_format=c))


def _setup_context(ctx, inputs, output):
    q, k, v, temperature, gumbel, seed = inputs
    _, idx = output
    ctx.save_for_backward(q, k, v, idx)
    ctx.temperature, ctx.gumbel, ctx.seed = temperature, gumbel, seed
    ctx.mark_non_differentiable(idx)


def _backward(ctx, dout, _didx):
    q, k, v, idx = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(v)
    dq, dk, dv = _top1_bwd_op(dout, q, k, v, idx, ctx.temperature, ctx.gumbel, ctx.seed)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("fastscore::top1_attention", _backward, setup_context=_setup_context)


def top1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float, gumbel: bool,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, idx)`` of top-1 attention on the Triton kernels (inputs validated by the caller)."""
    if q.dtype not in _KERNEL_DTYPES or max(q.shape[2], v.shape[2]) > _k.max_features(q.dtype):
        from .top1 import _Top1Reference
        return _Top1Reference.apply(q, k, v, temperature, gumbel, seed)
    return _top1_fwd_op(q, k, v, float(temperature), bool(gumbel), int(seed))
