"""The GPU check (``benchmarks/gpu_check.py``): its dry run on the CPU writes well-formed rows, a part that
crashes or hangs is recorded and the next part still runs, and the output fits the carry-off limits
(at most 8 files, none over 16 MB). The whole dry run is CI's job (``.ci/run``); here, a subset."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_attention  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_summary  # noqa: E402
from _common import cpu_time  # noqa: E402


def check_rows(rows: list[dict]) -> None:
    assert gpu_check.row_problems(rows) == []


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_dry_run_records_a_hang_and_a_crash_and_runs_the_next_part(tmp_path):
    out = tmp_path / "check"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
           "--parts", "env,reverse_step,sample", "--inject", "env=hang,reverse_step=crash", "--budget-s", "75"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = gpu_check.read_rows(out)
    check_rows(rows)
    parts = {r["provider"]: r for r in rows if r["op"] == "part"}
    assert [parts[k]["status"] for k in ("env", "reverse_step", "sample")] == ["timeout", "crashed", "ok"]
    assert parts["env"]["seconds"] <= parts["env"]["cap_s"] + 10, "a hung part is killed at its cap"
    assert "injected crash" in " ".join(parts["reverse_step"]["log_tail"])
    sample = [r for r in rows if r["part"] == "sample" and r["op"] != "part"]
    assert {(r["network"], r["provider"], r["status"]) for r in sample} == \
        {(n, "eager", "ok") for n in ("none", "softmax")} | {(n, "graph", "skipped") for n in ("none", "softmax")}
    summary = (out / "summary.md").read_text()
    assert "Dry run" in summary and "| reverse_step | crashed |" in summary and "| env | timeout |" in summary
    assert gpu_check.check_files(out) == []


def test_the_ops_rows_mark_unsupported_inputs_and_the_score_guard(monkeypatch):
    # the guard: a provider that materialises B x N x N scores beyond the limit is a skipped row
    monkeypatch.setattr(bench_attention, "SCORE_LIMIT", 2 * 16 * 16 - 1)
    timer = functools.partial(cpu_time, reps=1)
    rows = list(bench_attention.measure([(2, 16, 16)], [torch.float32], "cpu", timer, [("softmax_attention", "fwd")],
                                        sdpa_backends=("MATH",)))
    status = {r["provider"]: r["status"] for r in rows}
    assert status == {"triton": "ok", "torch": "skipped", "sdpa": "ok", "sdpa:MATH": "skipped", "auto": "skipped",
                      "sdpa:FLASH_ATTENTION": "skipped", "sdpa:EFFICIENT_ATTENTION": "skipped",
                      "sdpa:CUDNN_ATTENTION": "skipped"}
    assert all("2^31" in r["reason"] for r in rows if r["provider"] in ("torch", "sdpa:MATH", "auto"))
    # the kernels refuse float64: an unsupported row naming why, the reference still timed
    monkeypatch.setattr(bench_attention, "SCORE_LIMIT", 2 ** 31)
    rows = list(bench_attention.measure([(2, 8, 4)], [torch.float64], "cpu", timer, [("top1_attention", "fwd")]))
    by = {r["provider"]: r for r in rows}
    assert by["triton"]["status"] == "unsupported" and "float" in by["triton"]["reason"]
    assert by["torch"]["status"] == "ok" and by["torch"]["median_ms"] > 0
    for r in rows:
        r["part"] = "ops"
    check_rows(rows)


def test_caps_split_the_budget_in_order_and_pass_unused_time_on():
    names = [p for p, _ in gpu_check.PARTS]
    caps = gpu_check.caps(420, names)
    assert list(caps) == names and sum(caps.values()) == pytest.approx(420)
    assert caps["tests"] > caps["env"]
    # after env used 5 s of its share, the rest is split among the remaining parts
    later = gpu_check.caps(420, names[1:], spent=5)
    assert sum(later.values()) == pytest.approx(415) and later["tests"] > caps["tests"]


def test_output_limits_are_checked(tmp_path):
    for i in range(gpu_check.MAX_FILES):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert gpu_check.check_files(tmp_path) == []
    with open(tmp_path / "f0.txt", "wb") as f:
        f.truncate(gpu_check.MAX_BYTES + 1)
    (tmp_path / "one-too-many.txt").write_text("x")
    problems = gpu_check.check_files(tmp_path)
    assert len(problems) == 2 and "f0.txt" in problems[0] and "9 files > 8" in problems[1]
    gpu_check._shrink_logs(tmp_path)   # only the known logs are cut; f0.txt is not one
    (tmp_path / "log.txt").write_bytes(b"a" * (gpu_check.MAX_BYTES + 10))
    gpu_check._shrink_logs(tmp_path)
    assert (tmp_path / "log.txt").stat().st_size <= gpu_check.MAX_BYTES


def test_the_schema_check_finds_what_is_wrong():
    good = {"part": "ops", "op": "top1_attention", "provider": "torch", "status": "ok", "device": "cpu", "torch": "2",
            "triton": "3", "commit": "x", "pass": "fwd", "shape": [1, 2, 3], "dtype": "float32", "median_ms": 2.0,
            "p20_ms": 1.0, "p80_ms": 3.0, "metric": "TFLOP/s", "value": 1.0}
    assert gpu_check.row_problems([good]) == []
    bad = [{k: v for k, v in good.items() if k != "commit"}, {**good, "status": "fine"}, {**good, "p80_ms": 1.5},
           {**good, "status": "skipped", "median_ms": None}, {**good, "pass": None}]
    assert [len(gpu_check.row_problems([b])) for b in bad] == [1, 1, 1, 1, 1]
    assert gpu_check.row_problems([]) == ["no rows"]


def test_rows_are_appended_as_measured_and_a_cut_line_is_skipped(tmp_path):
    emit = gpu_check.Rows(tmp_path, "ops")
    emit({"op": "softmax_attention", "provider": "torch", "shape": [1, 2, 3], "dtype": "float32", "pass": "fwd",
          "median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "metric": "TFLOP/s", "value": 1.0})
    with open(tmp_path / "rows.jsonl", "a") as f:
        f.write('{"op": "cut')
    rows = gpu_check.read_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["part"] == "ops" and rows[0]["status"] == "ok"
    check_rows(rows)


def test_the_summary_diffs_against_the_previous_run_of_the_same_device():
    def r(ms, device="NVIDIA H100 80GB HBM3"):
        return {"part": "ops", "op": "softmax_attention", "provider": "sdpa", "shape": [64, 64, 16],
                "dtype": "float32", "pass": "fwd", "median_ms": ms, "status": "ok", "device": device}
    env = {"part": "env", "op": "env", "provider": "system", "device": "NVIDIA H100 80GB HBM3", "status": "ok"}
    text = gpu_check_summary.render([env, r(0.5)], [r(1.0), r(0.1, device="NVIDIA A100")])
    assert "| softmax_attention | sdpa | (64, 64, 16) | float32 | fwd | 1.0000 | 0.5000 | 0.50 |" in text
    assert "no row in common" in gpu_check_summary.render([env, r(0.5)], [r(1.0, device="NVIDIA A100")])


def test_bad_arguments_are_named_before_any_work(tmp_path, capsys):
    for args, word in ((["--parts", "env,nope"], "--parts"), (["--budget-s", "0"], "--budget-s"),
                       (["--previous", str(tmp_path)], "--previous")):
        with pytest.raises(SystemExit):
            gpu_check.main(["--out", str(tmp_path / "o"), *args])
        assert word in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
