"""Shared benchmark plumbing: environment, GPU timing, JSON rows, printed tables.

Rows are dicts ``{op, provider, shape, dtype, metric, value, median_ms, p20_ms, p80_ms, device,
torch, triton, date}``; ``write_rows`` stores them as JSON under ``benchmarks/results/``.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def env() -> dict:
    """Device name and versions for every row."""
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {"device": dev, "torch": torch.__version__, "triton": tv,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}


def gpu_time(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds with ``triton.testing.do_bench`` (L2 flushed between runs)."""
    from triton.testing import do_bench
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def row(op: str, provider: str, shape: Iterable[int], dtype: str, ms: tuple[float, float, float],
        metric: str, work: float) -> dict:
    """A result row; ``work`` is FLOPs (metric TFLOP/s) or bytes (metric GB/s)."""
    med, p20, p80 = ms
    scale = 1e-9 if metric == "TFLOP/s" else 1e-6
    return {"op": op, "provider": provider, "shape": list(shape), "dtype": dtype, "metric": metric,
            "value": work / med * scale, "median_ms": med, "p20_ms": p20, "p80_ms": p80, **env()}


def write_rows(name: str, rows: list[dict]) -> Path:
    """Write rows to ``benchmarks/results/<name>.json`` (replacing an earlier run of the same name)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def print_table(rows: list[dict], expected_ms: Callable[[dict], float] | None = None) -> None:
    """One line per row: time, throughput, speed-up over the ``eager`` row of the same shape, roofline %."""
    eager = {(r["op"], tuple(r["shape"]), r["dtype"]): r["median_ms"] for r in rows if r["provider"] == "eager"}
    print(f"{'op':22s} {'provider':8s} {'shape':26s} {'dtype':8s} {'median ms':>10s} {'p20-p80':>15s} "
          f"{'value':>9s} {'vs eager':>8s} {'roofline':>8s}")
    for r in rows:
        e = eager.get((r["op"], tuple(r["shape"]), r["dtype"]))
        sp = f"{e / r['median_ms']:.2f}x" if e else "-"
        rf = f"{100 * expected_ms(r) / r['median_ms']:.0f}%" if expected_ms else "-"
        print(f"{r['op']:22s} {r['provider']:8s} {str(tuple(r['shape'])):26s} {r['dtype']:8s} "
              f"{r['median_ms']:10.4f} {r['p20_ms']:7.4f}-{r['p80_ms']:<7.4f} {r['value']:7.1f} "
              f"{r['metric'][:2]} {sp:>8s} {rf:>8s}")
