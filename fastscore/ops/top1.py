"""Top-1 (hard) attention with a straight-through softmax surrogate for q and k.

Contract (every path):
  q, k: (B, N, D), v: (B, N, Dv); floating, same dtype and device; math in float32.
  Scores ``s_ij = q_i . k_j`` (plus Gumbel noise ``g_ij`` when ``gumbel=True``).
  Forward: ``idx_i = argmax_j s_ij`` (ties: lowest j) and ``out_i = v[idx_i]``;
  returns ``(out (B, N, Dv) in v's dtype, idx (B, N) int64)``.
  Backward: ``dv_j = sum_{i: idx_i = j} dout_i`` (hard, deterministic);
  dq, dk are the gradients of the surrogate ``softmax(s / temperature) v`` (same Gumbel noise).
  Gumbel noise: ``g = -log(-log(u))`` with ``u = philox.uniform(seed, e)`` at global element
  index ``e = (b * N + i) * N + j`` (stream ``STREAM_GUMBEL``), u clamped to [1e-10, 1 - 1e-7].

Paths (``fastscore.ops._dispatch`` has the rule and the ``backend="auto"`` table):
  * ``"torch"``: ``top1_attention_reference`` (``_Top1Reference``, an autograd Function): scores,
    argmax, gather; the one eager top-1 the tests and the benchmarks use. ``auto`` on CUDA too.
  * ``"triton"``: the kernels (``fastscore.kernels.top1``) as the custom op
    ``fastscore::top1_attention`` with a fake (meta) implementation, its backward
    ``fastscore::top1_attention_backward`` attached with ``register_autograd``, so autograd sees one
    differentiable op and ``torch.compile`` traces it without graph breaks. The kernels take
    float32/float16/bfloat16 and ``D, Dv <= kernels.top1.max_features(dtype)``; other inputs
    raise under ``backend="triton"`` and run the reference under ``"auto"``.
"""
from __future__ import annotations

import torch

from .. import _validate
from . import _dispatch, philox
from .attention import _check


# ---------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------
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


def top1_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float = 1.0,
                             gumbel: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager top-1 (scores, argmax, gather) with the straight-through backward; no checks."""
    return _Top1Reference.apply(q, k, v, float(temperature), gumbel, seed)


# ---------------------------------------------------------------------------------------------
# the Triton path: custom ops, their fakes and autograd
# ---------------------------------------------------------------------------------------------
def _kernels():
    # imported on first use: fastscore.ops imports without triton (macOS, Windows)
    from fastscore.kernels import top1
    return top1


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise TypeError / ValueError for inputs the Triton kernels cannot take (dtype other than
    float32/float16/bfloat16, D or Dv above ``kernels.top1.max_features(dtype)``)."""
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"q, k, v: the Triton top-1 kernels take float32/float16/bfloat16, got {q.dtype}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"the Triton top-1 kernels need as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    limit = _kernels().max_features(q.dtype)
    if max(q.shape[2], v.shape[2]) > limit:
        raise ValueError(f"the Triton top-1 kernels support D, Dv <= {limit} for {q.dtype}, "
                         f"got D={q.shape[2]}, Dv={v.shape[2]}")


def _resolve(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    return _dispatch.resolve("top1_attention", backend, (q, k, v), lambda: kernel_check(q, k, v))


@torch.library.custom_op("fastscore::top1_attention", mutates_args=())
def _top1_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float, gumbel: bool,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().top1_forward(q, k, v, gumbel, seed)


@_top1_fwd_op.register_fake
def _(q, k, v, temperature, gumbel, seed):
    b, n, _ = q.shape
    return v.new_empty((b, n, v.shape[2])), q.new_empty((b, n), dtype=torch.int64)


@torch.library.custom_op("fastscore::top1_attention_backward", mutates_args=())
def _top1_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                 temperature: float, gumbel: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().top1_backward(dout, q, k, v, idx, temperature, gumbel, seed)


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


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------
def top1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, temperature: float = 1.0,
                   gumbel: bool = False, seed: int = 0,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Hard attention ``out_i = v[argmax_j q_i . k_j]``; returns ``(out (B, N, Dv), idx (B, N) int64)``."""
    _check(q, k, v, None)
    _validate.finite_float("temperature", temperature, minimum=0.0, strict=True)
    if not isinstance(gumbel, bool):
        raise TypeError(f"gumbel must be a bool, got {type(gumbel).__name__}")
    _validate.seed("seed", seed)
    if _resolve(backend, q, k, v) == "triton":
        return _top1_fwd_op(q, k, v, float(temperature), gumbel, int(seed))
    return top1_attention_reference(q, k, v, temperature, gumbel, seed)
