"""Softmax attention (forward, forward + backward), identity attention and top-1: triton vs torch vs SDPA.

GPU:  python benchmarks/bench_attention.py [--quick]   -> benchmarks/results/attention_<device>.json
CPU:  pytest benchmarks/bench_attention.py --benchmark-only   (reference path and SDPA, small sizes)

Providers, each through ``fastscore.ops`` so that the benchmark's and the tests' code are the same,
named after the op's paths (``fastscore.ops.PATHS``): ``triton`` (our kernels, ``backend="triton"``),
``torch`` (the references the tests compare against: ``softmax_attention_reference``; for top-1
``top1_attention_reference``: scores, argmax, gather), ``sdpa`` (``softmax_attention_sdpa``: SDPA on
``(B, 1, N, D)`` views with torch's own backend choice, what ``auto`` runs), ``sdpa:<BACKEND>``
(each SDPA backend forced alone with ``sdpa_kernel``; one that refuses the inputs is a row with
status ``unsupported``) and ``auto`` (what ``backend="auto"`` runs; the row names the path). A
provider that would materialise more than ``SCORE_LIMIT`` scores is a ``skipped`` row.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator, Sequence

import pytest
import torch
from _common import SDPA_BACKENDS, Timer, env, gpu_time, print_table, row, time_sdpa_backends, write_rows
from roofline import DATASHEET, attention_cost, expected_for_row, top1_cost

from fastscore import ops

# issue 15's grid (B*M sequences x N tokens x D features) and its large-N case
SIZES = [(B, N, D) for B in (64, 768, 4096) for N in (64, 144, 256) for D in (16, 32, 64)] + [(1024, 1024, 64)]
QUICK = [(1024, 64, 16), (64, 64, 32), (4096, 64, 64), (1024, 256, 32), (1024, 1024, 64)]
#: (op, pass) pairs; pass "fwd" runs under no_grad, "fwd_bwd" differentiates every input
OPS = [(op, p) for op in ("softmax_attention", "identity_attention", "top1_attention") for p in ("fwd", "fwd_bwd")]
#: at most this many B x N x N scores may be materialised (the torch reference, SDPA's MATH backend)
SCORE_LIMIT = 2 ** 31


def providers(op: str) -> list[tuple[str, object]]:
    """(name, fn(q, k, v) -> out) pairs for an op; ``sdpa`` is also timed per SDPA backend."""
    if op == "top1_attention":
        return [("triton", lambda q, k, v: ops.top1_attention(q, k, v, backend="triton")[0]),
                ("torch", lambda q, k, v: ops.top1_attention_reference(q, k, v)[0]),
                ("auto", lambda q, k, v: ops.top1_attention(q, k, v)[0])]
    if op == "identity_attention":
        return [("triton", lambda q, k, v: ops.identity_attention(q, backend="triton")),
                ("torch", lambda q, k, v: ops.softmax_attention_reference(q, q, q, q.shape[-1] ** -0.5)),
                ("sdpa", lambda q, k, v: ops.softmax_attention_sdpa(q, q, q, q.shape[-1] ** -0.5)),
                ("auto", lambda q, k, v: ops.identity_attention(q))]
    return [("triton", lambda q, k, v: ops.softmax_attention(q, k, v, backend="triton")),
            ("torch", lambda q, k, v: ops.softmax_attention_reference(q, k, v, q.shape[-1] ** -0.5)),
            ("sdpa", lambda q, k, v: ops.softmax_attention_sdpa(q, k, v, q.shape[-1] ** -0.5)),
            ("auto", lambda q, k, v: ops.softmax_attention(q, k, v))]


def too_many_scores(path: str, B: int, N: int) -> bool:
    """True when ``path`` (``torch``, ``sdpa:MATH``) would materialise more than SCORE_LIMIT scores."""
    return path in ("torch", "sdpa:MATH") and B * N * N > SCORE_LIMIT


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


def _case_row(op, pss, shape, dt, flops, provider, ms, status="ok", **extra) -> dict:
    return row(op, provider, shape, dt, ms, "TFLOP/s", flops, status, **{"pass": pss}, **extra)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: " + ((str(e).strip().splitlines() or [""])[0][:200])


def measure(sizes: Sequence[tuple[int, int, int]], dtypes: Sequence[torch.dtype], device: str | torch.device,
            timer: Timer = gpu_time, op_passes: Sequence[tuple[str, str]] = OPS,
            sdpa_backends: Sequence[str] = SDPA_BACKENDS) -> Iterator[dict]:
    """One row per (dtype, shape, op, pass, provider), all providers of a case side by side: status
    ``ok`` (timed), ``unsupported`` (the provider refused the inputs: TypeError/ValueError from the
    kernels' checks, or an SDPA backend with no kernel for them), ``skipped`` (SCORE_LIMIT; an SDPA
    backend not in ``sdpa_backends``) or ``failed`` (any other error, e.g. out of memory)."""
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for B, N, D in sizes:
            for op, pss in op_passes:
                bwd, identity = pss == "fwd_bwd", op == "identity_attention"
                if op == "top1_attention":
                    flops = top1_cost(B, N, D, dt, backward=bwd)[0]
                else:
                    flops = attention_cost(B, N, D, dt, backward=bwd, identity=identity)[0]
                out = functools.partial(_case_row, op, pss, (B, N, D), dt, flops)
                for name, fn in providers(op):
                    q, k, v = _inputs(B, N, D, dtype, device, bwd)
                    do = torch.randn(B, N, D, device=device, dtype=dtype)
                    step = _step(fn, q, k, v, do, bwd, identity)
                    extra = {}
                    path = name
                    if name == "auto":
                        path = extra["auto_path"] = ops.resolve_backend("auto", *((q,) if identity else (q, k, v)), op=op)
                    if too_many_scores(path, B, N):
                        yield out(name, None, "skipped", reason=f"would materialise {B * N * N} > 2^31 scores")
                        continue
                    try:
                        yield out(name, timer(step), **extra)
                    except (TypeError, ValueError) as e:
                        yield out(name, None, "unsupported", reason=_reason(e))
                    except Exception as e:  # noqa: BLE001 - recorded, the next provider still runs
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        yield out(name, None, "failed", reason=_reason(e))
                    if name != "sdpa":
                        continue
                    for backend in SDPA_BACKENDS:
                        if backend not in sdpa_backends:
                            yield out(f"sdpa:{backend}", None, "skipped", reason="not measured on this device")
                        elif too_many_scores(f"sdpa:{backend}", B, N):
                            yield out(f"sdpa:{backend}", None, "skipped", reason=f"would materialise {B * N * N} > 2^31 scores")
                    wanted = [b for b in sdpa_backends if not too_many_scores(f"sdpa:{b}", B, N)]
                    for backend, ms, why in time_sdpa_backends(step, timer, wanted):
                        yield out(f"sdpa:{backend}", ms, "ok" if ms else "unsupported", **({"reason": why} if why else {}))


def run_gpu(sizes, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:  # pragma: no cover - needs a GPU
    return list(measure(sizes, dtypes, "cuda"))


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
SOFTMAX_PROVIDERS = ["triton", "torch", "sdpa", "auto"] if CUDA else ["torch", "sdpa", "auto"]
TOP1_PROVIDERS = ["triton", "torch", "auto"] if CUDA else ["torch", "auto"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


CASES = [("softmax_attention", size, p) for size in BENCH_SIZES for p in SOFTMAX_PROVIDERS] + \
    [("top1_attention", BENCH_SIZES[0], p) for p in TOP1_PROVIDERS]


@pytest.mark.parametrize("op, size, provider", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_bench_forward(benchmark, op, size, provider):
    q, k, v = _inputs(*size, torch.float32, DEV, False)
    fn = dict(providers(op))[provider]
    benchmark.group = f"{op} {size} {DEV}"
    with torch.no_grad():
        benchmark(lambda: (fn(q, k, v), _sync()))


if __name__ == "__main__":
    main()
