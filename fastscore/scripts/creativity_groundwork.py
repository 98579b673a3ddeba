"""Groundwork for the creativity study: how much of the rule a training set covers, the
exact references for consistent-and-novel samples, and the two analytic anchors.

    python -m fastscore.scripts.creativity_groundwork [--anchors] [--figures DIR]

Prints markdown: per setting (pairs, colours) and number of training images, the distinct consistent
contents the training set shows (data seed 0; the range over data seeds 0-9 in brackets), the exact
chance of consistent-and-novel among valid under uniform random pairs, the mosaic chance (pairs drawn
independently from the training set's pairs at their positions) and the novelty of a model that samples
the rule (``rule_novel``). ``--anchors`` also samples the ELS machine (patch 5) and the ideal score, 1,000
samples each, at 4 pairs / 2 colours / 8x8 for 8-256 training images (~1 min on one CPU thread);
``--figures DIR`` writes the curve and the ELS machine's novel samples beside their nearest training images.
"""
import argparse
from pathlib import Path

import torch

from fastscore import KVConfig, make_dataset, make_schedule, sample
from fastscore.data import generate, palette_of_size
from fastscore.novelty import coverage, mosaic_chance, novelty

SIZES = (8, 16, 32, 64, 128, 256, 1000, 5000)
SETTINGS = ((4, 2, 8), (6, 2, 8), (8, 2, 12), (4, 4, 8), (6, 4, 8), (8, 4, 12))


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def coverage_table() -> None:
    print("| pairs | colours | image | training images | consistent contents | covered (seeds 0-9) | "
          "chance, uniform pairs | mosaic chance (seeds 0-9) | rule novel |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n_pairs, P, size in SETTINGS:
        c = KVConfig(n_pairs=n_pairs, palette=palette_of_size(P), image_size=size)
        for n in SIZES:
            sets = [generate(c, n, seed=s) for s in range(10)]
            covs = [coverage(c, t) for t in sets]
            mos = [float(mosaic_chance(c, t)) for t in sets]
            c0, cv = covs[0], [x["covered"] for x in covs]
            m = f"{pct(mos[0])} ({pct(min(mos))}-{pct(max(mos))})"
            print(f"| {n_pairs} | {P} | {size}x{size} | {n} | {c0['consistent_contents']} | {c0['covered']} "
                  f"({min(cv)}-{max(cv)}) | {c0['chance_exact']} = {pct(c0['chance'])} | {m} | {pct(c0['rule_novel'])} |")


def anchors(figures: Path | None) -> None:
    torch.set_num_threads(1)
    from fastscore.theory import ELSScore, IdealScore
    sched = make_schedule("linear", 1000)
    c = KVConfig(palette=palette_of_size(2))
    curves: dict = {"ELS machine": {}, "ideal score": {}}
    refs: dict = {"chance (uniform pairs)": {}, "mosaic (training pairs)": {}}
    print("\n| training images | model | copy among valid | consistent and novel among valid | uniform chance | "
          "mosaic chance | own-marginal mosaic |")
    print("|---|---|---|---|---|---|---|")
    for n in SIZES[:6]:
        images, train = make_dataset(c, n, 0)
        for name, model in (("ELS machine", ELSScore(images, sched, 5)), ("ideal score", IdealScore(images, sched))):
            x = sample(model, 1000, steps=50, seed=10_000)
            nv = novelty(c, x, train)
            r = nv.rates
            curves[name][n] = r["novel_among_valid"]
            own = "-" if nv.own_mosaic is None else pct(float(nv.own_mosaic))
            print(f"| {n} | {name} | {r['copy_among_valid']} | {r['novel_among_valid']} | {pct(float(nv.chance))} | "
                  f"{pct(float(nv.mosaic))} | {own} |")
            if figures is not None and name == "ELS machine" and n == 32:
                from fastscore.novelty_figures import plot_novel_beside_nearest
                plot_novel_beside_nearest(c, x, train, figures / "els-novel-beside-nearest.png", result=nv,
                                          overwrite=True)
        refs["chance (uniform pairs)"][n] = float(nv.chance)
        refs["mosaic (training pairs)"][n] = float(nv.mosaic)
    if figures is not None:
        from fastscore.novelty_figures import plot_novelty_curve
        plot_novelty_curve(curves, refs, figures / "anchors-novelty-curve.png", overwrite=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", action="store_true", help="also sample the ELS machine and the ideal score")
    ap.add_argument("--figures", type=Path, default=None, help="folder for the figures (with --anchors)")
    a = ap.parse_args(argv)
    coverage_table()
    if a.anchors:
        anchors(a.figures)


if __name__ == "__main__":
    main()
