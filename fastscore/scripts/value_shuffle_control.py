"""Control for consistency among valid samples: is it above what the samples' own value
distribution gives by chance? Shuffles each pair's values across the valid samples (keeping every
marginal) and recomputes consistency; also prints the value marginals.

    python -m fastscore.scripts.value_shuffle_control CHECKPOINT [N]
"""
from __future__ import annotations

import argparse

import torch

from fastscore import sample
from fastscore.checkpoint import load_model
from fastscore.data import KVConfig, decode
from fastscore.metrics import Rate, is_consistent, shuffled_consistency


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a fastscore model checkpoint (.safetensors)")
    p.add_argument("n", nargs="?", type=int, default=2000, help="samples (default 2000)")
    a = p.parse_args(argv)
    m, meta = load_model(a.checkpoint)
    cfg = KVConfig.from_dict(meta["data"])
    x = sample(m, a.n, steps=50, eta=1.0, seed=7)
    d = decode(cfg, x)
    k, v = d.keys[d.valid], d.values[d.valid]
    obs = is_consistent(k, v)
    print("valid", int(d.valid.sum()), "of", a.n, "| consistent among valid", Rate(int(obs.sum()), len(obs)))
    print("value marginals per pair:",
          [torch.bincount(v[:, i], minlength=cfg.n_colours).tolist() for i in range(cfg.n_pairs)])
    c = shuffled_consistency(k, v)
    print(f"shuffled-values consistency (chance under the samples' own marginals): {100 * c['mean']:.2f}% "
          f"(2.5-97.5%: {100 * c['q025']:.2f}-{100 * c['q975']:.2f})")
    return c


if __name__ == "__main__":
    main()
