"""End to end: ``fastscore.sample`` for each of the four networks, and one training step.

CPU:  pytest benchmarks/bench_end_to_end.py --benchmark-only   (throughput in images/s in extra_info)
GPU:  python benchmarks/bench_end_to_end.py                    -> benchmarks/results/end_to_end_<device>.json
      (50-step DDIM on 4,096 images, for each model backend ``auto``, ``triton`` and ``torch``, with
      and without the CUDA graph; the first call, which captures the graph, is reported apart
      from the median of the calls after it, which replay it; and one training step per backend)

The CPU benchmark also times an eager sampling loop written the usual way (``torch.randn_like`` and
separate arithmetic per step) against ``fastscore.sample`` on the reference path.
"""
from __future__ import annotations

import time

import pytest
import torch
from _common import env, write_rows

import fastscore
from fastscore.data import KVConfig, make_dataset
from fastscore.models import ATTENTIONS, ScoreNet
from fastscore.sampling import step_coefficients, timesteps
from fastscore.schedule import make_schedule
from fastscore.training import TrainConfig, train


@torch.no_grad()
def eager_sample(model, n, steps=50, eta=1.0, seed=0):
    """The usual eager DDIM loop: randn_like noise and separate ops per step (no fused update)."""
    torch.manual_seed(seed)
    s = make_schedule("linear", model.config.T)
    ts = timesteps(s.T, steps)
    x = torch.randn(n, *model.image_shape)
    for t, c in zip(ts, step_coefficients(s, ts, eta)):
        eps = model(x, torch.full((n,), t, dtype=torch.int64))
        x0 = ((x - c.sqrt_one_minus_alpha_bar * eps) / c.sqrt_alpha_bar).clamp(-1, 1)
        eps = (x - c.sqrt_alpha_bar * x0) / c.sqrt_one_minus_alpha_bar
        x = c.sqrt_alpha_bar_prev * x0 + c.dir_coef * eps + c.sigma * torch.randn_like(x)
    return x


# ----- CPU: pytest-benchmark -----
N_CPU = 256


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bench_sample_cpu(benchmark, attention):
    m = ScoreNet(attention, 64, backend="torch").eval()
    benchmark.group = "sample 256 images, 50 DDIM steps, CPU"
    benchmark.pedantic(lambda: fastscore.sample(m, N_CPU, steps=50), rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = N_CPU / benchmark.stats.stats.median


@pytest.mark.parametrize("attention", ["softmax"])
def test_bench_sample_eager_loop_cpu(benchmark, attention):
    m = ScoreNet(attention, 64).eval()
    benchmark.group = "sample 256 images, 50 DDIM steps, CPU"
    benchmark.pedantic(lambda: eager_sample(m, N_CPU), rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = N_CPU / benchmark.stats.stats.median


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bench_train_step_cpu(benchmark, attention):
    x, _ = make_dataset(KVConfig(), 1024, 0)
    m = ScoreNet(attention, 64)
    cfg = TrainConfig(steps=5, batch_size=128, ema=0.999)
    benchmark.group = "5 training steps, batch 128, CPU"
    benchmark.pedantic(lambda: train(m, x, cfg, progress=False), rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = 5 * 128 / benchmark.stats.stats.median


# ----- GPU -----
def _timed(fn, device: torch.device | str = "cuda") -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_sample(model, n: int, steps: int, graph: bool, repeats: int = 5, **extra) -> dict:
    """``fastscore.sample(model, n, steps=steps, batch_size=n, cuda_graph=graph)`` called ``1 + repeats``
    times: the first call (compilation; with the graph, warm-up and capture, kept for later calls)
    apart, the median and p20/p80 of the others, and every call's time (``calls_ms``)."""
    device = next(model.parameters()).device
    run = lambda: fastscore.sample(model, n, steps=steps, batch_size=n, cuda_graph=graph)
    first = _timed(run, device)
    calls = [_timed(run, device) for _ in range(repeats)]
    times = sorted(calls)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"op": f"sample_ddim{steps}", "provider": ("graph" if graph else "eager"), "shape": [n, *model.image_shape],
            "dtype": "float32", "metric": "images/s", "value": n / q(0.5), "median_ms": 1e3 * q(0.5),
            "p20_ms": 1e3 * q(0.2), "p80_ms": 1e3 * q(0.8), "first_call_ms": 1e3 * first,
            "calls_ms": [1e3 * c for c in calls], "status": "ok", **extra, **env()}


def main() -> None:  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        print("no CUDA device: `pytest benchmarks/bench_end_to_end.py --benchmark-only` runs the CPU version")
        return
    rows = []
    n = 4096
    for attention in ATTENTIONS:
        for backend in ("auto", "triton", "torch"):
            m = ScoreNet(attention, 64, backend=backend).cuda().eval()
            graphs = (True, False) if backend != "torch" else (False,)  # the graph needs the fused update
            for graph in graphs:
                r = time_sample(m, n, 50, graph, network=attention, backend=backend)
                r["provider"] = backend + ("+graph" if graph else "")
                rows.append(r)
                print(f"{attention:9s} {r['provider']:13s} {r['median_ms']:9.1f} ms  {r['value']:10.0f} images/s  "
                      f"(first call {r['first_call_ms']:.1f} ms)")
    x, _ = make_dataset(KVConfig(), 8192, 0)
    for attention in ATTENTIONS:
        for backend in ("auto", "triton", "torch"):
            m = ScoreNet(attention, 64, backend=backend).cuda()
            cfg = TrainConfig(steps=50, batch_size=512, ema=0.999)
            train(m, x, cfg, progress=False)
            dt = _timed(lambda: train(m, x, cfg, progress=False))  # noqa: B023
            rows.append({"op": "train_step", "provider": backend, "shape": [512, 3, 8, 8], "dtype": "float32",
                         "metric": "images/s", "value": 50 * 512 / dt, "median_ms": 1e3 * dt / 50, "p20_ms": None,
                         "p80_ms": None, "network": attention, **env()})
            print(f"{attention:9s} {backend:6s} train step {1e3 * dt / 50:8.2f} ms  {50 * 512 / dt:10.0f} images/s")
    print("wrote", write_rows("end_to_end_" + env()["device"].replace(" ", "_"), rows))


if __name__ == "__main__":
    main()
