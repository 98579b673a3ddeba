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
from .attention import _check, fold, member, per_member, unfold


# ---------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------
def gumbel_noise(seed: int, b: int, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise (b, nq, nk) float32 of the documented stream."""
    u = philox.uniform_range(seed, 0, b * nq * nk, device=device).view(b, nq, nk).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _scores(q: torch.Tensor, k: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    return s if noise is None else s + noise.to(acc)


class _Top1Reference(torch.autograd.Function):
    """Returns ``(out, idx, noise)``: the Gumbel noise (zeros (B, 1, 1) without it) is an output so that
    backward reuses it instead of drawing it again."""

    @staticmethod
    def forward(q, k, v, temperature: float, gumbel: bool, seed: int):
        noise = gumbel_noise(seed, q.shape[0], q.shape[1], k.shape[1], q.device) if gumbel else \
            q.new_zeros((q.shape[0], 1, 1), dtype=torch.float32)
        s = _scores(q, k, noise if gumbel else None)
        idx = torch.argmax(s, dim=-1)  # first maximal index on ties
        return torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1])), idx, noise

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, temperature, gumbel, seed = inputs
        _, idx, noise = output
        ctx.save_for_backward(q, k, v, idx, noise)
        ctx.temperature, ctx.gumbel = temperature, gumbel
        ctx.mark_non_differentiable(idx, noise)

    @staticmethod
    def backward(ctx, dout, _didx, _dnoise):
        q, k, v, idx, noise = ctx.saved_tensors
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dout = dout.to(acc)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        dv.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]), dout)
        p = torch.softmax(_scores(q, k, noise if ctx.gumbel else None) / ctx.temperature, dim=-1)
        dp = torch.matmul(dout, v.to(acc).transpose(-1, -2))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / ctx.temperature
        dq = torch.matmul(ds, k.to(acc))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, temperature, gumbel, seed):
        return _top1_vmap(_Top1Reference.apply, info, in_dims, q, k, v, temperature, gumbel, seed)


def _top1_vmap(op, info, in_dims, q, k, v, temperature, gumbel, seed):
    """vmap rule of both top-1 paths: the member dim folded into the batch; with Gumbel noise one call
    per member instead, so that each member's noise is keyed by its own batch indices, as alone."""
    M = info.batch_size
    if not gumbel:
        return unfold(M, *op(*fold(M, in_dims[:3], q, k, v), temperature, gumbel, seed))
    outs = [op(member(q, in_dims[0], m), member(k, in_dims[1], m), member(v, in_dims[2], m), temperature, gumbel,
               seed) for m in range(M)]
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


# top-1 with a Gumbel seed per vmapped member (a batched int64 seed, e.g. ScoreNet's ``seed`` under
# torch.func.vmap): one top1_attention call per member with that member's int seed
_PerMemberSeed = per_member("_PerMemberSeed", lambda m, d, q, k, v, temperature, gumbel, seed, backend: top1_attention(
    member(q, d[0], m), member(k, d[1], m), member(v, d[2], m), temperature=temperature, gumbel=gumbel,
    seed=int(member(seed, d[5], m)), backend=backend))


def top1_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float = 1.0,
                             gumbel: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager top-1 (scores, argmax, gather) with the straight-through backward; no checks."""
    out, idx, _ = _Top1Reference.apply(q, k, v, float(temperature), gumbel, seed)
    return out, idx


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
torch.library.register_vmap(_top1_fwd_op, lambda info, in_dims, *args: _top1_vmap(_top1_fwd_op, info, in_dims, *args))


def _top1_bwd_vmap(info, in_dims, dout, q, k, v, idx, temperature, gumbel, seed):
    M = info.batch_size
    if not gumbel:
        return unfold(M, *_top1_bwd_op(*fold(M, in_dims[:5], dout, q, k, v, idx), temperature, gumbel, seed))
    outs = [_top1_bwd_op(*(member(x, d, m) for x, d in zip((dout, q, k, v, idx), in_dims)), temperature, gumbel, seed)
            for m in range(M)]
    return tuple(torch.stack(g) for g in zip(*outs)), (0, 0, 0)


torch.library.register_vmap(_top1_bwd_op, _top1_bwd_vmap)


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------
def top1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, temperature: float = 1.0,
                   gumbel: bool = False, seed: int | torch.Tensor = 0,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Hard attention ``out_i = v[argmax_j q_i . k_j]``; returns ``(out (B, N, Dv), idx (B, N) int64)``.

    ``seed`` (Gumbel noise) may be a one-element int64 tensor; under ``torch.func.vmap`` a batched one
    gives each member its own seed."""
    _check(q, k, v, None)
    _validate.finite_float("temperature", temperature, minimum=0.0, strict=True)
    if not isinstance(gumbel, bool):
        raise TypeError(f"gumbel must be a bool, got {type(gumbel).__name__}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed given as a tensor must be one int64, got {seed.dtype} x {seed.numel()}")
        if torch._C._functorch.is_batchedtensor(seed):
            if not gumbel:   # the seed changes nothing: fold the members
                return top1_attention(q, k, v, temperature=temperature, backend=backend)
            return _PerMemberSeed.apply(q, k, v, float(temperature), gumbel, seed, backend)
        seed = int(seed)
    _validate.seed("seed", seed)
    if _resolve(backend, q, k, v) == "triton":
        return _top1_fwd_op(q, k, v, float(temperature), gumbel, int(seed))
    return top1_attention_reference(q, k, v, temperature, gumbel, seed)
