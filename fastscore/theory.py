"""Analytic score models: the ideal score, the equivariant local score (ELS) machine and the
position-specific local score machine.

All are eps-prediction modules with ``ScoreNet``'s call signature, ``model(x_t, t) -> eps_hat``
with ``x_t`` (B, C, H, W) and integer timesteps ``t`` (B,) (or a scalar), so ``fastscore.sample``
draws from them unchanged (pass ``schedule=`` when it is not the default linear one of
``config.T`` steps). Each computes a posterior mean ``x0_hat`` and returns
``eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)``.

* ``IdealScore``: the exact score of the Gaussian-smoothed training set, ``x0_hat =
  sum_n w_n X_n`` with ``w = softmax_n(-||x - sqrt(ab) X_n||^2 / (2 (1 - ab)) + log m_n)``;
  ``m_n`` is the multiplicity of distinct training image ``X_n``.
* ``ELSScore``: Kamb & Ganguli's equivariant local score machine (arXiv 2412.20292). For each
  pixel, ``x0_hat`` at that pixel is the posterior mean of the centre of a k x k training patch
  given the k x k noisy patch around the pixel, over the training patches of *every position*
  (translation equivariance) with the same weights as above (patch distances).
  ``padding="circular"``: images live on a torus; queries and training patches are cut from
  circularly padded images at all H*W positions (exactly equivariant under ``torch.roll``).
  ``padding="zeros"``: images are zero padded, and a pixel is matched only against training
  patches whose window has the same padding pattern (interior pixels against interior patches,
  a pixel at distance r < k//2 from the top edge against patches at distance r from the top
  edge, and so on; corners by both), as in the reference's ``LocalEquivBordersScoreModule``.
  ``padding="circular_valid"``: queries as ``"circular"``, but training patches cut only at the
  (H - k + 1)(W - k + 1) valid (unpadded) positions, as the reference's circular module does (on a
  small image most wrapped patches then have no training counterpart); ``"circular"`` wraps them, so
  it is the exact ELS of the torus.
* ``LocalScore``: the position-specific local score machine: as ``ELSScore`` with zero padding, but
  the k x k noisy patch at a pixel is compared only with the training patches at *that same
  position* (locality without equivariance).

All are softmax attentions with distance logits, run on ``fastscore.ops.softmax_attention`` (on
the path its dispatch picks: with ``backend="auto"``, on CUDA what the measured table says is fastest,
the torch reference elsewhere) through the identity
``-||q - aP||^2 / (2 s2) + log m = q.(aP / s2) - a^2 ||P||^2 / (2 s2) + log m - ||q||^2 / (2 s2)``:
queries ``[q, 1]``, keys ``[aP / s2, -a^2 ||P||^2 / (2 s2) + log m]``, scale 1; the last term is
constant per query and cancels. Training images and patches are deduplicated, each distinct one
carrying ``log(multiplicity)`` in its key bias, so cost scales with distinct patches.
Float32 inputs are computed in float32 (logits reach ~|x||P| / (1 - ab), so at t = 0 their
absolute rounding error is ~0.1, harmless next to the gaps between distinct patches); float64
inputs run the float64 reference.

Also: ``calibrate_patch_sizes`` (the locality calibration of Kamb & Ganguli; ``odd_sizes`` gives
their candidates 3, 5, ... up to the image, ``Calibration.saturated`` where the choice hits the largest),
``sample_correlation`` / ``correlation_summary`` (per-sample Pearson r of mean-centred images).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate, ops
from .ops import softmax_attention
from .schedule import Schedule

PADDINGS = ("zeros", "circular", "circular_valid")
_TORCH_CHUNK = 2**24                    # logits materialised at once by a path that may build M x N

PatchSizes = int | Sequence[int] | Callable[[int], int]


@dataclass(frozen=True)
class AnalyticConfig:
    """What ``fastscore.sample`` reads from a model: ``T`` (and the image geometry, for reports)."""
    kind: str
    T: int
    image_channels: int
    image_size: int


# ---------------------------------------------------------------------------------------------
# checks and small helpers
# ---------------------------------------------------------------------------------------------
def _check_train(train_images: torch.Tensor) -> torch.Tensor:
    _validate.tensor("train_images", train_images, ndim=4)
    if train_images.shape[0] == 0:
        raise ValueError("train_images is empty: need at least one training image")
    if min(train_images.shape[1:]) == 0:
        raise ValueError(f"train_images must have non-empty (C, H, W), got shape {tuple(train_images.shape)}")
    if not bool(torch.isfinite(train_images).all()):
        raise ValueError("train_images must be finite")
    return train_images.detach()


def _check_schedule(schedule: Schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastscore.schedule.Schedule, got {type(schedule).__name__}")
    return schedule


def _check_patch_size(k: int, H: int, W: int, name: str = "patch_size") -> int:
    _validate.positive_int(name, k)
    if k % 2 == 0:
        raise ValueError(f"{name} must be odd (the patch has a centre pixel), got {k}")
    if k > min(H, W):
        raise ValueError(f"{name} {k} is larger than the {H}x{W} image")
    return k


def unique_with_counts(rows: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``rows`` (N, D) and their total multiplicity (M,) float64; ``counts`` (N,)
    are the rows' own multiplicities (default 1 each). Rows are compared exactly."""
    w = torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device) if counts is None else counts.to(torch.float64)
    uniq, inv = _unique_rows(rows)
    tot = torch.zeros(uniq.shape[0], dtype=torch.float64, device=rows.device).index_add_(0, inv, w)
    return uniq, tot


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows, inverse) with exact float equality: an exact integer hash of the bit patterns
    (-0.0 folded into 0.0), a 1-D unique on the hash, and a check of every row against its group's
    representative; on a hash collision, ``torch.unique(dim=0)``."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}.get(rows.dtype)
    if ints is None or rows.shape[0] == 0:
        return torch.unique(rows, dim=0, return_inverse=True)
    r = (rows + 0.0).contiguous()
    bits = r.view(ints).to(torch.int64)
    if ints == torch.int64:                                    # 32-bit halves, so no input bit is lost
        bits = torch.cat([bits >> 32, bits & 0xFFFFFFFF], dim=1)
    g = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(-2**62, 2**62, (bits.shape[1],), generator=g, dtype=torch.int64).to(rows.device) | 1
    h = (bits * mult).sum(1)                                   # int64 arithmetic wraps: exact, deterministic
    _, inv = torch.unique(h, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), rows.shape[0], dtype=torch.int64, device=rows.device)
    first = first.scatter_reduce(0, inv, torch.arange(rows.shape[0], device=rows.device), reduce="amin")
    uniq = r[first]
    if not bool((uniq[inv] == r).all()):
        return torch.unique(rows, dim=0, return_inverse=True)
    return uniq, inv


def gaussian_posterior_mean(q: torch.Tensor, keys: torch.Tensor, log_m: torch.Tensor, values: torch.Tensor,
                            alpha_bar: float, *, backend: str = "auto") -> torch.Tensor:
    """Posterior mean ``sum_j w_ij values_j`` (M, Dv) with
    ``w_i = softmax_j(-||q_i - sqrt(ab) keys_j||^2 / (2 (1 - ab)) + log_m_j)``.

    ``q`` (M, D), ``keys`` (N, D), ``log_m`` (N,), ``values`` (N, Dv), one dtype and device; the
    result has q's dtype. Runs on ``softmax_attention`` with ``backend``, on the path the op chooses
    (``fastscore.ops.resolve_backend``): the Triton kernels in one call (they never build M x N),
    SDPA or the torch reference in chunks of queries (their math paths materialise the logits)."""
    a = math.sqrt(alpha_bar)
    s2 = 1.0 - alpha_bar
    dt = q.dtype
    ones = torch.ones(q.shape[0], 1, dtype=dt, device=q.device)
    qq = torch.cat([q, ones], dim=1)
    bias = (-(alpha_bar / (2 * s2)) * keys.to(torch.float64).pow(2).sum(1) + log_m.to(torch.float64)).to(dt)
    kk = torch.cat([keys * (a / s2), bias[:, None]], dim=1)
    if ops.resolve_backend(backend, qq[None], kk[None], values[None], op="softmax_attention") == "triton":
        return softmax_attention(qq[None], kk[None], values[None], 1.0, backend=backend)[0]
    chunk = max(1, _TORCH_CHUNK // kk.shape[0])
    out = [softmax_attention(qq[None, s:s + chunk], kk[None], values[None], 1.0, backend=backend)[0]
           for s in range(0, qq.shape[0], chunk)]
    return torch.cat(out)


def _check_input(x: torch.Tensor, t, image_shape: tuple[int, int, int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    _validate.tensor("x", x, ndim=4)
    if tuple(x.shape[1:]) != image_shape:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, image_shape))}), got {tuple(x.shape)}")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=x.device)
    if t.is_floating_point():
        raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"timesteps must lie in [0, {T}), got [{int(t.min())}, {int(t.max())}]")
    return x, t


class _AnalyticScore(nn.Module):
    """Shared plumbing: training set (deduplicated), schedule, per-timestep dispatch."""

    kind = "analytic"
    train_images: torch.Tensor      # buffers, registered in __init__
    train_counts: torch.Tensor

    def __init__(self, train_images: torch.Tensor, schedule: Schedule, *, deduplicate: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        train = _check_train(train_images)
        self.schedule = _check_schedule(schedule)
        self.backend = _validate.choice("backend", backend, ops.BACKENDS)
        if not isinstance(deduplicate, bool):
            raise TypeError(f"deduplicate must be a bool, got {type(deduplicate).__name__}")
        self.deduplicate = deduplicate
        C, H, W = train.shape[1:]
        self._shape = (int(C), int(H), int(W))
        self.n_train = int(train.shape[0])
        if deduplicate:
            flat, counts = unique_with_counts(train.flatten(1))
            train = flat.view(-1, C, H, W)
        else:
            counts = torch.ones(train.shape[0], dtype=torch.float64, device=train.device)
        self.register_buffer("train_images", train.contiguous(), persistent=False)
        self.register_buffer("train_counts", counts, persistent=False)
        self.config = AnalyticConfig(self.kind, schedule.T, int(C), int(H))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images."""
        return self._shape

    def _x0(self, x: torch.Tensor, t: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t) -> torch.Tensor:
        """Posterior mean x0_hat (B, C, H, W), x's dtype, for x (B, C, H, W) and timesteps t (B,) int."""
        x, t = _check_input(x, t, self.image_shape, self.schedule.T)
        if x.shape[0] == 0:
            return x.clone()
        ts = torch.unique(t).tolist()
        if len(ts) == 1:
            return self._x0(x, int(ts[0]))
        out = torch.empty_like(x)
        for tv in ts:
            idx = (t == tv).nonzero().squeeze(1)
            out[idx] = self._x0(x[idx], int(tv))
        return out

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """eps_hat (B, C, H, W), x's dtype, for x (B, C, H, W) and integer timesteps t (B,) or a scalar."""
        x0 = self.denoise(x, t)
        x, t = _check_input(x, t, self.image_shape, self.schedule.T)
        ab = self.schedule.alpha_bar.to(x.device)[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


# ---------------------------------------------------------------------------------------------
# the ideal score
# ---------------------------------------------------------------------------------------------
class IdealScore(_AnalyticScore):
    """Exact eps of the training set smoothed by the forward process (a mixture of Gaussians).

    ``train_images`` (N, C, H, W) floating, N >= 1; ``schedule`` the diffusion ``Schedule``;
    ``deduplicate`` merges equal images into one key with ``log(multiplicity)`` bias (same result).
    Its samples reproduce training images (memorisation): the baseline a creative model must beat."""

    kind = "ideal"

    def _x0(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ab = float(self.schedule.alpha_bar[t])
        X = self.train_images.to(x.dtype).flatten(1)
        out = gaussian_posterior_mean(x.flatten(1), X, self.train_counts.log(), X, ab, backend=self.backend)
        return out.view_as(x)

    @property
    def n_keys(self) -> int:
        """Number of distinct keys (training images after deduplication)."""
        return int(self.train_images.shape[0])


# ---------------------------------------------------------------------------------------------
# the ELS machine
# ---------------------------------------------------------------------------------------------
def _axis_class(n: int, d: int) -> torch.Tensor:
    """(n,) int64 padding class along one axis: i for i < d, 2d - (n-1-i) for i >= n - d, d between."""
    i = torch.arange(n)
    return torch.where(i < d, i, torch.where(i >= n - d, 2 * d - (n - 1 - i), torch.full_like(i, d)))


def position_classes(H: int, W: int, k: int, padding: str) -> list[torch.Tensor]:
    """Positions (flat indices y*W + x, int64) grouped by the padding pattern of their k x k window.
    ``"circular"`` and ``"circular_valid"``: one group with all H*W positions; ``"zeros"``: up to k*k groups."""
    _validate.choice("padding", padding, PADDINGS)
    if padding != "zeros" or k == 1:
        return [torch.arange(H * W)]
    d = k // 2
    cls = (_axis_class(H, d)[:, None] * (2 * d + 1) + _axis_class(W, d)[None, :]).flatten()
    return [(cls == c).nonzero().squeeze(1) for c in torch.unique(cls).tolist()]


def extract_patches(x: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """(B, H*W, C*k*k) k x k patches around every pixel of x (B, C, H, W); rows in (C, ky, kx) order,
    the window padded by zeros or circularly (``"circular"``, ``"circular_valid"``). The centre pixel is
    column ``c*k*k + (k//2)*(k+1)``."""
    d = k // 2
    if d:
        x = F.pad(x, (d, d, d, d), mode="circular") if padding != "zeros" else F.pad(x, (d, d, d, d))
    return F.unfold(x, k).transpose(1, 2)


class ELSScore(_AnalyticScore):
    """Equivariant local score machine (Kamb & Ganguli): see the module docstring.

    ``train_images`` (N, C, H, W) floating, N >= 1; ``schedule`` the diffusion ``Schedule``;
    ``patch_size``: an odd int <= min(H, W), a sequence of T such ints (index = timestep), or a
    callable ``t -> int`` (checked when first used); ``padding``: ``"zeros"``, ``"circular"`` or
    ``"circular_valid"``; ``deduplicate`` merges equal training patches (per padding class) with ``log(multiplicity)``.
    """

    kind = "els"

    def __init__(self, train_images: torch.Tensor, schedule: Schedule, patch_size: PatchSizes = 3, *,
                 padding: str = "zeros", deduplicate: bool = True, backend: str = "auto") -> None:
        super().__init__(train_images, schedule, deduplicate=deduplicate, backend=backend)
        self.padding = _validate.choice("padding", padding, PADDINGS)
        _, H, W = self.image_shape
        self._size_fn: Callable[[int], int] | None
        self._sizes: list[int] | None
        if callable(patch_size) and not isinstance(patch_size, nn.Module):
            self._size_fn = patch_size
            self._sizes = None
        elif isinstance(patch_size, int) and not isinstance(patch_size, bool):
            self._sizes = [_check_patch_size(patch_size, H, W)] * schedule.T
            self._size_fn = None
        elif isinstance(patch_size, (Sequence, torch.Tensor)) and not isinstance(patch_size, str):
            sizes = [int(k) if isinstance(k, torch.Tensor) else k for k in patch_size]
            if len(sizes) != schedule.T:
                raise ValueError(f"a per-step patch_size sequence needs T={schedule.T} entries, got {len(sizes)}")
            self._sizes = [_check_patch_size(k, H, W, f"patch_size[{i}]") for i, k in enumerate(sizes)]
            self._size_fn = None
        else:
            raise TypeError(f"patch_size must be an odd int, a sequence of T ints or a callable t -> int, "
                            f"got {type(patch_size).__name__}")
        self._tables: dict = {}

    def patch_size_at(self, t: int) -> int:
        """The patch size used at timestep t."""
        if self._sizes is not None:
            return self._sizes[t]
        _, H, W = self.image_shape
        assert self._size_fn is not None   # exactly one of _sizes / _size_fn is set in __init__
        return _check_patch_size(self._size_fn(int(t)), H, W, f"patch_size({t})")

    def table(self, k: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
        """Per padding class: (positions (L,) int64, patches (M, C*k*k), log multiplicities (M,) float64,
        centres (M, C)) of the distinct training patches of size k (cached per k, device, dtype)."""
        key = (k, str(device), dtype)
        if key not in self._tables:
            imgs = self.train_images.to(device, dtype)
            counts = self.train_counts.to(device)
            C = imgs.shape[1]
            centre = torch.arange(C, device=device) * k * k + (k // 2) * (k + 1)
            if self.padding == "circular_valid":                                  # (N, valid positions, Ckk)
                P = F.unfold(imgs, k).transpose(1, 2)
            else:
                P = extract_patches(imgs, k, self.padding)                      # (N, HW, Ckk)
            rows = []
            for pos in self._groups(k):
                pos = pos.to(device)
                src = torch.arange(P.shape[1], device=device) if self.padding == "circular_valid" else pos
                p = P[:, src].reshape(-1, P.shape[2])
                m = counts.repeat_interleave(src.numel())
                if self.deduplicate:
                    p, m = unique_with_counts(p, m)
                rows.append((pos, p.contiguous(), m.log(), p[:, centre].contiguous()))
            self._tables[key] = rows
        return self._tables[key]

    def _groups(self, k: int) -> list[torch.Tensor]:
        """Query positions answered together (each group against its own training patches)."""
        return position_classes(*self.image_shape[1:], k, self.padding)

    def n_keys(self, k: int) -> int:
        """Total number of keys (distinct training patches over all padding classes) at patch size k."""
        return sum(r[1].shape[0] for r in self.table(k, self.train_images.device, self.train_images.dtype))

    def _x0(self, x: torch.Tensor, t: int, k: int | None = None) -> torch.Tensor:
        k = self.patch_size_at(t) if k is None else k
        ab = float(self.schedule.alpha_bar[t])
        B, C, H, W = x.shape
        q = extract_patches(x, k, self.padding)                                  # (B, HW, Ckk)
        out = torch.empty(B, H * W, C, dtype=x.dtype, device=x.device)
        for pos, keys, log_m, centres in self.table(k, x.device, x.dtype):
            qq = q[:, pos].reshape(-1, q.shape[2])
            out[:, pos] = gaussian_posterior_mean(qq, keys, log_m, centres, ab,
                                                  backend=self.backend).view(B, pos.numel(), C)
        return out.transpose(1, 2).reshape(B, C, H, W)

    def eps_at_size(self, x: torch.Tensor, t, k: int) -> torch.Tensor:
        """eps_hat (B, C, H, W) at a fixed patch size k (ignoring the schedule of sizes)."""
        _check_patch_size(k, *self.image_shape[1:])
        x, t = _check_input(x, t, self.image_shape, self.schedule.T)
        out = torch.empty_like(x)
        for tv in torch.unique(t).tolist():
            idx = (t == tv).nonzero().squeeze(1)
            ab = float(self.schedule.alpha_bar[int(tv)])
            xi = x[idx]
            out[idx] = (xi - math.sqrt(ab) * self._x0(xi, int(tv), k)) / math.sqrt(1 - ab)
        return out


class LocalScore(ELSScore):
    """Position-specific local score machine: ``ELSScore`` with zero padding in which the k x k noisy
    patch around a pixel is compared only with the training patches around the *same* pixel (no
    translation equivariance). ``patch_size`` and ``deduplicate`` as ``ELSScore``. With k covering the
    whole image from every pixel it is the ideal score; at k = 1 each pixel is denoised on its own."""

    kind = "local"

    def __init__(self, train_images: torch.Tensor, schedule: Schedule, patch_size: PatchSizes = 3, *,
                 deduplicate: bool = True, backend: str = "auto") -> None:
        super().__init__(train_images, schedule, patch_size, padding="zeros", deduplicate=deduplicate,
                         backend=backend)

    def _groups(self, k: int) -> list[torch.Tensor]:
        _, H, W = self.image_shape
        return list(torch.arange(H * W).view(-1, 1))


# ---------------------------------------------------------------------------------------------
# locality calibration
# ---------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Result of ``calibrate_patch_sizes``. ``timesteps`` (S,) decreasing; ``sizes`` (K,);
    ``cosine`` (S, n, K) float64: cosine similarity of the CNN's eps and the ELS eps per step,
    sample and size; ``best`` (S, n) int64: per-sample best size; ``median`` / ``mode`` (S,) int64:
    the per-step aggregates (``median`` is the lower median, always one of ``sizes``)."""
    timesteps: list[int]
    sizes: tuple[int, ...]
    cosine: torch.Tensor
    best: torch.Tensor
    median: torch.Tensor
    mode: torch.Tensor

    def patch_schedule(self, T: int, aggregate: str = "median") -> list[int]:
        """Per-timestep patch sizes (T ints) for ``ELSScore``: each t takes the calibrated size of
        the nearest calibrated timestep (ties: the smaller timestep)."""
        _validate.choice("aggregate", aggregate, ("median", "mode"))
        vals = (self.median if aggregate == "median" else self.mode).tolist()
        ts = torch.tensor(self.timesteps, dtype=torch.float64)
        out = []
        for t in range(T):
            dist = (ts - t).abs()
            best = min(range(len(ts)), key=lambda i: (float(dist[i]), self.timesteps[i]))
            out.append(int(vals[best]))
        return out

    @property
    def saturated(self) -> list[int]:
        """The calibrated timesteps whose (median) size is the largest candidate: there the calibration
        is bounded by the image (or the candidates), not by the network's locality."""
        return [t for t, k in zip(self.timesteps, self.median.tolist()) if k == max(self.sizes)]

    def to_dict(self) -> dict:
        """JSON-ready: timesteps, sizes, per-step median and mode, mean best cosine per step, saturated."""
        return {"timesteps": list(self.timesteps), "sizes": list(self.sizes), "median": self.median.tolist(),
                "mode": self.mode.tolist(), "best_cosine": self.cosine.max(2).values.mean(1).tolist(),
                "saturated": self.saturated}


def odd_sizes(image_size: int, smallest: int = 3) -> tuple[int, ...]:
    """Kamb & Ganguli's calibration candidates: the odd patch sizes ``smallest, smallest + 2, ...`` up to
    ``image_size`` (the largest odd size that fits)."""
    _validate.positive_int("image_size", image_size)
    _validate.positive_int("smallest", smallest)
    if smallest % 2 == 0 or smallest > image_size:
        raise ValueError(f"smallest must be odd and <= image_size={image_size}, got {smallest}")
    return tuple(range(smallest, image_size + 1, 2))


@torch.no_grad()
def calibrate_patch_sizes(cnn_model: Callable, train_images: torch.Tensor, schedule: Schedule,
                          sizes: Sequence[int] = (1, 3, 5, 7), *, t_values: Sequence[int] | None = None,
                          steps: int = 20, n: int = 16, eta: float = 1.0, padding: str = "zeros", seed: int = 0,
                          clip_x0: bool = True, shape: Sequence[int] | None = None,
                          device: str | torch.device | None = None, deduplicate: bool = True,
                          backend: str = "auto", machine: str = "els") -> Calibration:
    """Kamb & Ganguli's locality calibration: the patch size whose ELS eps best matches the CNN's.

    Runs the CNN's own DDIM(eta) trajectory from ``n`` initial noises (``fastscore.sampling``'s
    Philox stream, ``seed``) over ``t_values`` (decreasing; default ``timesteps(T, steps)``); at each
    step compares the CNN's eps with the ELS eps of every size in ``sizes`` (odd, <= image size)
    by per-sample cosine similarity, takes each sample's best size, and aggregates per step by the
    median and the mode over samples (as the reference ``scales_calibration.py`` does).
    ``machine="local"`` calibrates the position-specific ``LocalScore`` instead (``padding`` unused)."""
    from .sampling import initial_noise, sample_ddim, timesteps
    if not callable(cnn_model):
        raise TypeError(f"cnn_model must be callable (x_t, t) -> eps, got {type(cnn_model).__name__}")
    train = _check_train(train_images)
    _check_schedule(schedule)
    _validate.positive_int("n", n)
    _validate.seed("seed", seed)
    _validate.finite_float("eta", eta, minimum=0.0)
    sizes = tuple(sizes)
    if not sizes:
        raise ValueError("sizes must name at least one patch size")
    for k in sizes:
        _check_patch_size(k, int(train.shape[2]), int(train.shape[3]), name="sizes")
    ts = timesteps(schedule.T, steps) if t_values is None else sorted({int(t) for t in t_values}, reverse=True)
    if not ts or ts[-1] < 0 or ts[0] >= schedule.T:
        raise ValueError(f"t_values must be non-empty timesteps in [0, {schedule.T})")
    shape = tuple(train.shape[1:]) if shape is None else tuple(shape)
    if device is None:
        params = list(cnn_model.parameters()) if isinstance(cnn_model, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    _validate.choice("machine", machine, ("els", "local"))
    els = (ELSScore(train.to(device), schedule, sizes[0], padding=padding, deduplicate=deduplicate, backend=backend)
           if machine == "els" else LocalScore(train.to(device), schedule, sizes[0], deduplicate=deduplicate,
                                               backend=backend))
    cos = torch.zeros(len(ts), n, len(sizes), dtype=torch.float64)
    step = {"i": 0}

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = cnn_model(x, t)
        a = eps.flatten(1).to(torch.float64)
        for j, k in enumerate(sizes):
            b = els.eps_at_size(x, t, k).flatten(1).to(torch.float64)
            cos[step["i"], :, j] = F.cosine_similarity(a, b, dim=1, eps=1e-30).cpu()
        step["i"] += 1
        return eps

    x = initial_noise((n, *shape), seed, 0, device)
    sample_ddim(recording, x, schedule, ts, eta=eta, seed=seed, clip_x0=clip_x0, backend=backend)
    size_t = torch.tensor(sizes, dtype=torch.int64)
    best = size_t[cos.argmax(dim=2)]                                              # (S, n)
    return Calibration(ts, sizes, cos, best, best.median(dim=1).values, best.mode(dim=1).values)


# ---------------------------------------------------------------------------------------------
# comparing samples
# ---------------------------------------------------------------------------------------------
def sample_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson r (n,) float64 between a and b (n, ...): each sample flattened and
    mean-centred; NaN where either sample is constant."""
    _validate.tensor("a", a)
    _validate.tensor("b", b)
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"a and b must have the same shape (n, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    x = a.detach().flatten(1).to(torch.float64).cpu()
    y = b.detach().flatten(1).to(torch.float64).cpu()
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))


def correlation_summary(r: torch.Tensor) -> dict:
    """``{"n", "median", "q25", "q75", "mean"}`` of per-sample correlations r (n,), NaNs ignored."""
    r = r.detach().to(torch.float64).flatten()
    r = r[~torch.isnan(r)]
    if r.numel() == 0:
        return {"n": 0, "median": float("nan"), "q25": float("nan"), "q75": float("nan"), "mean": float("nan")}
    q = torch.quantile(r, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"n": int(r.numel()), "median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]),
            "mean": float(r.mean())}


def bootstrap_summary(r: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Median and quartiles of per-sample correlations r (n,) and of r^2, each with a percentile bootstrap
    interval (``n_boot`` resamples of the n samples with replacement, ``seed``; ``level`` coverage); NaNs
    dropped. ``{"n", "r": {...}, "r2": {...}}``, each ``{"median", "q25", "q75", "median_ci", "q25_ci",
    "q75_ci"}``."""
    _validate.positive_int("n_boot", n_boot)
    _validate.seed("seed", seed)
    _validate.finite_float("level", level, minimum=0.0, strict=True)
    if level >= 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    r = r.detach().to(torch.float64).flatten().cpu()
    r = r[~torch.isnan(r)]
    nan = float("nan")
    if r.numel() == 0:
        empty = {k: nan for k in ("median", "q25", "q75")} | {k: [nan, nan] for k in ("median_ci", "q25_ci", "q75_ci")}
        return {"n": 0, "r": dict(empty), "r2": dict(empty)}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, r.numel(), (n_boot, r.numel()), generator=g)
    qs = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out: dict[str, Any] = {"n": int(r.numel())}
    for name, v in (("r", r), ("r2", r * r)):
        point = torch.quantile(v, qs)
        boot = torch.quantile(v[idx], qs, dim=1)                                 # (3, n_boot)
        ci = torch.quantile(boot, torch.tensor([lo, hi], dtype=torch.float64), dim=1)  # (2, 3)
        out[name] = {"median": float(point[1]), "q25": float(point[0]), "q75": float(point[2]),
                     "median_ci": ci[:, 1].tolist(), "q25_ci": ci[:, 0].tolist(), "q75_ci": ci[:, 2].tolist()}
    return out


# ---------------------------------------------------------------------------------------------
# agreement where it matters: cells, decoded colours, pairs (issue 16, point 5)
# ---------------------------------------------------------------------------------------------
PAIR_CLASSES = ("alone", "coordinated", "conflicting")


def _check_pair_images(config, a: torch.Tensor, b: torch.Tensor) -> None:
    from .data import KVConfig
    if not isinstance(config, KVConfig):
        raise TypeError(f"config must be a KVConfig, got {type(config).__name__}")
    H = config.image_size
    for name, x in (("samples", a), ("reference", b)):
        _validate.tensor(name, x, ndim=4)
        if tuple(x.shape[1:]) != (3, H, H) or x.shape[0] == 0:
            raise ValueError(f"{name} must have shape (N >= 1, 3, {H}, {H}), got {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"samples and reference must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def cell_correlation(config, samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson r (N,) float64 between ``samples`` and ``reference`` (N, 3, H, W) over the pixels of
    the key and value cells only (``config``: the ``KVConfig``); the background, where every model agrees,
    is left out. NaN where either sample is constant on the cells."""
    from .data import _cell_masks
    _check_pair_images(config, samples, reference)
    mask = _cell_masks(config).any(0)
    return sample_correlation(samples[:, :, mask], reference[:, :, mask])


def pair_classes(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(N, n_pairs) int64 index into ``PAIR_CLASSES`` of each pair of contents ``keys``, ``values``
    (N, n_pairs): 0 *alone* (no other pair has its key), 1 *coordinated* (its key is shared, and every
    pair with that key carries its value), 2 *conflicting* (a pair with the same key carries another value)."""
    same_key = keys.unsqueeze(2) == keys.unsqueeze(1)                 # (N, i, j)
    other = ~torch.eye(keys.shape[1], dtype=torch.bool, device=keys.device)
    shared = (same_key & other).any(2)
    conflict = (same_key & (values.unsqueeze(2) != values.unsqueeze(1))).any(2)
    return torch.where(conflict, 2, torch.where(shared, 1, 0)).to(torch.int64)


@dataclass
class Agreement:
    """How a model's samples agree with a reference's (the ELS machine's) drawn from the same noise.

    ``cell_r`` (N,) float64: Pearson r over cell pixels (``cell_correlation``); ``sample_colours`` and
    ``reference_colours`` (N, 2, n_pairs) int64: the nearest palette colour of each key cell (``[:, 0]``)
    and value cell (``[:, 1]``) in the samples and in the reference."""
    cell_r: torch.Tensor
    sample_colours: torch.Tensor
    reference_colours: torch.Tensor

    @property
    def cells(self) -> torch.Tensor:
        """(N, 2, n_pairs) bool: the cell's decoded colour is the same in the sample and the reference."""
        return self.sample_colours == self.reference_colours

    @property
    def pair_class(self) -> torch.Tensor:
        """(N, n_pairs) int64: ``pair_classes`` of the *samples'* decoded colours."""
        return pair_classes(self.sample_colours[:, 0], self.sample_colours[:, 1])

    def cell_chance(self) -> float:
        """Cell agreement expected if samples and reference were independent with their own colour
        frequencies per cell: the mean over cells of sum_c p_sample(c) p_reference(c). A cell without a
        colour (-1) counts as one more category, as ``cells`` compares it."""
        P = int(max(self.sample_colours.max(), self.reference_colours.max())) + 2
        ps = F.one_hot(self.sample_colours + 1, P).double().mean(0)         # (2, n_pairs, P); class 0: no colour
        pr = F.one_hot(self.reference_colours + 1, P).double().mean(0)
        return float((ps * pr).sum(-1).mean())

    def summary(self) -> dict:
        """``cell_r`` (median, quartiles: ``correlation_summary``); ``cells`` (Rate dict: cells that agree)
        and ``cell_chance``; ``content`` (Rate dict: samples whose every cell agrees); per class of
        ``PAIR_CLASSES`` under ``pairs``: ``agree`` (key and value agree) and ``value_given_key`` (value
        agrees among pairs whose key agrees)."""
        from .metrics import Rate
        cells, cls = self.cells, self.pair_class
        key_ok, val_ok = cells[:, 0], cells[:, 1]
        out: dict[str, Any] = {"cell_r": correlation_summary(self.cell_r),
               "cells": Rate(int(cells.sum()), int(cells.numel())).to_dict(), "cell_chance": self.cell_chance(),
               "content": Rate(int(cells.flatten(1).all(1).sum()), int(cells.shape[0])).to_dict(),
               "pairs": {}}
        for i, name in enumerate(PAIR_CLASSES):
            m = cls == i
            out["pairs"][name] = {"agree": Rate(int((m & key_ok & val_ok).sum()), int(m.sum())).to_dict(),
                                  "value_given_key": Rate(int((m & key_ok & val_ok).sum()),
                                                          int((m & key_ok).sum())).to_dict()}
        return out


def agreement(config, samples: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """Agreement of ``samples`` with ``reference`` (N, 3, H, W), sample by sample (same initial noise),
    on the dataset ``config`` (``KVConfig``): over cell pixels, cell by decoded (nearest) colour, and pair
    by pair split by whether the sample coordinated the pair (``pair_classes``). A machine whose pairs
    are decided locally agrees with the ELS machine about as often on coordinated pairs as on alone ones
    (its pairs match by coincidence); a network that coordinates changes the values of coordinated pairs
    away from the local prediction."""
    from .data import decode
    _check_pair_images(config, samples, reference)
    ds, dr = decode(config, samples), decode(config, reference)
    return Agreement(cell_correlation(config, samples, reference),
                     torch.stack([ds.nearest_keys, ds.nearest_values], 1),
                     torch.stack([dr.nearest_keys, dr.nearest_values], 1))
