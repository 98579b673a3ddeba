"""Scoring samples: validity, consistency, novelty, with 95% Wilson intervals; random baselines.

- *valid*: every key/value cell and the background decode cleanly (``fastscore.data.decode``);
- *consistent*: valid, and equal keys carry equal values;
- *novel*: consistent, and the decoded (keys, values) match no training image;
- *consistent among valid*: consistent / valid (the headline rate can rise by validity alone);
- *nearest-colour consistent*: every cell shows a colour (its mean is nearer a palette colour than
  the background) and equal nearest-colour keys carry equal nearest-colour values, on every sample,
  valid or not (a lenient lens beside the strict one).

Garbage is never scored as content: an image holding NaN or inf (*non-finite*), or a pixel beyond
[-1 - tolerance, 1 + tolerance] (*out of range*; colours lie in [-1, 1], so no valid image has one:
e.g. images scaled to [0, 255]) is neither valid nor nearest-colour consistent; ``score`` counts such
images in its rates and warns (RuntimeWarning).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import _validate
from .data import KVBatch, KVConfig, decode, generate, render

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (lower, upper) for ``k`` successes in ``n`` trials; (0, 1) if n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``, with its 95% Wilson interval."""
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "rate": self.value, "ci95": [lo, hi]}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:5.2f}% [{100 * lo:5.2f}, {100 * hi:5.2f}]"


def is_consistent(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(N,) bool: no two pairs with equal keys carry different values (indices (N, n_pairs))."""
    same_key = keys.unsqueeze(2) == keys.unsqueeze(1)
    diff_val = values.unsqueeze(2) != values.unsqueeze(1)
    return ~(same_key & diff_val).flatten(1).any(1)


def content_codes(keys: torch.Tensor, values: torch.Tensor, n_colours: int) -> torch.Tensor:
    """(N,) int64 code of each image's (keys, values) content; equal codes, equal content."""
    base = n_colours * n_colours
    if base ** keys.shape[1] >= 2**63:
        raise ValueError("too many pairs and colours to encode contents in int64")
    digits = keys * n_colours + values
    weights = base ** torch.arange(keys.shape[1], dtype=torch.int64)
    return (digits * weights).sum(1)


@dataclass
class Scores:
    """Per-image flags (N,) bool and the rates. ``finite``: no NaN/inf pixel; ``in_range``: finite and
    every pixel within [-1 - tolerance, 1 + tolerance]."""
    valid: torch.Tensor
    consistent: torch.Tensor
    novel: torch.Tensor
    nearest_consistent: torch.Tensor
    finite: torch.Tensor
    in_range: torch.Tensor

    @property
    def rates(self) -> dict[str, Rate]:
        n = int(self.valid.numel())
        nv = int(self.valid.sum())
        nc = int(self.consistent.sum())
        return {
            "valid": Rate(nv, n),
            "consistent": Rate(nc, n),
            "consistent_among_valid": Rate(nc, nv),
            "novel": Rate(int(self.novel.sum()), n),
            "novel_among_consistent": Rate(int(self.novel.sum()), nc),
            "nearest_consistent": Rate(int(self.nearest_consistent.sum()), n),
            "non_finite": Rate(int((~self.finite).sum()), n),
            "out_of_range": Rate(int((self.finite & ~self.in_range).sum()), n),
        }

    def to_dict(self) -> dict:
        return {k: r.to_dict() for k, r in self.rates.items()}


def score(config: KVConfig, images: torch.Tensor, train: KVBatch | None = None, *,
          tolerance: float | None = None) -> Scores:
    """Score images (N, 3, H, W) in [-1, 1] against the training contents ``train`` (novelty needs it).

    Images with NaN/inf or pixels beyond 1 + tolerance in magnitude score as invalid and inconsistent
    under both lenses, are counted in ``rates["non_finite"]`` / ``rates["out_of_range"]``, and raise a
    RuntimeWarning."""
    if train is not None:
        if not isinstance(train, KVBatch):
            raise TypeError(f"train must be a KVBatch, got {type(train).__name__}")
        if train.keys.dim() != 2 or train.keys.shape[1] != config.n_pairs:
            raise ValueError(f"train must hold {config.n_pairs} pairs per image (the config's n_pairs), "
                             f"got keys of shape {tuple(train.keys.shape)}")
        if train.keys.numel() and (int(train.keys.max()) >= config.n_colours or int(train.values.max()) >= config.n_colours):
            raise ValueError(f"train holds colour indices beyond the config's {config.n_colours} colours")
    d = decode(config, images, tolerance=tolerance)
    tol = config.tolerance if tolerance is None else tolerance   # decode has checked it
    x = images.detach().flatten(1)
    finite = torch.isfinite(x).all(1).cpu()
    in_range = finite & (x.abs() <= 1 + tol).all(1).cpu()
    n_bad, n_out = int((~finite).sum()), int((finite & ~in_range).sum())
    if n_bad or n_out:
        warnings.warn(f"score: {n_bad} of {len(finite)} images hold NaN or inf and {n_out} have pixels beyond "
                      f"+-{1 + tol:g} (images must lie in [-1, 1]; scaled to [0, 255]?); they count as invalid "
                      f"and inconsistent (rates 'non_finite', 'out_of_range')", RuntimeWarning, stacklevel=2)
    valid = d.valid & in_range
    consistent = valid & is_consistent(d.keys, d.values)
    if train is not None:
        codes = content_codes(d.keys.clamp(min=0), d.values.clamp(min=0), config.n_colours)
        seen = torch.isin(codes, content_codes(train.keys, train.values, config.n_colours))
        novel = consistent & ~seen
    else:
        novel = torch.zeros_like(consistent)
    shows_colours = (d.nearest_keys >= 0).all(1) & (d.nearest_values >= 0).all(1)
    nearest = in_range & shows_colours & is_consistent(d.nearest_keys, d.nearest_values)
    return Scores(valid, consistent, novel, nearest, finite, in_range)


def _stirling2(n: int, k: int) -> int:
    s = [[0] * (k + 1) for _ in range(n + 1)]
    s[0][0] = 1
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            s[i][j] = j * s[i - 1][j] + s[i - 1][j - 1]
    return s[n][k]


def analytic_random_consistency(n_pairs: int, n_colours: int) -> Fraction:
    """Exact P(consistent | valid) when keys and values are independent and uniform.

    With d distinct keys among n, the n - d repeats must each copy a value: P**-(n-d).
    Summing over the number of distinct keys: sum_d S(n, d) P!/(P-d)! P**-n P**-(n-d).
    4 pairs, 4 colours: 1045/4096.
    """
    _validate.positive_int("n_pairs", n_pairs)
    _validate.positive_int("n_colours", n_colours)
    P, n = n_colours, n_pairs
    total = Fraction(0)
    for d in range(1, min(n, P) + 1):
        falling = math.perm(P, d)
        total += Fraction(_stirling2(n, d) * falling, P**n) * Fraction(1, P ** (n - d))
    return total


def shuffled_consistency(keys: torch.Tensor, values: torch.Tensor, *, n_perm: int = 200, seed: int = 0) -> dict:
    """Chance consistency under the samples' own colour marginals: shuffle each pair's values across
    samples (every marginal kept, the within-sample link broken) and recompute consistency.

    ``keys``, ``values``: (M, n_pairs) int colour indices of decoded *valid* samples. Returns the mean
    over ``n_perm`` shuffles and its 2.5% / 97.5% quantiles (fractions; NaN when M = 0) and ``n`` = M."""
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError("keys and values must be tensors")
    if keys.dim() != 2 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be (M, n_pairs), got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    _validate.positive_int("n_perm", n_perm)
    m = keys.shape[0]
    if m == 0:
        return {"mean": float("nan"), "q025": float("nan"), "q975": float("nan"), "n": 0}
    g = torch.Generator().manual_seed(_validate.seed("seed", seed))
    rates = torch.empty(n_perm, dtype=torch.float64)
    for i in range(n_perm):
        shuffled = torch.stack([values[torch.randperm(m, generator=g), j] for j in range(values.shape[1])], 1)
        rates[i] = is_consistent(keys, shuffled).double().mean()
    return {"mean": rates.mean().item(), "q025": rates.quantile(0.025).item(),
            "q975": rates.quantile(0.975).item(), "n": m}


def random_images(config: KVConfig, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` valid images whose keys and values are independent and uniform (the empirical baseline)."""
    _validate.positive_int("n", n)
    g = torch.Generator().manual_seed(_validate.seed("seed", seed))
    keys = torch.randint(0, config.n_colours, (n, config.n_pairs), generator=g)
    values = torch.randint(0, config.n_colours, (n, config.n_pairs), generator=g)
    return render(config, keys, values)


__all__ = ["wilson", "Rate", "Scores", "score", "is_consistent", "content_codes",
           "analytic_random_consistency", "shuffled_consistency", "random_images", "generate"]
