import pytest
import torch
import torch.nn as nn

from fastscore.data import KVConfig
from fastscore.models import ScoreNet
from fastscore.probe import coordination_probe
from fastscore.schedule import make_schedule


class CopyOracle(nn.Module):
    """Denoises pair 1's value cell by averaging it with pair 0's value when their keys look equal:
    a hand-built network that uses the other pair. Elsewhere predicts eps = 0 (x0_hat = x_t / sqrt(ab))."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.ab = cfg, make_schedule("linear", 1000).alpha_bar.float()
        self.config = type("C", (), {"T": 1000})()

    def forward(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        x0 = x / ab.sqrt()
        (k0, v0), (k1, v1) = self.cfg.positions[:2]
        same = ((x0[:, :, k0[0], k0[1]] - x0[:, :, k1[0], k1[1]]).abs().amax(1) < 0.8).view(-1, 1)
        mixed = torch.where(same, (x0[:, :, v0[0], v0[1]] + x0[:, :, v1[0], v1[1]]) / 2, x0[:, :, v1[0], v1[1]])
        x0 = x0.clone()
        x0[:, :, v1[0], v1[1]] = mixed
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def test_probe_gives_exactly_zero_for_a_local_network():
    torch.manual_seed(0)
    m = ScoreNet("none", 8).eval()
    rows = coordination_probe(m, KVConfig(), [100, 400], n=200)
    for r in rows:
        assert r["gap"] == 0.0 and r["changed"] == 0.0 and r["matched"].k == r["unmatched"].k


def test_probe_detects_a_network_that_uses_the_other_pair():
    cfg = KVConfig()
    rows = coordination_probe(CopyOracle(cfg), cfg, [200], n=1000)
    assert rows[0]["gap"] > 0.01 and rows[0]["gap_ci95"][0] > 0 and rows[0]["changed"] > 0


def test_probe_bad_input():
    with pytest.raises(ValueError, match="n_pairs"):
        coordination_probe(ScoreNet("none", 4), KVConfig(n_pairs=1), [10])
    with pytest.raises(ValueError, match="t"):
        coordination_probe(ScoreNet("none", 4), KVConfig(), [1000], n=4)
