import math
from fractions import Fraction

import pytest
import torch

from fastscore.data import KVConfig, make_dataset, palette_of_size
from fastscore.metrics import (
    analytic_random_consistency,
    content_codes,
    is_consistent,
    random_images,
    score,
    shuffled_consistency,
    wilson,
)


def test_analytic_baseline_default_is_1045_over_4096():
    assert analytic_random_consistency(4, 4) == Fraction(1045, 4096)


def _brute(n, P):
    import itertools
    ok = 0
    for keys in itertools.product(range(P), repeat=n):
        d = len(set(keys))
        ok += Fraction(1, P ** (n - d))
    return ok / P**n


@pytest.mark.parametrize("n,P", [(1, 2), (2, 2), (3, 3), (4, 4), (5, 3), (3, 6)])
def test_analytic_baseline_matches_enumeration(n, P):
    assert analytic_random_consistency(n, P) == _brute(n, P)


@pytest.mark.parametrize("n,P", [(3, 2), (5, 3), (4, 4)])
def test_analytic_baseline_matches_monte_carlo(n, P, seed):
    size = {3: 12, 5: 12, 4: 8}[n]
    cfg = KVConfig(n_pairs=n, palette=palette_of_size(P), image_size=size)
    x = random_images(cfg, 20000, seed % 2**31)
    s = score(cfg, x)
    p = float(analytic_random_consistency(n, P))
    se = math.sqrt(p * (1 - p) / 20000)
    assert s.valid.all()
    assert abs(s.rates["consistent"].value - p) < 4.5 * se


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-12
    assert wilson(0, 100)[0] == 0.0 and wilson(100, 100)[1] == 1.0
    assert abs(wilson(10, 100)[0] - 0.0552) < 1e-3 and abs(wilson(10, 100)[1] - 0.1744) < 1e-3


def test_is_consistent_by_hand():
    keys = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 2], [3, 3, 3, 3], [0, 1, 2, 3]])
    vals = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [2, 2, 2, 1], [0, 0, 0, 0]])
    assert is_consistent(keys, vals).tolist() == [True, False, False, True]


def test_novelty_against_training_set():
    cfg = KVConfig()
    x, b = make_dataset(cfg, 300, 0)
    s = score(cfg, x, b)
    assert s.consistent.all() and not s.novel.any()
    y = random_images(cfg, 2000, 5)
    s2 = score(cfg, y, b)
    d_codes = content_codes(b.keys, b.values, 4)
    assert s2.novel.sum() > 0 and (s2.novel <= s2.consistent).all()
    assert s2.rates["novel"].k <= s2.rates["consistent"].k
    assert len(set(d_codes.tolist())) <= 300


def test_score_rejects_a_training_set_of_another_config():
    cfg = KVConfig()
    x, _ = make_dataset(cfg, 10, 0)
    _, other = make_dataset(KVConfig(n_pairs=2), 10, 0)
    with pytest.raises(ValueError, match="pairs"):
        score(cfg, x, other)
    with pytest.raises(TypeError, match="KVBatch"):
        score(cfg, x, "train")


def test_shuffled_consistency_is_the_chance_of_the_samples_own_marginals(seed):
    g = torch.Generator().manual_seed(seed % 2**31)
    keys = torch.randint(0, 2, (4000, 4), generator=g)
    # perfectly consistent samples (value = key) with uniform marginals: shuffling gives the analytic chance
    c = shuffled_consistency(keys, keys.clone(), n_perm=50, seed=1)
    assert c["n"] == 4000 and c["q025"] <= c["mean"] <= c["q975"]
    assert abs(c["mean"] - float(analytic_random_consistency(4, 2))) < 0.02
    # one value everywhere: every shuffle is consistent
    assert shuffled_consistency(keys, torch.zeros_like(keys), n_perm=5)["mean"] == 1.0
    # skewed value marginals raise chance above the uniform 15/64
    skew = (torch.rand(4000, 4, generator=g) < 0.8).long()
    assert shuffled_consistency(keys, skew, n_perm=20)["mean"] > float(analytic_random_consistency(4, 2)) + 0.1
    assert shuffled_consistency(keys[:0], keys[:0])["n"] == 0
    with pytest.raises(ValueError, match="keys and values"):
        shuffled_consistency(keys, keys[:, :3])
    with pytest.raises(ValueError, match="n_perm"):
        shuffled_consistency(keys, keys, n_perm=0)


def _garbage(kind: str, x: torch.Tensor) -> torch.Tensor:
    return {"nan": torch.full_like(x, float("nan")), "inf": torch.full_like(x, float("inf")),
            "-inf": torch.full_like(x, -float("inf")), "grey": torch.zeros_like(x),
            "0-255": (x + 1) * 127.5, "0-1": (x + 1) / 2}[kind]


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "grey", "0-255", "0-1"])
def test_no_rate_is_above_zero_on_garbage_images(kind):
    # consistent training images made garbage: every cell reads as one colour (or none) under a naive
    # nearest-colour lens, which used to score them 100% nearest-colour consistent
    cfg = KVConfig(palette=palette_of_size(2))
    x, b = make_dataset(cfg, 64, 0)
    assert score(cfg, x, b).nearest_consistent.all()            # the lens does read real content
    y = _garbage(kind, x)
    if kind in ("nan", "inf", "-inf", "0-255"):
        with pytest.warns(RuntimeWarning, match="NaN or inf|beyond"):
            s = score(cfg, y, b)
    else:
        s = score(cfg, y, b)
    for name in ("valid", "consistent", "novel", "nearest_consistent"):
        assert s.rates[name].k == 0, (name, s.rates[name])
    assert s.rates["non_finite"].k == (64 if kind in ("nan", "inf", "-inf") else 0)
    assert s.rates["out_of_range"].k == (64 if kind == "0-255" else 0)


def test_score_flags_only_the_bad_images_and_scores_the_rest():
    cfg = KVConfig()
    x, b = make_dataset(cfg, 20, 3)
    y = x.clone()
    y[2, 1, 4, 4] = float("nan")          # one background pixel
    y[5, 0, 0, 0] = float("inf")          # one key cell
    y[7] *= 255                           # out of range
    y[9, :, 7, 7] *= 1.3                  # a small overshoot in a key cell: still clean and in range
    with pytest.warns(RuntimeWarning, match="2 of 20 images hold NaN or inf and 1 have pixels beyond"):
        s = score(cfg, y, b)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[2, 5, 7]] = True
    assert s.finite.tolist() == [i not in (2, 5) for i in range(20)]
    assert s.in_range.tolist() == (~bad).tolist()
    assert s.valid.tolist() == (~bad).tolist() and s.nearest_consistent.tolist() == (~bad).tolist()
    assert s.to_dict()["non_finite"]["k"] == 2 and s.to_dict()["out_of_range"]["k"] == 1


def test_nearest_colour_lens_needs_every_cell_to_show_a_colour():
    cfg = KVConfig()
    x, _ = make_dataset(cfg, 8, 1)
    y = x.clone()
    y[0, :, 0, 0] = 0.05                      # image 0: key cell of pair 0 greyed out (nearest the background)
    y[1, :, 0, 0] = 0.55 * x[1, :, 0, 0]      # image 1: a faint key (not clean), still nearer its colour than grey
    s = score(cfg, y)
    assert not s.valid[0] and not s.valid[1]
    assert not s.nearest_consistent[0] and s.nearest_consistent[1:].all()
