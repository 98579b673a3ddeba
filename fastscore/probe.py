"""The coordination probe: does a network use the other pairs to denoise one pair?

Clean images are noised to level t; the accuracy of the denoised value of pair 1 (nearest colour of
x0_hat at its value cell) is compared between images where pair 0 shares pair 1's key ("matched")
and where it does not ("unmatched"). An optimal denoiser is more accurate when matched (two noisy
views of one value); a local network, which cannot see pair 0, scores a gap of exactly 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _validate
from .data import KVConfig, generate, render
from .metrics import Z95, Rate
from .schedule import make_schedule


@torch.no_grad()
def coordination_probe(model, config: KVConfig, t_values: Sequence[int], *, n: int = 2000, seed: int = 0,
                       device: str | torch.device = "cpu", batch_size: int = 1000) -> list[dict]:
    """Per t: accuracy of pair 1's denoised value when pair 0 shares its key vs when it does not.

    Paired design: each of ``n`` images appears twice, identical but for pair 0 (its key set equal to
    pair 1's, or to another colour; its value ``f(key)``), with the same noise. A network that does
    not look at pair 0 (any local network: pair 0 is outside pair 1's receptive field) gives exactly
    the same prediction in both copies, so its gap is exactly 0; a positive gap means the network
    uses pair 0 to denoise pair 1. Returns rows ``{"t", "matched": Rate, "unmatched": Rate, "gap",
    "gap_ci95": (lo, hi), "changed": fraction of images whose prediction differs}``; the interval
    is the normal interval of a paired difference. Needs ``config.n_pairs >= 2``.
    """
    if config.n_pairs < 2:
        raise _validate.UsageError("the coordination probe needs n_pairs >= 2")
    _validate.positive_int("n", n)
    sched = make_schedule("linear", getattr(getattr(model, "config", None), "T", 1000))
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    b = generate(config, n, seed)
    P = config.n_colours
    km, ku = b.keys.clone(), b.keys.clone()
    km[:, 0] = km[:, 1]                                                    # matched: pair 0 shares pair 1's key
    ku[:, 0] = (ku[:, 1] + torch.randint(1, P, (n,), generator=g)) % P     # unmatched: another key
    keys = torch.cat([km, ku])
    values = b.functions.repeat(2, 1).gather(1, keys)
    x0 = render(config, keys, values)
    target = values[:n, 1]                                                 # pair 1 is the same in both copies
    assert config.positions is not None   # KVConfig fills in the default layout
    (vr, vc) = config.positions[1][1]
    s = config.cell_size
    pal = torch.tensor(config.palette)
    rows = []
    for t in t_values:
        t = _validate.positive_int("t", int(t), minimum=0)
        if t >= sched.T:
            raise _validate.UsageError(f"t must be < T={sched.T}, got {t}")
        ab = float(sched.alpha_bar[t])
        eps = torch.randn((n, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        pred = []
        for start in range(0, 2 * n, batch_size):
            xb = x0[start:start + batch_size].to(device)
            xt = math.sqrt(ab) * xb + math.sqrt(1 - ab) * eps[start:start + batch_size].to(device)
            tt = torch.full((xb.shape[0],), t, dtype=torch.int64, device=device)
            x0_hat = (xt - math.sqrt(1 - ab) * model(xt, tt)) / math.sqrt(ab)
            cell = x0_hat[:, :, vr * s:(vr + 1) * s, vc * s:(vc + 1) * s].mean((2, 3)).float().cpu()
            pred.append(((cell[:, None, :] - pal[None]) ** 2).sum(-1).argmin(1))
        p = torch.cat(pred)
        cm, cu = p[:n] == target, p[n:] == target
        d = cm.double() - cu.double()
        gap = float(d.mean())
        half = Z95 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
        rows.append({"t": t, "matched": Rate(int(cm.sum()), n), "unmatched": Rate(int(cu.sum()), n), "gap": gap,
                     "gap_ci95": (gap - half, gap + half), "changed": float((p[:n] != p[n:]).double().mean())})
    return rows


def format_probe(rows: list[dict]) -> str:
    """A markdown table of ``coordination_probe`` rows."""
    lines = ["| t | accuracy, key shared | accuracy, key not shared | gap [95% CI] | predictions changed |",
             "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["gap_ci95"]
        lines.append(f"| {r['t']} | {r['matched']} | {r['unmatched']} | {100 * r['gap']:+.2f} pp "
                     f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {100 * r['changed']:.1f}% |")
    return "\n".join(lines)


def probe_json(rows: list[dict]) -> list[dict]:
    """``coordination_probe`` rows as JSON-serialisable dicts."""
    return [{"t": r["t"], "matched": r["matched"].to_dict(), "unmatched": r["unmatched"].to_dict(), "gap": r["gap"],
             "gap_ci95": list(r["gap_ci95"]), "changed": r["changed"]} for r in rows]
