"""Creativity proper: samples that are consistent *and* new, and how far they lie from the training set.

For samples of the key-value dataset and the training set's contents (a ``KVBatch``):

- *copy*: a valid sample whose decoded (keys, values) equal some training image's. Training
  contents obey the rule, so every copy is consistent.
- *consistent and novel*: valid, consistent, and not a copy. The headline creativity rate is
  consistent-and-novel among valid samples.
- Exact references for it (``Fraction``):
  ``novelty_chance``, uniform random keys and values: the fraction of the ``P**(2n)`` contents that are
  consistent and not covered by the training set (4 pairs, 2 colours, 5,000 training images: all 60
  consistent contents covered, so 0); ``mosaic_chance``, each pair drawn independently from the
  training set's pairs at its position (or from the samples' own pairs: the own-marginal chance),
  which is what a patch mosaic does; and, among consistent samples, ``coverage(...)["rule_novel"]``,
  the novelty of a model that learned the rule and samples the data distribution.
- *nearest training image*: per sample, the training image at the smallest pixel L2 distance
  (float64, over all C*H*W values in [-1, 1] units); a copy lies within its sampling error of a
  training image, a new content at least one recoloured cell away (``recolour_distances``: 2.83 between
  red and green, 2.0-3.46 among the paper's 4 colours).

Anchors: the ideal score (``fastscore.theory.IdealScore``) reproduces training images (novel 0); the
ELS machine composes training patches into new contents at the mosaic chance (``python -m fastscore.scripts.creativity_groundwork``).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from . import _validate
from .data import KVBatch, KVConfig, decode, render
from .metrics import Rate, analytic_random_consistency, content_codes, is_consistent

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
_CHUNK_ELEMENTS = 2**22                 # sample x training-image distances held at once


def _check_contents(config: KVConfig, name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
    for part, x in (("keys", keys), ("values", values)):
        _validate.tensor(f"{name} {part}", x, ndim=2, floating=False)
    if keys.shape != values.shape or keys.shape[1] != config.n_pairs:
        raise ValueError(f"{name} must hold keys and values of shape (N, {config.n_pairs}) (the config's n_pairs), "
                         f"got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one image's contents")
    for part, x in (("keys", keys), ("values", values)):
        if int(x.min()) < 0 or int(x.max()) >= config.n_colours:
            raise ValueError(f"{name} {part} must hold colour indices in [0, {config.n_colours})")


def _check_train(config: KVConfig, train: KVBatch) -> KVBatch:
    if not isinstance(config, KVConfig):
        raise TypeError(f"config must be a KVConfig, got {type(config).__name__}")
    if not isinstance(train, KVBatch):
        raise TypeError(f"train must be a KVBatch (training contents), got {type(train).__name__}")
    _check_contents(config, "train", train.keys, train.values)
    return train


def n_consistent_contents(n_pairs: int, n_colours: int) -> int:
    """How many of the ``n_colours**(2 n_pairs)`` contents are consistent (4 pairs, 2 colours: 60)."""
    exact = analytic_random_consistency(n_pairs, n_colours) * n_colours ** (2 * n_pairs)
    assert exact.denominator == 1
    return int(exact)


def training_codes(config: KVConfig, train: KVBatch) -> torch.Tensor:
    """Sorted distinct content codes (``metrics.content_codes``) of the training contents, (M,) int64."""
    _check_train(config, train)
    return torch.unique(content_codes(train.keys, train.values, config.n_colours))


def coverage(config: KVConfig, train: KVBatch) -> dict:
    """How much of the rule the training set shows: ``n_train``, ``distinct`` training contents,
    ``consistent_contents`` (all of them), ``covered`` (distinct consistent training contents),
    ``covered_fraction``, ``chance`` (``novelty_chance``; a float) with ``chance_exact`` ("p/q"), and
    ``rule_novel`` (with ``rule_novel_exact``): the exact probability that a fresh draw from the data
    distribution (``fastscore.data.generate``) is not a training content, i.e. the novelty of a model
    that learned the rule and samples it (the reference for novel among consistent)."""
    _check_train(config, train)
    uniq = torch.unique(torch.cat([train.keys, train.values], 1), dim=0)
    n, P = config.n_pairs, config.n_colours
    ok = is_consistent(uniq[:, :n], uniq[:, n:])
    covered = int(ok.sum())
    total = n_consistent_contents(n, P)
    chance = Fraction(total - covered, P ** (2 * n))
    # the data distribution gives a consistent content with d distinct keys probability P**-n * P**-d
    # (its keys, then f on those d keys); a model that learned the rule and samples it draws new contents
    # with the probability mass the training set does not cover
    d = (uniq[ok, :n].sort(1).values.diff(dim=1) != 0).sum(1) + 1
    rule = 1 - sum((Fraction(int(c), P ** (n + int(k))) for k, c in zip(*torch.unique(d, return_counts=True))),
                   Fraction(0))
    return {"n_train": int(train.keys.shape[0]), "distinct": int(uniq.shape[0]), "consistent_contents": total,
            "covered": covered, "covered_fraction": covered / total, "chance": float(chance),
            "chance_exact": f"{chance.numerator}/{chance.denominator}",
            "rule_novel": float(rule), "rule_novel_exact": f"{rule.numerator}/{rule.denominator}"}


def novelty_chance(config: KVConfig, train: KVBatch) -> Fraction:
    """Exact P(consistent and content not in ``train`` | valid) for independent uniform keys and values:
    (consistent contents - distinct consistent training contents) / P**(2 n_pairs)."""
    return Fraction(coverage(config, train)["chance_exact"])


def mosaic_chance(config: KVConfig, train: KVBatch, keys: torch.Tensor | None = None,
                  values: torch.Tensor | None = None) -> Fraction:
    """Exact P(consistent and content not in ``train``) for a *mosaic*: pair i's (key, value) drawn
    independently of the other pairs from its empirical distribution in ``keys``, ``values`` (M, n_pairs)
    (default: the training contents). This is what a machine that copies each pair from the training
    set's pairs at that position produces, e.g. the ELS machine when the pairs lie outside each other's
    patches; given a model's own valid samples it is the own-marginal chance of novelty.

    Consistency couples the pairs only through the partial map key -> value, so the probability is a
    dynamic programme over pairs whose state is that partial map (at most (P + 1)**P states); the
    training contents' own mass under the product is subtracted."""
    _check_train(config, train)
    if keys is None and values is None:
        keys, values = train.keys, train.values
    elif keys is None or values is None:
        raise ValueError("give keys and values together, or neither")
    _check_contents(config, "pairs", keys, values)
    n, P, M = config.n_pairs, config.n_colours, int(keys.shape[0])
    counts = torch.zeros(n, P, P, dtype=torch.int64)
    for i in range(n):
        counts[i].view(-1).index_add_(0, keys[:, i] * P + values[:, i], torch.ones(M, dtype=torch.int64))
    table = counts.tolist()
    states: dict[tuple[int, ...], int] = {(-1,) * P: 1}              # partial map -> mass x M**(pairs so far)
    for i in range(n):
        nxt: dict[tuple[int, ...], int] = {}
        for f, w in states.items():
            for k in range(P):
                if f[k] >= 0:
                    if table[i][k][f[k]]:
                        nxt[f] = nxt.get(f, 0) + w * table[i][k][f[k]]
                    continue
                for v in range(P):
                    if table[i][k][v]:
                        g = f[:k] + (v,) + f[k + 1:]
                        nxt[g] = nxt.get(g, 0) + w * table[i][k][v]
        states = nxt
    consistent = sum(states.values())
    uniq = torch.unique(torch.cat([train.keys, train.values], 1), dim=0)
    uniq = uniq[is_consistent(uniq[:, :n], uniq[:, n:])].tolist()
    seen = 0
    for row in uniq:
        w = 1
        for i in range(n):
            w *= table[i][row[i]][row[n + i]]
        seen += w
    return Fraction(consistent - seen, M ** n)


def recolour_distances(config: KVConfig) -> tuple[float, float]:
    """The smallest and largest pixel L2 distance (values in [-1, 1]) between two images that differ in
    one cell's colour, over the palette's pairs of colours (red and green: 2.83 for 1-pixel cells)."""
    if config.n_colours < 2:
        raise ValueError(f"config: a recoloured cell needs 2 colours or more, got {config.n_colours}")
    pal = torch.tensor(config.palette, dtype=torch.float64)
    d = torch.cdist(pal, pal)[~torch.eye(len(pal), dtype=torch.bool)] * config.cell_size
    return float(d.min()), float(d.max())


def nearest_training(samples: torch.Tensor, train_images: torch.Tensor, *, chunk: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest training image of each sample by pixel L2 distance.

    ``samples`` (N, C, H, W) and ``train_images`` (M, C, H, W) floating, M >= 1. Returns
    ``(distance (N,) float64, index (N,) int64)``: the L2 norm of the difference over all C*H*W values,
    and the index into ``train_images`` (equal training images: the first). Equal training images are
    merged first (a training set of 5,000 shows 60 distinct images at 4 pairs, 2 colours); the
    search runs in float64 over chunks of ``chunk`` samples (default: ~4M distances at once), and the
    winner's distance is recomputed directly as ||x - y||."""
    _validate.tensor("samples", samples, ndim=4)
    _validate.tensor("train_images", train_images, ndim=4)
    if samples.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"samples and train_images must share (C, H, W), got {tuple(samples.shape[1:])} and "
                         f"{tuple(train_images.shape[1:])}")
    if train_images.shape[0] == 0:
        raise ValueError("train_images is empty: need at least one training image")
    if chunk is not None:
        _validate.positive_int("chunk", chunk)
    x_all = samples.detach().flatten(1).to("cpu", torch.float64)
    y = train_images.detach().flatten(1).to("cpu", torch.float64)
    uniq, inv = torch.unique(y, dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), y.shape[0], dtype=torch.int64)
    first = first.scatter_reduce(0, inv, torch.arange(y.shape[0]), reduce="amin")
    # break exact distance ties towards the lowest training index: search the distinct images in that order
    order = torch.argsort(first)
    uniq, first = uniq[order], first[order]
    yy = uniq.pow(2).sum(1)
    step = chunk or max(1, _CHUNK_ELEMENTS // uniq.shape[0])
    dist = torch.empty(x_all.shape[0], dtype=torch.float64)
    index = torch.empty(x_all.shape[0], dtype=torch.int64)
    for s in range(0, x_all.shape[0], step):
        x = x_all[s:s + step]
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ uniq.T + yy      # argmin is first-occurrence on ties
        j = d2.argmin(1)
        dist[s:s + step] = (x - uniq[j]).norm(dim=1)
        index[s:s + step] = first[j]
    return dist, index


def distance_summary(distance: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """``{"n", "mean", "q0", "q5", "q25", "q50", "q75", "q95", "q100"}`` (floats; NaN when n = 0) of the
    distances (N,) where ``mask`` (N,) bool is true (all by default)."""
    _validate.tensor("distance", distance, ndim=1)
    d = distance.detach().to("cpu", torch.float64)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != distance.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(distance.shape)}")
        d = d[mask.cpu()]
    keys = [f"q{round(100 * q)}" for q in QUANTILES]
    if d.numel() == 0:
        return {"n": 0, "mean": float("nan"), **{k: float("nan") for k in keys}}
    q = torch.quantile(d, torch.tensor(QUANTILES, dtype=torch.float64))
    return {"n": int(d.numel()), "mean": float(d.mean()), **{k: float(v) for k, v in zip(keys, q)}}


@dataclass
class Novelty:
    """Per-sample flags (N,) bool (``valid``, ``consistent``, ``copy``, ``novel`` = consistent and not a
    copy), the nearest training image (``nearest_index`` (N,) int64 into the training set,
    ``nearest_distance`` (N,) float64) and three exact references for consistent-and-novel among valid:
    ``chance`` (uniform random pairs, ``novelty_chance``), ``mosaic`` (each pair drawn from the training
    set's pairs at its position, ``mosaic_chance``) and ``own_mosaic`` (from the valid samples' own pairs;
    None without valid samples)."""
    valid: torch.Tensor
    consistent: torch.Tensor
    copy: torch.Tensor
    novel: torch.Tensor
    nearest_index: torch.Tensor
    nearest_distance: torch.Tensor
    chance: Fraction
    mosaic: Fraction
    own_mosaic: Fraction | None
    coverage: dict

    @property
    def rates(self) -> dict[str, Rate]:
        n, nv = int(self.valid.numel()), int(self.valid.sum())
        nc, nn = int(self.consistent.sum()), int(self.novel.sum())
        return {"copy": Rate(int(self.copy.sum()), n), "copy_among_valid": Rate(int(self.copy.sum()), nv),
                "novel_among_valid": Rate(nn, nv), "novel_among_consistent": Rate(nn, nc)}

    def to_dict(self) -> dict:
        """Rates (k, n, rate, ci95), the chances (floats; uniform also as "p/q"), coverage and distance summaries
        (all samples, copies, consistent-and-novel samples, invalid samples)."""
        return {"rates": {k: r.to_dict() for k, r in self.rates.items()},
                "chance": float(self.chance), "chance_exact": f"{self.chance.numerator}/{self.chance.denominator}",
                "mosaic_chance": float(self.mosaic),
                "own_mosaic_chance": None if self.own_mosaic is None else float(self.own_mosaic),
                "coverage": self.coverage,
                "nearest_distance": {"all": distance_summary(self.nearest_distance),
                                     "copy": distance_summary(self.nearest_distance, self.copy),
                                     "novel": distance_summary(self.nearest_distance, self.novel),
                                     "invalid": distance_summary(self.nearest_distance, ~self.valid)}}


def novelty(config: KVConfig, samples: torch.Tensor, train: KVBatch, *, tolerance: float | None = None) -> Novelty:
    """Copies, consistent-and-novel samples and nearest training images of ``samples`` (N, 3, H, W),
    for the training contents ``train`` (its images are rendered from them); ``tolerance`` as in
    ``fastscore.data.decode``."""
    _check_train(config, train)
    d = decode(config, samples, tolerance=tolerance)
    valid = d.valid
    consistent = valid & is_consistent(d.keys, d.values)
    codes = content_codes(d.keys.clamp(min=0), d.values.clamp(min=0), config.n_colours)
    copy = valid & torch.isin(codes, training_codes(config, train))
    dist, idx = nearest_training(samples, render(config, train.keys, train.values))
    cov = coverage(config, train)
    own = mosaic_chance(config, train, d.keys[valid], d.values[valid]) if bool(valid.any()) else None
    return Novelty(valid, consistent, copy, consistent & ~copy, idx, dist, Fraction(cov["chance_exact"]),
                   mosaic_chance(config, train), own, cov)


__all__ = ["n_consistent_contents", "training_codes", "coverage", "novelty_chance", "mosaic_chance",
           "recolour_distances", "nearest_training", "distance_summary", "Novelty", "novelty"]
