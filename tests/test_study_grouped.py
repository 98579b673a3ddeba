"""``reproduce`` with the seeds of a network trained together (``group_seeds=True``; the default on a GPU)."""
import json

import pytest
import torch

from fastscore.checkpoint import load_tensors
from fastscore.study import StudyConfig, reproduce
from fastscore.study.parallel import balance
from fastscore.study.rows import units


def _tiny(**kw) -> StudyConfig:
    return StudyConfig.preset("tiny", networks=("none", "softmax"), n_samples=8, probe_n=8, n_random=50,
                              analytic=("els",), n_seeds=2, **kw)


def _relative(a: dict, b: dict) -> float:
    """Largest per-tensor max |a - b| / max |b| over the floating tensors of two files."""
    assert set(a) == set(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
               for k in b if b[k].is_floating_point())


def _same(a, b) -> bool:
    """Equal as JSON (rates of an empty subset are NaN, which is not equal to itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_units_group_the_seeds_of_each_trained_network_and_keep_analytic_rows_single():
    todo = [("els", 0), ("none", 0), ("none", 2), ("softmax", 1)]
    assert units(todo, True) == [("els", (0,)), ("none", (0, 2)), ("softmax", (1,))]
    assert units(todo, False) == [(n, (s,)) for n, s in todo]


def test_balance_splits_only_a_network_that_would_leave_a_worker_idle():
    full = [("top1", (0, 1, 2)), ("softmax", (0, 1, 2)), ("identity", (0, 1, 2)), ("none", (0, 1, 2)), ("els", (0,))]
    assert balance(full, 2) == full                     # 12 + 3 against 9 + 6: nothing to gain
    assert balance([("softmax", (0, 1, 2)), ("none", (0, 1, 2))], 2) == \
        [("softmax", (0, 1)), ("softmax", (2,)), ("none", (0, 1, 2))]
    assert balance([("none", (0, 1, 2, 3))], 4) == [("none", (s,)) for s in range(4)]
    assert balance([("none", (0, 1, 2, 3))], 1) == [("none", (0, 1, 2, 3))]


def test_group_seeds_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="group_seeds"):
        reproduce(_tiny(), tmp_path / "s", progress=False, group_seeds="no")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_grouped_training_gives_each_row_its_own_network_and_resumes_without_training(tmp_path):
    cfg = _tiny()
    grouped = reproduce(cfg, tmp_path / "g", progress=False, workers=1, group_seeds=True)
    alone = reproduce(cfg, tmp_path / "r", progress=False, workers=1, group_seeds=False)
    assert [(r["network"], r["seed"]) for r in grouped["rows"]] == [(r["network"], r["seed"]) for r in alone["rows"]]
    for g, r in zip(grouped["rows"], alone["rows"]):
        name = f"{g['network']}-seed{g['seed']}"
        if g["network"] != "els":
            # each checkpoint is the one its row trains alone: one engine; on a CPU its loop schedule
            # runs each member's forward on its own, so bitwise; on CUDA vmap's summation order differs
            (tg, mg), (tr, mr) = [load_tensors(tmp_path / d / "checkpoints" / f"{name}.safetensors", "model")
                                  for d in ("g", "r")]
            assert _relative(tg, tr) <= (1e-4 if torch.cuda.is_available() else 0.0), name
            # the same record: configs, training set, losses every 10th step; only the wall time differs
            assert {k: v for k, v in mg.items() if k != "extra"} == {k: v for k, v in mr.items() if k != "extra"}
            assert mg["extra"].keys() == mr["extra"].keys()
            assert (mg["extra"]["n_train"], mg["extra"]["data_seed"]) == (cfg.n_train, cfg.data_seed)
            assert len(mg["extra"]["losses"]) == len(range(0, cfg.train_steps, 10))
            assert mg["extra"]["losses"] == pytest.approx(mr["extra"]["losses"], rel=1e-4) == g["losses"]
        xs = [load_tensors(tmp_path / d / "samples" / f"{name}.safetensors")[0]["samples"] for d in ("g", "r")]
        assert torch.allclose(xs[0], xs[1], atol=1e-4), name
        assert _same(g["rates"], r["rates"]) and _same(g["probe"], r["probe"]), name
    # one ensemble per network: its members share its wall time (the ensemble's over its size)
    secs = {(r["network"], r["seed"]): r["train_seconds"] for r in grouped["rows"]}
    assert secs[("none", 0)] == secs[("none", 1)] > 0 and secs[("softmax", 0)] == secs[("softmax", 1)] > 0
    # resume: a finished grouped study trains and evaluates nothing
    ckpts = sorted((tmp_path / "g" / "checkpoints").glob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    again = reproduce(cfg, tmp_path / "g", progress=False, workers=1, group_seeds=True)
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes
    assert json.loads((tmp_path / "g" / "invocations.json").read_text())[-1]["rows_run"] == 0
    assert _same([r["rates"] for r in again["rows"]], [r["rates"] for r in grouped["rows"]])
    # a saved checkpoint is loaded, never retrained; only the missing one is trained (alone: one is left)
    (tmp_path / "g" / "rows" / "none-seed0.json").unlink()
    (tmp_path / "g" / "rows" / "none-seed1.json").unlink()
    (tmp_path / "g" / "checkpoints" / "none-seed1.safetensors").unlink()
    seed0 = tmp_path / "g" / "checkpoints" / "none-seed0.safetensors"
    before = seed0.stat().st_mtime_ns
    third = reproduce(cfg, tmp_path / "g", progress=False, workers=1, group_seeds=True)
    assert seed0.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "g" / "invocations.json").read_text())[-1]["rows_run"] == 2
    retrained, ref = [load_tensors(tmp_path / d / "checkpoints" / "none-seed1.safetensors")[0] for d in ("g", "r")]
    assert _relative(retrained, ref) < 1e-4
    assert _same([r["rates"] for r in third["rows"]], [r["rates"] for r in grouped["rows"]])


def test_seeds_are_grouped_by_default_on_a_gpu_only(tmp_path, monkeypatch):
    from fastscore.study import run as run_mod

    class Decided(Exception):
        pass
    seen = []

    def units(todo, grouped):
        seen.append(grouped)
        raise Decided
    monkeypatch.setattr(run_mod, "units", units)
    for kw, want in (({}, False), ({"group_seeds": True}, True)):   # this machine runs the study on a CPU
        with pytest.raises(Decided):
            reproduce(_tiny(), tmp_path / f"s{want}", progress=False, workers=1, **kw)
    assert seen == [False, True]
