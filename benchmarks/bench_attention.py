"""Softmax attention (forward, forward + backward), identity attention and top-1: fused vs eager vs SDPA.

GPU:  python benchmarks/bench_attention.py [--quick]   -> benchmarks/results/attention_<device>.json
CPU:  pytest benchmarks/bench_attention.py --benchmark-only   (reference path and SDPA, small sizes)

Providers: ``fused`` (the Triton kernels through ``fastscore.ops``), ``eager`` (the torch reference
the tests use: matmul, softmax, matmul; for top-1: scores, argmax, gather), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``, softmax only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env, gpu_time, print_table, row, write_rows  # noqa: E402
from roofline import DATASHEET, attention_cost, expected_for_row, top1_cost  # noqa: E402

from fastscore import ops  # noqa: E402
from fastscore.ops.attention import softmax_attention_reference  # noqa: E402

SIZES = [(B, N, D) for B in (1024, 4096) for N in (64, 256, 1024) for D in (16, 32, 64)]
QUICK = [(1024, 64, 16), (4096, 64, 64), (1024, 256, 32), (1024, 1024, 64)]


def eager_top1(q, k, v):
    """The eager top-1 a researcher would write: full score matrix, argmax, gather."""
    idx = torch.matmul(q, k.transpose(-1, -2)).argmax(-1)
    return torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1])), idx


def providers(op: str):
    """(name, fn(q, k, v)) pairs for an op."""
    if op == "top1_fwd":
        return [("fused", lambda q, k, v: ops.top1_attention(q, k, v, backend="triton")), ("eager", eager_top1)]
    if op.startswith("identity"):
        return [("fused", lambda q, k, v: ops.identity_attention(q, backend="triton")),
                ("eager", lambda q, k, v: softmax_attention_reference(q, q, q, q.shape[-1] ** -0.5))]
    return [("fused", lambda q, k, v: ops.softmax_attention(q, k, v, backend="triton")),
            ("eager", lambda q, k, v: softmax_attention_reference(q, k, v, q.shape[-1] ** -0.5)),
            ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v))]


def _inputs(B, N, D, dtype, device, grad):
    return [torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def run_gpu(sizes, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:  # pragma: no cover - needs a GPU
    rows = []
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for B, N, D in sizes:
            for op in ("softmax_attention_fwd", "softmax_attention_fwd_bwd", "identity_attention_fwd_bwd", "top1_fwd"):
                bwd = op.endswith("fwd_bwd")
                if op == "top1_fwd":
                    flops = top1_cost(B, N, D, dt)[0]
                else:
                    flops = attention_cost(B, N, D, dt, backward=bwd, identity=op.startswith("identity"))[0]
                for name, fn in providers(op):
                    if name == "eager" and B * N * N * 4 > 8e9:  # the N x N matrix would not fit
                        continue
                    q, k, v = _inputs(B, N, D, dtype, "cuda", bwd)
                    do = torch.randn(B, N, D, device="cuda", dtype=dtype)
                    identity = op.startswith("identity")
                    if bwd:
                        def step(fn=fn, q=q, k=k, v=v, do=do, identity=identity):
                            out = fn(q, k, v)
                            out = out[0] if isinstance(out, tuple) else out
                            torch.autograd.grad(out, (q,) if identity else (q, k, v), do)
                    else:
                        def step(fn=fn, q=q, k=k, v=v):
                            with torch.no_grad():
                                fn(q, k, v)
                    try:
                        ms = gpu_time(step)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        continue
                    rows.append(row(op, name, (B, N, D), dt, ms, "TFLOP/s", flops))
    return rows


def main() -> None:  # pragma: no cover - needs a GPU
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="four shapes instead of eighteen")
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
SOFTMAX_PROVIDERS = ["fused", "eager", "sdpa"] if CUDA else ["eager", "sdpa"]
TOP1_PROVIDERS = ["fused", "eager"] if CUDA else ["eager"]


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
