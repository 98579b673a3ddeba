"""Shared benchmark plumbing: environment, GPU timing, SDPA backends, JSON rows, printed tables.

Rows are dicts ``{op, provider, shape, dtype, metric, value, median_ms, p20_ms, p80_ms, device,
torch, triton, date, ...extra}``; ``write_rows`` stores them as JSON under ``benchmarks/results/``.
The benchmark scripts import this module as a sibling (``python benchmarks/bench_x.py`` and
pytest both put ``benchmarks/`` on ``sys.path``).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: SDPA's backends, tried one at a time (``torch.nn.attention.SDPBackend`` names)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


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


def time_sdpa_backends(step: Callable[[], object]) -> list[tuple[str, tuple[float, float, float]]]:
    """``(backend name, (median, p20, p80) ms)`` for each SDPA backend that runs ``step``, forced one
    at a time with ``torch.nn.attention.sdpa_kernel``; a backend that refuses the inputs (or runs
    out of memory) is left out. ``step`` must call SDPA (on 4-D inputs: 3-D inputs run only MATH)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = []
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:  # pragma: no cover - older torch
            continue
        try:
            with sdpa_kernel(backend):
                step()  # "No available kernel" when this backend cannot take the inputs
                out.append((name, gpu_time(step)))
        except RuntimeError:  # includes torch.cuda.OutOfMemoryError
            torch.cuda.empty_cache()
    return out


def row(op: str, provider: str, shape: Iterable[int], dtype: str, ms: tuple[float, float, float],
        metric: str, work: float, **extra) -> dict:
    """A result row; ``work`` is FLOPs (metric TFLOP/s) or bytes (metric GB/s); ``extra`` fields
    (e.g. ``sdpa_backend``) are stored with it."""
    med, p20, p80 = ms
    scale = 1e-9 if metric == "TFLOP/s" else 1e-6
    return {"op": op, "provider": provider, "shape": list(shape), "dtype": dtype, "metric": metric,
            "value": work / med * scale, "median_ms": med, "p20_ms": p20, "p80_ms": p80, **extra, **env()}


def write_rows(name: str, rows: list[dict]) -> Path:
    """Write rows to ``benchmarks/results/<name>.json`` (replacing an earlier run of the same name)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def print_table(rows: list[dict], expected_ms: Callable[[dict], float] | None = None) -> None:
    """One line per row: time, throughput, speed-up over the ``eager`` and the ``sdpa`` (fastest SDPA
    backend, named) rows of the same op, shape and dtype, roofline %."""
    def base(provider: str) -> dict:
        return {(r["op"], tuple(r["shape"]), r["dtype"]): r for r in rows if r["provider"] == provider}
    eager, sdpa = base("eager"), base("sdpa")
    print(f"{'op':26s} {'provider':22s} {'shape':20s} {'dtype':8s} {'median ms':>10s} {'p20-p80':>15s} "
          f"{'value':>9s} {'vs eager':>8s} {'vs sdpa':>8s} {'roofline':>8s}")
    for r in rows:
        key = (r["op"], tuple(r["shape"]), r["dtype"])
        sp = [f"{b[key]['median_ms'] / r['median_ms']:.2f}x" if key in b else "-" for b in (eager, sdpa)]
        rf = f"{100 * expected_ms(r) / r['median_ms']:.0f}%" if expected_ms else "-"
        name = r["provider"] + (f" ({r['sdpa_backend']})" if r.get("sdpa_backend") else "")
        print(f"{r['op']:26s} {name:22s} {str(tuple(r['shape'])):20s} {r['dtype']:8s} "
              f"{r['median_ms']:10.4f} {r['p20_ms']:7.4f}-{r['p80_ms']:<7.4f} {r['value']:7.1f} "
              f"{r['metric'][:2]} {sp[0]:>8s} {sp[1]:>8s} {rf:>8s}")
