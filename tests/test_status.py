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
    (out / "rows" / "els-seed0.json").write_text(json.dumps({"rates": {"consistent_among_valid": {"rate": 0.25, "n": 8}}}))
    (out / "checkpoints" / "none-seed0.safetensors").write_bytes(b"")      # existence is all status reads
    _partial(out, "none-seed1", 3000, 10000, 100.0)
    _partial(out, "softmax-seeds0-1", 500, 10000, 50.0)                      # grouped seeds: one state, two rows
    doc = status.status(out)
    assert _states(doc) == {"ideal-seed0": "finished", "els-seed0": "finished", "none-seed0": "trained",
                            "none-seed1": "training", "softmax-seed0": "training", "softmax-seed1": "training"}
    assert doc["results"] is False and doc["train_steps"] == 10000
    p = next(r for r in doc["rows"] if r["name"] == "none-seed1")["partials"][0]
    assert p["file"] == "none-seed1" and p["step"] == 3000 and p["steps_per_second"] == pytest.approx(30.0)
    assert p["seconds_left"] == pytest.approx(7000 / 30)
    lines = status.text(doc).splitlines()
    assert "  finished 2: ideal-seed0, els-seed0 25.0% (consistent among valid)" in lines
    assert not any("to start" in line for line in lines)
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


def _files(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_it_reads_only(tmp_path, capsys):
    out = _study(tmp_path / "s")
    _partial(out, "none-seed0", 3, 10, 1.0)
    (out / "results.json").write_text(json.dumps({"config": CFG.to_dict()}))
    g = grid.from_cli(StudyConfig, ["networks=none", "analytic="], ["n_train=8,64"], "tiny")
    sweep._prepare(tmp_path / "sw", g, force=False)
    _study(tmp_path / "sw" / "cells" / g.cells()[0].dirname, sweep.cell_config(g, g.cells()[0]))
    before = _files(tmp_path)
    for d in (out, tmp_path / "sw"):
        assert main(["status", str(d)]) == 0 and main(["status", str(d), "--json"]) == 0
    assert _files(tmp_path) == before


def test_a_saved_checkpoint_outranks_a_stale_state_and_bad_states_are_noted(tmp_path):
    out = _study(tmp_path / "s")
    (out / "checkpoints" / "none-seed0.safetensors").write_bytes(b"")
    _partial(out, "none-seeds0-1", 5000, 10000, 100.0)      # left by a grouped run, e.g. resumed ungrouped
    (out / "checkpoints" / "softmax-seed0.partial.safetensors").write_bytes(b"not a safetensors file")
    save_tensors(out / "checkpoints" / "softmax-seed1.partial.safetensors", {}, {"kind": STATE_KIND})
    doc = status.status(out)
    assert _states(doc)["none-seed0"] == "trained" and _states(doc)["none-seed1"] == "training"
    text = status.text(doc)
    assert "    softmax-seed0: unreadable (" in text
    assert "    softmax-seed1: unreadable (an incomplete training state (no step, steps or seconds))" in text
    (out / "checkpoints" / "softmax-seed0.partial.safetensors").unlink()
    _partial(out, "softmax-seed0", 1000, 160000, 50.0)
    assert "softmax-seed0: step 1,000 of 160,000 (0.6%), 20.0 steps/s so far, ~2.2 h more at that rate" \
        in status.text(status.status(out))
    assert status._partial(out / "checkpoints" / "gone.partial.safetensors")["error"].startswith("no such file")


def test_a_sweep_json_reads_back_as_the_grid_the_sweep_ran(tmp_path):
    grids = [grid.from_cli(StudyConfig, ["networks=none,softmax", "analytic="],
                           ["t_focus=50+600,none", "lr=1e-3,2.5e-3"], "tiny"),
             sweep.pairs_grid("tiny", {"image_size": 8}, (2, 10))]       # a rule overrides base's image_size
    for i, g in enumerate(grids):
        out = tmp_path / f"sw{i}"
        sweep._prepare(out, g, force=False)
        back = sweep.read_grid(out)
        assert [(c.name, c.dirname, sweep.cell_config(back, c)) for c in back.cells()] == \
            [(c.name, c.dirname, sweep.cell_config(g, c)) for c in g.cells()]
    names = [c.name for c in grids[0].cells()]
    assert names == ["t_focus=50+600,lr=0.001", "t_focus=50+600,lr=0.0025", "t_focus=None,lr=0.001",
                     "t_focus=None,lr=0.0025"]
    assert [sweep.cell_config(grids[1], c).image_size for c in grids[1].cells()] == [8, 14]     # the smallest image that holds 10 pairs
    (tmp_path / "sw0" / "sweep.json").write_text(json.dumps({"kind": "fastscore-sweep"}))
    with pytest.raises(ValueError, match="holds no grid"):
        status.status(tmp_path / "sw0")


def test_a_cell_of_another_config_and_a_damaged_results_file(tmp_path):
    g = grid.from_cli(StudyConfig, ["networks=none", "analytic="], ["n_train=8,64"], "tiny")
    out = tmp_path / "sw"
    sweep._prepare(out, g, force=False)
    first, second = g.cells()
    _study(out / "cells" / first.dirname, StudyConfig.preset("tiny", networks=("softmax",), n_train=8))
    cell = _study(out / "cells" / second.dirname, sweep.cell_config(g, second))
    (cell / "results.json").write_text('{"config": ')                      # cut short
    doc = status.status(out)
    assert [c["state"] for c in doc["cells"]] == ["another config (a rerun refuses it without --force)", "started"]
    assert "1 started, 1 with another config" in status.text(doc).splitlines()[0]
