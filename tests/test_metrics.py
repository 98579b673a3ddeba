import math
from fractions import Fraction

import pytest
import torch

from fastscore.data import KVConfig, make_dataset, palette_of_size
from fastscore.metrics import (analytic_random_consistency, content_codes, is_consistent, random_images, score,
                               shuffled_consistency, wilson)


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
