"""The fused attention block vs the torch composition (ScoreNet.attend), forward and forward + backward.

GPU:  python benchmarks/bench_attention_block.py [--quick]  -> benchmarks/results/attention_block_<device>.json
CPU:  python benchmarks/bench_attention_block.py             (a tiny run: the rows printed, nothing written;
      with TRITON_INTERPRET=1 the block runs in the interpreter, its time meaningless)

Providers, all through ``fastscore.ops`` (the tests' code): ``block`` (``attention_block(...,
backend="triton")``), ``eager`` (``attention_block_reference``: the composition with the eager attention
core) and, for softmax and identity, ``sdpa`` (the same composition around ``softmax_attention_sdpa``;
each SDPA backend timed alone, the row names the fastest, ``sdpa:<BACKEND>`` rows hold the others).
Shapes: B in {64, 768, 4096} images, N = H*W in {64, 256}, C = 64, d in {16, 64}, patch features of a
3-channel input (the study's ``attn_patch``) for softmax and top-1; float32 and bfloat16. fwd_bwd takes
gradients for z and every weight (not x, as in training). Rows: ``_common.row``, metric TFLOP/s of
the block's matmul work (``block_flops``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import env, gpu_time, print_table, row, time_sdpa_backends, write_rows

from fastscore import ops

SIZES = [(B, N, 64, d) for B in (64, 768, 4096) for N in (64, 256) for d in (16, 64)]
QUICK = [(768, 64, 64, 16), (768, 64, 64, 64), (4096, 64, 64, 64), (768, 256, 64, 64)]
TINY = [(2, 16, 16, 16)]
KINDS = ("softmax", "identity", "top1")
HW = {16: (4, 4), 64: (8, 8), 256: (16, 16)}


def block_flops(B: int, N: int, C: int, d: int, kind: str, patch: int, backward: bool) -> float:
    """Matmul FLOPs of the layer: projections 2N(C+P)3d, scores and p@v 4N^2 d, output 2NdC per image
    (identity: 4N^2 C); backward twice the forward (its recomputation not counted)."""
    f = 4 * N * N * C if kind == "identity" else 2 * N * (C + patch) * 3 * d + 4 * N * N * d + 2 * N * d * C
    return B * f * (3 if backward else 1)


def inputs(kind: str, B: int, N: int, C: int, d: int, dtype, device, grad: bool):
    """(z, x, w_qkv, b_qkv, w_out, b_out) with gradients for z and the weights when ``grad``."""
    H, W = HW[N]
    z = torch.randn(B, C, H, W, device=device, dtype=dtype)
    if kind == "identity":
        return [z.requires_grad_(grad), None, None, None, None, None]
    x = torch.randn(B, 3, H, W, device=device, dtype=dtype)
    k_in = C + 27
    ws = [torch.randn(3 * d, k_in, device=device) / k_in ** 0.5, torch.zeros(3 * d, device=device),
          torch.randn(C, d, device=device) / d ** 0.5, torch.zeros(C, device=device)]
    return [z.requires_grad_(grad), x, *(w.to(dtype).requires_grad_(grad) for w in ws)]


def providers(kind: str) -> list[tuple[str, object]]:
    """(name, fn(args, kw) -> out); ``sdpa`` is timed per SDPA backend."""
    out = [("block", lambda a, kw: ops.attention_block(*a, backend="triton", **kw)),
           ("eager", lambda a, kw: ops.attention_block_reference(*a, **kw))]
    if kind != "top1":
        out.append(("sdpa", lambda a, kw: ops.attention_block_reference(*a, core=ops.softmax_attention_sdpa, **kw)))
    return out


def _step(fn, args, kw, bwd: bool):
    leaves = [a for a in args if a is not None and a.requires_grad]

    def step():
        if bwd:
            res = fn(args, kw)
            out = res[0] if isinstance(res, tuple) else res
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        else:
            with torch.no_grad():
                fn(args, kw)
    return step


def _cpu_time(step, reps: int = 3) -> tuple[float, float, float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t))
    times.sort()
    return statistics.median(times), times[0], times[-1]


def run(sizes, dtypes, device: str) -> list[dict]:
    """Rows for every (kind, op, size, dtype, provider); ``block`` is skipped where the kernels cannot
    run (CPU without TRITON_INTERPRET=1)."""
    rows = []
    can_block = device == "cuda" or ops._dispatch.interpreting()
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for (B, N, C, d), kind, bwd in ((s, k, b) for s in sizes for k in KINDS for b in (False, True)):
            op = f"attention_block_{kind}_{'fwd_bwd' if bwd else 'fwd'}"
            kw = {"kind": kind, "scale": (C if kind == "identity" else d) ** -0.5}
            flops = block_flops(B, N, C, d, kind, 0 if kind == "identity" else 27, bwd)
            for name, fn in providers(kind):
                if name == "block" and not can_block:
                    continue
                args = inputs(kind, B, N, C, d, dtype, device, bwd)
                step = _step(fn, args, kw, bwd)
                try:
                    if name == "sdpa":
                        timed = (sorted(time_sdpa_backends(step), key=lambda t: t[1][0]) if device == "cuda"
                                 else [("default", _cpu_time(step))])
                        for i, (backend, ms) in enumerate(timed):
                            rows.append(row(op, "sdpa" if i == 0 else f"sdpa:{backend}", (B, N, C, d), dt, ms,
                                            "TFLOP/s", flops, sdpa_backend=backend))
                        continue
                    ms = gpu_time(step) if device == "cuda" else _cpu_time(step)
                except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
                    torch.cuda.empty_cache()
                    continue
                rows.append(row(op, name, (B, N, C, d), dt, ms, "TFLOP/s", flops))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes instead of {len(SIZES)} (GPU)")
    a = p.parse_args()
    if torch.cuda.is_available():  # pragma: no cover - needs a GPU
        rows = run(QUICK if a.quick else SIZES, (torch.float32, torch.bfloat16), "cuda")
        print_table(rows)
        print("wrote", write_rows("attention_block_" + env()["device"].replace(" ", "_"), rows))
        return
    if ops._dispatch.interpreting():
        ops.patch_triton_interpreter()
    print_table(run(TINY, (torch.float32,), "cpu"))


if __name__ == "__main__":
    main()
