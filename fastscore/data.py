"""The key-value colour dataset: generation, rendering, decoding.

An image shows ``n_pairs`` key-value pairs on a plain background. Keys are drawn uniformly with
replacement from the palette; a function ``f: palette -> palette`` is drawn uniformly per image
(all ``P**P`` functions equally likely); pair i shows ``K_i`` in its key cell and ``f(K_i)`` in its
value cell. Colours are RGB in [-1, 1]; images are ``(N, 3, H, W)`` float32.

Default geometry (8x8 pixels, 1-pixel cells, 4 pairs): one pair in each corner, the key on the
corner pixel and the value beside it, horizontally. The two 3x3 conv layers of the CNN see 5x5
pixels, so a pair is outside every other pair's receptive field (5 pixels apart at the closest),
and the zero padding tells the CNN where the corners are.

Decoding (``decode``): a cell is *clean* when every pixel of it is within ``tolerance``
(L-infinity, in [-1, 1] units; default 0.4, under half the distance 1 from the grey background
to any palette colour) of one palette colour; the background is clean when every background pixel
is within ``tolerance`` of the background colour. ``decode`` also returns the nearest palette colour
of each cell's mean (-1 when the mean is non-finite or no nearer any colour than the background), for
the lenient nearest-colour scores.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from . import _validate
from .options import option

DEFAULT_PALETTE: tuple[tuple[float, float, float], ...] = (
    (1.0, -1.0, -1.0),   # red
    (-1.0, 1.0, -1.0),   # green
    (-1.0, -1.0, 1.0),   # blue
    (1.0, 1.0, -1.0),    # yellow
)
DEFAULT_NAMES = ("red", "green", "blue", "yellow")
EXTRA_COLOURS = ((-1.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 1.0, 1.0), (-1.0, -1.0, -1.0))  # cyan, magenta, white, black

Cell = tuple[int, int]


def palette_of_size(n: int) -> tuple[tuple[float, float, float], ...]:
    """The first ``n`` colours of red, green, blue, yellow, cyan, magenta, white, black (n <= 8)."""
    _validate.positive_int("n", n, minimum=2)
    colours = DEFAULT_PALETTE + EXTRA_COLOURS
    if n > len(colours):
        raise ValueError(f"n must be <= {len(colours)}, got {n}")
    return colours[:n]


def corner_positions(grid: int, n_pairs: int) -> tuple[tuple[Cell, Cell], ...]:
    """Key/value cells (row, col) for up to 4 pairs, one per corner, value beside its key."""
    g = grid - 1
    corners = (((0, 0), (0, 1)), ((0, g), (0, g - 1)), ((g, 0), (g, 1)), ((g, g), (g, g - 1)))
    return corners[:n_pairs]


def border_positions(grid: int, n_pairs: int, gap: int = 3) -> tuple[tuple[Cell, Cell], ...]:
    """Pairs around the border (for > 4 pairs), ``gap`` empty cells between neighbours: horizontal pairs
    along the top and bottom rows, vertical pairs down the left and right columns between them;
    taken round-robin (top, bottom, left, right) so every side fills evenly."""
    g = grid - 1
    across = range(0, grid - 1, 2 + gap)
    down = range(gap, g - gap, 2 + gap)
    sides = ([((0, c), (0, c + 1)) for c in across], [((g, c), (g, c + 1)) for c in across],
             [((r, 0), (r + 1, 0)) for r in down], [((r, g), (r + 1, g)) for r in down])
    order = [side[i] for i in range(max(map(len, sides))) for side in sides if i < len(side)]
    if len(order) < n_pairs:
        raise ValueError(f"image too small for {n_pairs} pairs: a grid of {grid} cells holds {len(order)}")
    return tuple(order[:n_pairs])


@dataclass(frozen=True)
class KVConfig:
    """Dataset configuration. Sizes in pixels; ``positions`` in cell units, ``((key_row, key_col),
    (value_row, value_col))`` per pair; ``None`` picks corners (<= 4 pairs) or the border layout."""
    n_pairs: int = option(4, "key-value pairs per image")
    palette: tuple[tuple[float, float, float], ...] = option(DEFAULT_PALETTE, "RGB colours in [-1, 1] of keys and values")
    image_size: int = option(8, "image side in pixels")
    cell_size: int = option(1, "cell side in pixels")
    positions: tuple[tuple[Cell, Cell], ...] | None = option(None, "((key_row, key_col), (value_row, value_col)) per pair, in cells")
    background: tuple[float, float, float] = option((0.0, 0.0, 0.0), "background RGB")
    tolerance: float = option(0.4, "decoding tolerance: a cell decodes to a colour within this L-inf distance")

    def __post_init__(self) -> None:
        _validate.positive_int("n_pairs", self.n_pairs)
        _validate.positive_int("image_size", self.image_size, minimum=2)
        _validate.positive_int("cell_size", self.cell_size)
        pal = tuple(tuple(float(c) for c in col) for col in self.palette)
        if len(pal) < 2:
            raise ValueError(f"palette must have at least 2 colours, got {len(pal)}")
        if any(len(c) != 3 for c in pal) or len(self.background) != 3:
            raise ValueError("palette colours and background must be RGB triples")
        if len(set(pal)) != len(pal):
            raise ValueError("palette has duplicate colours")
        if tuple(float(c) for c in self.background) in pal:
            raise ValueError("background must differ from every palette colour")
        if any(abs(c) > 1 for col in pal + (tuple(self.background),) for c in col):
            raise ValueError("colours must lie in [-1, 1]")
        object.__setattr__(self, "palette", pal)
        object.__setattr__(self, "background", tuple(float(c) for c in self.background))
        _validate.finite_float("tolerance", self.tolerance, minimum=0.0, strict=True)
        if self.image_size % self.cell_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of cell_size {self.cell_size}")
        grid = self.grid
        if self.positions is None:
            if grid < 4:
                raise ValueError(f"image_size/cell_size must be >= 4 cells, got {grid}")
            pos = corner_positions(grid, self.n_pairs) if self.n_pairs <= 4 else border_positions(grid, self.n_pairs)
        else:
            pos = tuple(((int(kc[0]), int(kc[1])), (int(vc[0]), int(vc[1]))) for kc, vc in self.positions)
            if len(pos) != self.n_pairs:
                raise ValueError(f"positions must list n_pairs={self.n_pairs} pairs, got {len(pos)}")
        cells = [c for pair in pos for c in pair]
        if any(not (0 <= r < grid and 0 <= c < grid) for r, c in cells):
            raise ValueError(f"positions must lie inside the {grid}x{grid} cell grid")
        if len(set(cells)) != len(cells):
            raise ValueError("positions overlap: each cell may hold one key or value")
        if self.positions is None and self.n_pairs > 1:
            # default geometry: different pairs further apart than the CNN's 5x5 receptive field
            s = self.cell_size
            gap = min(max(abs(a[0] - b[0]), abs(a[1] - b[1])) * s - (s - 1)
                      for i, p in enumerate(pos) for j, q in enumerate(pos) if i < j for a in p for b in q)
            if gap < 3:
                raise ValueError(f"image_size={self.image_size} is too small for {self.n_pairs} pairs in the default "
                                 f"layout: pairs {gap} px apart would share a receptive field (need >= 3)")
        object.__setattr__(self, "positions", pos)

    @property
    def grid(self) -> int:
        return self.image_size // self.cell_size

    @property
    def n_colours(self) -> int:
        return len(self.palette)

    def to_dict(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict) -> KVConfig:
        d = dict(d)
        d["palette"] = tuple(tuple(c) for c in d["palette"])
        d["background"] = tuple(d["background"])
        d["positions"] = tuple((tuple(k), tuple(v)) for k, v in d["positions"]) if d.get("positions") else None
        return cls(**d)


@dataclass
class KVBatch:
    """Contents of N images: ``keys`` and ``values`` (N, n_pairs) int64 colour indices,
    ``functions`` (N, P) int64 (``values = functions.gather(1, keys)``)."""
    keys: torch.Tensor
    values: torch.Tensor
    functions: torch.Tensor = field(repr=False)


def generate(config: KVConfig, n: int, seed: int = 0) -> KVBatch:
    """Draw ``n`` image contents: keys uniform with replacement, one uniform function per image."""
    _validate.positive_int("n", n)
    _validate.seed("seed", seed)
    g = torch.Generator().manual_seed(seed)
    P = config.n_colours
    keys = torch.randint(0, P, (n, config.n_pairs), generator=g)
    functions = torch.randint(0, P, (n, P), generator=g)
    return KVBatch(keys, functions.gather(1, keys), functions)


def _cell_masks(config: KVConfig) -> torch.Tensor:
    """(2 * n_pairs, H, W) bool: key cells then value cells, in pair order."""
    H = config.image_size
    s = config.cell_size
    m = torch.zeros(2, config.n_pairs, H, H, dtype=torch.bool)
    for i, (kc, vc) in enumerate(config.positions or ()):   # set by __post_init__
        for j, (r, c) in enumerate((kc, vc)):
            m[j, i, r * s:(r + 1) * s, c * s:(c + 1) * s] = True
    return m.view(2 * config.n_pairs, H, H)


def render(config: KVConfig, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) float32 in [-1, 1] for colour indices ``keys``, ``values`` (N, n_pairs)."""
    for name, x in (("keys", keys), ("values", values)):
        _validate.tensor(name, x, ndim=2, floating=False)
        if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor of colour indices, got dtype {x.dtype}")
        if x.shape[1] != config.n_pairs:
            raise ValueError(f"{name} must have n_pairs={config.n_pairs} columns, got {x.shape[1]}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= config.n_colours):
            raise ValueError(f"{name} must hold colour indices in [0, {config.n_colours})")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)}, {tuple(values.shape)}")
    pal = torch.tensor(config.palette, dtype=torch.float32)
    masks = _cell_masks(config).to(torch.float32)                     # (2n, H, W)
    idx = torch.cat([keys, values], dim=1).cpu()                      # (N, 2n)
    cols = pal[idx]                                                   # (N, 2n, 3)
    bg = torch.tensor(config.background, dtype=torch.float32).view(1, 3, 1, 1)
    img = torch.einsum("ncd,chw->ndhw", cols, masks)
    cover = masks.sum(0).view(1, 1, *masks.shape[1:])
    return img + bg * (1 - cover)


def make_dataset(config: KVConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, KVBatch]:
    """``(images (n, 3, H, W) float32, contents)``: ``n`` generated and rendered training images."""
    b = generate(config, n, seed)
    return render(config, b.keys, b.values), b


@dataclass
class Decoded:
    """Decoding of N images. Strict: ``keys``/``values`` (N, n_pairs) int64, -1 where a cell is not
    clean; ``cell_clean`` (N, 2, n_pairs) bool (key cells, value cells); ``background_clean`` (N,)
    bool. Lenient: ``nearest_keys``/``nearest_values``, the palette colour nearest each cell's mean, -1
    where the cell shows no colour (its mean is NaN/inf, or no nearer any palette colour than the background)."""
    keys: torch.Tensor
    values: torch.Tensor
    cell_clean: torch.Tensor
    background_clean: torch.Tensor
    nearest_keys: torch.Tensor
    nearest_values: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.cell_clean.flatten(1).all(1) & self.background_clean


def decode(config: KVConfig, images: torch.Tensor, *, tolerance: float | None = None,
           chunk: int = 65536) -> Decoded:
    """Decode images (N, 3, H, W) back to colour indices; vectorised, in chunks of ``chunk`` images."""
    _validate.tensor("images", images, ndim=4)
    H = config.image_size
    if tuple(images.shape[1:]) != (3, H, H):
        raise ValueError(f"images must have shape (N, 3, {H}, {H}), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    _validate.positive_int("chunk", chunk)
    tol = config.tolerance if tolerance is None else _validate.finite_float("tolerance", tolerance, minimum=0.0,
                                                                               strict=True)
    n = config.n_pairs
    masks = _cell_masks(config)
    pal = torch.tensor(config.palette, dtype=torch.float32)
    bg = torch.tensor(config.background, dtype=torch.float32).view(1, 3, 1, 1)
    bg_mask = ~masks.any(0)
    s = config.cell_size
    parts = []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].detach().to("cpu", torch.float32)
        # per cell: (N, 2n, 3, s*s) pixels
        px = torch.stack([x[:, :, m].view(x.shape[0], 3, s * s) for m in masks], dim=1)
        dist = (px.unsqueeze(2) - pal.view(1, 1, -1, 3, 1)).abs().amax(dim=(3, 4))   # (N, 2n, P)
        best_d, best = dist.min(dim=2)
        clean = best_d <= tol
        strict = torch.where(clean, best, torch.full_like(best, -1))
        mean = px.mean(-1)                                                           # (N, 2n, 3)
        near_d, nearest = ((mean.unsqueeze(2) - pal.view(1, 1, -1, 3)) ** 2).sum(-1).min(2)
        # a grey, NaN or inf cell has no nearest colour: otherwise all its cells would share colour 0
        # and garbage would read as consistent (NaN and inf compare False here)
        nearest = torch.where(near_d < ((mean - bg.view(1, 1, 3)) ** 2).sum(-1), nearest, -1)
        if bg_mask.any():
            bclean = ((x - bg).abs().amax(1)[:, bg_mask] <= tol).all(1)
        else:
            bclean = torch.ones(x.shape[0], dtype=torch.bool)
        parts.append((strict, clean, bclean, nearest))
    strict, clean, bclean, nearest = (torch.cat(p) for p in zip(*parts))
    return Decoded(strict[:, :n], strict[:, n:], clean.view(-1, 2, n), bclean, nearest[:, :n], nearest[:, n:])
