import pytest
import torch

from fastscore.data import KVConfig, border_positions, decode, generate, make_dataset, palette_of_size, render
from fastscore.metrics import is_consistent


@pytest.mark.parametrize("cfg", [KVConfig(), KVConfig(n_pairs=2, palette=palette_of_size(3)),
                                 KVConfig(image_size=16, cell_size=2),
                                 KVConfig(n_pairs=6, image_size=12, palette=palette_of_size(5))])
def test_generated_images_decode_exactly_and_are_valid_and_consistent(cfg, seed):
    x, b = make_dataset(cfg, 500, seed % 2**31)
    assert x.shape == (500, 3, cfg.image_size, cfg.image_size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    d = decode(cfg, x)
    assert torch.equal(d.keys, b.keys) and torch.equal(d.values, b.values)
    assert d.valid.all()
    assert is_consistent(d.keys, d.values).all()
    assert torch.equal(d.nearest_keys, b.keys) and torch.equal(d.nearest_values, b.values)


def test_generation_is_seeded_and_uniform():
    cfg = KVConfig()
    a, b = generate(cfg, 1000, 3), generate(cfg, 1000, 3)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.functions, b.functions)
    assert not torch.equal(a.keys, generate(cfg, 1000, 4).keys)
    big = generate(cfg, 40000, 0)
    freq = torch.bincount(big.keys.flatten(), minlength=4).float() / big.keys.numel()
    assert (freq - 0.25).abs().max() < 0.01
    # f is a function: equal keys in one image always carry equal values
    assert is_consistent(big.keys, big.values).all()
    # values are uniform too (f uniform over all functions)
    vfreq = torch.bincount(big.values.flatten(), minlength=4).float() / big.values.numel()
    assert (vfreq - 0.25).abs().max() < 0.01


def test_default_geometry_pairs_outside_each_others_receptive_field():
    cfg = KVConfig()
    cells = cfg.positions
    for i, (ki, vi) in enumerate(cells):
        assert abs(ki[0] - vi[0]) + abs(ki[1] - vi[1]) == 1  # value beside key
        for j, (kj, vj) in enumerate(cells):
            if i != j:
                for a in (ki, vi):
                    for b in (kj, vj):
                        assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 2  # 5x5 receptive field radius 2


def test_decode_tolerance_and_invalid_cells():
    cfg = KVConfig()
    x, b = make_dataset(cfg, 4, 0)
    y = x.clone()
    kr, kc = cfg.positions[0][0]
    y[0, :, kr, kc] += 0.39          # inside tolerance 0.4
    y[1, :, kr, kc] += 0.41          # outside
    y[2, :, 4, 4] = 0.5              # dirty background
    d = decode(cfg, y)
    assert d.valid.tolist() == [True, False, False, True]
    assert d.keys[1, 0] == -1 and d.keys[0, 0] == b.keys[0, 0]
    assert d.nearest_keys[1, 0] == b.keys[1, 0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_pairs=0), "n_pairs"),
    (dict(n_pairs=7, image_size=8), "too small"),
    (dict(palette=((1, 1, 1), (1, 1, 1))), "duplicate"),
    (dict(palette=((1, 1, 1),)), "at least 2"),
    (dict(background=(1.0, -1.0, -1.0)), "background"),
    (dict(image_size=9, cell_size=2), "multiple"),
    (dict(tolerance=-1), "tolerance"),
    (dict(positions=(((0, 0), (0, 1)),)), "positions"),
    (dict(n_pairs=2, positions=(((0, 0), (0, 1)), ((0, 1), (0, 2)))), "overlap"),
    (dict(n_pairs=1, positions=(((0, 0), (0, 8)),)), "inside"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVConfig(**kwargs)


@pytest.mark.parametrize("grid", range(8, 21))
def test_border_layout_keeps_pairs_out_of_each_others_receptive_field(grid):
    pos, n = border_positions(grid, 1), 1
    while True:
        try:
            pos = border_positions(grid, n + 1)
        except ValueError:
            break
        n += 1
    assert n >= 6 and {min(r, c, grid - 1 - r, grid - 1 - c) for p in pos for r, c in p} == {0}
    assert {r for p in pos for r, _ in p} >= {0, grid - 1} and {c for p in pos for _, c in p} >= {0, grid - 1}
    cells = [c for pair in pos for c in pair]
    assert all(0 <= r < grid and 0 <= c < grid for r, c in cells) and len(set(cells)) == len(cells)
    for i, p in enumerate(pos):
        assert max(abs(p[0][0] - p[1][0]), abs(p[0][1] - p[1][1])) == 1  # value beside its key
        for q in pos[i + 1:]:
            assert min(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in p for b in q) >= 3


def test_bad_inputs():
    cfg = KVConfig()
    with pytest.raises(ValueError, match="n"):
        generate(cfg, 0)
    with pytest.raises(TypeError, match="n"):
        generate(cfg, 2.5)
    with pytest.raises(ValueError, match="images"):
        decode(cfg, torch.zeros(2, 3, 7, 7))
    with pytest.raises(TypeError, match="images"):
        decode(cfg, torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys"):
        render(cfg, torch.full((2, 4), 9), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="columns"):
        render(cfg, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))


def test_config_round_trip():
    cfg = KVConfig(n_pairs=3, palette=palette_of_size(5), image_size=10)
    assert KVConfig.from_dict(cfg.to_dict()) == cfg


def test_more_bad_inputs():
    cfg = KVConfig()
    with pytest.raises(TypeError, match="keys"):
        render(cfg, torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one"):
        decode(cfg, torch.zeros(0, 3, 8, 8))
    for kw in (dict(image_size=4), dict(image_size=8, cell_size=2), dict(image_size=5)):
        with pytest.raises(ValueError, match="receptive field|too small"):
            KVConfig(**kw)
