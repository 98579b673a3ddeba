"""Training throughput: M networks in one ensemble step against M separate ``train`` calls.

    python benchmarks/bench_ensemble.py [--device cpu|cuda] [--steps 10] [--sizes 1 4 12]
        -> benchmarks/results/ensemble_<device>.json

Model-steps per second (members x steps / best-of-3 wall time, set-up included) for the study's networks
(width 64, batch 64, the CNN and softmax attention with ``attn_patch``), per ensemble size M.
On CUDA the ensemble runs on the device stream with the whole step in a CUDA graph; on CPU
eagerly on the ``train`` stream (what ``train`` draws). Tiny step counts: a throughput probe,
not a training run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import env, write_rows

from fastscore.data import KVConfig, make_dataset, palette_of_size
from fastscore.models import ScoreNet
from fastscore.training import TrainConfig, train

NETWORKS = {"cnn": ("none", False), "softmax": ("softmax", True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _models(network: str, M: int, device: torch.device, backend: str | None = None) -> list[ScoreNet]:
    """M seeded networks; ``backend`` None: ``"torch"`` on CPU, ``"auto"`` elsewhere."""
    attention, patch = NETWORKS[network]
    backend = backend or ("torch" if device.type == "cpu" else "auto")
    out = []
    for s in range(M):
        torch.manual_seed(1000 + s)
        out.append(ScoreNet(attention, 64, attn_patch=patch, backend=backend))
    return out


def _configs(M: int, steps: int, batch_size: int = 64) -> list[TrainConfig]:
    return [TrainConfig(steps=steps, batch_size=batch_size, seed=s, t_focus=(50, 400), t_focus_prob=0.5) for s in range(M)]


def measure(network: str, M: int, steps: int, device: torch.device, data: torch.Tensor,
            repeat: int = 3) -> list[dict]:
    """Best-of-``repeat`` wall time (set-up included) of the ensemble and of M separate train calls."""
    models, configs = _models(network, M, device), _configs(M, steps)
    stream = "device" if device.type == "cuda" else "train"
    best = {"separate": float("inf"), "ensemble": float("inf")}
    for _ in range(repeat):   # alternate the two and keep each one's best: the CPU may be shared
        for provider in best:
            nets = [copy.deepcopy(m) for m in models]
            _sync(device)
            t0 = time.perf_counter()
            if provider == "separate":
                for net, cfg in zip(nets, configs):
                    train(net, data, cfg, device=device, progress=False)
            else:
                train(nets, data, configs, device=device, stream=stream, progress=False)
            _sync(device)
            best[provider] = min(best[provider], time.perf_counter() - t0)
    rows = [{"op": "train", "provider": p, "network": network, "members": M, "steps": steps, "batch_size": 64,
             "width": 64, "repeat": repeat, "seconds": sec, "metric": "model-steps/s", "value": M * steps / sec,
             **env()} for p, sec in best.items()]
    rows[1]["speedup"] = rows[1]["value"] / rows[0]["value"]
    return rows


def step_rate(network: str, M: int, steps: int, device: torch.device, data: torch.Tensor, graph: bool,
              warm: int = 4, backend: str | None = None, batch_size: int = 64) -> dict:
    """Steady-state model-steps/s of one ensemble of M (``train`` itself when ``M == 0``: one network),
    eager or with the whole step in a CUDA graph: each step after step ``warm`` timed alone (the
    device synchronised after every step; median, p20, p80), so compilation, warm-up and capture are
    reported apart (``first_s``: start to the end of step ``warm``). ``backend`` is the networks' ops
    backend (None: ``_models``' default, and the row has no ``backend`` field)."""
    if steps <= warm + 1:
        raise ValueError(f"steps must exceed warm + 1 = {warm + 1}, got {steps}")
    marks: dict[int, float] = {}

    def tick(step: int, *_: object) -> None:
        if step >= warm:
            _sync(device)
            marks[step] = time.perf_counter()
    nets = _models(network, max(M, 1), device, backend)
    _sync(device)
    t0 = time.perf_counter()
    if M == 0:
        train(nets[0], data, _configs(1, steps, batch_size)[0], device=device, progress=False, callback=tick,
              check_every=1)
    else:   # check_every=1: the callback marks every step (on CUDA losses are otherwise checked every 50)
        train(nets, data, _configs(M, steps, batch_size), device=device, progress=False, callback=tick,
              check_every=1, stream="device" if device.type == "cuda" else "train", cuda_graph=graph)
    members = max(M, 1)
    per_step = sorted(1e3 * (marks[s] - marks[s - 1]) for s in range(warm + 1, steps))
    q = statistics.quantiles(per_step, n=10, method="inclusive") if len(per_step) > 1 else per_step * 9
    med = statistics.median(per_step)
    return {"op": "train" if M == 0 else "train_ensemble", "provider": "graph" if graph else "eager",
            "network": network, "members": members, "shape": [members, batch_size, *data.shape[1:]],
            "dtype": "float32", **({"backend": backend} if backend else {}), "steps": steps, "timed_steps": len(per_step), "width": 64, "metric": "model-steps/s",
            "value": members * 1e3 / med, "median_ms": med, "p20_ms": q[1], "p80_ms": q[7],
            "first_s": marks[warm] - t0, **env()}


def profile_step(network: str, M: int, device: torch.device, data: torch.Tensor, row_limit: int = 25) -> str:
    """``torch.profiler``'s table (sorted by device time) of one eager ensemble step of M networks, the
    third (compilation and first-call costs are past; a graph replay would hide the kernels)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)

    def tick(step: int, *_: object) -> None:
        _sync(device)
        if step == 1:
            prof.start()
        elif step == 2:
            prof.stop()
    train(_models(network, M, device), data, _configs(M, 4), device=device, progress=False, callback=tick,
          check_every=1, stream="device" if device.type == "cuda" else "train", cuda_graph=False)
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "self_cpu_time_total"):   # torch renamed the CUDA column to "device" (2.4)
        try:
            return prof.key_averages().table(sort_by=key, row_limit=row_limit)
        except (AttributeError, KeyError, ValueError):
            continue
    return prof.key_averages().table(row_limit=row_limit)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 12])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--note", default="", help="free text stored in every row (e.g. 'contended 2-core CPU')")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    data, _ = make_dataset(KVConfig(palette=palette_of_size(2)), 2000, seed=0)
    rows = []
    for network in a.networks:
        measure(network, 1, 2, device, data, 1)   # warm-up: first calls pay for kernel/primitive creation
        for M in a.sizes:
            for r in measure(network, M, a.steps, device, data, a.repeat):
                r["note"], r["threads"] = a.note, torch.get_num_threads()
                rows.append(r)
                print(f"{network:8s} M={M:3d} {r['provider']:9s} {r['seconds']:8.2f} s  "
                      f"{r['value']:8.1f} model-steps/s" + (f"  x{r['speedup']:.2f}" if "speedup" in r else ""),
                      flush=True)
    print("wrote", write_rows(f"ensemble_{device.type}", rows))


if __name__ == "__main__":
    main()
