"""Reverse-step benchmarks: fused op vs the eager step written the usual way.

CPU (pytest-benchmark):  pytest benchmarks/bench_reverse_step.py
GPU (do_bench, GB/s):    python benchmarks/bench_reverse_step.py   (rows written to results/ as JSON)

The eager step draws ``torch.randn_like`` and does the arithmetic in separate ops; the fused step
moves 12 bytes per float32 element (read x, read eps, write out).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from fastscore.ops import ddim_coefficients, reverse_step

SHAPES = [(4096, 3, 8, 8), (4096, 3, 32, 32)]
COEF = ddim_coefficients(0.5, 0.55, 1.0)


def eager_step(x, eps, coef):
    """The usual eager DDIM/DDPM step: x0, direction, fresh ``randn_like`` noise (several launches)."""
    a, b, a_prev, d, s = coef
    x0 = (x - b * eps) / a
    return a_prev * x0 + d * eps + s * torch.randn_like(x)


def _inputs(shape, device):
    return torch.randn(shape, device=device), torch.randn(shape, device=device)


# ----- CPU: pytest-benchmark -----
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("shape", SHAPES[:1])
    @pytest.mark.parametrize("provider", ["reference", "eager"])
    def test_bench_cpu_step(benchmark, shape, provider):
        x, e = _inputs(shape, "cpu")
        if provider == "reference":
            benchmark(lambda: reverse_step(x, e, COEF, seed=1, step=3, backend="torch"))
        else:
            benchmark(lambda: eager_step(x, e, COEF))


# ----- GPU: do_bench -----
def main() -> None:  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        print("no CUDA device: run `pytest benchmarks/bench_reverse_step.py` for the CPU comparison")
        return
    import triton
    from triton.testing import do_bench
    rows = []
    dev = torch.cuda.get_device_name()
    for shape in SHAPES:
        x, e = _inputs(shape, "cuda")
        out = torch.empty_like(x)
        nbytes = 12 * x.numel()
        for provider, fn in [
            ("fused", lambda x=x, e=e, out=out: reverse_step(x, e, COEF, seed=1, step=3, out=out, backend="triton")),
            ("eager", lambda x=x, e=e: eager_step(x, e, COEF)),
        ]:
            ms, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            row = {"op": "reverse_step", "provider": provider, "shape": list(shape), "dtype": "float32",
                   "metric": "GB/s", "value": nbytes / ms * 1e-6, "ms": ms, "ms_p20": p20, "ms_p80": p80,
                   "device": dev, "torch": torch.__version__, "triton": triton.__version__}
            rows.append(row)
            print(f"{provider:6s} {str(shape):20s} {ms * 1e3:8.1f} us  {row['value']:7.0f} GB/s")
    path = os.path.join(os.path.dirname(__file__), "results", "reverse_step_gpu.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
