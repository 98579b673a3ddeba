"""fastscore status: a study's rows and a sweep's cells, read from their files (no run needed: the files
are made here as the study writes them; tests/test_train_resume.py follows a real interrupted row)."""
import json

import pytest

from fastscore.checkpoint import save_tensors
from fastscore.cli import main
from fastscore.study import StudyConfig, grid, status, sweep
from fastscore.study.files import StudyDir
from fastscore.training import STATE_KIND

CFG = StudyConfig.preset("tiny", networks=("none", "softmax"), n_seeds=2, train_steps=10000)


def _study(path, config=CFG):
    StudyDir(path).prepare(config, force=False)
    (path / "rows").mkdir()
    (path / "checkpoints").mkdir()
    return path


def _partial(path, name, step, steps, seconds):
    save_tensors(path / "checkpoints" / f"{name}.partial.safetensors", {},
                 {"kind": STATE_KIND, "step": step, "configs": [{"steps": steps}], "seconds": seconds})


def _states(doc):
    return {r["name"]: r["state"] for r in doc["rows"]}


def test_each_row_is_finished_trained_training_or_to_start(tmp_path):
    out = _study(tmp_path / "s")
    (out / "rows" / "ideal-seed0.json").write_text("{}")
    (out / "checkpoints" / "none-seed0.safetensors").write_bytes(b"")      # existence is all status reads
    _partial(out, "none-seed1", 3000, 10000, 100.0)
    _partial(out, "softmax-seeds0-1", 500, 10000, 50.0)                      # grouped seeds: one state, two rows
    doc = status.status(out)
    assert _states(doc) == {"ideal-seed0": "finished", "els-seed0": "to start", "none-seed0": "trained",
                            "none-seed1": "training", "softmax-seed0": "training", "softmax-seed1": "training"}
    assert doc["results"] is False and doc["train_steps"] == 10000
    p = next(r for r in doc["rows"] if r["name"] == "none-seed1")["partials"][0]
    assert p["file"] == "none-seed1" and p["step"] == 3000 and p["steps_per_second"] == pytest.approx(30.0)
    assert p["seconds_left"] == pytest.approx(7000 / 30)
    lines = status.text(doc).splitlines()
    assert "  finished 1: ideal-seed0" in lines and "  to start 1: els-seed0" in lines
    assert "    none-seed1: step 3,000 of 10,000 (30.0%), 30.0 steps/s so far, ~4 min more at that rate" in lines
    assert sum("softmax-seeds0-1" in line for line in lines) == 2     # listed under each row it trains
    (out / "results.json").write_text(json.dumps({"config": CFG.to_dict()}))
    assert status.status(out)["results"] is True
    (out / "results.json").write_text(json.dumps({"config": {**CFG.to_dict(), "train_steps": 5}}))
    assert status.status(out)["results"] is False       # another config's results are not this study's


def test_a_halves_row_trains_two_networks(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=(), probe_t=(), n_seeds=3)
    out = _study(tmp_path / "h", cfg)
    for half in "ab":
        (out / "checkpoints" / f"none-{half}-seed0.safetensors").write_bytes(b"")
    (out / "checkpoints" / "none-a-seed1.safetensors").write_bytes(b"")
    _partial(out, "none-b-seed2", 7, 20, 1.0)
    assert _states(status.status(out)) == {"none-seed0": "trained", "none-seed1": "training",
                                           "none-seed2": "training"}
    assert "none-seed1 (one half saved)" in status.text(status.status(out))


def test_partial_names_cover_their_rows_only():
    assert status._covers("top1-seed2", "top1", 2) and not status._covers("top1-seed2", "top1", 1)
    assert status._covers("none-a-seed0", "none", 0) and status._covers("none-b-seed0", "none", 0)
    assert status._covers("softmax-seeds0-1-2", "softmax", 1) and not status._covers("softmax-seeds0-1-2", "softmax", 3)
    assert not status._covers("softmax-seeds10", "softmax", 1) and not status._covers("none-seed0", "softmax", 0)


def test_a_sweep_lists_its_cells_and_the_rows_of_those_started(tmp_path):
    g = grid.from_cli(StudyConfig, ["networks=none", "analytic=", "n_seeds=1"], ["n_train=8,64,512"], "tiny")
    out = tmp_path / "sw"
    sweep._prepare(out, g, force=False)
    cells = g.cells()
    done, started = (_study(out / "cells" / c.dirname, sweep.cell_config(g, c)) for c in cells[:2])
    (done / "results.json").write_text(json.dumps({"config": sweep.cell_config(g, cells[0]).to_dict()}))
    _partial(started, "none-seed0", 4, 20, 2.0)
    doc = status.status(out)
    assert [(c["name"], c["state"]) for c in doc["cells"]] == [("n_train=8", "finished"), ("n_train=64", "started"),
                                                               ("n_train=512", "to start")]
    assert _states(doc["cells"][1]["study"]) == {"none-seed0": "training"} and doc["tables"] is False
    text = status.text(doc)
    assert text.splitlines()[0].endswith("sweep of 3 cells: 1 finished, 1 started, 1 to start; tables not yet written")
    assert "  cell n_train=64: started, 2 colours, 20 training steps (fp32), 1 rows; results not yet written" \
        in text.splitlines()
    assert "      none-seed0: step 4 of 20 (20.0%), 2.0 steps/s so far, ~0 min more at that rate" in text.splitlines()


def test_the_command_prints_it_and_refuses_what_is_not_a_run(tmp_path, capsys):
    out = _study(tmp_path / "s")
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "study"
    assert main(["status", str(out)]) == 0
    assert "to start 6:" in capsys.readouterr().out
    for bad, words in ((tmp_path / "missing", "is not a directory"),
                       (tmp_path, "holds no fastscore study or sweep (no study.json or sweep.json); give the --out "
                                  "directory of one; these directories in it are: s")):
        assert main(["status", str(bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    main(["status", str(out)])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before     # reads only
