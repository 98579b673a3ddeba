"""Roofline model: FLOPs and minimal bytes per op and shape, device peaks, expected times.

    python benchmarks/roofline.py            # estimates for H100 SXM, H200, A100 (+ the local GPU, measured)

Peaks are datasheet figures (dense, no sparsity) unless measured on the device (a large copy for
bandwidth, a large matmul for matrix throughput). fp32 attention inputs run ``tl.dot`` in TF32,
except where a kernel chooses otherwise: the attention kernels compute fp32 ``tl.dot`` in IEEE
fp32 (CUDA-core FMA peak, matching torch's default matmul precision), top-1 too (the fp32 policy of
kernels/_common.py at torch's default "highest"); fp16/bf16 use the tensor-core peak. Expected time = max(FLOPs / peak, bytes / bandwidth) +
one launch overhead per kernel (``LAUNCH_US``): at the workload's small shapes the overhead
matters.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

LAUNCH_US = 3.0
ELT = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float   # bytes/s
    tf32: float        # FLOP/s, dense tensor-core TF32
    bf16: float        # FLOP/s, dense tensor-core bf16/fp16
    fp32: float        # FLOP/s, CUDA cores
    sfu: float         # exp2/s of the special-function units (16 per SM per clock)
    source: str = "datasheet"


DATASHEET = {
    "H100 SXM": Device("H100 SXM", 3.35e12, 494e12, 989e12, 67e12, 132 * 16 * 1.98e9),
    "H200": Device("H200", 4.8e12, 494e12, 989e12, 67e12, 132 * 16 * 1.98e9),
    "A100 SXM 80GB": Device("A100 SXM 80GB", 2.04e12, 156e12, 312e12, 19.5e12, 108 * 16 * 1.41e9),
}


def copy_bandwidth(device: str = "cuda", n: int = 1 << 28, timer=None) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of ``n`` float32 elements (1 GiB by
    default), timed with ``do_bench`` or ``timer(fn) -> (median ms, p20, p80)``: the denominator of
    every "% of peak bandwidth"."""
    if timer is None:
        from triton.testing import do_bench
        timer = lambda fn: (do_bench(fn),)
    a = torch.empty(n, device=device, dtype=torch.float32)
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a))[0]
    return 2 * 4 * n / (ms * 1e-3)


def measure_device() -> Device:
    """Peaks measured on the local GPU: a 1 GiB copy and an 8192^3 matmul in TF32 and bf16."""
    from triton.testing import do_bench
    bw = copy_bandwidth()
    m = 8192
    x = torch.randn(m, m, device="cuda")
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = 2 * m**3 / (do_bench(lambda: x @ x) * 1e-3)
    finally:  # a global switch: later benchmarks in this process must run torch's default precision
        torch.backends.cuda.matmul.allow_tf32 = was
    xb = x.to(torch.bfloat16)
    bf16 = 2 * m**3 / (do_bench(lambda: xb @ xb) * 1e-3)
    props = torch.cuda.get_device_properties(0)
    sfu = props.multi_processor_count * 16 * 1.98e9  # clock not exposed by torch: H100/H200 boost clock
    return Device(torch.cuda.get_device_name() + " (measured)", bw, tf32, bf16, tf32 / 8, sfu, "measured")


def attention_cost(B: int, N: int, D: int, dtype: str = "float32", backward: bool = False,
                   identity: bool = False) -> tuple[float, float, int, float]:
    """(FLOPs, minimal bytes, kernel launches, exps) of softmax attention (forward, or forward + backward).

    Forward: 2 matmuls of 2*N*N*D per sequence; backward: 5 (recompute S, dV, dP, dQ, dK).
    Bytes: read q, k, v (one z for identity), write o and the fp32 log-sum-exp; backward also reads
    o, do and writes dq, dk, dv (one dz for identity) and the fp32 Delta.
    """
    e = ELT[dtype]
    flops = 4.0 * B * N * N * D
    tensors_in = 1 if identity else 3
    bytes_ = (tensors_in + 1) * B * N * D * e + 4 * B * N
    launches = 1
    exps = float(B * N * N)
    if backward:
        flops += 10.0 * B * N * N * D
        bytes_ += (tensors_in + 2 + tensors_in) * B * N * D * e + 8 * B * N
        launches += 2 if identity else 3
        exps *= 2
    return flops, bytes_, launches, exps


def top1_cost(B: int, N: int, D: int, dtype: str = "float32", backward: bool = False
              ) -> tuple[float, float, int, float]:
    """(FLOPs, minimal bytes, launches, exps) of the top-1 forward: scores (2*N*N*D), read q, k and
    the chosen rows of v, write out and the int64 index; no exponentials. ``backward``: plus the
    straight-through backward, whose dq, dk are a softmax-attention backward (the surrogate)."""
    e = ELT[dtype]
    f, b, la, ex = 2.0 * B * N * N * D, 4 * B * N * D * e + 8 * B * N, 1, 0.0
    if backward:
        af, ab, al, ae = attention_cost(B, N, D, dtype, backward=True)
        fwd = attention_cost(B, N, D, dtype)
        f, b, la, ex = f + af - fwd[0], b + ab - fwd[1], la + al - fwd[2], ex + ae - fwd[3]
    return f, b, la, ex


def reverse_step_cost(numel: int, dtype: str = "float32") -> tuple[float, float, int, float]:
    """(FLOPs, bytes, launches, transcendentals): read x and eps, write out: 3 * element size per
    element; Box-Muller costs a log, sqrt, sin and cos per two elements."""
    return 10.0 * numel, 3 * ELT[dtype] * numel, 1, 2.0 * numel


FP32_DOT = {"attention": "ieee", "top1": "ieee", "reverse_step": "none"}


def matrix_peak(dev: Device, dtype: str, fp32_dot: str) -> float:
    """FLOP/s of the kernel's dot products: tensor cores for 16-bit inputs; for fp32 per ``fp32_dot``."""
    if dtype != "float32":
        return dev.bf16
    return {"ieee": dev.fp32, "tf32": dev.tf32, "tf32x3": dev.tf32 / 3, "none": dev.fp32}[fp32_dot]


def expected_ms(flops: float, bytes_: float, launches: int, exps: float, dev: Device, dtype: str = "float32",
                fp32_dot: str = "ieee") -> float:
    """Roofline time in milliseconds: the slowest of matrix/CUDA-core FLOPs, memory and SFU, plus launches."""
    peak = matrix_peak(dev, dtype, fp32_dot)
    return 1e3 * max(flops / peak, bytes_ / dev.bandwidth, exps / dev.sfu) + launches * LAUNCH_US * 1e-3


def _backward(r: dict) -> bool:
    return r.get("pass") == "fwd_bwd" or r["op"].endswith("fwd_bwd")


def expected_for_row(r: dict, dev: Device) -> float:
    """Expected ms for a benchmark row (``op`` and ``pass`` as in benchmarks/bench_*.py)."""
    op, s, dt = r["op"], r["shape"], r["dtype"]
    if op.startswith("softmax_attention") or op.startswith("identity_attention"):
        B, N, D = s
        return expected_ms(*attention_cost(B, N, D, dt, backward=_backward(r),
                                           identity=op.startswith("identity")), dev, dt, FP32_DOT["attention"])
    if op.startswith("top1"):
        B, N, D = s
        return expected_ms(*top1_cost(B, N, D, dt, backward=_backward(r)), dev, dt, FP32_DOT["top1"])
    if op == "reverse_step":
        n = 1
        for x in s:
            n *= x
        return expected_ms(*reverse_step_cost(n, dt), dev, dt, "none")
    raise KeyError(op)


def estimates() -> list[dict]:
    """Expected times for the workload of DESIGN.md on each datasheet device."""
    out = []
    for dev in DATASHEET.values():
        for B in (1024, 4096):
            for N in (64, 256, 1024):
                for D in (16, 32, 64):
                    for dt in ("float32", "bfloat16"):
                        for op, cost, kind in (
                                ("softmax_attention_fwd", attention_cost(B, N, D, dt), "attention"),
                                ("softmax_attention_fwd_bwd", attention_cost(B, N, D, dt, backward=True), "attention"),
                                ("top1_fwd", top1_cost(B, N, D, dt), "top1")):
                            f, by, la, ex = cost
                            ms = expected_ms(f, by, la, ex, dev, dt, FP32_DOT[kind])
                            peak = matrix_peak(dev, dt, FP32_DOT[kind])
                            bound = max((f / peak, "matrix"), (by / dev.bandwidth, "memory"), (ex / dev.sfu, "exp"))
                            out.append({"device": dev.name, "op": op, "shape": [B, N, D], "dtype": dt, "flops": f,
                                        "bytes": by, "exps": ex, "expected_ms": ms, "bound": bound[1]})
        for shape in ((4096, 3, 8, 8), (4096, 3, 32, 32)):
            n = 1
            for x in shape:
                n *= x
            f, by, la, ex = reverse_step_cost(n)
            out.append({"device": dev.name, "op": "reverse_step", "shape": list(shape), "dtype": "float32",
                        "flops": f, "bytes": by, "exps": ex, "expected_ms": expected_ms(f, by, la, ex, dev, "float32", "none"),
                        "bound": "memory" if by / dev.bandwidth > ex / dev.sfu else "sfu"})
    return out


def main() -> None:  # pragma: no cover - a report
    rows = estimates()
    devices = [asdict(d) for d in DATASHEET.values()]
    if torch.cuda.is_available():
        devices.append(asdict(measure_device()))
    from _common import RESULTS
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "roofline_estimates.json").write_text(json.dumps({"devices": devices, "rows": rows}, indent=1))
    print(f"{'device':14s} {'op':27s} {'B,N,D':18s} {'dtype':9s} {'GFLOP':>8s} {'MB':>8s} {'expected us':>12s} bound")
    for r in rows:
        print(f"{r['device']:14s} {r['op']:27s} {str(tuple(r['shape'])):18s} {r['dtype']:9s} {r['flops'] / 1e9:8.2f} "
              f"{r['bytes'] / 1e6:8.2f} {1e3 * r['expected_ms']:12.1f} {r['bound']}")


if __name__ == "__main__":
    main()
