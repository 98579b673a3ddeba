"""Theory vs networks: ELS machine and ideal score sampled from the same noise as trained nets.

    python -m fastscore.scripts.theory_compare CKPT [CKPT ...] [--n 500] [--patch-size 3 | --calibrate]
                                        [--out results/theory_compare.json] [--figure FILE.png]

The training set is rebuilt from the first checkpoint's metadata (data config, ``n_train``,
``data_seed``). Every model (the ELS machine, the ideal score, each checkpoint) is sampled with
the same seed, so sample i of each starts from the same x_T and sees the same per-step noise
(``fastscore.sampling``'s Philox stream). Reported per network: the per-sample Pearson r of
mean-centred flattened images against the ELS samples and against the ideal-score samples
(median and quartiles, Kamb & Ganguli's metric), and the sample rates (valid, consistent,
novel, ...). ``--calibrate`` picks the ELS patch size per step with ``calibrate_patch_sizes`` on
the first checkpoint whose attention is ``"none"`` (the CNN); otherwise ``--patch-size``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastscore import KVConfig, load_model, make_dataset, sample, score
from fastscore.ops import BACKENDS
from fastscore.schedule import make_schedule
from fastscore.theory import (
    ELSScore,
    IdealScore,
    calibrate_patch_sizes,
    correlation_summary,
    sample_correlation,
)


def _fmt(s: dict) -> str:
    return f"{s['median']:+.3f} [{s['q25']:+.3f}, {s['q75']:+.3f}]"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", help="fastscore model checkpoints (.safetensors)")
    p.add_argument("--n", type=int, default=500, help="samples per model (default 500)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch-size", type=int, default=3, help="fixed ELS patch size (default 3)")
    p.add_argument("--calibrate", action="store_true", help="calibrate the ELS patch size per step on the CNN")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 5, 7], help="candidate sizes for --calibrate")
    p.add_argument("--calib-n", type=int, default=32, help="trajectories for --calibrate (default 32)")
    p.add_argument("--padding", choices=("zeros", "circular"), default="zeros")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0])
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--figure", default=None, help="PNG of matched samples side by side (needs matplotlib)")
    a = p.parse_args(argv)
    device = torch.device(a.device)

    nets = []
    for path in a.checkpoints:
        model, meta = load_model(path, backend=a.backend, device=device)
        nets.append((Path(path).stem, model, meta))
    meta0 = nets[0][2]
    if not meta0.get("data"):
        sys.exit(f"{a.checkpoints[0]} has no data config; cannot rebuild its training set")
    cfg = KVConfig.from_dict(meta0["data"])
    extra = meta0.get("extra", {})
    images, train_set = make_dataset(cfg, int(extra.get("n_train", 5000)), int(extra.get("data_seed", 0)))
    T = nets[0][1].config.T
    schedule = make_schedule("linear", T)
    common = dict(n=a.n, schedule=schedule, steps=a.steps, eta=a.eta, seed=a.seed, device=device, backend=a.backend)

    calibration = None
    patch = a.patch_size
    if a.calibrate:
        cnn = next((m for _, m, _ in nets if m.config.attention == "none"), None)
        if cnn is None:
            sys.exit("--calibrate needs a checkpoint with attention 'none' (the CNN)")
        t0 = time.perf_counter()
        cal = calibrate_patch_sizes(cnn, images, schedule, sizes=a.sizes, steps=a.steps, n=a.calib_n, eta=a.eta,
                                    padding=a.padding, seed=a.seed + 1, device=device, backend=a.backend)
        patch = cal.patch_schedule(T)
        calibration = {"timesteps": cal.timesteps, "median": cal.median.tolist(), "mode": cal.mode.tolist(),
                       "mean_cosine": cal.cosine.mean(1).tolist(), "sizes": list(cal.sizes),
                       "seconds": time.perf_counter() - t0}
        print("calibrated patch sizes (t: k):", ", ".join(f"{t}:{k}" for t, k in zip(cal.timesteps, cal.median.tolist())))

    samples, rates, seconds = {}, {}, {}
    els = ELSScore(images.to(device), schedule, patch, padding=a.padding, backend=a.backend)
    ideal = IdealScore(images.to(device), schedule, backend=a.backend)
    for name, model in [("els", els), ("ideal", ideal)] + [(n, m) for n, m, _ in nets]:
        t0 = time.perf_counter()
        n = common.pop("n")
        samples[name] = sample(model, n, **common).cpu()
        common["n"] = n
        seconds[name] = time.perf_counter() - t0
        rates[name] = {k: v.to_dict() for k, v in score(cfg, samples[name], train_set).rates.items()}

    rows = []
    print(f"{'model':24s} {'r vs ELS: median [q25, q75]':32s} {'r vs ideal':28s} valid   consistent  novel")
    for name in samples:
        r_els = correlation_summary(sample_correlation(samples["els"], samples[name]))
        r_ideal = correlation_summary(sample_correlation(samples["ideal"], samples[name]))
        rt = rates[name]
        rows.append({"model": name, "r_vs_els": r_els, "r_vs_ideal": r_ideal, "rates": rt,
                     "sample_seconds": seconds[name]})
        print(f"{name:24s} {_fmt(r_els):32s} {_fmt(r_ideal):28s} {100 * rt['valid']['rate']:5.1f}%  "
              f"{100 * rt['consistent']['rate']:5.1f}%      {100 * rt['novel']['rate']:5.1f}%")
    doc = {"config": vars(a), "data_config": cfg.to_dict(), "patch_size": patch if isinstance(patch, int) else "calibrated",
           "calibration": calibration, "rows": rows, "device": str(device)}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1))
    if a.figure:
        _figure(samples, a.figure)
    return doc


def _figure(samples: dict, path: str, k: int = 8) -> None:
    """Rows: models; columns: the first k samples (same initial noise down each column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(samples)
    fig, axes = plt.subplots(len(names), k, figsize=(k * 0.9, len(names) * 0.95), squeeze=False)
    for i, name in enumerate(names):
        for j in range(k):
            ax = axes[i][j]
            img = samples[name][j].clamp(-1, 1).add(1).div(2).permute(1, 2, 0).numpy()
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
