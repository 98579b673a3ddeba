"""The fused attention block vs the torch composition (ScoreNet.attend), forward and forward + backward.

GPU:  python benchmarks/bench_attention_block.py [--quick]  -> benchmarks/results/attention_block_<device>.json
CPU:  python benchmarks/bench_attention_block.py             (a tiny run: the rows printed, nothing written;
      with TRITON_INTERPRET=1 the block runs in the interpreter, its time meaningless)

``measure`` (also the GPU check's, ``gpu_check.py``'s ops part) yields rows of op ``attention_block``
named after the op's paths, so ``make_dispatch_table.py`` chooses between them: ``triton`` (the fused
block, ``attention_block(..., backend="triton")``) and ``torch`` (the composition as ``auto`` runs it off
the kernels: its attention core on the core's own ``auto`` path, SDPA on CUDA). Beside them, not
paths: ``eager`` (``attention_block_reference``, the eager core: what ``backend="torch"`` runs) and, for
softmax and identity, ``sdpa:<BACKEND>`` (the composition around ``softmax_attention_sdpa`` with each
SDPA backend forced alone; one that refuses the inputs is ``unsupported``). The best composition is
the fastest of ``torch``, ``eager`` and ``sdpa:*``. A row's ``shape`` is z's (B, C, H, W), the op's
first input (``_dispatch.shape_bucket``: N = H*W); ``kind`` and ``attn_dim`` (d) are fields.
Shapes: B in {64, 768, 4096} images, N = H*W in {64, 256}, C = 64, d in {16, 64}, patch features of a
3-channel input (the study's ``attn_patch``) for softmax and top-1; float32 and bfloat16. fwd_bwd takes
gradients for z and every weight (not x, as in training). Metric TFLOP/s of the block's matmul work
(``block_flops``).
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from _common import SDPA_BACKENDS, Timer, cpu_time, env, gpu_time, print_table, row, time_sdpa_backends, write_rows

from fastscore import ops
from fastscore.ops.attention_block import _auto_core  # the composition exactly as auto runs it

#: (B, N, C, d), issue 21's grid; the target's shape (B = 768, N = 64) first
SIZES = [(B, N, 64, d) for N in (64, 256) for B in (768, 64, 4096) for d in (64, 16)]
QUICK = [(768, 64, 64, 16), (768, 64, 64, 64), (4096, 64, 64, 64), (768, 256, 64, 64)]
TINY = [(2, 16, 16, 16)]
KINDS = ("softmax", "identity", "top1")
PASSES = ("fwd", "fwd_bwd")
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


def providers(kind: str) -> list[tuple[str, Callable]]:
    """(name, fn(args, kw) -> out): the paths ``triton`` and ``torch``, then ``eager``; ``sdpa`` (the
    composition around SDPA) is timed per SDPA backend as ``sdpa:<BACKEND>``."""
    out: list[tuple[str, Callable]] = [("triton", lambda a, kw: ops.attention_block(*a, backend="triton", **kw)),
           ("torch", lambda a, kw: ops.attention_block_reference(*a, core=_auto_core, **kw)),
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


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: " + ((str(e).strip().splitlines() or [""])[0][:200])


def _case_row(size: tuple[int, int, int, int], dtype: str, kind: str, pss: str, flops: float, provider: str,
              ms: tuple[float, float, float] | None, status: str = "ok", **extra) -> dict:
    B, N, C, d = size
    return row("attention_block", provider, (B, C, *HW[N]), dtype, ms, "TFLOP/s", flops, status,
               **{"pass": pss, "kind": kind, "attn_dim": d, "tokens": N}, **extra)


def measure(sizes: Sequence[tuple[int, int, int, int]], dtypes: Sequence[torch.dtype], device: str | torch.device,
            timer: Timer = gpu_time, kinds: Sequence[str] = KINDS, passes: Sequence[str] = PASSES,
            sdpa_backends: Sequence[str] = SDPA_BACKENDS) -> Iterator[dict]:
    """One row per (dtype, size (B, N, C, d), kind, pass, provider), the providers of a case side by
    side (module docstring): status ``ok`` (timed), ``unsupported`` (the kernels' checks refused the
    inputs, or an SDPA backend has no kernel for them), ``skipped`` (an SDPA backend not in
    ``sdpa_backends``) or ``failed`` (any other error, e.g. out of memory)."""
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for (B, N, C, d), kind, pss in ((s, k, p) for s in sizes for k in kinds for p in passes):
            bwd = pss == "fwd_bwd"
            kw = {"kind": kind, "scale": (C if kind == "identity" else d) ** -0.5}
            flops = block_flops(B, N, C, d, kind, 0 if kind == "identity" else 27, bwd)
            out = functools.partial(_case_row, (B, N, C, d), dt, kind, pss, flops)
            for name, fn in providers(kind):
                try:
                    step = _step(fn, inputs(kind, B, N, C, d, dtype, device, bwd), kw, bwd)
                    if name == "sdpa":
                        for backend in SDPA_BACKENDS:
                            if backend not in sdpa_backends:
                                yield out(provider=f"sdpa:{backend}", ms=None, status="skipped",
                                          reason="not measured on this device")
                        for backend, ms, why in time_sdpa_backends(step, timer, sdpa_backends):
                            yield out(provider=f"sdpa:{backend}", ms=ms, status="ok" if ms else "unsupported",
                                      **({"reason": why} if why else {}))
                        continue
                    yield out(provider=name, ms=timer(step))
                except (TypeError, ValueError) as e:
                    yield out(provider=name, ms=None, status="unsupported", reason=_reason(e))
                except Exception as e:  # noqa: BLE001 - recorded, the next provider still runs
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    yield out(provider=name, ms=None, status="failed", reason=_reason(e))


def run(sizes, dtypes, device: str) -> list[dict]:
    """``measure``'s rows with the device's timer; ``triton`` is skipped where the kernels cannot run
    (CPU without TRITON_INTERPRET=1)."""
    timer = gpu_time if device == "cuda" else functools.partial(cpu_time, reps=3)
    rows = list(measure(sizes, dtypes, device, timer, sdpa_backends=SDPA_BACKENDS if device == "cuda" else ("MATH",)))
    if device != "cuda" and not ops._dispatch.interpreting():
        rows = [r for r in rows if r["provider"] != "triton"]
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
