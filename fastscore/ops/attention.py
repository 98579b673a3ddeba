"""Softmax patch attention: ``out = softmax(scale * q k^T) v`` over the ``N = H*W`` tokens.

Contract (both backends):
  q, k: (B, N, D), v: (B, N, Dv); floating, same dtype and device; math in float32;
  out: (B, N, Dv) in the input dtype. ``scale`` defaults to ``D ** -0.5``.
  The Triton path saves the log-sum-exp (B, N) float32 for backward and never builds N x N.
``identity_attention(z)`` is the paper's q = k = v = z case: one input, one gradient.
"""
from __future__ import annotations

import torch

from .. import _validate
from . import _dispatch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    for n, x in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(n, x, ndim=3)
    _validate.same(("q", "k", "v"), (q, k, v))
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must share the sequence length, got {k.shape[1]} and {v.shape[1]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share the feature size D, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError("q and k must have a sequence length N >= 1")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError("q and v must have a feature size D >= 1")
    if scale is None:
        return q.shape[2] ** -0.5
    return _validate.finite_float("scale", scale)


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Eager float32 (or float64 for float64 inputs) attention; differentiable by autograd."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      *, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of (B, N, D) queries over (B, N, D) keys and (B, N, Dv) values -> (B, N, Dv)."""
    scale = _check(q, k, v, scale)
    if _dispatch.resolve(backend, q, k, v) == "triton":
        from . import _attention_triton
        return _attention_triton.softmax_attention(q, k, v, scale)
    return softmax_attention_reference(q, k, v, scale)


def identity_attention(z: torch.Tensor, scale: float | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``softmax_attention(z, z, z, scale)`` for z of shape (B, N, D); one gradient, for z."""
    scale = _check(z, z, z, scale)
    if _dispatch.resolve(backend, z) == "triton":
        from . import _attention_triton
        return _attention_triton.identity_attention(z, scale)
    return softmax_attention_reference(z, z, z, scale)
