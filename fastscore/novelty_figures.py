"""Figures for the creativity study (need matplotlib: the ``plot`` extra).

- ``plot_novel_beside_nearest``: consistent-and-novel samples (top row) above their nearest training
  images (bottom row), with the pixel L2 distance (as Kamb & Ganguli show mosaics beside their sources);
- ``plot_novelty_curve``: consistent-and-novel among valid samples against the number of training
  images, one line per network with 95% Wilson intervals, and the exact references (chance, mosaic).
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

import torch

from . import _validate
from .checkpoint import atomic_write
from .data import KVBatch, KVConfig, render
from .metrics import Rate
from .novelty import Novelty, novelty


def _pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError naming the extra without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is installed in CI
        raise ImportError("figures need matplotlib: pip install 'fastscore[plot]'") from e
    return plt


def _rgb(x: torch.Tensor):
    """(3, H, W) in [-1, 1] -> (H, W, 3) numpy in [0, 1] for imshow."""
    return ((x.detach().cpu().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _save(fig, path: str | os.PathLike, overwrite: bool):
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"),
                        overwrite=overwrite)


def plot_novel_beside_nearest(config: KVConfig, samples: torch.Tensor, train: KVBatch, path: str | os.PathLike, *,
                              result: Novelty | None = None, n: int = 8, title: str | None = None,
                              overwrite: bool = False):
    """Write a PNG at ``path``: the first ``n`` consistent-and-novel ``samples`` (N, 3, H, W) above their
    nearest training images (rendered from the contents ``train``), each labelled with its distance;
    a note instead when there is none. ``result``: ``novelty(config, samples, train)`` if already
    computed. Refuses to replace an existing file unless ``overwrite``. Returns the path."""
    _validate.positive_int("n", n)
    if result is None:
        result = novelty(config, samples, train)
    elif not isinstance(result, Novelty) or result.novel.shape[0] != samples.shape[0]:
        raise ValueError("result must be the Novelty of these samples (novelty(config, samples, train))")
    plt = _pyplot()
    idx = result.novel.nonzero().squeeze(1)[:n].tolist()
    cols = max(len(idx), 1)
    fig, axes = plt.subplots(2, cols, figsize=(1.3 * cols + 0.6, 3.0), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if idx:
        nearest = render(config, train.keys[result.nearest_index[idx]], train.values[result.nearest_index[idx]])
        for j, i in enumerate(idx):
            axes[0][j].imshow(_rgb(samples[i]), interpolation="nearest")
            axes[1][j].imshow(_rgb(nearest[j]), interpolation="nearest")
            axes[1][j].set_xlabel(f"d = {float(result.nearest_distance[i]):.2f}", fontsize=7)
        axes[0][0].set_ylabel("sample", fontsize=8)
        axes[1][0].set_ylabel("nearest\ntraining", fontsize=8)
    else:
        axes[0][0].axis("off")
        axes[1][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no consistent novel sample", ha="center", va="center", fontsize=8)
    r = result.rates["novel_among_valid"]
    fig.suptitle(title or f"consistent and novel: {r} of valid (chance {100 * float(result.chance):.2f}%, "
                          f"mosaic {100 * float(result.mosaic):.2f}%)", fontsize=8)
    try:
        return _save(fig, path, overwrite)
    finally:
        plt.close(fig)


def plot_novelty_curve(curves: Mapping[str, Mapping[int, Rate]], references: Mapping[str, Mapping[int, float]],
                       path: str | os.PathLike, *, ylabel: str = "consistent and novel among valid (%)",
                       overwrite: bool = False):
    """Write a PNG at ``path``: consistent-and-novel among valid (a ``Rate`` per number of training images;
    any other rate with ``ylabel``, e.g. the copy rate)
    against the number of training images (log axis), one line per label of ``curves`` with its 95% Wilson
    interval, and each reference of ``references`` (e.g. ``{"chance": ..., "mosaic": ...}``, fractions per
    number of training images) as a dashed line. Returns the path."""
    if not curves:
        raise ValueError("curves must hold at least one network")
    for label, pts in curves.items():
        if not pts or any(not isinstance(r, Rate) for r in pts.values()):
            raise TypeError(f"curves[{label!r}] must map numbers of training images to Rate objects")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for label, pts in curves.items():
        xs = sorted(pts)
        ys = [100 * pts[x].value for x in xs]
        lo = [y - 100 * pts[x].interval[0] for x, y in zip(xs, ys)]
        hi = [100 * pts[x].interval[1] - y for x, y in zip(xs, ys)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=3, lw=1, label=label)
    for (label, ref), style in zip(references.items(), itertools.cycle(("k--", "k:", "k-.", "C7--"))):
        xs = sorted(ref)
        ax.plot(xs, [100 * ref[x] for x in xs], style, lw=1, label=label)
    ax.set_xscale("log")
    # label the measured numbers of training images, not the log axis's crowded minor ticks
    sizes = sorted({x for pts in curves.values() for x in pts})
    ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    try:
        return _save(fig, path, overwrite)
    finally:
        plt.close(fig)


__all__ = ["plot_novel_beside_nearest", "plot_novelty_curve"]
