"""Ensembles: each member gets what it gets trained (and sampled) alone; chunking; the patch features."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from fastscore import ensemble as ens_mod
from fastscore.data import KVConfig, make_dataset
from fastscore.ensemble import (
    EnsembleNet,
    EnsembleTrainer,
    Interleaved,
    Member,
    sample_ensemble,
    train_ensemble,
    train_members,
)
from fastscore.models import ModelConfig, ScoreNet, build_model, patch_features
from fastscore.sampling import sample
from fastscore.training import TrainConfig, train

# (attention, attn_patch): the CNN, both attentions with learned projections (with the study's patch
# features), and the identity attention (the folded op without projections)
NETS = [("none", False), ("softmax", True), ("top1", True), ("identity", False)]


@pytest.fixture(scope="module")
def data():
    x, _ = make_dataset(KVConfig(), 64, 0)
    return x


def _members(attention: str, patch: bool, M: int, width: int = 8) -> list[ScoreNet]:
    out = []
    for s in range(M):
        torch.manual_seed(1000 + s)
        out.append(ScoreNet(attention, width, attn_patch=patch, backend="torch"))
    return out


def _configs(steps: int, M: int = 3) -> list[TrainConfig]:
    """Members that differ in seed, lr, t-focus, EMA, schedule, weight decay and clipping."""
    base = [dict(lr=2e-3), dict(lr=5e-3, t_focus=(50, 400), t_focus_prob=0.5, weight_decay=0.01),
            dict(lr=1e-3, ema=0.9, lr_schedule="cosine", grad_clip=0.0),
            dict(lr=3e-3, ema=0.0, lr_schedule="constant", t_focus=(0, 10), t_focus_prob=1.0)]
    return [TrainConfig(steps=steps, batch_size=8, seed=7 + s, **base[s % len(base)]) for s in range(M)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _comparable(net: ScoreNet) -> dict[str, torch.Tensor]:
    """The parameters, less the key part of ``qkv.bias``: attention is invariant to it (a constant added
    to every score of a query), so its gradient is 0 up to rounding, and Adam turns that rounding noise
    into lr-sized steps: it drifts apart between any two summation orders and changes nothing."""
    p = {n: v.detach() for n, v in net.named_parameters()}
    if "qkv.bias" in p:
        d = net.config.attn_dim
        p["qkv.bias"] = torch.cat([p["qkv.bias"][:d], p["qkv.bias"][2 * d:]])
    return p


def _worst(net_a: ScoreNet, net_b: ScoreNet) -> float:
    pa, pb = _comparable(net_a), _comparable(net_b)
    assert pa.keys() == pb.keys()
    return max(_rel(pa[n], pb[n]) for n in pa)


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


# --- the ensemble forward ---------------------------------------------------------------------------

@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention, patch", NETS)
def test_ensemble_forward_equals_each_member(seed, attention, patch, members):
    models = _members(attention, patch, 3)
    ens = EnsembleNet(models, members=members).train()
    x = torch.randn(3, 5, 3, 8, 8)
    t = torch.randint(0, 1000, (3, 5))
    seeds = [11, 12, 13]
    out = ens(x, t, seeds=seeds)
    for m, net in enumerate(models):
        ref = net.train()(x[m], t[m], seed=seeds[m])
        assert torch.allclose(out[m], ref, rtol=1e-5, atol=1e-6), (attention, m, (out[m] - ref).abs().max())


def test_member_extracts_the_weights_without_touching_the_global_rng():
    models = _members("softmax", True, 2)
    ens = EnsembleNet(models)
    state = torch.get_rng_state()
    net = ens.member(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert _worst(net, models[1]) == 0.0
    assert not net.training


# --- training: each member as if alone --------------------------------------------------------------

@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention, patch", NETS)
def test_first_step_gradients_equal_those_of_train_alone(data, attention, patch, members):
    M = 3
    models = _members(attention, patch, M)
    configs = _configs(1, M)
    alone = []
    for net, cfg in zip(copy.deepcopy(models), configs):   # gradients as train computes them (before clipping)
        grads = {}
        for n, p in net.named_parameters():
            p.register_hook(lambda g, n=n, grads=grads: grads.__setitem__(n, g.detach().clone()))
        train(net, data, cfg, progress=False)
        alone.append(grads)
    tr = EnsembleTrainer(models, data, configs, members=members)
    stacked = {}
    for n, p in tr.params.items():
        p.register_hook(lambda g, n=n: stacked.__setitem__(n, g.detach().clone()))
    tr.step()
    assert stacked.keys() == alone[0].keys()
    for m in range(M):
        for n, g in alone[m].items():
            assert torch.allclose(stacked[n][m], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), (attention, m, n)


@pytest.mark.slow   # minutes on a contended 2-core CPU: train's per-step overhead, not the ensemble
@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_members_after_200_steps_agree_with_train_alone(data, attention, patch):
    M = 3
    models = _members(attention, patch, M, width=4)
    configs = _configs(200, M)
    alone = [train(net, data, cfg, progress=False) for net, cfg in zip(copy.deepcopy(models), configs)]
    res = train_ensemble(models, data, configs, progress=False)
    x = data[:16] * 0.7 + 0.3 * torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.arange(16) * 60
    for m in range(M):
        assert _worst(res[m].raw_model, alone[m].raw_model) < 1e-3, m
        assert _worst(res[m].model, alone[m].model) < 1e-3, m
        with torch.no_grad():
            assert _rel(res[m].model(x, t), alone[m].model(x, t)) < 1e-3, m
        assert len(res[m].losses) == 200
        assert abs(res[m].losses[0] - alone[m].losses[0]) < 1e-5 * alone[m].losses[0]
    assert res[2].model is not res[2].raw_model        # ema 0.9: a separate EMA copy
    assert all(r.raw_model is net for r, net in zip(res, models))   # like train: the given module is trained


@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_members_after_40_steps_agree_with_train_alone(data, attention, patch, members):
    """The fast twin of the 200-step test (two members, width 4)."""
    models = _members(attention, patch, 2, width=4)
    configs = _configs(40, 2)
    alone = [train(net, data, cfg, progress=False) for net, cfg in zip(copy.deepcopy(models), configs)]
    res = train_ensemble(models, data, configs, members=members, progress=False)
    for m in range(2):
        assert _worst(res[m].raw_model, alone[m].raw_model) < 1e-4, m
        assert _worst(res[m].model, alone[m].model) < 1e-4, m


def test_schedule_ema_and_optimiser_per_member_over_a_short_run(data):
    """Four members with four different schedules / EMA / decay / clipping settings, 25 steps."""
    models = _members("none", False, 4)
    configs = _configs(25, 4)
    alone = [train(net, data, cfg, progress=False) for net, cfg in zip(copy.deepcopy(models), configs)]
    res = train_ensemble(models, data, configs, progress=False)
    for m in range(4):
        assert _worst(res[m].raw_model, alone[m].raw_model) < 1e-5, m
        assert _worst(res[m].model, alone[m].model) < 1e-5, m
        assert max(abs(a - b) / b for a, b in zip(res[m].losses, alone[m].losses)) < 1e-5
    assert res[3].model is res[3].raw_model            # ema = 0: the raw model, as train returns it


def test_schedule_table_follows_torchs_onecycle():
    cfg = TrainConfig(steps=50, lr=4e-3, weight_decay=0.1)
    table = ens_mod._schedule_table(cfg)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    lrs, betas = [], []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    lrs_t = torch.tensor(lrs, dtype=torch.float64)
    assert torch.equal(table[:, 0], 1 - lrs_t * 0.1)
    assert torch.equal(table[:, 1], 1 - torch.tensor(betas, dtype=torch.float64))
    assert table[:, 2].argmax() > 5                          # warm-up: the lr rises first (OneCycle)
    step = torch.arange(cfg.steps, dtype=torch.float64)
    assert torch.allclose(table[:, 4], 1 - torch.clamp((1 + step) / (10 + step), max=cfg.ema))


@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_chunked_training_equals_unchunked(data, attention, patch):
    tol = 1e-5
    models = _members(attention, patch, 3)
    configs = _configs(15, 3)
    whole = train_ensemble(copy.deepcopy(models), data, configs, progress=False)
    parts = train_ensemble(copy.deepcopy(models), data, configs, chunk=2, progress=False)
    for a, b in zip(whole, parts):
        assert _worst(a.raw_model, b.raw_model) < tol
        assert _worst(a.model, b.model) < tol
        assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-6)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (test)"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory (test)")])
def test_an_ensemble_that_runs_out_of_memory_is_split_not_a_crash(data, monkeypatch, error):
    real = EnsembleTrainer.run
    sizes = []

    def run(self, callback=None):
        sizes.append(len(self.configs))
        if len(self.configs) > 1:
            raise error
        return real(self, callback)

    monkeypatch.setattr(EnsembleTrainer, "run", run)
    models = _members("none", False, 3)
    configs = _configs(5, 3)
    ref = train_ensemble(copy.deepcopy(models), data, configs, chunk=1, progress=False)
    sizes.clear()
    with pytest.warns(RuntimeWarning, match="out of memory"):
        res = train_ensemble(models, data, configs, progress=False)
    assert sizes == [3, 2, 1, 1, 1]   # halved until it fits, then the members one by one
    for a, b in zip(res, ref):
        assert _worst(a.raw_model, b.raw_model) == 0.0


def test_other_runtime_errors_are_not_taken_for_memory(data, monkeypatch):
    def run(self, callback=None):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(EnsembleTrainer, "run", run)
    with pytest.raises(RuntimeError, match="a real bug"):
        train_ensemble(_members("none", False, 2), data, _configs(2, 2), progress=False)


def test_train_members_groups_architectures_and_keeps_the_order(data):
    cnn, soft = ModelConfig("none", 8), ModelConfig("softmax", 8, 8, attn_patch=True)
    cfgs = _configs(5, 3)
    members = [Member(cnn, cfgs[0], 1000), Member(soft, cfgs[1], 1001), Member(cnn, cfgs[2], 1002)]
    res = train_members(members, data, backend="torch", progress=False)
    for mb, r in zip(members, res):
        torch.manual_seed(mb.init_seed)
        ref = train(build_model(mb.model, backend="torch"), data, mb.train, progress=False)
        assert r.raw_model.config == mb.model
        assert _worst(r.raw_model, ref.raw_model) < 1e-5


def test_callback_counts_member_steps(data):
    calls = []
    train_ensemble(_members("none", False, 2), data, TrainConfig(steps=4, batch_size=4), progress=False,
                   callback=lambda step, n: calls.append((step, n)))
    assert calls == [(s, 2) for s in range(4)]


# --- sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_sample_ensemble_gives_each_member_its_own_samples(attention, patch):
    models = _members(attention, patch, 3)
    seeds = [10_000, 10_001, 10_007]
    got = sample_ensemble(EnsembleNet(models), 10, seeds=seeds, steps=6, batch_size=4, backend="torch")
    assert got.shape == (3, 10, 3, 8, 8)
    for m, net in enumerate(models):
        ref = sample(net, 10, steps=6, seed=seeds[m], batch_size=10, backend="torch")
        assert torch.allclose(got[m], ref, atol=1e-5), (m, (got[m] - ref).abs().max())


def test_interleaved_module_samples_each_member_through_fastscore_sample():
    models = _members("softmax", True, 3)
    n = 4
    got = sample(Interleaved(EnsembleNet(models)), 3 * n, steps=5, seed=3, batch_size=6, backend="torch")
    for m, net in enumerate(models):
        ref = sample(net, 3 * n, steps=5, seed=3, backend="torch")[m::3]
        assert torch.allclose(got[m::3], ref, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------------

def test_bad_ensemble_arguments(data):
    cnn = _members("none", False, 2)
    with pytest.raises(ValueError, match="at least one"):
        EnsembleNet([])
    with pytest.raises(TypeError, match=r"models\[1\]"):
        EnsembleNet([cnn[0], torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="one architecture"):
        EnsembleNet([cnn[0], ScoreNet("none", 16)])
    with pytest.raises(ValueError, match="one TrainConfig per model"):
        train_ensemble(cnn, data, [TrainConfig()], progress=False)
    with pytest.raises(ValueError, match="must share"):
        train_ensemble(cnn, data, [TrainConfig(steps=3), TrainConfig(steps=4)], progress=False)
    with pytest.raises(ValueError, match="stream"):
        train_ensemble(cnn, data, TrainConfig(steps=2), stream="gpu", progress=False)
    with pytest.raises(ValueError, match="data must hold images"):
        train_ensemble(cnn, torch.zeros(4, 3, 6, 6), TrainConfig(steps=2), progress=False)
    with pytest.raises(ValueError, match="t_focus"):
        train_ensemble(cnn, data, TrainConfig(steps=2, t_focus=(0, 1000), t_focus_prob=0.5), progress=False)
    with pytest.raises(ValueError, match="chunk"):
        train_ensemble(cnn, data, TrainConfig(steps=2), chunk=0, progress=False)
    with pytest.raises(ValueError, match="CUDA"):
        train_ensemble(cnn, data, TrainConfig(steps=2), cuda_graph=True, stream="device", progress=False)
    with pytest.raises(ValueError, match="seeds"):
        sample_ensemble(EnsembleNet(cnn), 2, seeds=[1])
    with pytest.raises(ValueError, match="multiple of the ensemble size"):
        Interleaved(EnsembleNet(cnn))(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="members"):
        EnsembleNet(cnn, members="grouped")
    with pytest.raises(ValueError, match="x must have shape"):
        EnsembleNet(cnn)(torch.zeros(3, 2, 3, 8, 8), torch.zeros(3, 2, dtype=torch.int64))


# --- the CUDA graph (its eager twin is the reference) -----------------------------------------------

def test_graph_run_loop_replays_the_captured_step_once_per_remaining_step(data, monkeypatch):
    """The CPU stand-in for capture: warm-up steps run eagerly, then a 'graph' whose replay is the
    step function; the run must do every step exactly once and equal the eager run."""
    def fake_capture(self, warmup):
        for _ in range(warmup):
            self.step()
        self.graph = type("G", (), {"replay": staticmethod(self._step)})()

    models = _members("none", False, 2)
    configs = _configs(9, 2)
    eager = EnsembleTrainer(copy.deepcopy(models), data, configs, stream="device")
    eager.run()
    monkeypatch.setattr(EnsembleTrainer, "_capture", fake_capture)
    tr = EnsembleTrainer(copy.deepcopy(models), data, configs, stream="device")
    tr.use_graph = True
    calls = []
    tr.run(calls.append)
    assert calls == list(range(9)) and tr.step_host == 9 and int(tr.k) == 9
    assert torch.equal(tr.losses, eager.losses)
    for n in tr.params:
        assert torch.equal(tr.params[n], eager.params[n]) and torch.equal(tr.ema[n], eager.ema[n])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_cuda_graph_training_equals_eager_on_the_device_stream(data, attention, patch):
    models = _members(attention, patch, 4, width=16)
    configs = _configs(30, 4)
    kw = dict(device="cuda", stream="device", progress=False)
    eager = train_ensemble(copy.deepcopy(models), data, configs, cuda_graph=False, **kw)
    graph = train_ensemble(copy.deepcopy(models), data, configs, cuda_graph=True, **kw)
    for a, b in zip(eager, graph):
        assert _worst(a.raw_model, b.raw_model) < 1e-5
        assert _worst(a.model, b.model) < 1e-5
        assert max(abs(x - y) / y for x, y in zip(a.losses, b.losses)) < 1e-5


@requires_cuda
@pytest.mark.gpu
def test_train_stream_on_gpu_agrees_with_train_alone(data):
    models = _members("softmax", True, 2, width=16)
    configs = _configs(20, 2)
    alone = [train(net, data, cfg, device="cuda", progress=False) for net, cfg in zip(copy.deepcopy(models), configs)]
    res = train_ensemble(models, data, configs, device="cuda", stream="train", progress=False)
    for a, b in zip(res, alone):
        assert _worst(a.raw_model, b.raw_model) < 1e-3
