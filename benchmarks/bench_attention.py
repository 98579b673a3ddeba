"""Softmax attention (forward, forward + backward), identity attention and top-1: fused vs eager vs SDPA.

GPU:  python benchmarks/bench_attention.py [--quick]   -> benchmarks/results/attention_<device>.json
CPU:  pytest benchmarks/bench_attention.py --benchmark-only   (reference path and SDPA, small sizes)

Providers, each through ``fastscore.ops`` so that the benchmark's and the tests' code are the same:
``fused`` (the Triton kernels, ``backend="triton"``), ``eager`` (the references the tests compare
against: ``softmax_attention_reference``; for top-1 ``top1_attention_reference``: scores, argmax,
gather), ``sdpa`` (``softmax_attention_sdpa``: SDPA on ``(B, 1, N, D)`` views; each SDPA backend
is timed alone with ``sdpa_kernel`` and the row names the fastest, ``sdpa:<BACKEND>`` rows hold the
others) and ``auto`` (what ``backend="auto"`` runs: the path ``fastscore.ops.AUTO_ON_CUDA`` names).
"""
from __future__ import annotations

import argparse

import pytest
import torch
from _common import env, gpu_time, print_table, row, time_sdpa_backends, write_rows
from roofline import DATASHEET, attention_cost, expected_for_row, top1_cost

from fastscore import ops

# issue 15's grid (B*M sequences x N tokens x D features) and its large-N case
SIZES = [(B, N, D) for B in (64, 768, 4096) for N in (64, 144, 256) for D in (16, 32, 64)] + [(1024, 1024, 64)]
QUICK = [(1024, 64, 16), (64, 64, 32), (4096, 64, 64), (1024, 256, 32), (1024, 1024, 64)]
OPS = ("softmax_attention_fwd", "softmax_attention_fwd_bwd", "identity_attention_fwd", "identity_attention_fwd_bwd",
       "top1_fwd", "top1_fwd_bwd")


def providers(op: str) -> list[tuple[str, object]]:
    """(name, fn(q, k, v) -> out) pairs for an op; ``sdpa`` is timed per SDPA backend."""
    if op.startswith("top1"):
        return [("fused", lambda q, k, v: ops.top1_attention(q, k, v, backend="triton")[0]),
                ("eager", lambda q, k, v: ops.top1_attention_reference(q, k, v)[0]),
                ("auto", lambda q, k, v: ops.top1_attention(q, k, v)[0])]
    if op.startswith("identity"):
        return [("fused", lambda q, k, v: ops.identity_attention(q, backend="triton")),
                ("eager", lambda q, k, v: ops.softmax_attention_reference(q, q, q, q.shape[-1] ** -0.5)),
                ("sdpa", lambda q, k, v: ops.softmax_attention_sdpa(q, q, q, q.shape[-1] ** -0.5)),
                ("auto", lambda q, k, v: ops.identity_attention(q))]
    return [("fused", lambda q, k, v: ops.softmax_attention(q, k, v, backend="triton")),
            ("eager", lambda q, k, v: ops.softmax_attention_reference(q, k, v, q.shape[-1] ** -0.5)),
            ("sdpa", lambda q, k, v: ops.softmax_attention_sdpa(q, k, v, q.shape[-1] ** -0.5)),
            ("auto", lambda q, k, v: ops.softmax_attention(q, k, v))]


def _inputs(B, N, D, dtype, device, grad):
    return [torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def _step(fn, q, k, v, do, bwd: bool, identity: bool):
    if bwd:
        def step():
            torch.autograd.grad(fn(q, k, v), (q,) if identity else (q, k, v), do)
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    return step


def run_gpu(sizes, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:  # pragma: no cover - needs a GPU
    rows = []
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for B, N, D in sizes:
            for op in OPS:
                bwd = op.endswith("fwd_bwd")
                identity = op.startswith("identity")
                if op.startswith("top1"):
                    flops = top1_cost(B, N, D, dt, backward=bwd)[0]
                else:
                    flops = attention_cost(B, N, D, dt, backward=bwd, identity=identity)[0]
                for name, fn in providers(op):
                    if name == "eager" and B * N * N * 4 > 8e9:  # the N x N matrix would not fit
                        continue
                    q, k, v = _inputs(B, N, D, dtype, "cuda", bwd)
                    do = torch.randn(B, N, D, device="cuda", dtype=dtype)
                    step = _step(fn, q, k, v, do, bwd, identity)
                    try:
                        if name == "sdpa":
                            timed = sorted(time_sdpa_backends(step), key=lambda t: t[1][0])
                            for i, (backend, ms) in enumerate(timed):
                                rows.append(row(op, "sdpa" if i == 0 else f"sdpa:{backend}", (B, N, D), dt, ms,
                                                "TFLOP/s", flops, sdpa_backend=backend))
                            continue
                        ms = gpu_time(step)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        continue
                    rows.append(row(op, name, (B, N, D), dt, ms, "TFLOP/s", flops))
    return rows


def main() -> None:  # pragma: no cover - needs a GPU
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes instead of {len(SIZES)}")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: `pytest benchmarks/bench_attention.py --benchmark-only` runs the CPU comparison")
        return
    rows = run_gpu(QUICK if a.quick else SIZES)
    dev = DATASHEET["H200"] if "H200" in env()["device"] else DATASHEET["H100 SXM"]
    print_table(rows, lambda r: expected_for_row(r, dev))
    print("wrote", write_rows("attention_" + env()["device"].replace(" ", "_"), rows))


# ----- pytest-benchmark: reference path vs SDPA on CPU (small sizes); with CUDA, the fused kernels
# join and the sizes grow to the workload's -----
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BENCH_SIZES = QUICK if CUDA else [(64, 64, 16), (16, 256, 32)]
SOFTMAX_PROVIDERS = ["fused", "eager", "sdpa", "auto"] if CUDA else ["eager", "sdpa", "auto"]
TOP1_PROVIDERS = ["fused", "eager", "auto"] if CUDA else ["eager", "auto"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


CASES = [("softmax_attention_fwd", size, p) for size in BENCH_SIZES for p in SOFTMAX_PROVIDERS] + \
    [("top1_fwd", BENCH_SIZES[0], p) for p in TOP1_PROVIDERS]


@pytest.mark.parametrize("op, size, provider", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_bench_forward(benchmark, op, size, provider):
    q, k, v = _inputs(*size, torch.float32, DEV, False)
    fn = dict(providers(op))[provider]
    benchmark.group = f"{op} {size} {DEV}"
    with torch.no_grad():
        benchmark(lambda: (fn(q, k, v), _sync()))


if __name__ == "__main__":
    main()
