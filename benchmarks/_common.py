"""Shared benchmark plumbing: environment, GPU timing, SDPA backends, JSON rows, printed tables.

Rows are dicts ``{op, provider, shape, dtype, metric, value, median_ms, p20_ms, p80_ms, device,
torch, triton, commit, date, ...extra}``; ``write_rows`` stores them as JSON under ``benchmarks/results/``.
The benchmark scripts import this module as a sibling (``python benchmarks/bench_x.py`` and
pytest both put ``benchmarks/`` on ``sys.path``).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: SDPA's backends, tried one at a time (``torch.nn.attention.SDPBackend`` names)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The project's git commit (short; ``"+dirty"`` when the tree has changes), or ``"unknown"``."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if head and dirty else "")


def env() -> dict:
    """Device name, versions and commit for every row."""
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {"device": dev, "torch": torch.__version__, "triton": tv, "commit": commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}


Timer = Callable[[Callable[[], object]], tuple[float, float, float]]


def gpu_time(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds with ``triton.testing.do_bench`` (L2 flushed between runs);
    ``warmup`` and ``rep`` in milliseconds, as do_bench takes them."""
    from triton.testing import do_bench
    med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def cpu_time(fn: Callable[[], object], reps: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``reps`` calls timed with ``time.perf_counter`` after one
    warm-up call (the dry run's stand-in for ``gpu_time``)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def time_sdpa_backends(step: Callable[[], object], timer: Timer = gpu_time, names: Iterable[str] = SDPA_BACKENDS
                       ) -> list[tuple[str, tuple[float, float, float] | None, str]]:
    """``(backend name, (median, p20, p80) ms or None, reason)`` for each SDPA backend in ``names``, forced one at
    a time with ``torch.nn.attention.sdpa_kernel``; a backend that refuses the inputs (or runs out of
    memory) gets None and the first line of its error. ``step`` must call SDPA (on 4-D inputs: 3-D
    inputs run only MATH)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out: list[tuple[str, tuple[float, float, float] | None, str]] = []
    for name in names:
        backend = getattr(SDPBackend, name, None)
        if backend is None:  # pragma: no cover - older torch
            out.append((name, None, f"torch {torch.__version__} has no SDPBackend.{name}"))
            continue
        try:
            with sdpa_kernel(backend):
                step()  # "No available kernel" when this backend cannot take the inputs
                out.append((name, timer(step), ""))
        except RuntimeError as e:  # includes torch.cuda.OutOfMemoryError
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            out.append((name, None, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]))
    return out


def row(op: str, provider: str, shape: Iterable[int], dtype: str, ms: tuple[float, float, float] | None,
        metric: str, work: float, status: str = "ok", **extra) -> dict:
    """A result row; ``work`` is FLOPs (metric TFLOP/s) or bytes (metric GB/s); ``ms`` None (no time:
    status ``unsupported``, ``skipped`` or ``failed``, with a ``reason`` in ``extra``) leaves the times
    and the value None; ``extra`` fields (e.g. ``pass``, ``sdpa_backend``) are stored with it."""
    med, p20, p80 = ms if ms is not None else (None, None, None)
    scale = 1e-9 if metric == "TFLOP/s" else 1e-6
    value = work / med * scale if med else None
    return {"op": op, "provider": provider, "shape": list(shape), "dtype": dtype, "metric": metric,
            "value": value, "median_ms": med, "p20_ms": p20, "p80_ms": p80, "status": status, **extra, **env()}


def write_rows(name: str, rows: list[dict]) -> Path:
    """Write rows to ``benchmarks/results/<name>.json`` (replacing an earlier run of the same name)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def print_table(rows: list[dict], expected_ms: Callable[[dict], float] | None = None) -> None:
    """One line per timed row: time, throughput, speed-up over the ``torch`` (the reference) and the
    ``sdpa`` (torch's own SDPA choice) rows of the same op, pass, shape and dtype, roofline %."""
    rows = [r for r in rows if r.get("median_ms")]

    def key_of(r: dict) -> tuple:
        return r["op"], r.get("pass"), tuple(r["shape"]), r["dtype"], r.get("kind"), r.get("attn_dim")

    def base(provider: str) -> dict:
        return {key_of(r): r for r in rows if r["provider"] == provider}
    eager, sdpa = base("torch"), base("sdpa")
    print(f"{'op':26s} {'provider':22s} {'shape':20s} {'dtype':8s} {'median ms':>10s} {'p20-p80':>15s} "
          f"{'value':>9s} {'vs torch':>8s} {'vs sdpa':>8s} {'roofline':>8s}")
    for r in rows:
        key = key_of(r)
        sp = [f"{b[key]['median_ms'] / r['median_ms']:.2f}x" if key in b else "-" for b in (eager, sdpa)]
        rf = f"{100 * expected_ms(r) / r['median_ms']:.0f}%" if expected_ms else "-"
        name = r["provider"] + (f" {r['pass']}" if r.get("pass") else "")
        op = r["op"] + (f" {r['kind']} d={r['attn_dim']}" if r.get("kind") else "")
        print(f"{op:26s} {name:22s} {str(tuple(r['shape'])):20s} {r['dtype']:8s} "
              f"{r['median_ms']:10.4f} {r['p20_ms']:7.4f}-{r['p80_ms']:<7.4f} {r['value']:7.1f} "
              f"{r['metric'][:2]} {sp[0]:>8s} {sp[1]:>8s} {rf:>8s}")
