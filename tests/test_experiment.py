import json

import pytest
import torch
import torch.nn as nn

from fastscore.data import KVConfig
from fastscore.experiment import StudyConfig, coordination_probe, coordination_verdict, pairs_sweep, reproduce
from fastscore.models import ScoreNet
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


@pytest.mark.slow
def test_tiny_study_resumes_and_protects_its_directory(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none", "softmax"), n_samples=16, probe_n=16, n_random=50,
                             train_steps=4, analytic=("els",))
    out = tmp_path / "study"
    doc = reproduce(cfg, out, progress=False)
    assert set(doc["summary"]["networks"]) == {"els", "none", "softmax"}
    for f in ("results.json", "results.md", "study.json", "figures/samples.png", "figures/consistency.png",
              "checkpoints/none-seed0.safetensors"):
        assert (out / f).exists(), f
    assert doc["summary"]["baseline"]["analytic_fraction"] == "15/64"   # 4 pairs, 2 colours
    assert doc["summary"]["networks"]["none"]["probe"][0]["gap"] == 0.0
    assert "none" in doc["summary"]["correlation_with_els"]
    # resume: rows are reused, nothing is retrained
    mtime = (out / "checkpoints" / "none-seed0.safetensors").stat().st_mtime
    row = (out / "rows" / "softmax-seed0.json").read_text()
    doc2 = reproduce(cfg, out, progress=False)
    assert (out / "checkpoints" / "none-seed0.safetensors").stat().st_mtime == mtime
    assert (out / "rows" / "softmax-seed0.json").read_text() == row
    assert json.loads(row)["rates"] == doc2["rows"][-1]["rates"]
    # another config in the same directory is refused, and nothing is touched
    other = StudyConfig.preset("tiny", networks=("none",), n_samples=8, probe_n=8, n_random=50, train_steps=3,
                               analytic=())
    with pytest.raises(FileExistsError):
        reproduce(other, out, progress=False)
    assert (out / "rows" / "softmax-seed0.json").read_text() == row
    reproduce(other, out, progress=False, force=True)
    assert not (out / "rows" / "softmax-seed0.json").exists()


def test_study_config_validation():
    with pytest.raises(ValueError, match="networks"):
        StudyConfig(networks=("cnn",))
    with pytest.raises(ValueError, match="n_samples"):
        StudyConfig(n_samples=0)
    with pytest.raises(ValueError, match="too small"):
        StudyConfig(n_pairs=7, coord_channels=True)
    with pytest.raises(ValueError, match="coord_channels"):
        StudyConfig(n_pairs=6)
    with pytest.raises(ValueError, match="mode"):
        StudyConfig.preset("huge")


def test_force_never_deletes_a_directory_that_is_not_a_study(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.safetensors").write_bytes(b"user data")
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    with pytest.raises(FileExistsError):
        reproduce(cfg, tmp_path, progress=False, force=True)
    assert (tmp_path / "checkpoints" / "mine.safetensors").read_bytes() == b"user data"


@pytest.mark.parametrize("kw", [dict(steps=0), dict(steps=5000), dict(eta=-1.0), dict(sampler="euler"),
                                dict(probe_t=(1000,)), dict(batch_size=0), dict(lr=-1.0), dict(ema=1.5),
                                dict(width=0), dict(temperature=0.0), dict(els_patch=4), dict(n_pairs=1),
                                dict(networks=("none", "none")), dict(t_focus=(400, 50)), dict(t_focus_prob=1.5),
                                dict(attn_dim=0)])
def test_study_config_rejects_bad_options_up_front(kw):
    with pytest.raises((ValueError, TypeError)):
        StudyConfig.preset("tiny", **kw)


def test_study_recipe_reaches_the_networks_and_training():
    cfg = StudyConfig(t_focus=(10, 20), t_focus_prob=0.25, attn_dim=16, attn_patch=True)
    tc = cfg.train_config(2)
    assert (tc.t_focus, tc.t_focus_prob, tc.seed) == ((10, 20), 0.25, 2)
    # attn_patch needs learned projections: on for softmax and top-1, off for the others
    assert [cfg.model_config(n).attn_patch for n in ("none", "identity", "top1", "softmax")] == \
        [False, False, True, True]
    assert cfg.model_config("softmax").attn_dim == 16
    assert not StudyConfig(attn_patch=False).model_config("softmax").attn_patch


@pytest.mark.slow
def test_pairs_sweep_one_table_with_the_gap_over_the_cnn(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none", "softmax"), n_samples=8, probe_n=8, n_random=50,
                             train_steps=2, analytic=())
    docs = pairs_sweep(cfg, tmp_path, [2, 8], progress=False)
    assert list(docs) == [2, 8]
    # beyond 4 pairs the border layout needs positions: every study of the sweep gets coordinate channels
    assert all(d["config"]["coord_channels"] for d in docs.values())
    assert (docs[2]["config"]["image_size"], docs[8]["config"]["image_size"]) == (8, 12)
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert len(table) == 4 and "CNN + softmax attention - CNN (pp)" in table[0]
    assert table[3].startswith("| 8 | 12x12 |")
    assert (tmp_path / "sweep.png").exists()
    with pytest.raises(FileExistsError):
        pairs_sweep(cfg, tmp_path, [2], progress=False)


@pytest.mark.slow
def test_rows_in_worker_processes_match_and_resume(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none", "identity"), n_samples=8, probe_n=8, n_random=50,
                             train_steps=2, analytic=("els",), n_seeds=2)
    doc = reproduce(cfg, tmp_path / "par", progress=True, workers=2)
    md = (tmp_path / "par" / "results.md").read_text()
    assert "## Per seed" in md and "| CNN | 1 |" in md and "invocations" not in md
    own = doc["summary"]["own_marginal_chance"]
    assert "own-marginal chance" in md
    assert own["none"]["n"] == doc["summary"]["networks"]["none"]["rates"]["valid"]["k"]  # the valid samples
    assert set(own) == {"els", "none", "identity"}
    assert set(doc["summary"]["coordination"]) == {"identity"}
    ref = reproduce(cfg, tmp_path / "seq", progress=False, workers=1)
    assert [(r["network"], r["seed"]) for r in doc["rows"]] == [(r["network"], r["seed"]) for r in ref["rows"]]
    for a, b in zip(doc["rows"], ref["rows"]):   # same config, same data and noise; threads may move last bits
        assert a["rates"]["valid"]["n"] == b["rates"]["valid"]["n"]
    assert doc["rows"][0]["rates"] == ref["rows"][0]["rates"]   # the ELS row trains nothing
    mtime = (tmp_path / "par" / "checkpoints" / "none-seed0.safetensors").stat().st_mtime
    doc2 = reproduce(cfg, tmp_path / "par", progress=False, workers=2)
    assert (tmp_path / "par" / "checkpoints" / "none-seed0.safetensors").stat().st_mtime == mtime
    # the study's wall time sums its invocations
    runs = json.loads((tmp_path / "par" / "invocations.json").read_text())
    assert [r["rows_run"] for r in runs] == [5, 0]
    assert doc2["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in runs))
    assert "over 2 invocations" in (tmp_path / "par" / "results.md").read_text()
    with pytest.raises(ValueError, match="workers"):
        reproduce(cfg, tmp_path / "par", progress=False, workers=0)


def test_coordination_verdict_needs_intervals_clear_of_chance_and_the_cnn():
    def rate(rate, lo, hi, n=1000):
        return {"rates": {"consistent_among_valid": {"rate": rate, "ci95": [lo, hi], "n": n}}}
    summary = {"baseline": {"analytic_consistent": 0.234},
               "networks": {"none": rate(0.27, 0.24, 0.30), "softmax": rate(0.45, 0.42, 0.48),
                            "top1": rate(0.29, 0.26, 0.32), "identity": rate(0.0, 0.0, 1.0, n=0)}}
    v = coordination_verdict(summary)
    assert v["softmax"] == {"above_chance": True, "above_cnn": True}
    assert v["top1"] == {"above_chance": True, "above_cnn": False}     # overlaps the CNN's interval
    assert v["identity"] == {"above_chance": False, "above_cnn": False}  # no valid samples
