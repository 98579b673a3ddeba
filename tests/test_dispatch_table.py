"""``backend="auto"``'s table is data (``fastscore/ops/dispatch_table.json``), regenerated from a GPU
check's rows by ``benchmarks/make_dispatch_table.py``: the fastest measured path per bucket wins, a path
never measured is never chosen, unsupported / skipped / failed rows are ignored."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastscore import ops
from fastscore.ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_dispatch_table  # noqa: E402


def _row(op, provider, shape, ms, status="ok", dtype="float32", device="NVIDIA H100 80GB HBM3", pss="fwd"):
    return {"op": op, "provider": provider, "shape": list(shape), "dtype": dtype, "pass": pss, "device": device,
            "median_ms": ms if status == "ok" else None, "status": status, "commit": "abc", "torch": "2.11",
            "triton": "3.6"}


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    d = tmp_path / "check"
    d.mkdir()
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut short by a ki')
    return d


def test_the_shipped_table_loads_and_its_fallback_is_todays_choice():
    table = _dispatch.load_table()
    assert {op: table[(op, "*", "*", "*")] for op in _dispatch.BUCKET_EDGES} == ops.AUTO_ON_CUDA
    raw = json.loads(_dispatch.TABLE_PATH.read_text())
    assert all(r["source"] for r in raw["rows"]), "every row names where its choice comes from"


def test_names_and_buckets():
    assert _dispatch.device_class("NVIDIA H100 80GB HBM3") == "H100"
    assert _dispatch.device_class("NVIDIA A100-SXM4-80GB") == "A100"
    assert _dispatch.device_class("NVIDIA H200") == "H200"
    assert [_dispatch.shape_bucket("softmax_attention", (7, n, 16)) for n in (1, 64, 65, 256, 257)] == \
        ["N<=64", "N<=64", "N<=256", "N<=256", "N>256"]
    assert _dispatch.shape_bucket("reverse_step", (1024, 1024)) == "numel<=1048576"
    assert _dispatch.shape_bucket("reverse_step", (1025, 1024)) == "numel>1048576"


def test_the_fastest_measured_path_per_bucket_wins_and_a_path_never_measured_is_never_chosen(tmp_path):
    small, large = (64, 64, 16), (256, 1024, 64)
    rows = [
        # N <= 64, float32: triton fastest in total (1.0 + 1.0) vs sdpa (0.5 + 3.0); torch's row failed
        _row("softmax_attention", "triton", small, 1.0), _row("softmax_attention", "triton", small, 1.0, pss="fwd_bwd"),
        _row("softmax_attention", "sdpa", small, 0.5), _row("softmax_attention", "sdpa", small, 3.0, pss="fwd_bwd"),
        _row("softmax_attention", "torch", small, None, "failed"),
        # an SDPA backend forced alone and auto are not paths: ignored however fast
        _row("softmax_attention", "sdpa:FLASH_ATTENTION", small, 0.01), _row("softmax_attention", "auto", small, 0.01),
        # N > 256: triton unsupported, sdpa slower than torch but torch missed one case: sdpa wins
        _row("softmax_attention", "triton", large, None, "unsupported"),
        _row("softmax_attention", "sdpa", large, 2.0), _row("softmax_attention", "sdpa", large, 2.0, pss="fwd_bwd"),
        _row("softmax_attention", "torch", large, 1.0),
        # forward only: an attention bucket needs both passes -> no row
        _row("top1_attention", "triton", small, 0.1), _row("top1_attention", "torch", small, 0.3),
        # bfloat16 on another GPU: only skipped rows -> no row, the fallback applies
        _row("top1_attention", "triton", small, None, "skipped", dtype="bfloat16", device="NVIDIA A100-SXM4-80GB"),
        _row("reverse_step", "triton", (4096, 3, 8, 8), 0.01), _row("reverse_step", "torch", (4096, 3, 8, 8), 0.05),
        _row("reverse_step", "eager", (4096, 3, 8, 8), 0.001),   # not a path of the op
    ]
    chosen = {(r["op"], r["device_class"], r["dtype"], r["bucket"]): r["path"]
              for r in make_dispatch_table.choose(make_dispatch_table.read_rows(_write(tmp_path, rows)))}
    assert chosen == {("softmax_attention", "H100", "float32", "N<=64"): "triton",
                      ("softmax_attention", "H100", "float32", "N>256"): "sdpa",
                      ("reverse_step", "H100", "float32", "numel<=1048576"): "triton"}


def _block(provider, B, N, ms, pss="fwd", kind="softmax", d=64, status="ok", dtype="bfloat16"):
    """A row as ``bench_attention_block.measure`` writes it: z's shape (B, C, H, W), kind and d as fields."""
    H = int(N ** 0.5)
    return {**_row("attention_block", provider, (B, 64, H, H), ms, status, dtype=dtype, pss=pss), "kind": kind,
            "attn_dim": d, "tokens": N}


def test_the_block_is_bucketed_by_tokens_and_every_kind_and_width_counts_toward_one_path(tmp_path):
    both = ("fwd", "fwd_bwd")
    rows = [
        # N = 64: triton faster at softmax d = 64 and d = 16 (the same z shape: two cases, not one overwritten)
        *[_block("triton", 768, 64, 1.0, pss, d=d) for pss in both for d in (64, 16)],
        *[_block("torch", 768, 64, 2.0, pss, d=d) for pss in both for d in (64, 16)],
        # ... but much slower at top-1: summed over every kind, the composition wins the bucket
        *[_block("triton", 768, 64, 9.0, pss, kind="top1") for pss in both],
        *[_block("torch", 768, 64, 1.0, pss, kind="top1") for pss in both],
        # not paths: the eager composition and a forced SDPA backend, however fast
        *[_block(p, 768, 64, 0.01, pss) for p in ("eager", "sdpa:FLASH_ATTENTION") for pss in both],
        # N = 256: triton faster at softmax; the composition missed d = 16's fwd_bwd (failed): triton wins
        *[_block("triton", 64, 256, 1.0, pss, d=d) for pss in both for d in (64, 16)],
        *[_block("torch", 64, 256, 0.5, pss, d=d) for pss in both for d in (64, 16) if (pss, d) != ("fwd_bwd", 16)],
        _block("torch", 64, 256, None, "fwd_bwd", d=16, status="failed"),
    ]
    table = make_dispatch_table.choose(make_dispatch_table.read_rows(_write(tmp_path, rows)))
    chosen = {(r["op"], r["device_class"], r["dtype"], r["bucket"]): r["path"] for r in table}
    assert chosen == {("attention_block", "H100", "bfloat16", "N<=64"): "torch",
                      ("attention_block", "H100", "bfloat16", "N<=256"): "triton"}
    n64 = next(r for r in table if r["bucket"] == "N<=64")
    assert "6 shape x pass cases" in n64["source"] and "torch 10.000 ms" in n64["source"] \
        and "triton 22.000 ms" in n64["source"]
    # the buckets are the ones auto_path computes from z (B, C, H, W) and from an ensemble's (M, B, C, H, W)
    assert _dispatch.shape_bucket("attention_block", (3, 768, 64, 8, 8)) == "N<=64"
    assert _dispatch.shape_bucket("attention_block", (64, 64, 16, 16)) == "N<=256"


def test_the_script_rewrites_a_table_that_auto_then_reads(tmp_path, monkeypatch):
    rows = [_row("top1_attention", p, (64, 64, 16), ms, pss=pss) for p, ms in (("triton", 0.1), ("torch", 0.3))
            for pss in ("fwd", "fwd_bwd")]
    table = tmp_path / "table.json"
    table.write_text(_dispatch.TABLE_PATH.read_text())
    assert make_dispatch_table.main([str(_write(tmp_path, rows)), "--table", str(table)]) == 0
    written = json.loads(table.read_text())["rows"]
    assert {(r["device_class"], r["path"]) for r in written if r["op"] == "top1_attention"} == {("*", "torch"), ("H100", "triton")}
    # auto_path reads it: on an H100 at N <= 64 the measured row, elsewhere the fallback
    monkeypatch.setattr(_dispatch, "TABLE_PATH", table)
    load = _dispatch.load_table
    monkeypatch.setattr(_dispatch, "load_table", lambda path=str(table): load(path))
    monkeypatch.setattr(_dispatch, "_device_classes", lambda index: ("H100", "sm_90"))

    class FakeCuda(torch.Tensor):
        is_cuda = True

        @property
        def device(self):
            return torch.device("cuda", 0)
    q = torch.zeros(2, 64, 16).as_subclass(FakeCuda)
    assert _dispatch.auto_path("top1_attention", (q,)) == "triton"
    assert _dispatch.auto_path("top1_attention", (torch.zeros(2, 65, 16).as_subclass(FakeCuda),)) == "torch"
    monkeypatch.setattr(_dispatch, "_device_classes", lambda index: ("A100", "sm_80"))
    assert _dispatch.auto_path("top1_attention", (q,)) == "torch"


def test_a_malformed_table_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"rows": [{"op": "softmax_attention", "device_class": "*", "dtype": "*", "bucket": "*",
                                         "path": "cudnn"}]}))
    with pytest.raises(ValueError, match="t.json: row 0"):
        _dispatch.load_table.__wrapped__(str(bad))
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no fallback row"):
        _dispatch.load_table.__wrapped__(str(bad))
    with pytest.raises(ValueError, match="rows.jsonl"):
        make_dispatch_table.read_rows(tmp_path)
