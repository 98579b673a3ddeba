import copy
import dataclasses

import pytest
import torch
from conftest import requires_cuda

from fastscore.data import KVConfig, make_dataset
from fastscore.models import ScoreNet
from fastscore.training import TrainConfig, schedule_table, train


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["none", "softmax"])
def test_training_lowers_the_loss(attention):
    x, _ = make_dataset(KVConfig(), 500, 0)
    torch.manual_seed(0)
    r = train(ScoreNet(attention, 16), x, TrainConfig(steps=150, batch_size=64, ema=0.9), progress=False)
    first, last = sum(r.losses[:20]) / 20, sum(r.losses[-20:]) / 20
    assert last < 0.6 * first
    assert not r.model.training


def test_training_is_seeded():
    x, _ = make_dataset(KVConfig(), 100, 0)
    out = []
    for _ in range(2):
        torch.manual_seed(1)
        out.append(train(ScoreNet("none", 8), x, TrainConfig(steps=5, batch_size=8), progress=False).losses)
    assert out[0] == out[1]


@pytest.mark.parametrize("kw, err, match", [
    (dict(steps=0), ValueError, "steps must be >= 1, got 0"), (dict(lr=0.0), ValueError, "lr must be > 0.0, got 0.0"),
    (dict(ema=1.0), ValueError, r"ema must be in \[0, 1\), got 1.0"),
    (dict(lr_schedule="step"), ValueError, r"lr_schedule must be one of \['onecycle', 'cosine', 'constant'\], got 'step'"),
    (dict(batch_size=1.5), TypeError, "batch_size must be an int, got float"),
])
def test_bad_train_config(kw, err, match):
    with pytest.raises(err, match=match):
        TrainConfig(**kw)


def test_bad_train_args():
    with pytest.raises(TypeError, match="model"):
        train("net", torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="data"):
        train(ScoreNet("none", 4), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="data"):
        train(ScoreNet("none", 4), torch.zeros(0, 3, 8, 8))


def test_ema_warms_up_instead_of_keeping_the_initial_weights():
    x, _ = make_dataset(KVConfig(), 200, 0)
    torch.manual_seed(0)
    m = ScoreNet("none", 8)
    init = [p.detach().clone() for p in m.parameters()]
    r = train(m, x, TrainConfig(steps=30, batch_size=16, ema=0.999), progress=False)
    ema, raw = list(r.model.parameters()), list(r.raw_model.parameters())
    d_ema = sum((a - b).norm() for a, b in zip(ema, raw))
    d_init = sum((a - b).norm() for a, b in zip(init, raw))
    assert d_ema < 0.5 * d_init  # a plain 0.999 EMA would still sit ~97% of the way back at the start


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_train_refuses_non_finite_data_before_any_step(bad):
    x, _ = make_dataset(KVConfig(), 20, 0)
    x[7, 1, 3, 3] = bad
    m = ScoreNet("none", 4)
    before = [p.detach().clone() for p in m.parameters()]
    steps = []
    with pytest.raises(ValueError, match=r"data holds NaN or inf in 1 of 20 images \(first: image 7\)"):
        train(m, x, TrainConfig(steps=3, batch_size=4), progress=False, callback=lambda s, loss: steps.append(s))
    assert steps == [] and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_train_refuses_a_model_with_non_finite_weights():
    x, _ = make_dataset(KVConfig(), 20, 0)
    m = ScoreNet("none", 4)
    with torch.no_grad():
        next(m.parameters())[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf parameters"):
        train(m, x, TrainConfig(steps=3, batch_size=4), progress=False)


class _DivergesAt(torch.nn.Module):
    """A network whose output turns NaN from forward call ``k`` on (a stand-in for a diverging run)."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        self.calls += 1
        return self.w * x * (float("nan") if self.calls > self.k else 1.0)


@pytest.mark.parametrize("k", [0, 4])
def test_train_stops_at_the_first_non_finite_loss_and_names_the_step(k):
    x, _ = make_dataset(KVConfig(), 20, 0)
    seen = []
    with pytest.raises(FloatingPointError, match=rf"loss is nan at step {k} of 10"):
        train(_DivergesAt(k), x, TrainConfig(steps=10, batch_size=4), progress=False,
              callback=lambda s, loss: seen.append(s))
    assert seen == list(range(k))   # the failing step reports no loss


# --- one engine for one network or M: each member gets what it gets alone -------------------------------


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


def _worst(net_a, net_b) -> float:
    """Largest relative difference over the parameters, less the key part of ``qkv.bias``: attention
    is invariant to it (a constant added to every score of a query), so its gradient is 0 up to
    rounding, and Adam turns that rounding into lr-sized steps that change nothing."""
    pa, pb = dict(net_a.named_parameters()), dict(net_b.named_parameters())
    assert pa.keys() == pb.keys()
    worst = 0.0
    for n in pa:
        a, b = pa[n].detach(), pb[n].detach()
        if n == "qkv.bias":
            d = net_a.config.attn_dim
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-12)))
    return worst


def _plain_loop(model, data, config: TrainConfig):
    """An independent reference: the textbook loop with torch.optim.AdamW, clip_grad_norm_, torch's lr
    scheduler and an EMA with the documented warm-up, on the documented draws."""
    from fastscore.schedule import make_schedule
    from fastscore.training import gumbel_seed, make_lr_scheduler
    ab = make_schedule("linear", 1000).alpha_bar.float()
    gen = torch.Generator().manual_seed(config.seed)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = make_lr_scheduler(opt, config)
    model.train()
    for step in range(config.steps):
        B = config.batch_size
        i = torch.randint(0, data.shape[0], (B,), generator=gen)
        t = torch.randint(0, 1000, (B,), generator=gen)
        if config.t_focus is not None and config.t_focus_prob > 0:
            focus = torch.rand(B, generator=gen) < config.t_focus_prob
            t = torch.where(focus, torch.randint(config.t_focus[0], config.t_focus[1] + 1, (B,), generator=gen), t)
        eps = torch.randn((B, *data.shape[1:]), generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            out = model(a.sqrt() * data[i] + (1 - a).sqrt() * eps, t, seed=gumbel_seed(config.seed, step))
        loss = ((out.float() - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - min(config.ema, (1 + step) / (10 + step)))
    return model, ema


@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_train_equals_the_textbook_loop(data, attention, patch):
    """M = 1 against torch.optim.AdamW + clip_grad_norm_ + the lr scheduler + EMA, four settings."""
    for net, cfg in zip(_members(attention, patch, 4), _configs(25, 4)):
        raw, ema = _plain_loop(copy.deepcopy(net), data, cfg)
        r = train(net, data, cfg, progress=False)
        assert _worst(r.raw_model, raw) < 1e-5
        if cfg.ema > 0:
            assert _worst(r.model, ema) < 1e-5


@pytest.mark.parametrize("attention, patch", NETS)
def test_bf16_training_is_the_textbook_autocast_loop(data, attention, patch):
    """precision='bf16': the forward under torch.autocast(bfloat16), weights, AdamW, EMA and loss in float32,
    as the textbook loop does it: the loop's weights (as float32's test), far from the float32 run's (so
    autocast is on)."""
    net = _members(attention, patch, 1)[0]
    cfg = dataclasses.replace(_configs(12, 2)[1], precision="bf16")
    raw, ema = _plain_loop(copy.deepcopy(net), data, cfg)
    r = train(copy.deepcopy(net), data, cfg, progress=False)
    fp32 = train(copy.deepcopy(net), data, dataclasses.replace(cfg, precision="fp32"), progress=False)
    assert all(p.dtype == torch.float32 for p in r.raw_model.parameters())
    near, far = _worst(r.raw_model, raw), _worst(r.raw_model, fp32.raw_model)
    # measured on CPU: 0 from the loop (the same ops), 6.5e-4 .. 1.0e-3 from float32 after 12 steps
    assert near < 1e-5 and far > 1e-4, (near, far)
    assert _worst(r.model, ema) < 1e-5


def test_members_must_share_precision(data):
    a, b = _members("none", False, 2)
    configs = [TrainConfig(steps=2, batch_size=4), TrainConfig(steps=2, batch_size=4, precision="bf16")]
    with pytest.raises(ValueError, match=r"config\[1\] has steps/batch_size/precision \(2, 4, bf16\)"):
        train([a, b], data, configs, progress=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention, patch", NETS)
def test_members_agree_with_train_alone(data, attention, patch, members):
    """Three members with different settings, 30 steps: the loop schedule is bitwise the network alone
    (the same code, member by member); vmap differs by float32 summation order."""
    models = _members(attention, patch, 3)
    configs = _configs(30, 3)
    alone = [train(net, data, cfg, progress=False) for net, cfg in zip(copy.deepcopy(models), configs)]
    res = train(models, data, configs, members=members, progress=False)
    tol = 0.0 if members == "loop" else 1e-3
    for m in range(3):
        assert _worst(res[m].raw_model, alone[m].raw_model) <= tol, m
        assert _worst(res[m].model, alone[m].model) <= tol, m
        assert abs(res[m].losses[0] - alone[m].losses[0]) <= 1e-6 * alone[m].losses[0]
    assert res[2].model is not res[2].raw_model        # ema 0.9: a separate EMA copy
    assert all(r.raw_model is net for r, net in zip(res, models))   # the given modules are trained


@pytest.mark.slow
@pytest.mark.parametrize("attention, patch", NETS)
def test_members_after_300_steps_agree_with_train_alone(data, attention, patch):
    """The stated tolerance: after 300 CPU steps a vmapped member is within 1e-5 (relative, per
    parameter) of the network trained alone (measured: 2.9e-7 .. 4.0e-7 over the four kinds)."""
    models = _members(attention, patch, 3, width=8)
    configs = _configs(300, 3)
    alone = [train(net, data, cfg, progress=False) for net, cfg in zip(copy.deepcopy(models), configs)]
    res = train(models, data, configs, members="vmap", progress=False)
    worst = max(_worst(r.raw_model, a.raw_model) for r, a in zip(res, alone))
    print(f"{attention}: worst relative parameter difference after 300 steps {worst:.2e}")
    assert worst < 1e-5


def test_schedule_table_follows_torchs_onecycle():
    cfg = TrainConfig(steps=50, lr=4e-3, weight_decay=0.1)
    table = schedule_table(cfg)
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
    step = torch.arange(cfg.steps, dtype=torch.float64)
    assert torch.allclose(table[:, 4], 1 - torch.clamp((1 + step) / (10 + step), max=cfg.ema))


def test_chunked_training_equals_unchunked(data):
    models = _members("softmax", True, 3)
    configs = _configs(10, 3)
    whole = train(copy.deepcopy(models), data, configs, progress=False)
    parts = train(copy.deepcopy(models), data, configs, chunk=2, progress=False)
    for a, b in zip(whole, parts):
        assert _worst(a.raw_model, b.raw_model) == 0.0 and _worst(a.model, b.model) == 0.0


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (test)"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory (test)")])
def test_an_ensemble_that_runs_out_of_memory_is_split_not_a_crash(data, monkeypatch, error):
    import fastscore.training as training
    real = training._train_group
    sizes = []

    def group(models, *args):
        sizes.append(len(models))
        if len(models) > 1:
            raise error
        return real(models, *args)

    models = _members("none", False, 3)
    configs = _configs(5, 3)
    ref = train(copy.deepcopy(models), data, configs, chunk=1, progress=False)
    monkeypatch.setattr(training, "_train_group", group)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        res = train(models, data, configs, progress=False)
    assert sizes == [3, 2, 1, 1, 1]   # halved until it fits, then the members one by one
    assert all(_worst(a.raw_model, b.raw_model) == 0.0 for a, b in zip(res, ref))


def test_other_runtime_errors_are_not_taken_for_memory(data, monkeypatch):
    import fastscore.training as training

    def group(*args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(training, "_train_group", group)
    with pytest.raises(RuntimeError, match="a real bug"):
        train(_members("none", False, 2), data, _configs(2, 2), progress=False)


def test_callback_gets_each_members_loss(data):
    calls = []
    res = train(_members("none", False, 2), data, TrainConfig(steps=4, batch_size=4), progress=False,
                callback=lambda step, losses: calls.append((step, losses)))
    assert calls == [(s, [res[0].losses[s], res[1].losses[s]]) for s in range(4)]


@pytest.mark.parametrize("every", [1, 3, 50])
def test_check_every_reports_every_step_in_order_in_bursts(data, every, monkeypatch):
    """Losses are checked (and the callback called) every ``check_every`` steps, CUDA's default 50 included:
    every step is reported once, in order, and the burst arrives no later than its check."""
    seen: list[tuple[int, int]] = []
    progress: list[int] = []
    net = _members("none", False, 1)[0]

    def cb(step, loss):
        seen.append((step, len(progress)))

    import fastscore.training as training
    step = training._Trainer.step

    def counting(self):
        progress.append(1)
        return step(self)
    monkeypatch.setattr(training._Trainer, "step", counting)
    res = train(net, data, TrainConfig(steps=7, batch_size=4), progress=False, callback=cb, check_every=every)
    assert [s for s, _ in seen] == list(range(7)) and len(res.losses) == 7
    assert [done for _, done in seen] == [min(7, (s // every + 1) * every) for s in range(7)]
    with pytest.raises(ValueError, match="check_every"):
        train(net, data, TrainConfig(steps=2, batch_size=4), progress=False, check_every=0)


def test_graph_replay_loop_does_every_step_once(data, monkeypatch):
    """The CPU stand-in for capture: warm-up steps run eagerly, then a 'graph' whose replay is the
    step's device work; the run must do every step exactly once and equal the eager run."""
    import fastscore.training as training
    replays = []

    def fake_capture(step, device, warmup, generators=()):
        for _ in range(warmup):
            step()
        return lambda: (replays.append(1), step())

    models = _members("none", False, 2)
    configs = _configs(9, 2)
    eager = train(copy.deepcopy(models), data, configs, stream="device", progress=False)
    monkeypatch.setattr(training, "capture", fake_capture)
    steps = []
    out = training._train_group(copy.deepcopy(models), data, configs, training.make_schedule("linear", 1000),
                                torch.device("cpu"), "auto", "device", True, None, lambda s, loss: steps.append(s))
    assert len(replays) == 6 and steps == list(range(9))
    for a, b in zip(out, eager):
        assert a.losses == b.losses and _worst(a.raw_model, b.raw_model) == 0.0 and _worst(a.model, b.model) == 0.0


def test_bad_ensemble_training_arguments(data):
    cnn = _members("none", False, 2)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module or a list of them, got str"):
        train("net", data)
    with pytest.raises(TypeError, match=r"model\[1\] must be a torch.nn.Module, got str"):
        train([cnn[0], "net"], data)
    with pytest.raises(ValueError, match="one TrainConfig per model: 2 models, 1 configs"):
        train(cnn, data, [TrainConfig()], progress=False)
    with pytest.raises(TypeError, match="config must be a TrainConfig or a list of them, got dict"):
        train(cnn, data, {"steps": 3}, progress=False)
    with pytest.raises(ValueError, match="members must share them"):
        train(cnn, data, [TrainConfig(steps=3), TrainConfig(steps=4)], progress=False)
    with pytest.raises(ValueError, match="stream must be one of"):
        train(cnn, data, TrainConfig(steps=2), stream="gpu", progress=False)
    with pytest.raises(ValueError, match=r"data must hold images of shape \(3, 8, 8\)"):
        train(cnn, torch.zeros(4, 3, 6, 6), TrainConfig(steps=2), progress=False)
    with pytest.raises(ValueError, match=r"t_focus must lie in \[0, T=1000\)"):
        train(cnn, data, TrainConfig(steps=2, t_focus=(0, 1000), t_focus_prob=0.5), progress=False)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        train(cnn, data, TrainConfig(steps=2), chunk=0, progress=False)
    with pytest.raises(ValueError, match="one architecture"):
        train([cnn[0], ScoreNet("none", 16)], data, progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        train(cnn, data, TrainConfig(steps=2), cuda_graph=True, stream="device", progress=False)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attention, patch", [("none", False), ("softmax", True)])
def test_cuda_graph_training_equals_eager_on_the_device_stream(data, attention, patch):
    models = _members(attention, patch, 4, width=16)
    configs = _configs(30, 4)
    kw = dict(device="cuda", stream="device", progress=False)
    eager = train(copy.deepcopy(models), data, configs, cuda_graph=False, **kw)
    graph = train(copy.deepcopy(models), data, configs, cuda_graph=True, **kw)
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
    res = train(models, data, configs, device="cuda", stream="train", progress=False)
    for a, b in zip(res, alone):
        assert _worst(a.raw_model, b.raw_model) < 1e-3
