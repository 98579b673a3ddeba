"""Ahead-of-time compile of the kernels for sm_80 and sm_90a (no GPU): no spills, shared memory
within the target's limit. The full report (every config of every kernel module) is
``python benchmarks/compile_report.py``; this test compiles the attention configurations most at
risk (masked ragged N and D, the largest block for each feature block, float32 and bfloat16) so it
stays within a few minutes on a small CPU; FASTSCORE_FULL_COMPILE_REPORT=1 compiles everything."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compile_report  # noqa: E402

pytestmark = pytest.mark.slow


def _at_risk(cfg: dict) -> bool:
    c = cfg["constexprs"]
    if not cfg["name"].startswith("attention."):
        return True
    if c.get("EVEN_N", True) or c.get("EVEN_D", True):
        return False
    ptr = next(t for t in cfg["signature"].values() if t.startswith("*") and t != "*fp32") \
        if any(t.startswith("*") and t != "*fp32" for t in cfg["signature"].values()) else "*fp32"
    if ptr not in ("*fp32", "*bf16"):
        return False
    from fastscore.kernels import attention as K
    kernel = cfg["name"].split(".", 1)[1].replace("identity_fwd", "fwd")
    block = c.get("BLOCK", c.get("BLOCK_M"))
    return block == K._block_cap(kernel, c["BLOCK_D"])


def test_no_spills_and_smem_within_limits(tmp_path):
    full = os.environ.get("FASTSCORE_FULL_COMPILE_REPORT", "0") == "1"
    rows = compile_report.run_report(select=None if full else _at_risk, path=tmp_path / "report.json")
    assert rows, "no kernel configuration found"
    print("\n" + compile_report.format_table(rows))
    bad = [f"{r['kernel']} [{r['config']}] {r['target']}: {p}" for r in rows for p in compile_report.problems(r)]
    assert not bad, "\n".join(bad)
