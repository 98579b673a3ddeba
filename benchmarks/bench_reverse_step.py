"""Reverse-step benchmarks: the fused op vs the tests' reference vs the eager step written the usual way.

CPU (pytest-benchmark):  pytest benchmarks/bench_reverse_step.py
GPU (do_bench, GB/s):    python benchmarks/bench_reverse_step.py   -> benchmarks/results/reverse_step_<device>.json

Providers: ``triton`` (the kernel, ``backend="triton"``), ``torch`` (``reverse_step_reference``,
the op's torch path, what the tests compare against, Philox noise in torch), ``eager`` (the usual
step: ``torch.randn_like`` noise and separate ops; not a path of the op). The fused step moves 12 bytes per float32
element (read x, read eps, write out).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from _common import Timer, env, gpu_time, print_table, row, write_rows
from roofline import DATASHEET, expected_for_row

from fastscore.ops import ddim_coefficients, reverse_step, reverse_step_reference

SHAPES = [(4096, 3, 8, 8), (4096, 3, 32, 32)]
COEF = ddim_coefficients(0.5, 0.55, 1.0)


def eager_step(x, eps, coef):
    """The usual eager DDIM/DDPM step: x0, direction, fresh ``randn_like`` noise (several launches)."""
    a, b, a_prev, d, s = coef
    x0 = (x - b * eps) / a
    return a_prev * x0 + d * eps + s * torch.randn_like(x)


def providers(x, e, out):
    return [("triton", lambda: reverse_step(x, e, COEF, seed=1, step=3, out=out, backend="triton")),
            ("torch", lambda: reverse_step_reference(x, e, COEF, seed=1, step=3)),
            ("eager", lambda: eager_step(x, e, COEF))]


def _inputs(shape, device):
    return torch.randn(shape, device=device), torch.randn(shape, device=device)


# ----- CPU: pytest-benchmark -----
@pytest.mark.parametrize("shape", SHAPES[:1])
@pytest.mark.parametrize("provider", ["torch", "eager"])
def test_bench_cpu_step(benchmark, shape, provider):
    x, e = _inputs(shape, "cpu")
    benchmark(dict(providers(x, e, None))[provider])


# ----- GPU: do_bench -----
def measure(shapes: Sequence[tuple[int, ...]], device: str | torch.device, timer: Timer = gpu_time,
            peak_bytes_per_s: float | None = None) -> Iterator[dict]:
    """One row per (shape, provider) in GB/s (12 bytes per element moved by the fused step), with
    ``pct_of_peak`` of ``peak_bytes_per_s`` when given; a provider that raises is a ``failed`` row."""
    for shape in shapes:
        x, e = _inputs(shape, device)
        for name, fn in providers(x, e, torch.empty_like(x)):
            try:
                r = row("reverse_step", name, shape, "float32", timer(fn), "GB/s", 12 * x.numel(), **{"pass": "fwd"})
            except Exception as exc:  # noqa: BLE001 - recorded, the next provider still runs
                yield row("reverse_step", name, shape, "float32", None, "GB/s", 0, "failed", **{"pass": "fwd"},
                          reason=f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            if peak_bytes_per_s:
                r["pct_of_peak"] = 100 * r["value"] * 1e9 / peak_bytes_per_s
            yield r


def main() -> None:  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        print("no CUDA device: run `pytest benchmarks/bench_reverse_step.py` for the CPU comparison")
        return
    rows = list(measure(SHAPES, "cuda"))
    dev = DATASHEET["H200"] if "H200" in env()["device"] else DATASHEET["H100 SXM"]
    print_table(rows, lambda r: expected_for_row(r, dev))
    print("wrote", write_rows("reverse_step_" + env()["device"].replace(" ", "_"), rows))


if __name__ == "__main__":
    main()
