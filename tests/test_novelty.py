"""Creativity measures (fastscore.novelty) and agreement with the ELS machine (fastscore.theory.agreement),
against enumeration, Monte Carlo, float64 brute force and constructed samples whose answer is known."""
import itertools
from fractions import Fraction

import pytest
import torch

from fastscore import KVConfig, decode, make_dataset, make_schedule, render, sample
from fastscore.data import KVBatch, generate, palette_of_size
from fastscore.metrics import is_consistent, wilson
from fastscore.novelty import (
    coverage,
    distance_summary,
    mosaic_chance,
    n_consistent_contents,
    nearest_training,
    novelty,
    novelty_chance,
    recolour_distances,
)
from fastscore.theory import (
    PAIR_CLASSES,
    ELSScore,
    IdealScore,
    agreement,
    cell_correlation,
    pair_classes,
    sample_correlation,
)

SCHED = make_schedule("linear", 1000)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core box: one intra-op thread (restored after the module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg(n_pairs: int, n_colours: int) -> KVConfig:
    return KVConfig(n_pairs=n_pairs, palette=palette_of_size(n_colours),
                    image_size=8 if n_pairs <= 6 else 12)


def contents(keys, values) -> KVBatch:
    k, v = torch.tensor(keys, dtype=torch.int64), torch.tensor(values, dtype=torch.int64)
    return KVBatch(k, v, torch.zeros(k.shape[0], 1, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# exact chance of consistent-and-novel
# --------------------------------------------------------------------------------------------
def brute_chance(n_pairs: int, P: int, train: KVBatch) -> Fraction:
    """Enumerate all P**(2n) contents: consistent ones not shown by any training image."""
    seen = {(tuple(k), tuple(v)) for k, v in zip(train.keys.tolist(), train.values.tolist())}
    hits = 0
    for kv in itertools.product(range(P), repeat=2 * n_pairs):
        k, v = kv[:n_pairs], kv[n_pairs:]
        ok = all(v[i] == v[j] for i in range(n_pairs) for j in range(n_pairs) if k[i] == k[j])
        hits += ok and (k, v) not in seen
    return Fraction(hits, P ** (2 * n_pairs))


@pytest.mark.parametrize("n_pairs,P", [(2, 2), (2, 3), (3, 2), (3, 3), (4, 2)])
def test_consistent_content_count_matches_enumeration(n_pairs, P):
    empty_like = contents([[0] * n_pairs], [[0, 1] + [0] * (n_pairs - 2)])   # inconsistent: covers nothing
    assert n_consistent_contents(n_pairs, P) == brute_chance(n_pairs, P, empty_like) * P ** (2 * n_pairs)


def test_sixty_consistent_contents_at_four_pairs_two_colours():
    assert n_consistent_contents(4, 2) == 60


@pytest.mark.parametrize("n_pairs,P", [(2, 2), (2, 3), (3, 2), (3, 3), (4, 2)])
def test_novelty_chance_equals_enumeration(n_pairs, P, seed):
    g = torch.Generator().manual_seed(seed)
    n_train = int(torch.randint(1, 40, (1,), generator=g))
    train = generate(cfg(n_pairs, P), n_train, seed=seed % 2**31)
    assert novelty_chance(cfg(n_pairs, P), train) == brute_chance(n_pairs, P, train)


@pytest.mark.parametrize("n_pairs,P", [(2, 2), (3, 3), (4, 2), (2, 4)])
def test_rule_novelty_equals_enumeration_of_the_data_distribution(n_pairs, P, seed):
    """Every (keys, f) pair of the generator is equally likely: count those whose content is new."""
    c = cfg(n_pairs, P)
    train = generate(c, 1 + seed % 30, seed=seed % 2**31)
    seen = {(tuple(k), tuple(v)) for k, v in zip(train.keys.tolist(), train.values.tolist())}
    new = sum((k, tuple(f[i] for i in k)) not in seen
              for k in itertools.product(range(P), repeat=n_pairs) for f in itertools.product(range(P), repeat=P))
    assert Fraction(coverage(c, train)["rule_novel_exact"]) == Fraction(new, P ** (n_pairs + P))


def test_inconsistent_training_contents_do_not_lower_the_chance():
    c = cfg(2, 2)
    # keys (0, 0) with values (0, 1): inconsistent, so not a consistent content the training set covers
    train = contents([[0, 0], [0, 1]], [[0, 1], [1, 1]])
    cov = coverage(c, train)
    assert cov["distinct"] == 2 and cov["covered"] == 1
    assert novelty_chance(c, train) == brute_chance(2, 2, train) == Fraction(n_consistent_contents(2, 2) - 1, 16)


def test_novelty_chance_agrees_with_monte_carlo(seed):
    c = cfg(4, 2)
    train = generate(c, 20, seed=seed % 2**31)
    p = novelty_chance(c, train)
    n = 200_000
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randint(0, 2, (n, 4), generator=g), torch.randint(0, 2, (n, 4), generator=g)
    seen = torch.zeros(n, dtype=torch.bool)
    for tk, tv in zip(train.keys, train.values):
        seen |= (k == tk).all(1) & (v == tv).all(1)
    hits = int((is_consistent(k, v) & ~seen).sum())
    sd = (float(p) * (1 - float(p)) / n) ** 0.5
    assert abs(hits / n - float(p)) < 5 * sd


def brute_mosaic(n_pairs: int, P: int, train: KVBatch, keys: torch.Tensor, values: torch.Tensor) -> Fraction:
    """Enumerate every choice of one source row per pair (M**n_pairs equally likely mosaics)."""
    seen = {(tuple(k), tuple(v)) for k, v in zip(train.keys.tolist(), train.values.tolist())}
    kk, vv = keys.tolist(), values.tolist()
    hits = 0
    for rows in itertools.product(range(len(kk)), repeat=n_pairs):
        k = tuple(kk[r][i] for i, r in enumerate(rows))
        v = tuple(vv[r][i] for i, r in enumerate(rows))
        ok = all(v[i] == v[j] for i in range(n_pairs) for j in range(n_pairs) if k[i] == k[j])
        hits += ok and (k, v) not in seen
    return Fraction(hits, len(kk) ** n_pairs)


@pytest.mark.parametrize("n_pairs,P,m", [(2, 2, 5), (3, 3, 6), (4, 2, 7), (4, 4, 6), (3, 4, 9)])
def test_mosaic_chance_equals_enumeration_of_mosaics(n_pairs, P, m, seed):
    c = cfg(n_pairs, P)
    train = generate(c, m, seed=seed % 2**31)
    assert mosaic_chance(c, train) == brute_mosaic(n_pairs, P, train, train.keys, train.values)
    g = torch.Generator().manual_seed(seed)                      # arbitrary sources (a model's samples)
    k, v = torch.randint(0, P, (m, n_pairs), generator=g), torch.randint(0, P, (m, n_pairs), generator=g)
    assert mosaic_chance(c, train, k, v) == brute_mosaic(n_pairs, P, train, k, v)


def test_mosaic_chance_of_a_full_uniform_source_is_the_uniform_chance():
    """Every (key, value) once per pair: the product is uniform, so the mosaic chance is novelty_chance."""
    c = cfg(3, 3)
    kv = torch.tensor(list(itertools.product(range(3), repeat=2)))        # the 9 (key, value) combinations
    keys, values = kv[:, :1].repeat(1, 3), kv[:, 1:].repeat(1, 3)
    train = generate(c, 7, seed=1)
    assert mosaic_chance(c, train, keys, values) == novelty_chance(c, train)
    with pytest.raises(ValueError, match="together"):
        mosaic_chance(c, train, keys)
    with pytest.raises(ValueError, match="pairs keys must hold colour indices"):
        mosaic_chance(c, train, keys + 3, values)


def test_full_training_set_covers_every_consistent_content_at_two_colours():
    c = cfg(4, 2)
    cov = coverage(c, generate(c, 5000, seed=0))
    assert cov["covered"] == 60 and cov["chance"] == 0.0 and cov["chance_exact"] == "0/1"


# --------------------------------------------------------------------------------------------
# copies and novel samples on constructed images
# --------------------------------------------------------------------------------------------
def test_copies_novel_and_invalid_samples_are_told_apart(seed):
    c = cfg(4, 2)
    train = contents([[0, 1, 0, 1], [0, 0, 0, 0]], [[1, 0, 1, 0], [1, 1, 1, 1]])
    keys = torch.tensor([[0, 1, 0, 1],      # copy of training image 0
                         [0, 0, 0, 0],      # copy of training image 1
                         [1, 1, 1, 1],      # consistent, new
                         [0, 1, 1, 0],      # consistent, new
                         [0, 0, 1, 1],      # inconsistent (pair 0 and 1 share key 0, values differ)
                         [0, 1, 0, 1]])     # copy content, but made invalid below
    values = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0]])
    g = torch.Generator().manual_seed(seed)
    x = render(c, keys, values) + 0.1 * (2 * torch.rand(6, 3, 8, 8, generator=g) - 1)   # within tolerance 0.4
    x[5, :, 0, 0] = 0.0                     # key cell of pair 0 is background grey: not clean
    nv = novelty(c, x, train)
    assert nv.valid.tolist() == [True] * 5 + [False]
    assert nv.copy.tolist() == [True, True, False, False, False, False]
    assert nv.novel.tolist() == [False, False, True, True, False, False]
    r = nv.rates
    assert (r["copy"].k, r["copy"].n) == (2, 6)
    assert (r["novel_among_valid"].k, r["novel_among_valid"].n) == (2, 5)
    assert (r["novel_among_consistent"].k, r["novel_among_consistent"].n) == (2, 4)
    assert nv.nearest_index[:2].tolist() == [0, 1]
    d = nv.to_dict()
    assert d["nearest_distance"]["copy"]["n"] == 2 and d["nearest_distance"]["novel"]["n"] == 2
    assert d["rates"]["novel_among_valid"]["ci95"][0] > 0


def test_novelty_checks_the_training_contents():
    c = cfg(4, 2)
    x = render(c, torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="train must be a KVBatch"):
        novelty(c, x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        novelty(c, x, contents([[0, 1]], [[0, 1]]))
    with pytest.raises(ValueError, match="colour indices in"):
        novelty(c, x, contents([[0, 1, 2, 0]], [[0, 0, 0, 0]]))


# --------------------------------------------------------------------------------------------
# nearest training image
# --------------------------------------------------------------------------------------------
def test_nearest_training_matches_float64_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(37, 3, 5, 5, generator=g)
    train = torch.cat([train, train[:9]])                               # duplicates: first index wins
    x = torch.randn(203, 3, 5, 5, generator=g)
    x[:5] = train[[3, 40, 7, 0, 45]] + 1e-3 * torch.randn(5, 3, 5, 5, generator=g)
    d, i = nearest_training(x, train, chunk=17)
    brute = torch.stack([torch.stack([(a.double() - b.double()).pow(2).sum().sqrt() for b in train]) for a in x])
    torch.testing.assert_close(d, brute.min(1).values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brute.gather(1, i[:, None])[:, 0], brute.min(1).values, rtol=1e-12, atol=1e-12)
    assert i[:5].tolist() == [3, 3, 7, 0, 8]                            # 40 = 3 + 37, 45 = 8 + 37
    assert i.max() < 37                                                 # never a later duplicate


def test_nearest_training_ties_go_to_the_lowest_index():
    train = torch.stack([torch.full((3, 2, 2), v) for v in (1.0, -1.0, 1.0, -1.0)])
    d, i = nearest_training(torch.zeros(4, 3, 2, 2), train)             # equidistant from all four
    assert i.tolist() == [0] * 4 and torch.allclose(d, torch.full((4,), 12 ** 0.5, dtype=torch.float64))


def test_nearest_training_rejects_bad_shapes():
    with pytest.raises(ValueError, match="share"):
        nearest_training(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="empty"):
        nearest_training(torch.zeros(2, 3, 4, 4), torch.zeros(0, 3, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        nearest_training(torch.zeros(2, 3, 4, 4, dtype=torch.int64), torch.zeros(2, 3, 4, 4))


def test_distance_summary_quantiles(seed):
    d = torch.rand(1001, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = distance_summary(d)
    ds = d.sort().values
    assert s["n"] == 1001 and s["q0"] == ds[0] and s["q100"] == ds[-1] and s["q50"] == ds[500]
    assert distance_summary(d, d > 2)["n"] == 0


# --------------------------------------------------------------------------------------------
# anchors: the ideal score memorises, the ELS machine makes mosaics
# --------------------------------------------------------------------------------------------
def test_ideal_score_samples_are_all_copies(seed):
    c = cfg(4, 2)
    images, train = make_dataset(c, 6, seed % 2**31)
    x = sample(IdealScore(images, SCHED), 32, steps=50, eta=1.0, seed=seed % 2**31)
    nv = novelty(c, x, train)
    assert int(nv.valid.sum()) == 32 and int(nv.copy.sum()) == 32 and int(nv.novel.sum()) == 0
    assert float(nv.nearest_distance.max()) < 0.05
    assert torch.equal(images[nv.nearest_index], render(c, train.keys, train.values)[nv.nearest_index])


def test_els_machine_makes_new_consistent_mosaics_at_the_mosaic_chance(seed):
    c = cfg(4, 2)
    images, train = make_dataset(c, 8, seed % 2**31)
    x = sample(ELSScore(images, SCHED, 5), 200, steps=20, eta=1.0, seed=seed % 2**31)   # the study's patch size
    nv = novelty(c, x, train)
    # pairs are composed from different training images: mostly new contents, some of them consistent,
    # at the rate of independent pairs drawn from the samples' own pair marginals (99.9% interval)
    assert int(nv.copy.sum()) < 200 and int(nv.novel.sum()) > 0
    d = decode(c, x)
    p = float(mosaic_chance(c, train, d.keys[nv.valid], d.values[nv.valid]))
    assert float(nv.own_mosaic) == p and nv.mosaic == mosaic_chance(c, train)
    lo, hi = wilson(int(nv.novel.sum()), int(nv.valid.sum()), z=3.2905)
    assert lo <= p <= hi, (lo, p, hi)


# --------------------------------------------------------------------------------------------
# agreement with a reference (the ELS machine) where it matters
# --------------------------------------------------------------------------------------------
def test_cell_correlation_ignores_the_background(seed):
    c = cfg(4, 2)
    b = generate(c, 20, seed=seed % 2**31)
    ref = render(c, b.keys, b.values)
    g = torch.Generator().manual_seed(seed)
    x = ref.clone()
    from fastscore.data import _cell_masks
    bg = ~_cell_masks(c).any(0)
    x[:, :, bg] += 0.3 * torch.randn(x[:, :, bg].shape, generator=g)   # background noise only
    torch.testing.assert_close(cell_correlation(c, x, ref), torch.ones(20, dtype=torch.float64))
    assert bool((sample_correlation(x, ref) < 0.999).all())


def test_cell_correlation_matches_float64_brute_force(seed):
    c = cfg(4, 3)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(9, 3, 8, 8, generator=g), torch.randn(9, 3, 8, 8, generator=g)
    cells = [(r, col) for pair in c.positions for (r, col) in pair]
    for n in range(9):
        u = torch.stack([a[n, :, r, col] for r, col in cells], 1).double().flatten()
        v = torch.stack([b[n, :, r, col] for r, col in cells], 1).double().flatten()
        expect = torch.corrcoef(torch.stack([u, v]))[0, 1]
        torch.testing.assert_close(cell_correlation(c, a, b)[n], expect, rtol=1e-10, atol=1e-12)


def test_pair_classes_by_hand():
    keys = torch.tensor([[0, 1, 0, 2], [0, 0, 0, 1]])
    values = torch.tensor([[1, 2, 1, 0], [1, 1, 2, 0]])
    assert PAIR_CLASSES == ("alone", "coordinated", "conflicting")
    assert pair_classes(keys, values).tolist() == [[1, 0, 1, 0], [2, 2, 2, 0]]


def test_agreement_counts_cells_and_pairs_by_class(seed):
    c = cfg(4, 3)
    ref_k = torch.tensor([[0, 1, 0, 2], [0, 0, 1, 2]])
    ref_v = torch.tensor([[1, 2, 1, 0], [1, 1, 0, 0]])
    # sample 0: identical content. sample 1: keys as the reference, value of pair 1 changed to coordinate
    # with pair 0 -> pairs 0 and 1 coordinated (pair 1's value disagrees), pairs 2, 3 alone and agreeing
    s_k = torch.tensor([[0, 1, 0, 2], [0, 0, 1, 2]])
    s_v = torch.tensor([[1, 2, 1, 0], [2, 2, 0, 0]])
    g = torch.Generator().manual_seed(seed)
    noise = 0.2 * (2 * torch.rand(2, 3, 8, 8, generator=g) - 1)
    a = agreement(c, render(c, s_k, s_v) + noise, render(c, ref_k, ref_v))
    assert a.cells[:, 0].all() and a.cells[0, 1].all() and a.cells[1, 1].tolist() == [False, False, True, True]
    assert a.pair_class.tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    s = a.summary()
    assert (s["cells"]["k"], s["cells"]["n"]) == (14, 16)
    assert (s["content"]["k"], s["content"]["n"]) == (1, 2)
    assert (s["pairs"]["coordinated"]["agree"]["k"], s["pairs"]["coordinated"]["agree"]["n"]) == (2, 4)
    assert (s["pairs"]["alone"]["agree"]["k"], s["pairs"]["alone"]["agree"]["n"]) == (4, 4)
    assert s["pairs"]["conflicting"]["agree"]["n"] == 0
    assert s["pairs"]["coordinated"]["value_given_key"]["n"] == 4
    # cell chance by hand: the key cells' colours are identical in both (per cell: p_s = p_r);
    # value cells: pair 0 (1, 2) vs (1, 1), pair 1 (2, 2) vs (2, 1), pairs 2, 3 as the keys
    keys_part = [1.0, 0.5, 0.5, 1.0]        # sum_c p_s(c) p_r(c) per key cell: (0,0) (1,0) (0,1) (2,2)
    vals_part = [0.5 * 1.0, 1.0 * 0.5, 0.5, 1.0]
    assert s["cell_chance"] == pytest.approx(sum(keys_part + vals_part) / 8)


def test_pair_agreement_separates_a_local_machine_from_a_coordinating_one(seed):
    """Reference: uniform random contents. A local machine redraws each cell independently with
    probability 0.3: its agreement is the same on coordinated and alone pairs. A coordinating machine
    copies, within each group of equal keys, the first pair's value: alone pairs agree fully, coordinated
    pairs disagree wherever a value was changed."""
    c = cfg(4, 2)
    g = torch.Generator().manual_seed(seed)
    n = 4000
    rk, rv = torch.randint(0, 2, (n, 4), generator=g), torch.randint(0, 2, (n, 4), generator=g)
    ref = render(c, rk, rv)

    def flip(x):
        return torch.where(torch.rand(x.shape, generator=g) < 0.3, torch.randint(0, 2, x.shape, generator=g), x)

    local = agreement(c, render(c, flip(rk), flip(rv)), ref).summary()["pairs"]
    a, b = local["coordinated"]["agree"], local["alone"]["agree"]
    p = (a["k"] + b["k"]) / (a["n"] + b["n"])
    sd = (p * (1 - p) * (1 / a["n"] + 1 / b["n"])) ** 0.5
    assert abs(a["rate"] - b["rate"]) < 4 * sd
    first = (rk.unsqueeze(2) == rk.unsqueeze(1)).int().argmax(2)          # first pair with the same key
    coord = agreement(c, render(c, rk, rv.gather(1, first)), ref).summary()["pairs"]
    assert coord["alone"]["agree"]["rate"] == 1.0 and coord["conflicting"]["agree"]["n"] == 0
    assert coord["coordinated"]["agree"]["ci95"][1] < 0.9


def test_agreement_rejects_mismatched_images():
    c = cfg(4, 2)
    with pytest.raises(ValueError, match="same shape"):
        agreement(c, torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N >= 1, 3, 8, 8\)"):
        cell_correlation(c, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="KVConfig"):
        agreement("config", torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def test_novel_beside_nearest_figure_is_written_and_not_overwritten(tmp_path, seed):
    pytest.importorskip("matplotlib")
    from fastscore.novelty_figures import plot_novel_beside_nearest
    c = cfg(4, 2)
    train = contents([[0, 1, 0, 1]], [[1, 0, 1, 0]])
    keys = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]])
    values = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]])
    x = render(c, keys, values)
    path = tmp_path / "novel.png"
    assert plot_novel_beside_nearest(c, x, train, path) == path
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(FileExistsError, match="exists"):
        plot_novel_beside_nearest(c, x, train, path)
    plot_novel_beside_nearest(c, x[1:2], train, path, overwrite=True)          # no novel sample: a note
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="Novelty of these samples"):
        plot_novel_beside_nearest(c, x, train, tmp_path / "b.png", result=novelty(c, x[:2], train))


def test_novelty_curve_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from fastscore.metrics import Rate
    from fastscore.novelty_figures import plot_novelty_curve
    path = tmp_path / "curve.png"
    plot_novelty_curve({"CNN": {8: Rate(20, 100), 64: Rate(5, 90)}, "softmax": {8: Rate(30, 100), 64: Rate(9, 95)}},
                       {"chance": {8: 13 / 64, 64: 19 / 256}, "mosaic": {8: 0.26, 64: 0.1}}, path)
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(TypeError, match="Rate objects"):
        plot_novelty_curve({"CNN": {8: 0.2}}, {}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        plot_novelty_curve({}, {}, tmp_path / "x.png")


@pytest.mark.parametrize("n_colours, cell_size", [(2, 1), (4, 1), (4, 2), (5, 1)])
def test_recolour_distances_are_the_rendered_images_distances(n_colours, cell_size):
    cfg = KVConfig(palette=palette_of_size(n_colours), cell_size=cell_size, image_size=8 * cell_size)
    keys = torch.zeros(1, cfg.n_pairs, dtype=torch.int64)
    d = []
    for a, b in itertools.permutations(range(n_colours), 2):     # value cell 0 coloured a, then b
        x = [render(cfg, keys, torch.full((1, cfg.n_pairs), 0).index_fill(1, torch.tensor([0]), c)).double()
             for c in (a, b)]
        d.append(float((x[0] - x[1]).flatten().norm()))
    assert recolour_distances(cfg) == pytest.approx((min(d), max(d)), rel=1e-6)

