"""fastscore sweep: cells resumable, a finished sweep rerun does nothing, two gloo ranks = one process."""
import json
import os

import pytest

from fastscore.study import StudyConfig, grid, sweep

pytestmark = pytest.mark.slow
SETS = ["networks=none", "analytic=", "n_seeds=2", "train_steps=12"]
AXES = ["n_train=8,64"]


def _grid():
    return grid.from_cli(StudyConfig, SETS, AXES, "tiny")


def _mtimes(root):
    return {p: os.stat(p).st_mtime_ns for p in sorted(map(str, root.rglob("*.safetensors")))}


def _comparable(result):
    return json.dumps(result["rows"], sort_keys=True)


def test_sweep_writes_one_row_per_cell_network_seed_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "sw"
    res = sweep.run(_grid(), out, progress=False, workers=1)
    assert [(r["n_train"], r["seed"]) for r in res["rows"]] == [(8, 0), (8, 1), (64, 0), (64, 1)]
    assert all(r["final_loss"] is not None and r["valid"]["n"] == 48 for r in res["rows"])
    assert {(p["n_train"], tuple(p["seeds"])) for p in res["pooled"]} == {(8, (0, 1)), (64, (0, 1))}
    for name in ("sweep.md", "sweep.csv", "sweep-results.json"):
        assert (out / name).stat().st_size > 0
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 4
    before = _mtimes(out)
    assert len(before) == 8   # a checkpoint and a sample file per cell and seed
    again = sweep.run(_grid(), out, progress=False, workers=1)
    assert _mtimes(out) == before and _comparable(again) == _comparable(res)


def test_sweep_refuses_a_foreign_directory_and_another_grid_without_force(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a fastscore sweep"):
        sweep.run(_grid(), tmp_path, progress=False)
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"kind": "fastscore-sweep", "grid": {"other": 1}}))
    with pytest.raises(FileExistsError, match="another grid"):
        sweep.run(_grid(), out, progress=False)


def test_a_bad_cell_fails_before_any_cell_runs(tmp_path):
    g = grid.from_cli(StudyConfig, SETS, ["n_pairs=4,1"], "tiny")
    with pytest.raises(ValueError, match="n_pairs"):
        sweep.run(g, tmp_path / "sw", progress=False)
    assert not (tmp_path / "sw").exists()


def _cli(args, **env):
    import subprocess
    import sys
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    r = subprocess.run([sys.executable, *args], env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _cli_args(out):
    return ["sweep", "--preset", "tiny", *sum((["--set", x] for x in SETS), []), *sum((["--grid", x] for x in AXES), []),
            "--workers", "1", "--quiet", "--out", str(out)]


def test_torchrun_with_two_gloo_ranks_gives_the_single_process_sweep(tmp_path, free_port):
    """``torchrun --nproc-per-node 2 -m fastscore sweep`` on a CPU: each rank runs one cell, rank 0 merges,
    and the table equals the one a single process writes."""
    _cli(["-m", "fastscore", *_cli_args(tmp_path / "one")])
    r = _cli(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port),
              "-m", "fastscore", *_cli_args(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "sweep-results.json").read_text())
    two = json.loads((tmp_path / "two" / "sweep-results.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert _comparable(two) == _comparable(one)
    assert r.stdout.count("# fastscore sweep") == 1          # only rank 0 prints the table




def test_a_cell_finished_before_a_setting_existed_is_not_run_again(tmp_path):
    """A cell's results.json written by an older fastscore lacks settings added since: with their
    default now, the cell counts as finished (the rule study.json follows too)."""
    g = grid.from_cli(StudyConfig, ["networks=none"], ["n_train=8,64"], "tiny")
    calls = []

    def old_main(config, path, **kw):   # a finished study as an older version wrote it: without els_patch
        calls.append(config.n_train)
        doc = {"config": {k: v for k, v in config.to_dict().items() if k != "els_patch"},
               "summary": {"baseline": {"analytic_consistent": 0.25}}, "rows": [], "wall_seconds": 1.0}
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(doc))
        return doc
    sweep.run(g, tmp_path, progress=False, run_cell=old_main)
    assert sorted(calls) == [8, 64]
    sweep.run(g, tmp_path, progress=False, run_cell=old_main)
    assert len(calls) == 2                         # both finished: nothing runs
    g5 = grid.from_cli(StudyConfig, ["networks=none", "els_patch=3"], ["n_train=8,64"], "tiny")
    sweep.run(g5, tmp_path, progress=False, run_cell=old_main, force=True)
    assert len(calls) == 4                         # not at its default now: another study, run again
