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
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env, write_rows  # noqa: E402

from fastscore.data import KVConfig, make_dataset, palette_of_size  # noqa: E402
from fastscore.models import ScoreNet  # noqa: E402
from fastscore.training import TrainConfig, train  # noqa: E402

NETWORKS = {"cnn": ("none", False), "softmax": ("softmax", True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(network: str, M: int, steps: int, device: torch.device, data: torch.Tensor,
            repeat: int = 3) -> list[dict]:
    """Best-of-``repeat`` wall time (set-up included) of the ensemble and of M separate train calls."""
    attention, patch = NETWORKS[network]
    models = []
    for s in range(M):
        torch.manual_seed(1000 + s)
        models.append(ScoreNet(attention, 64, attn_patch=patch, backend="torch" if device.type == "cpu" else "auto"))
    configs = [TrainConfig(steps=steps, batch_size=64, seed=s, t_focus=(50, 400), t_focus_prob=0.5) for s in range(M)]
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
