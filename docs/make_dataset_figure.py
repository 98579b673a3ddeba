"""Draws docs/dataset.png: training images of the study's default key-value dataset (needs matplotlib)."""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastscore.data import DEFAULT_NAMES, make_dataset  # noqa: E402
from fastscore.experiment import StudyConfig  # noqa: E402

cfg = StudyConfig().data_config()
x, b = make_dataset(cfg, 8, seed=1)
fig, axes = plt.subplots(1, 8, figsize=(12, 2.1))
for ax, img, k, v in zip(axes, x, b.keys, b.values):
    ax.imshow(((img + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(" ".join(f"{DEFAULT_NAMES[a][0]}>{DEFAULT_NAMES[c][0]}" for a, c in zip(k, v)), fontsize=6.5)
fig.suptitle(f"{cfg.image_size}x{cfg.image_size} images, {cfg.n_pairs} key-value pairs, {cfg.n_colours} colours "
             "(key in the corner, value beside it); title: key>value per pair", fontsize=8)
fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "docs/dataset.png", dpi=110, bbox_inches="tight")
