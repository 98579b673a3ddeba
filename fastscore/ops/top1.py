"""Top-1 (hard) attention with a straight-through softmax surrogate for q and k.

Contract (both backends):
  q, k: (B, N, D), v: (B, N, Dv); floating, same dtype and device; math in float32.
  Scores ``s_ij = q_i . k_j`` (plus Gumbel noise ``g_ij`` when ``gumbel=True``).
  Forward: ``idx_i = argmax_j s_ij`` (ties: lowest j) and ``out_i = v[idx_i]``;
  returns ``(out (B, N, Dv) in v's dtype, idx (B, N) int64)``.
  Backward: ``dv_j = sum_{i: idx_i = j} dout_i`` (hard, deterministic);
  dq, dk are the gradients of the surrogate ``softmax(s / temperature) v`` (same Gumbel noise).
  Gumbel noise: ``g = -log(-log(u))`` with ``u = philox.uniform(seed, e)`` at global element
  index ``e = (b * N + i) * N + j`` (stream ``STREAM_GUMBEL``), u clamped to [1e-10, 1 - 1e-7].
"""
from __future__ import annotations

import torch

from .. import _validate
from . import _dispatch, philox
from .attention import _check


def gumbel_noise(seed: int, b: int, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise (b, nq, nk) float32 of the documented stream."""
    e = torch.arange(b * nq * nk, device=device, dtype=torch.int64).view(b, nq, nk)
    u = philox.uniform(seed, e).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _scores(q: torch.Tensor, k: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    return s if noise is None else s + noise.to(acc)


class _Top1Reference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, temperature: float, gumbel: bool, seed: int):
        noise = gumbel_noise(seed, q.shape[0], q.shape[1], k.shape[1], q.device) if gumbel else None
        s = _scores(q, k, noise)
        idx = torch.argmax(s, dim=-1)  # first maximal index on ties
        out = torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))
        ctx.save_for_backward(q, k, v, idx)
        ctx.temperature, ctx.noise = temperature, noise
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, dout, _didx):
        q, k, v, idx = ctx.saved_tensors
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dout = dout.to(acc)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        dv.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]), dout)
        p = torch.softmax(_scores(q, k, ctx.noise) / ctx.temperature, dim=-1)
        dp = torch.matmul(dout, v.to(acc).transpose(-1, -2))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / ctx.temperature
        dq = torch.matmul(ds, k.to(acc))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def top1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, temperature: float = 1.0,
                   gumbel: bool = False, seed: int = 0,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Hard attention ``out_i = v[argmax_j q_i . k_j]``; returns ``(out (B, N, Dv), idx (B, N) int64)``."""
    _check(q, k, v, None)
    _validate.finite_float("temperature", temperature, minimum=0.0, strict=True)
    if not isinstance(gumbel, bool):
        raise TypeError(f"gumbel must be a bool, got {type(gumbel).__name__}")
    _validate.seed("seed", seed)
    if _dispatch.resolve(backend, q, k, v) == "triton":
        from . import _top1_triton
        return _top1_triton.top1_attention(q, k, v, float(temperature), gumbel, seed)
    return _Top1Reference.apply(q, k, v, float(temperature), gumbel, seed)
