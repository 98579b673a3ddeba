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
import bench_attention_block  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_summary  # noqa: E402
import make_dispatch_table  # noqa: E402
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


def test_the_dry_ops_part_writes_the_block_rows_that_the_table_can_choose_from(tmp_path):
    gpu_check.part_ops(gpu_check.Ctx(tmp_path, "ops", True, 120.0))
    rows = gpu_check.read_rows(tmp_path)
    check_rows(rows)
    block = [r for r in rows if r["op"] == "attention_block" and r["provider"] != "all"]
    assert {(r["kind"], r["pass"]) for r in block} == {(k, p) for k in bench_attention_block.KINDS
                                                         for p in ("fwd", "fwd_bwd")}
    status = {(r["kind"], r["pass"], r["provider"]): r["status"] for r in block}
    for kind in bench_attention_block.KINDS:   # the fused block ran in the interpreter, beside the composition
        for pss in ("fwd", "fwd_bwd"):
            assert [status[(kind, pss, p)] for p in ("triton", "torch", "eager")] == ["ok"] * 3
            sdpa = {b: status.get((kind, pss, f"sdpa:{b}")) for b in ("MATH", "CUDNN_ATTENTION")}
            assert sdpa == ({"MATH": None, "CUDNN_ATTENTION": None} if kind == "top1" else
                            {"MATH": "ok", "CUDNN_ATTENTION": "skipped"})
    assert all(r["shape"] == [2, 16, 4, 4] and r["tokens"] == 16 and r["attn_dim"] == 16 for r in block)
    gpu = next(r for r in rows if r["op"] == "attention_block" and r["provider"] == "all")
    assert gpu["status"] == "skipped" and "(768, 64, 64, 64)" in gpu["reason"]
    # the table's script reads them: one attention_block row for this device, a path of the op
    chosen = [r for r in make_dispatch_table.choose(rows) if r["op"] == "attention_block"]
    assert len(chosen) == 1 and chosen[0]["bucket"] == "N<=64" and chosen[0]["path"] in ("triton", "torch")
    assert "6 shape x pass cases" in chosen[0]["source"]


def test_the_summary_reads_off_issue_21s_target_ratios():
    def block(provider, ms, dtype="bfloat16", d=64, B=768):
        return {"part": "ops", "op": "attention_block", "provider": provider, "shape": [B, 64, 8, 8], "dtype": dtype,
                "pass": "fwd_bwd", "kind": "softmax", "attn_dim": d, "median_ms": ms, "status": "ok"}

    def step(net, ms, provider="eager", backend=None, M=12):
        return {"part": "train", "op": "train_ensemble", "provider": provider, "network": net, "members": M,
                "median_ms": ms, "status": "ok", **({"backend": backend} if backend else {})}
    rows = [block("triton", 1.0), block("torch", 3.0), block("sdpa:FLASH_ATTENTION", 2.5), block("eager", 4.0),
            block("triton", 1.0, d=16), block("torch", 1.5, d=16), block("triton", 0.1, B=64),   # not the target's B
            step("cnn", 10.0), step("softmax", 18.4), step("softmax", 12.0, backend="triton"),
            step("cnn", 4.0, "graph"), step("softmax", 5.0, "graph"), step("cnn", 1.0, M=48)]
    text = "\n".join(gpu_check_summary.targets(rows))
    assert "| bfloat16 | 64 | 1.0000 | sdpa:FLASH_ATTENTION | 2.5000 | 2.50 | yes |" in text
    assert "| bfloat16 | 16 | 1.0000 | torch | 1.5000 | 1.50 | no |" in text
    assert "| eager | default | 18.400 | 10.000 | 1.84 | no |" in text
    assert "| eager | triton | 12.000 | 10.000 | 1.20 | yes |" in text
    assert "| graph | default | 5.000 | 4.000 | 1.25 | yes |" in text
    assert "not measured" not in text and "0.1000" not in text
    assert gpu_check_summary.targets([]).count("| not measured |" + " |" * 6) == 1


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
