"""The study's figures (with matplotlib installed; without it, none): sample grids framed by their
score, consistency per model, loss curves, attention maps."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoint import atomic_write, load_model
from ..data import make_dataset
from ..metrics import score
from ..schedule import make_schedule
from .config import ANALYTIC, FIGURE_IMAGE_SEED, LABELS, StudyConfig
from .files import StudyDir

# frame colours of a sample in samples.png (RGB in [0, 1])
FRAMES = {"consistent": (0.1, 0.65, 0.2), "valid": (0.95, 0.6, 0.0), "invalid": (0.85, 0.1, 0.1)}
ATTENTION_T = (100, 300, 600)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (figures are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, rel: str, out: StudyDir | Path) -> str:
    """Save ``fig`` as PNG atomically (through ``out``'s manifest when it is a study directory)."""
    def write(tmp) -> None:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    if isinstance(out, StudyDir):
        path = out.write_with(rel, write)
    else:
        path = atomic_write(Path(out) / rel, write, overwrite=True)
    plt.close(fig)
    return str(path)


def sample_grid(config: StudyConfig, x: torch.Tensor) -> torch.Tensor:
    """(3, k(H+2), k(H+2)) image in [0, 1]: up to 36 samples of ``x`` (N, 3, H, H), each in a 1-pixel
    frame coloured by its score (``FRAMES``: consistent, valid but not consistent, invalid)."""
    x = x[:36]
    k = int(math.ceil(math.sqrt(max(len(x), 1))))
    H = x.shape[-1] if len(x) else 1
    grid = torch.ones(3, k * (H + 2), k * (H + 2))
    if not len(x):
        return grid
    s = score(config.data_config(), x)
    for i, im in enumerate(x):
        gy, gx = divmod(i, k)
        y0, x0 = gy * (H + 2), gx * (H + 2)
        kind = "consistent" if s.consistent[i] else ("valid" if s.valid[i] else "invalid")
        grid[:, y0:y0 + H + 2, x0:x0 + H + 2] = torch.tensor(FRAMES[kind]).view(3, 1, 1)
        grid[:, y0 + 1:y0 + 1 + H, x0 + 1:x0 + 1 + H] = (im.clamp(-1, 1) + 1) / 2
    return grid


def study_figures(out: StudyDir, config: StudyConfig, rows: list[dict], device, backend: str,
                  summary: dict | None = None) -> list[str]:
    """samples.png, consistency.png (with ``summary``), loss.png and attention.png in ``figures/``."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    nets = [n for n in tuple(config.analytic) + tuple(config.networks) if any(r["network"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(nets), figsize=(3.2 * len(nets), 3.6), squeeze=False)
    for ax, net in zip(axes[0], nets):
        r = next(r for r in rows if r["network"] == net)
        ax.imshow(sample_grid(config, torch.tensor(r["preview"])).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(LABELS[net], fontsize=9)
        ax.axis("off")
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in FRAMES.values()],
               labels=["consistent", "valid, not consistent", "invalid"], loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    written.append(_save(plt, fig, "figures/samples.png", out))
    if summary is not None:
        written.append(consistency_figure(plt, out, config, summary))
    written.append(_loss_figure(plt, out, nets, rows))
    att = _attention_figure(plt, out, config, nets, device, backend)
    if att is not None:
        written.append(att)
    return written


def _loss_figure(plt, out: StudyDir, nets: list[str], rows: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for net in nets:
        for r in rows:
            if r["network"] == net and r["losses"]:
                l = torch.tensor(r["losses"])
                w = max(1, len(l) // 30)
                sm = l.unfold(0, w, w).mean(1) if len(l) >= w else l
                ax.plot(torch.arange(len(sm)) * w * 10, sm, label=f"{LABELS[net]} s{r['seed']}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    return _save(plt, fig, "figures/loss.png", out)


def _attention_figure(plt, out: StudyDir, config: StudyConfig, nets: list[str], device, backend: str) -> str | None:
    """Where pair 1's value cell (the query, outlined) attends, on one training image at a few t;
    one colour scale (attention probability, from 0) per network, with its colour bar."""
    cfg = config.data_config()
    att_nets = [n for n in nets if n not in ("none",) + ANALYTIC]
    if not att_nets:
        return None
    x0, _ = make_dataset(cfg, 1, seed=config.data_seed + FIGURE_IMAGE_SEED)
    assert cfg.positions is not None   # KVConfig fills in the default layout
    (vr, vc) = cfg.positions[1][1]
    H, s = cfg.image_size, cfg.cell_size
    maps = []
    for net in att_nets:
        model, _ = load_model(out.checkpoint(net, 0), backend=backend, device=device)
        sched = make_schedule("linear", model.config.T)
        g = torch.Generator().manual_seed(0)
        row = []
        for t in ATTENTION_T:
            ab = float(sched.alpha_bar[t])
            xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g)
            w = model.attention_weights(xt.to(device), torch.tensor([t], device=device))[0].cpu()
            row.append(w[(vr * s) * H + vc * s].view(H, H))
        maps.append(row)
    fig, axes = plt.subplots(len(att_nets), len(ATTENTION_T) + 1, figsize=(2.2 * (len(ATTENTION_T) + 1) + 0.6,
                             2.3 * len(att_nets)), squeeze=False)
    for i, net in enumerate(att_nets):
        vmax = max(float(m.max()) for m in maps[i]) or 1.0
        axes[i][0].imshow(((x0[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i][0].set_title("image", fontsize=8)
        axes[i][0].set_ylabel(LABELS[net], fontsize=7)
        for j, t in enumerate(ATTENTION_T):
            im = axes[i][j + 1].imshow(maps[i][j].numpy(), cmap="viridis", interpolation="nearest", vmin=0, vmax=vmax)
            axes[i][j + 1].set_title(f"t={t}", fontsize=8)
        for ax in axes[i]:
            ax.add_patch(plt.Rectangle((vc * s - 0.5, vr * s - 0.5), s, s, fill=False, ec="red", lw=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes[i][1:]), fraction=0.04, pad=0.02).set_label("attention", fontsize=7)
    fig.suptitle("attention of pair 1's value cell (query outlined in red)", fontsize=9)
    return _save(plt, fig, "figures/attention.png", out)


def consistency_figure(plt, out: StudyDir, config: StudyConfig, summary: dict) -> str:
    """Consistency among valid samples per model: pooled rate with its 95% interval, seeds as dots,
    the analytic chance as a line and each model's own-marginal chance as a tick. The axis fits the
    trained networks; a bar above it (the ideal score, ~100%) is cut and labelled with its value."""
    nets = summary["networks"]
    own = summary.get("own_marginal_chance") or {}
    names = [n for n in nets if nets[n]["rates"]["consistent_among_valid"]["n"]]
    chance = 100 * summary["baseline"]["analytic_consistent"]
    tops = [100 * nets[n]["rates"]["consistent_among_valid"]["ci95"][1] for n in names if n != "ideal"]
    ymax = min(100.0, 1.25 * max(tops + [chance]) + 5)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 1.5, 3.4))
    for i, n in enumerate(names):
        r = nets[n]["rates"]["consistent_among_valid"]
        lo, hi = r["ci95"]
        ax.bar(i, 100 * r["rate"], color="tab:orange" if n not in ("none",) + ANALYTIC else "tab:grey", alpha=0.8)
        ax.errorbar(i, 100 * r["rate"], yerr=[[100 * (r["rate"] - lo)], [100 * (hi - r["rate"])]], color="k",
                    capsize=4)
        if 100 * r["rate"] > ymax:
            ax.text(i, 0.97 * ymax, f"{100 * r['rate']:.0f}% \u2191", ha="center", va="top", fontsize=7,
                    bbox={"fc": "white", "ec": "none", "pad": 1})
        seeds = [p for p in r.get("per_seed", []) if p is not None]
        if len(seeds) > 1:
            ax.scatter([i] * len(seeds), [100 * p for p in seeds], color="k", s=10, zorder=3)
        if n in own and own[n]["mean"] == own[n]["mean"]:
            ax.hlines(100 * own[n]["mean"], i - 0.4, i + 0.4, colors="tab:blue", linestyles="dotted")
    ax.axhline(chance, color="tab:red", ls="--", lw=1, label="analytic chance")
    ax.plot([], [], color="tab:blue", ls="dotted", label="own-marginal chance")
    ax.set_xticks(range(len(names)), [LABELS[n].replace("CNN + ", "+ ").replace(" (theory)", "") for n in names],
                  fontsize=7, rotation=20)
    ax.set_ylabel("consistent among valid (%)")
    ax.set_ylim(0, ymax)
    ax.set_title(f"{config.n_pairs} pairs, {config.n_colours} colours, {config.n_seeds} seed(s) x "
                 f"{config.n_samples} samples", fontsize=8)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    return _save(plt, fig, "figures/consistency.png", out)
