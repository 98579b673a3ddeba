"""Ensembles: M networks as one module (``fastscore.ensemble.Ensemble``): each member computes what it
computes alone, under both schedules; sampled through ``fastscore.sample``; the patch features."""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from fastscore.ensemble import Ensemble
from fastscore.models import ScoreNet, patch_features
from fastscore.sampling import sample

# (attention, attn_patch): the CNN, both attentions with learned projections (with the study's patch
# features), and the identity attention (the folded op without projections)
NETS = [("none", False), ("softmax", True), ("top1", True), ("identity", False)]


def _members(attention: str, patch: bool, M: int, width: int = 8, backend: str = "torch", **kw) -> list[ScoreNet]:
    out = []
    for s in range(M):
        torch.manual_seed(1000 + s)
        out.append(ScoreNet(attention, width, attn_patch=patch, backend=backend, **kw))
    return out


# --- patch features (issue 14, point 5) -------------------------------------------------------------

@pytest.mark.parametrize("B, C, H, W", [(1, 1, 1, 1), (3, 3, 8, 8), (5, 2, 7, 4), (64, 3, 8, 8)])
def test_patch_features_equal_unfold_bitwise(seed, B, C, H, W):
    x = torch.randn(B, C, H, W) * 3
    assert torch.equal(patch_features(x), F.unfold(x, 3, padding=1).transpose(1, 2))


def test_patch_features_equal_unfold_in_float64(seed):
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out = patch_features(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, F.unfold(x, 3, padding=1).transpose(1, 2))


@requires_cuda
@pytest.mark.gpu
def test_patch_features_equal_unfold_on_gpu(seed):
    x = torch.randn(4096, 3, 8, 8, device="cuda")
    assert torch.equal(patch_features(x), F.unfold(x, 3, padding=1).transpose(1, 2))


# --- the ensemble forward: vmap and loop are the members' own forward ----------------------------------

@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention, patch", NETS)
def test_ensemble_run_equals_each_member(seed, attention, patch, members):
    models = _members(attention, patch, 3)
    ens = Ensemble(models, members=members).train()
    x = torch.randn(3, 5, 3, 8, 8)
    t = torch.randint(0, 1000, (3, 5))
    seeds = torch.tensor([11, 12, 13])
    out = ens.run(x, t, seeds=seeds)
    for m, net in enumerate(models):
        ref = net.train()(x[m], t[m], seed=int(seeds[m]))
        assert torch.allclose(out[m], ref, rtol=1e-5, atol=1e-6), (attention, m, (out[m] - ref).abs().max())


def _vmap_and_loop(models, x, t, seeds):
    """Outputs and parameter gradients (of a fixed random projection of the output) of the vmapped
    ensemble, and of each member run alone."""
    ens = Ensemble(models, members="vmap").train()
    w = torch.randn_like(x)
    out = ens.run(x, t, seeds=seeds)
    params = ens.parameters_by_name()
    grads = torch.autograd.grad((out * w).sum(), list(params.values()))
    ref, ref_grads = [], []
    for m, net in enumerate(models):
        net.train()
        o = net(x[m], t[m], seed=int(seeds[m]))
        ref.append(o)
        ref_grads.append(torch.autograd.grad((o * w[m]).sum(), list(net.parameters())))
    return out, grads, torch.stack(ref), [torch.stack(g) for g in zip(*ref_grads)]


@pytest.mark.parametrize("attention, patch, gumbel", [("none", False, True), ("identity", False, True),
                                                      ("softmax", True, True), ("softmax", False, True),
                                                      ("top1", True, True), ("top1", False, False)])
def test_vmap_over_stacked_networks_equals_the_loop_in_float64(seed, attention, patch, gumbel):
    """The ops' vmap rules (member dim folded into the batch; top-1 with Gumbel noise one call per
    member seed): forward and every parameter gradient, float64, torch backend."""
    models = [m.double() for m in _members(attention, patch, 3, width=6, image_size=4, gumbel=gumbel)]
    x = torch.randn(3, 2, 3, 4, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (3, 2))
    out, grads, ref, ref_grads = _vmap_and_loop(models, x, t, torch.tensor([5, 6, 2**40]))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12 * r.abs().max().item())


@pytest.mark.interpret
@pytest.mark.parametrize("attention, patch", [("identity", False), ("softmax", True), ("top1", True)])
def test_vmap_over_stacked_networks_equals_the_loop_on_the_kernels(seed, attention, patch):
    """The same on the Triton kernels (custom ops with vmap rules, forward and backward; float32: the
    kernels take no float64), against the loop on the same kernels."""
    models = _members(attention, patch, 3, width=6, backend="triton", image_size=4)
    x = torch.randn(3, 2, 3, 4, 4)
    t = torch.randint(0, 1000, (3, 2))
    out, grads, ref, ref_grads = _vmap_and_loop(models, x, t, torch.tensor([5, 6, 7]))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_any_module_with_buffers_runs_as_an_ensemble(seed):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("shift", torch.randn(4))

        def forward(self, x, t):
            return self.lin(x) + self.shift * t[:, None]

    models = [Net() for _ in range(3)]
    x, t = torch.randn(3, 5, 4), torch.randint(0, 9, (3, 5))
    for members in ("vmap", "loop"):
        out = Ensemble(models, members=members).run(x, t)
        for m, net in enumerate(models):
            assert torch.allclose(out[m], net(x[m], t[m]), atol=1e-6)


def test_member_extracts_the_weights_without_touching_the_global_rng():
    models = _members("softmax", True, 2)
    ens = Ensemble(models)
    state = torch.get_rng_state()
    net = ens.member(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), models[1].state_dict().values()))
    assert not net.training


# --- sampling through fastscore.sample ----------------------------------------------------------------

@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_an_ensemble_samples_each_member_through_fastscore_sample(attention, patch, members):
    models = _members(attention, patch, 3)
    n = 4
    got = sample(Ensemble(models, members=members), 3 * n, steps=5, seed=3, batch_size=6, backend="torch")
    for m, net in enumerate(models):
        ref = sample(net, 3 * n, steps=5, seed=3, backend="torch")[m::3]
        assert torch.allclose(got[m::3], ref, atol=1e-5), (m, (got[m::3] - ref).abs().max())


def test_sample_rounds_an_ensemble_s_batches_to_its_member_count():
    """A batch size that is not a multiple of M (the default 1000 for M = 3) is rounded down, so each
    batch starts at a member-0 row and member m's samples are still rows m::M."""
    models = _members("none", False, 3)
    ens = Ensemble(models, members="loop")
    got = sample(ens, 15, steps=3, seed=1, batch_size=7, backend="torch")     # batches of 6, 6, 3
    for m, net in enumerate(models):
        ref = sample(net, 15, steps=3, seed=1, backend="torch")[m::3]
        assert torch.allclose(got[m::3], ref, atol=1e-5), m


# --- bad input --------------------------------------------------------------------------------------

def test_bad_ensemble_arguments():
    cnn = _members("none", False, 2)
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"models\[1\] must be a torch.nn.Module"):
        Ensemble([cnn[0], "net"])
    with pytest.raises(ValueError, match=r"models\[1\] differs .* one architecture"):
        Ensemble([cnn[0], ScoreNet("none", 16)])
    with pytest.raises(ValueError, match=r"models\[1\] differs"):
        Ensemble([cnn[0], ScoreNet("none", 8, backend="triton")])
    with pytest.raises(ValueError, match="members must be one of"):
        Ensemble(cnn, members="grouped")
    with pytest.raises(ValueError, match="multiple of the ensemble size 2"):
        Ensemble(cnn)(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape \(2, B, ...\)"):
        Ensemble(cnn).run(torch.zeros(3, 2, 3, 8, 8), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="seeds must be an int64 tensor of shape"):
        Ensemble(_members("top1", True, 2)).run(torch.zeros(2, 1, 3, 8, 8), torch.zeros(2, 1, dtype=torch.int64),
                                                seeds=torch.zeros(3, dtype=torch.int64))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attention, patch", NETS)
def test_vmap_on_the_gpu_equals_the_loop(seed, attention, patch):
    models = [m.cuda() for m in _members(attention, patch, 3, width=16, backend="auto")]
    x = torch.randn(3, 8, 3, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (3, 8), device="cuda")
    out, grads, ref, ref_grads = _vmap_and_loop(models, x, t, torch.tensor([5, 6, 7]))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-4 * r.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_reverse_step_under_vmap_gives_each_member_its_own_noise(seed, backend):
    from torch.func import vmap

    from fastscore.ops import ddim_coefficients, reverse_step
    x, eps = torch.randn(3, 4, 3, 5, 5), torch.randn(3, 4, 3, 5, 5)
    seeds, offsets = torch.tensor([7, 8, 2**40]), torch.tensor([0, 4, 9])
    c = ddim_coefficients(0.5, 0.7, 1.0)
    got = vmap(lambda x, e, s, o: reverse_step(x, e, c, seed=s, step=3, sample_offset=o, clip_x0=True,
                                                backend=backend))(x, eps, seeds, offsets)
    for m in range(3):
        ref = reverse_step(x[m], eps[m], c, seed=int(seeds[m]), step=3, sample_offset=int(offsets[m]), clip_x0=True,
                           backend=backend)
        assert torch.equal(got[m], ref), m
    with pytest.raises(ValueError, match="out cannot be given under vmap"):
        vmap(lambda x, e: reverse_step(x, e, c, seed=1, step=0, out=x))(x, eps)
