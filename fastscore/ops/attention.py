"""Softmax patch attention: ``out = softmax(scale * q k^T) v`` over the ``N = H*W`` tokens.

Contract (every path):
  q: (B, NQ, D), k: (B, N, D), v: (B, N, Dv); floating, same dtype and device; math in float32
  (float64 for float64 inputs on the reference); out: (B, NQ, Dv) in the input dtype.
  ``scale`` defaults to ``D ** -0.5``.
``identity_attention(z)`` is the paper's q = k = v = z case: one input, one gradient.

Paths (``fastscore.ops._dispatch`` has the rule and the ``backend="auto"`` table):
  * ``"torch"``: ``softmax_attention_reference``, eager matmul + softmax + matmul; what the tests
    and the benchmarks' "eager" compare against.
  * ``"sdpa"``: ``softmax_attention_sdpa``, torch's ``scaled_dot_product_attention`` on
    ``(B, 1, N, D)`` views: 4-D inputs let it pick FlashAttention / memory-efficient / cuDNN
    kernels (3-D inputs run its math path). ``auto`` on CUDA.
  * ``"triton"``: the fused kernels (``fastscore.kernels.attention``) as ``torch.library`` custom
    ops with fake (meta) implementations, so ``torch.compile`` traces them without graph breaks:
    ``fastscore::attention_fwd(q, k, v, scale) -> (out, lse)`` with autograd through
    ``fastscore::attention_bwd``, and ``fastscore::identity_attention_fwd`` /
    ``identity_attention_bwd`` for q = k = v = z (each tile loaded once). The forward saves the
    log-sum-exp (B, NQ) float32 for backward and never builds NQ x N.

vmap (``torch.func``, e.g. an ensemble of networks): the torch paths are plain torch; the custom ops,
forward and backward, carry ``torch.library.register_vmap`` rules that fold the vmapped (member)
dimension into the batch: attention is independent per batch row, so folding is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate
from . import _dispatch


def _kernels():
    # imported on first use: fastscore.ops imports without triton (macOS, Windows)
    from fastscore.kernels import attention
    return attention


# ---------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------
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
        raise ValueError(f"q and k must have a sequence length N >= 1, got {q.shape[1]} and {k.shape[1]}")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"q and v must have a feature size D >= 1, got {q.shape[2]} and {v.shape[2]}")
    if scale is None:
        return q.shape[2] ** -0.5
    return _validate.finite_float("scale", scale)


def kernel_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise TypeError / ValueError for inputs the Triton kernels cannot take (dtype other than
    float32/float16/bfloat16, feature size above the kernels' limit); the kernels own the limits."""
    _kernels().check_inputs(q, k, v)


def _resolve(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str) -> str:
    return _dispatch.resolve(op, backend, (q, k, v), lambda: kernel_check(q, k, v))


# ---------------------------------------------------------------------------------------------
# the two torch paths
# ---------------------------------------------------------------------------------------------
def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Eager float32 (or float64 for float64 inputs) attention; differentiable by autograd."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


def softmax_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` on ``(B, 1, N, D)`` views (one head), so that its
    fused backends are eligible; (B, NQ, Dv) out. Differentiable by autograd."""
    out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale)
    return out.squeeze(1)


# ---------------------------------------------------------------------------------------------
# vmap: fold the vmapped dimension into the batch (every op here is independent per batch row)
# ---------------------------------------------------------------------------------------------
def fold(size: int, in_dims, *args):
    """The tensors of ``args`` with their vmapped dim (``in_dims``, None: unbatched) moved to the front,
    expanded to ``size`` where unbatched, and merged with the batch dim: (size * B, ...)."""
    out = []
    for x, d in zip(args, in_dims):
        if isinstance(x, torch.Tensor):
            x = x.unsqueeze(0).expand(size, *x.shape) if d is None else x.movedim(d, 0)
            x = x.reshape(size * x.shape[1], *x.shape[2:])
        out.append(x)
    return out


def unfold(size: int, *outs: torch.Tensor):
    """Split the folded batch of ``outs`` back into (size, B, ...); returns ``(outs, out_dims)``."""
    return tuple(o.view(size, -1, *o.shape[1:]) for o in outs), (0,) * len(outs)


def member(x, d, m: int):
    """Member ``m`` of ``x`` batched at ``d`` (``x`` itself when unbatched or not a tensor)."""
    return x if d is None or not isinstance(x, torch.Tensor) else x.select(d, m)


def per_member(name: str, call):
    """An autograd.Function reached only under ``torch.func.vmap``, whose vmap rule runs
    ``call(m, in_dims, *args)`` once per member m and stacks the outputs (a tensor, or a tuple of
    tensors) along dim 0: for ops whose randomness must be keyed per member (a batched seed) as when
    each member runs alone. Autograd records the per-member calls; its own forward/backward never run."""
    def forward(*args):
        raise RuntimeError(f"{name} runs under vmap only (the op passes an unbatched seed as an int)")

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"unreachable: {name}'s vmap rule records the per-member ops")

    def vmap(info, in_dims, *args):
        outs = [call(m, in_dims, *args) for m in range(info.batch_size)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return type(name, (torch.autograd.Function,), {f.__name__: staticmethod(f)
                                                    for f in (forward, setup_context, backward, vmap)})


def _folded(op):
    """A vmap rule that runs ``op`` once on the folded batch."""
    def rule(info, in_dims, *args):
        out = op(*fold(info.batch_size, in_dims, *args))
        if isinstance(out, torch.Tensor):
            return out.view(info.batch_size, -1, *out.shape[1:]), 0
        return unfold(info.batch_size, *out)
    return rule


# ---------------------------------------------------------------------------------------------
# the Triton path: custom ops, their fakes, autograd and vmap
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastscore::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().attention_forward(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale):
    B, NQ, _ = q.shape
    return q.new_empty((B, NQ, v.shape[2])), q.new_empty((B, NQ), dtype=torch.float32)


@torch.library.custom_op("fastscore::attention_bwd", mutates_args=())
def _attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().attention_backward(q, k, v, out, lse, dout, scale)


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
torch.library.register_vmap(_attention_fwd, _folded(_attention_fwd))
torch.library.register_vmap(_attention_bwd, _folded(_attention_bwd))


@torch.library.custom_op("fastscore::identity_attention_fwd", mutates_args=())
def _identity_fwd(z: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().identity_forward(z, scale)


@_identity_fwd.register_fake
def _(z, scale):
    return torch.empty_like(z), z.new_empty(z.shape[:2], dtype=torch.float32)


@torch.library.custom_op("fastscore::identity_attention_bwd", mutates_args=())
def _identity_bwd(z: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  scale: float) -> torch.Tensor:
    return _kernels().identity_backward(z, out, lse, dout, scale)


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
torch.library.register_vmap(_identity_fwd, _folded(_identity_fwd))
torch.library.register_vmap(_identity_bwd, _folded(_identity_bwd))


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------
def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      *, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of (B, NQ, D) queries over (B, N, D) keys and (B, N, Dv) values -> (B, NQ, Dv)."""
    scale = _check(q, k, v, scale)
    path = _resolve(backend, q, k, v, "softmax_attention")
    if path == "triton":
        return _attention_fwd(q, k, v, float(scale))[0]
    if path == "sdpa":
        return softmax_attention_sdpa(q, k, v, scale)
    return softmax_attention_reference(q, k, v, scale)


def identity_attention(z: torch.Tensor, scale: float | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``softmax_attention(z, z, z, scale)`` for z of shape (B, N, D); one gradient, for z."""
    scale = _check(z, z, z, scale)
    path = _resolve(backend, z, z, z, "identity_attention")
    if path == "triton":
        return _identity_fwd(z, float(scale))[0]
    if path == "sdpa":
        return softmax_attention_sdpa(z, z, z, scale)
    return softmax_attention_reference(z, z, z, scale)
