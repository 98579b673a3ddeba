"""A/B on a CPU: ``fastscore.train`` in float32 against ``precision="bf16"`` (autocast), at the 4-colour
study's networks (width 64, batch 64, ``attn_patch``), one thread; each network 300 steps per run, the two
precisions alternated ``--reps`` times; prints the median ms per step and the ratio.

    OMP_NUM_THREADS=1 python benchmarks/ab_precision_cpu.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastscore.data import make_dataset
from fastscore.models import build_model
from fastscore.study.config import StudyConfig
from fastscore.training import train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = StudyConfig(n_colours=4)
    x, _ = make_dataset(cfg.data_config(), cfg.n_train, cfg.data_seed)
    for net in ("none", "top1", "identity", "softmax"):
        ms: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(a.reps):
            for prec in ms:
                torch.manual_seed(0)
                model = build_model(cfg.model_config(net), backend="torch")
                tc = StudyConfig(n_colours=4, train_steps=a.steps, precision=prec).train_config(0)
                t0 = time.perf_counter()
                train(model, x, tc, progress=False)
                ms[prec].append((time.perf_counter() - t0) / a.steps * 1e3)
        f, b = statistics.median(ms["fp32"]), statistics.median(ms["bf16"])
        print(f"{net}: fp32 {f:.1f} ms, bf16 {b:.1f} ms per step, {f / b:.2f}x", flush=True)


if __name__ == "__main__":
    main()
