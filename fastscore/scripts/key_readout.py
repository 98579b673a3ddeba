"""Linear read-out of pair 1's own value and its neighbouring key colour from the CNN embedding z at
pair 1's value cell, at several noise levels (least squares on 4,000 images, accuracy on 2,000).

    python -m fastscore.scripts.key_readout CHECKPOINT
"""
from __future__ import annotations

import argparse
import math

import torch

from fastscore.checkpoint import load_model
from fastscore.data import KVConfig, make_dataset
from fastscore.schedule import make_schedule


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a fastscore model checkpoint (.safetensors)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    m, meta = load_model(a.checkpoint)
    cfg = KVConfig.from_dict(meta["data"])
    x0, b = make_dataset(cfg, 6000, 99)
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    assert cfg.positions is not None   # filled in by KVConfig.__post_init__
    (kr, kc), (vr, vc) = cfg.positions[1]
    out = {}
    for t in (100, 200, 400):
        ab = float(s.alpha_bar[t])
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            z = m.embed(xt, torch.full((6000,), t))[:, :, vr, vc]          # CNN embedding at pair 1's value cell
        z = torch.cat([z, torch.ones(6000, 1)], 1)
        res = {}
        for name, y in (("own value", b.values[:, 1]), ("own key (neighbour)", b.keys[:, 1])):
            Y = torch.nn.functional.one_hot(y, cfg.n_colours).float()
            W = torch.linalg.lstsq(z[:4000], Y[:4000]).solution
            res[name] = ((z[4000:] @ W).argmax(1) == y[4000:]).float().mean().item()
        # chance-level reference: the raw noisy pixels of the key cell, linearly
        raw = torch.cat([xt[:, :, kr, kc], torch.ones(6000, 1)], 1)
        Y = torch.nn.functional.one_hot(b.keys[:, 1], cfg.n_colours).float()
        W = torch.linalg.lstsq(raw[:4000], Y[:4000]).solution
        res["key from raw key pixel"] = ((raw[4000:] @ W).argmax(1) == b.keys[4000:, 1]).float().mean().item()
        print(t, {k: round(v, 3) for k, v in res.items()})
        out[t] = res
    return out


if __name__ == "__main__":
    main()
