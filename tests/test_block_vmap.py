"""vmap over the fused attention block: ``ScoreNet.attend`` is ``ops.attention_block``, and the block's
custom ops (forward and backward) fold the vmapped member dim into the block's own member support, so an
``Ensemble(members="vmap")`` of ScoreNets runs each attention layer as one launch for all members and
gives each member what it gives alone.

Tolerance on the kernels (flash-attention's rule, as ``test_attention_block``): the error against the
float64 loop is at most twice that of the torch loop in float32, plus a small floor; the torch path in
float64 agrees to rounding.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fastscore.ensemble import Ensemble
from fastscore.kernels import attention_block as K
from fastscore.models import ScoreNet

DEV = DEVICE
#: (attention, attn_patch); top-1 without Gumbel noise (the folded launch), with it below
NETS = [("softmax", True), ("softmax", False), ("identity", False), ("top1", True), ("top1", False)]
M, B = 3, 2


def _nets(attention: str, patch: bool, backend: str, dtype: torch.dtype, gumbel: bool = False) -> list[ScoreNet]:
    out = []
    for s in range(M):
        torch.manual_seed(1000 + s)
        net = ScoreNet(attention, 8, attn_dim=8, image_size=4, attn_patch=patch, gumbel=gumbel, backend=backend)
        out.append(net.to(DEV, dtype))
    return out


def _vmap_and_loop(models, x, t, w, seeds):
    """(vmapped ensemble's output, its parameter gradients of (out * w).sum(), the loop's output, its gradients)."""
    ens = Ensemble(models, members="vmap").train()
    dtype = next(models[0].parameters()).dtype
    x, w = x.to(dtype), w.to(dtype)
    out = ens.run(x, t, seeds=seeds)
    grads = torch.autograd.grad((out * w).sum(), list(ens.parameters_by_name().values()))
    ref, ref_grads = [], []
    for m, net in enumerate(models):
        o = net.train()(x[m], t[m], seed=int(seeds[m]))
        ref.append(o)
        ref_grads.append(torch.autograd.grad((o * w[m]).sum(), list(net.parameters())))
    return [out.detach(), *grads], [torch.stack(ref).detach(), *(torch.stack(g) for g in zip(*ref_grads))]


def _inputs():
    x = torch.randn(M, B, 3, 4, 4, device=DEV, dtype=torch.float64)
    t = torch.randint(0, 1000, (M, B), device=DEV)
    return x, t, torch.randn_like(x), torch.tensor([5, 6, 2**40], device=DEV)


def _counting(monkeypatch) -> dict[str, int]:
    calls = {"block_forward": 0, "block_backward": 0}
    for name in calls:
        real = getattr(K, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(K, name, counted)
    return calls


@pytest.mark.parametrize("attention, patch", NETS)
def test_vmap_equals_the_loop_on_the_torch_path_in_float64(seed, attention, patch):
    x, t, w, seeds = _inputs()
    got, want = _vmap_and_loop(_nets(attention, patch, "torch", torch.float64), x, t, w, seeds)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-11, atol=1e-12 * max(1.0, r.abs().max().item()))


@pytest.mark.interpret
@pytest.mark.parametrize("attention, patch", NETS)
def test_vmap_runs_each_layer_as_one_launch_and_equals_the_loop_on_the_kernels(seed, attention, patch, monkeypatch):
    """Forward and every parameter gradient of the vmapped ensemble on the kernels (float32) against the
    float64 loop, bounded by the float32 torch loop's error; one forward and one backward launch in all."""
    x, t, w, seeds = _inputs()
    want64 = _vmap_and_loop(_nets(attention, patch, "torch", torch.float64), x, t, w, seeds)[1]
    low = _vmap_and_loop(_nets(attention, patch, "torch", torch.float32), x, t, w, seeds)[1]
    calls = _counting(monkeypatch)
    got, loop = _vmap_and_loop(_nets(attention, patch, "triton", torch.float32), x, t, w, seeds)
    # the vmapped step: one launch each; the loop after it: one per member
    assert calls == {"block_forward": 1 + M, "block_backward": 1 + M}
    floor = 1e-5 if attention == "top1" else 2e-6   # top-1's surrogate logits are unscaled (test_attention_block)
    names = ["out", *(f"d{n}" for n in dict(_nets(attention, patch, "torch", torch.float32)[0].named_parameters()))]
    for name, g, lp, r64, rlow in zip(names, got, loop, want64, low):
        assert not torch.isnan(g).any(), name
        bound = 2 * (rlow.double() - r64).abs().max().item() + floor * max(1.0, r64.abs().max().item())
        for what, v in (("vmap", g), ("loop", lp)):
            err = (v.double() - r64).abs().max().item()
            assert err <= bound, f"{what} {name}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.interpret
def test_top1_with_gumbel_noise_under_vmap_keys_each_member_by_its_own_seed(seed, monkeypatch):
    """With Gumbel noise and a seed per member the block runs once per member (its noise keyed by its own
    images and seed, as alone): equal to the loop on the same kernels, index maps included."""
    x, t, w, seeds = _inputs()
    calls = _counting(monkeypatch)
    got, loop = _vmap_and_loop(_nets("top1", True, "triton", torch.float32, gumbel=True), x, t, w, seeds)
    assert calls == {"block_forward": 2 * M, "block_backward": 2 * M}
    for g, r in zip(got, loop):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6 * max(1.0, r.abs().max().item()))


@pytest.mark.interpret
@pytest.mark.parametrize("kind, c, weights_batched", [("softmax", 3, True), ("top1", 3, True), ("identity", 0, True),
                                                      ("softmax", 0, False)])
def test_the_vmap_rules_of_both_custom_ops_fold_the_members_into_one_launch(seed, kind, c, weights_batched,
                                                                          monkeypatch):
    """The rules themselves, on the ops ``fastscore::attention_block_fwd`` / ``_bwd`` (torch's
    ``register_autograd`` does not run under ``torch.func.grad``, so the backward op is vmapped only when
    called under vmap): each vmapped member's outputs, dx's patch gradient and weight gradients included,
    equal that member's own call; weights shared across the vmap (unbatched) are expanded; one launch each."""
    fwd, bwd = torch.ops.fastscore.attention_block_fwd, torch.ops.fastscore.attention_block_bwd
    C, d, H, W = 16, 8, 4, 3
    z = torch.randn(M, B, C, H, W, device=DEV)
    x = torch.randn(M, B, c, H, W, device=DEV) if c else None
    ws = [None] * 4 if kind == "identity" else [torch.randn(*((M,) if weights_batched else ()), 1, *s, device=DEV) * 0.3
                                                 for s in ((3 * d, C + 9 * c), (3 * d,), (C, d), (C,))]
    wd = 0 if weights_batched and kind != "identity" else None
    g = torch.randn_like(z)
    rest = (kind, 1, d ** -0.5 if kind != "top1" else 0.5, False, 0)
    calls = _counting(monkeypatch)
    dims = (0, None if x is None else 0, wd, wd, wd, wd)
    out, lse, idx = torch.vmap(lambda *a: fwd(*a, *rest), in_dims=dims)(z, x, *ws)
    grads = torch.vmap(lambda *a: bwd(*a, *rest, x is not None), in_dims=(0, *dims, 0, 0))(g, z, x, *ws, lse, idx)
    assert calls == {"block_forward": 1, "block_backward": 1}
    for m in range(M):
        mw = [w if w is None or not weights_batched else w[m] for w in ws]
        o1, l1, i1 = fwd(z[m], None if x is None else x[m], *mw, *rest)
        assert torch.equal(i1, idx[m])
        g1 = bwd(g[m], z[m], None if x is None else x[m], *mw, l1, i1, *rest, x is not None)
        for a, b in zip([o1, l1, *g1], [out[m], lse[m], *(t[m] for t in grads)]):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max([1.0, *a.abs().flatten().tolist()]))
