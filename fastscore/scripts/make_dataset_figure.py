"""Draws docs/dataset.png: training images of the study's default key-value dataset (needs matplotlib).

    python -m fastscore.scripts.make_dataset_figure [OUT.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastscore.data import DEFAULT_NAMES, make_dataset
from fastscore.study import StudyConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=str(DOCS / "dataset.png"), help="PNG file (default docs/dataset.png)")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = StudyConfig().data_config()
    x, b = make_dataset(cfg, 8, seed=1)
    fig, axes = plt.subplots(1, 8, figsize=(12, 2.1))
    for ax, img, k, v in zip(axes, x, b.keys, b.values):
        ax.imshow(((img + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(" ".join(f"{DEFAULT_NAMES[i][0]}>{DEFAULT_NAMES[j][0]}" for i, j in zip(k, v)), fontsize=6.5)
    fig.suptitle(f"{cfg.image_size}x{cfg.image_size} images, {cfg.n_pairs} key-value pairs, {cfg.n_colours} colours "
                 "(key in the corner, value beside it); title: key>value per pair", fontsize=8)
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return a.out


if __name__ == "__main__":
    main()
