"""The patch-attention block: ScoreNet's whole residual attention layer as one op.

Contract (every path), for z (B, C, H, W) (``ScoreNet``'s embedding layout), N = H*W tokens
``z_i``, and optionally x (B, c, H, W) (the network input; its raw zero-padded 3x3 neighbourhoods,
``models.patch_features``, join the projection input: ``u = [z_i; patch_i]``, ``attn_patch``):

* ``kind="softmax"``: ``q, k, v = (u W_qkv^T + b_qkv).chunk(3)``, ``a = softmax_attention(q, k, v,
  scale)``, returns ``z + a W_out^T + b_out``;
* ``kind="identity"``: ``z + identity_attention(z, scale)`` (no weights, no x);
* ``kind="top1"``: ``a, idx = top1_attention(q, k, v, temperature, gumbel, seed)``, returns
  ``(z + a W_out^T + b_out, idx (B, N) int64)``; backward straight-through as ``ops.top1``.

Weights have ``nn.Linear``'s layout: ``w_qkv`` (3d, C + 9c) (C without x), ``b_qkv`` (3d,),
``w_out`` (C, d), ``b_out`` (C,). **Ensembles**: weights with a leading member dim (M, ...) take
z (M, B, C, H, W) and x (M, B, c, H, W) and return (M, B, C, H, W) (idx (M, B, N)); member m's images
see member m's weights, all members in one launch; the top-1 Gumbel stream indexes images by their
flat position m * B + b. All tensors share dtype and device.

Paths (``fastscore.ops._dispatch``):
  * ``"torch"``: ``attention_block_reference``, today's composition in ``ScoreNet.attend``
    (``patch_features``, ``F.linear``, ``softmax_attention_reference`` / ``top1_attention_reference``),
    batched over members with ``baddbmm``; float64 in, float64 math.
  * ``"triton"``: ``fastscore.kernels.attention_block`` (one forward kernel, one backward kernel,
    N <= 256, C, d, 9c <= 128) as the ``torch.library`` custom ops ``fastscore::attention_block_fwd``
    -> (out, lse, idx) and ``fastscore::attention_block_bwd`` with fake (meta) implementations, so
    ``torch.compile`` traces them, autograd attached with ``register_autograd``. The gradient for x is computed only
    when x requires grad: the kernel writes the patch-feature gradient and the adjoint of
    ``patch_features`` (torch autograd of it) maps it to dx.
  * ``"auto"``: the composition, its attention core on the core's own ``auto`` path (SDPA on CUDA,
    the reference elsewhere; top-1: the reference), also on CUDA: ``AUTO_ON_CUDA["attention_block"]``
    is ``"torch"`` until a GPU measurement says the kernels are faster.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from .. import _validate
from . import _dispatch
from .attention import fold, member, per_member, softmax_attention, softmax_attention_reference
from .top1 import top1_attention_reference

KINDS = ("softmax", "identity", "top1")


def _kernels():
    # imported on first use: fastscore.ops imports without triton (macOS, Windows)
    from fastscore.kernels import attention_block
    return attention_block


def _patch_features(x: torch.Tensor) -> torch.Tensor:
    from ..models import patch_features  # models imports ops: import on use
    return patch_features(x)


# ---------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------
def _check(z, x, w_qkv, b_qkv, w_out, b_out, kind, scale, temperature, gumbel, seed) -> tuple[int | None, int]:
    """Validate every argument; returns (members M or None, attention width d)."""
    _validate.choice("kind", kind, KINDS)
    _validate.tensor("z", z)
    weights = {"w_qkv": w_qkv, "b_qkv": b_qkv, "w_out": w_out, "b_out": b_out}
    if kind == "identity":
        given = [n for n, w in weights.items() if w is not None]
        if given or x is not None:
            raise ValueError(f"kind='identity' takes no weights and no x, got {given + (['x'] if x is not None else [])}")
        if z.dim() not in (4, 5):
            raise ValueError(f"z must have shape (B, C, H, W) or (M, B, C, H, W), got {tuple(z.shape)}")
        members = z.shape[0] if z.dim() == 5 else None
    else:
        for n, w in weights.items():
            if w is None:
                raise ValueError(f"kind={kind!r} needs {n}")
            _validate.tensor(n, w)
        members = w_qkv.shape[0] if w_qkv.dim() == 3 else None
        lead = () if members is None else (members,)
        if z.dim() != 4 + len(lead) or tuple(z.shape[:len(lead)]) != lead:
            want = "(B, C, H, W)" if members is None else f"({members}, B, C, H, W) (w_qkv has {members} members)"
            raise ValueError(f"z must have shape {want}, got {tuple(z.shape)}")
    C = z.shape[-3]
    if z.shape[-1] == 0 or z.shape[-2] == 0 or C == 0:
        raise ValueError(f"z must have C, H, W >= 1, got shape {tuple(z.shape)}")
    if x is not None:
        _validate.tensor("x", x)
        if x.dim() != z.dim() or x.shape[:-3] != z.shape[:-3] or x.shape[-2:] != z.shape[-2:] or x.shape[-3] == 0:
            raise ValueError(f"x must have z's batch and spatial dims {tuple(z.shape[:-3])} + (c, "
                             f"{z.shape[-2]}, {z.shape[-1]}), got {tuple(x.shape)}")
    d = C
    if kind != "identity":
        lead = () if members is None else (members,)
        k_in = C + (9 * x.shape[-3] if x is not None else 0)
        if w_qkv.dim() != 2 + len(lead) or w_qkv.shape[-2] % 3 or w_qkv.shape[-2] == 0 or w_qkv.shape[-1] != k_in:
            raise ValueError(f"w_qkv must have shape {lead + ('3d', k_in)} (C + 9c input features), "
                             f"got {tuple(w_qkv.shape)}")
        d = w_qkv.shape[-2] // 3
        for n, w, shape in (("b_qkv", b_qkv, (*lead, 3 * d)), ("w_out", w_out, (*lead, C, d)),
                            ("b_out", b_out, (*lead, C))):
            if tuple(w.shape) != shape:
                raise ValueError(f"{n} must have shape {shape}, got {tuple(w.shape)}")
    names = ["z"] + (["x"] if x is not None else []) + ([] if kind == "identity" else list(weights))
    tensors = [z] + ([x] if x is not None else []) + ([] if kind == "identity" else list(weights.values()))
    _validate.same(names, tensors)
    if kind == "top1":
        _validate.finite_float("temperature", temperature, minimum=0.0, strict=True)
        if not isinstance(gumbel, bool):
            raise TypeError(f"gumbel must be a bool, got {type(gumbel).__name__}")
        _validate.seed("seed", seed)
    elif scale is None:
        raise ValueError(f"kind={kind!r} needs scale (ScoreNet: attn_dim ** -0.5, identity width ** -0.5)")
    else:
        _validate.finite_float("scale", scale)
    return members, d


def kernel_check(z: torch.Tensor, x: torch.Tensor | None, kind: str, d: int) -> None:
    """Raise TypeError / ValueError for inputs the Triton kernels cannot take (dtype, N > 256, widths)."""
    _kernels().check_inputs(kind, z.dtype, z.shape[-1] * z.shape[-2], z.shape[-3],
                            0 if x is None else 9 * x.shape[-3], d)


def _resolve(backend: str, z: torch.Tensor, x: torch.Tensor | None, kind: str, d: int) -> str:
    tensors = (z,) if x is None else (z, x)
    return _dispatch.resolve("attention_block", backend, tensors, lambda: kernel_check(z, x, kind, d))


# ---------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------
def _linear(u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, members: int | None) -> torch.Tensor:
    """``F.linear`` (members None), else per member: u (M*B, N, K), w (M, out, K), b (M, out)."""
    if members is None:
        return F.linear(u, w, b)
    NB, N, K = u.shape
    y = torch.baddbmm(b.unsqueeze(1), u.reshape(members, NB // members * N, K), w.transpose(1, 2))
    return y.reshape(NB, N, -1)


def attention_block_reference(z: torch.Tensor, x: torch.Tensor | None, w_qkv: torch.Tensor | None,
                              b_qkv: torch.Tensor | None, w_out: torch.Tensor | None, b_out: torch.Tensor | None,
                              *, kind: str, scale: float | None = None, temperature: float = 1.0,
                              gumbel: bool = False, seed: int = 0, core: Callable | None = None):
    """The eager composition (``ScoreNet.attend``'s maths), differentiable by autograd; no checks.
    ``core(q, k, v, scale)`` replaces ``softmax_attention_reference`` for softmax and identity (the
    benchmarks time the same composition around SDPA: ``softmax_attention_sdpa``)."""
    core = core or softmax_attention_reference
    sc = cast(float, scale)
    members = z.shape[0] if z.dim() == 5 else None
    zf = z.flatten(0, 1) if members is not None else z
    NB, C, H, W = zf.shape
    tok = zf.flatten(2).transpose(1, 2)                                   # (NB, N, C)
    idx = None
    if kind == "identity":   # contiguous, as ScoreNet passed it to identity_attention: the same bits in float64
        tc = tok.contiguous()
        a = core(tc, tc, tc, sc)
    else:
        assert w_qkv is not None and b_qkv is not None and w_out is not None and b_out is not None
        u = tok
        if x is not None:
            xf = x.flatten(0, 1) if members is not None else x
            u = torch.cat([tok, _patch_features(xf).to(tok.dtype)], dim=-1)
        q, k, v = _linear(u, w_qkv, b_qkv, members).chunk(3, dim=-1)
        if kind == "softmax":
            a = core(q, k, v, sc)
        else:
            a, idx = top1_attention_reference(q, k, v, temperature, gumbel, seed)
        a = _linear(a, w_out, b_out, members)
    out = zf + a.transpose(1, 2).reshape(NB, C, H, W)
    if members is not None:
        out = out.unflatten(0, (members, NB // members))
        idx = None if idx is None else idx.unflatten(0, (members, NB // members))
    return out if idx is None else (out, idx)


# ---------------------------------------------------------------------------------------------
# the Triton path
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastscore::attention_block_fwd", mutates_args=())
def _block_fwd(z: torch.Tensor, x: torch.Tensor | None, w_qkv: torch.Tensor | None, b_qkv: torch.Tensor | None,
               w_out: torch.Tensor | None, b_out: torch.Tensor | None, kind: str, members: int, scale: float,
               gumbel: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, idx = _kernels().block_forward(z, x, w_qkv, b_qkv, w_out, b_out, kind=kind, members=members,
                                             qk_scale=scale, gumbel=gumbel, seed=seed)
    return out, lse, (idx if idx is not None else z.new_empty((0,), dtype=torch.int64))


@_block_fwd.register_fake
def _(z, x, w_qkv, b_qkv, w_out, b_out, kind, members, scale, gumbel, seed):
    nb, _, h, w = z.shape
    idx_shape = (nb, h * w) if kind == "top1" else (0,)
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((nb, h * w), dtype=torch.float32), z.new_empty(idx_shape, dtype=torch.int64))


@torch.library.custom_op("fastscore::attention_block_bwd", mutates_args=())
def _block_bwd(g: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None, w_qkv: torch.Tensor | None,
               b_qkv: torch.Tensor | None, w_out: torch.Tensor | None, b_out: torch.Tensor | None, lse: torch.Tensor,
               idx: torch.Tensor, kind: str, members: int, scale: float, gumbel: bool, seed: int,
               need_dpatch: bool) -> list[torch.Tensor]:
    """[dz, dpatch (or empty), then dw_qkv, db_qkv, dw_out, db_out in float32 unless identity]."""
    dz, dpatch, *dws = _kernels().block_backward(
        g, z, x, w_qkv, b_qkv, w_out, b_out, lse, idx if kind == "top1" else None, kind=kind, members=members,
        sm_scale=scale, gumbel=gumbel, seed=seed, need_dpatch=need_dpatch)
    empty = z.new_empty((0,), dtype=torch.float32)
    return [dz, dpatch if dpatch is not None else empty, *([] if kind == "identity" else dws)]


@_block_bwd.register_fake
def _(g, z, x, w_qkv, b_qkv, w_out, b_out, lse, idx, kind, members, scale, gumbel, seed, need_dpatch):
    nb, _, h, w = z.shape
    f32 = torch.float32
    dpatch = z.new_empty((nb, h * w, 9 * x.shape[1]) if (need_dpatch and x is not None) else (0,), dtype=f32)
    dws = [] if kind == "identity" else [t.new_empty(t.shape, dtype=f32) for t in (w_qkv, b_qkv, w_out, b_out)]
    return [torch.empty_like(z, memory_format=torch.contiguous_format), dpatch, *dws]


def _block_setup(ctx, inputs, output):
    z, x, w_qkv, b_qkv, w_out, b_out, kind, members, scale, gumbel, seed = inputs
    _, lse, idx = output
    ctx.save_for_backward(z, x, w_qkv, b_qkv, w_out, b_out, lse, idx)
    ctx.kind, ctx.members, ctx.scale, ctx.gumbel, ctx.seed = kind, members, scale, gumbel, seed
    ctx.mark_non_differentiable(lse, idx)


def _block_backward(ctx, g, _dlse, _didx):
    z, x, w_qkv, b_qkv, w_out, b_out, lse, idx = ctx.saved_tensors
    if g is None:
        return (None,) * 11
    need_dx = x is not None and ctx.needs_input_grad[1]
    dz, dpatch, *dws = _block_bwd(g, z, x, w_qkv, b_qkv, w_out, b_out, lse, idx, ctx.kind, ctx.members,
                                  ctx.scale, ctx.gumbel, ctx.seed, need_dx)
    dx = None
    if need_dx:  # the adjoint of patch_features, by torch's autograd of it
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            dx, = torch.autograd.grad(_patch_features(xx), xx, dpatch.to(x.dtype))
    grads = [None] * 4 if ctx.kind == "identity" else [gw.to(w.dtype) for w, gw in
                                                       zip((w_qkv, b_qkv, w_out, b_out), dws)]
    return (dz, dx, *grads, None, None, None, None, None)


_block_fwd.register_autograd(_block_backward, setup_context=_block_setup)


# vmap (``torch.func``, e.g. ``Ensemble(members="vmap")``): the vmapped dim is folded into the block's own
# member support, z/x (V, NB, ...) -> (V * NB, ...) and weights (V, M, ...) -> (V * M, ...) (unbatched ones
# expanded), one launch for all; member v * M + m owns images (v * M + m) * B + b, as the kernels index them.
# With Gumbel noise one call per vmapped member instead, so that its noise is keyed by its own images, as alone.
def _unfold(size: int, outs):
    """Split the folded leading dim of each of ``outs`` back into (size, ...); empty outputs give (size, 0)."""
    return [o.unflatten(0, (size, -1)) if o.numel() else o.new_empty((size, 0)) for o in outs]


def _per_member(op, size: int, in_dims, tensors, rest):
    outs = [op(*(member(t, d, m) for t, d in zip(tensors, in_dims)), *rest) for m in range(size)]
    return [torch.stack(o) for o in zip(*outs)]


def _block_fwd_vmap(info, in_dims, z, x, w_qkv, b_qkv, w_out, b_out, kind, members, scale, gumbel, seed):
    V, tensors = info.batch_size, (z, x, w_qkv, b_qkv, w_out, b_out)
    if gumbel:
        outs = _per_member(_block_fwd, V, in_dims[:6], tensors, (kind, members, scale, gumbel, seed))
    else:
        outs = _unfold(V, _block_fwd(*fold(V, in_dims[:6], *tensors), kind, members * V, scale, gumbel, seed))
    return tuple(outs), (0, 0, 0)


def _block_bwd_vmap(info, in_dims, g, z, x, w_qkv, b_qkv, w_out, b_out, lse, idx, kind, members, scale, gumbel,
                    seed, need_dpatch):
    V, tensors = info.batch_size, (g, z, x, w_qkv, b_qkv, w_out, b_out, lse, idx)
    if gumbel:
        outs = _per_member(_block_bwd, V, in_dims[:9], tensors, (kind, members, scale, gumbel, seed, need_dpatch))
    else:
        outs = _unfold(V, _block_bwd(*fold(V, in_dims[:9], *tensors), kind, members * V, scale, gumbel, seed,
                                     need_dpatch))
    return outs, [0] * len(outs)


torch.library.register_vmap(_block_fwd, _block_fwd_vmap)
torch.library.register_vmap(_block_bwd, _block_bwd_vmap)


def _triton(z, x, w_qkv, b_qkv, w_out, b_out, kind, members, scale, temperature, gumbel, seed):
    flat = members is not None
    zf = z.flatten(0, 1) if flat else z
    xf = None if x is None else (x.flatten(0, 1) if flat else x)
    ws = [None if w is None else (w if flat else w.unsqueeze(0)) for w in (w_qkv, b_qkv, w_out, b_out)]
    sc = 1.0 / float(temperature) if kind == "top1" else float(scale)
    out, _, idx = _block_fwd(zf, xf, *ws, kind, members or 1, sc, bool(gumbel) and kind == "top1", int(seed))
    if flat:
        out = out.unflatten(0, z.shape[:2])
        idx = idx.unflatten(0, z.shape[:2]) if kind == "top1" else idx
    return (out, idx) if kind == "top1" else out


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------
def attention_block(z: torch.Tensor, x: torch.Tensor | None = None, w_qkv: torch.Tensor | None = None,
                    b_qkv: torch.Tensor | None = None, w_out: torch.Tensor | None = None,
                    b_out: torch.Tensor | None = None, *, kind: str, scale: float | None = None,
                    temperature: float = 1.0, gumbel: bool = False, seed: int | torch.Tensor = 0,
                    backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ScoreNet's residual attention layer ``z + A(z)`` (module docstring); top-1 also returns its
    index map. ``scale`` (softmax, identity) and ``temperature`` / ``gumbel`` / ``seed`` (top-1) as
    in ``softmax_attention`` and ``top1_attention``: ``seed`` may be a one-element int64 tensor, and
    under ``torch.func.vmap`` a batched one gives each member its own Gumbel seed (one call per member)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed given as a tensor must be one int64, got {seed.dtype} x {seed.numel()}")
        if kind != "top1" or gumbel is not True:   # the seed changes nothing
            seed = 0
        elif torch._C._functorch.is_batchedtensor(seed):
            return _PerMemberSeed.apply(z, x, w_qkv, b_qkv, w_out, b_out, kind, temperature, seed, backend)
        else:
            seed = int(seed)
    members, d = _check(z, x, w_qkv, b_qkv, w_out, b_out, kind, scale, temperature, gumbel, seed)
    if _resolve(backend, z, x, kind, d) == "triton":
        return _triton(z, x, w_qkv, b_qkv, w_out, b_out, kind, members, scale, temperature, gumbel, seed)
    # "auto" off the kernels: the composition with the attention core's own "auto" (SDPA on CUDA), so
    # that a caller switching to this op runs what it ran before
    core = _auto_core if backend == "auto" else None
    return attention_block_reference(z, x, w_qkv, b_qkv, w_out, b_out, kind=kind, scale=scale,
                                     temperature=temperature, gumbel=gumbel, seed=seed, core=core)


def _auto_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return softmax_attention(q, k, v, scale, backend="auto")


# top-1 with Gumbel noise and a seed per vmapped member (a batched int64 seed, e.g. ScoreNet's ``seed``
# under torch.func.vmap): one attention_block call per member with that member's int seed
_PerMemberSeed = per_member("_PerMemberSeed", lambda m, d, z, x, w_qkv, b_qkv, w_out, b_out, kind, temperature, seed,
                            backend: attention_block(
    *(member(t, dt, m) for t, dt in zip((z, x, w_qkv, b_qkv, w_out, b_out), d)), kind=kind, temperature=temperature,
    gumbel=True, seed=int(member(seed, d[8], m)), backend=backend))
