import pytest
import torch

from fastscore.data import KVConfig, make_dataset
from fastscore.models import ScoreNet
from fastscore.training import TrainConfig, train


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
