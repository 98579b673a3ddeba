"""Score networks: one CNN base, four attention variants. Each predicts the noise eps.

``ScoreNet(x_t, t) -> eps_hat`` with ``x_t`` (B, C, H, W) and integer timesteps ``t`` (B,) in
[0, T). The score is ``-eps_hat / sqrt(1 - alpha_bar[t])`` (``Schedule.eps_to_score``).

Architecture (all variants share it, so all non-locality comes from the attention layer):
  z = SiLU(conv3x3(SiLU(conv3x3(x) + e1(t))) + e2(t))          # CNN g: 5x5 receptive field
      (``depth`` such layers, default 2; receptive field (2 depth + 1)^2)
  h = z + A(z)                                                  # residual attention over H*W tokens
  eps_hat = conv1x1(SiLU(conv1x1(h)))                           # pointwise head
with ``A`` = 0 (``"none"``), ``identity_attention(z)`` (``"identity"``: q = k = v = z, scale
width**-0.5), ``W_o softmax_attention(W_q z, W_k z, W_v z)`` (``"softmax"``), or
``W_o top1_attention(W_q z, W_k z, W_v z)`` (``"top1"``: hard argmax; trained straight-through
with the surrogate ``softmax(q.k / (temperature * sqrt(attn_dim)))``, i.e. the softmax model's
scaling at temperature 1, and Gumbel noise in training mode).
No layer pools over positions. ``coord_channels=True`` appends two fixed coordinate channels
(row, col in [-1, 1]) to the input, a positional source that keeps the CNN local.
``attn_patch=True`` (softmax and top-1) computes q, k, v from ``[z, the raw 3x3 neighbourhood of x_t]``
instead of z alone: attention then sees a pixel's neighbouring key colour linearly from the start,
which the local denoising loss gives z no reason to encode (a value is independent of its own key).
Still all non-locality is in the attention layer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate, ops
from .options import option

ATTENTIONS = ("none", "identity", "top1", "softmax")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a ``ScoreNet`` (JSON-serialisable); the one declaration of each."""
    attention: str = option("none", "attention layer after the CNN: none, identity, top1 or softmax")
    width: int = option(64, "CNN channels (the width of the embedding z)")
    attn_dim: int = option(64, "query/key width of the learned projections (ScoreNet's default: its width)")
    image_channels: int = option(3, "image channels")
    image_size: int = option(8, "image side in pixels")
    T: int = option(1000, "diffusion timesteps the time embedding covers")
    temperature: float = option(1.0, "top-1 surrogate temperature")
    gumbel: bool = option(True, "Gumbel noise in the top-1 surrogate while training")
    coord_channels: bool = option(False, "two coordinate input channels (row, col in [-1, 1])")
    attn_patch: bool = option(False, "queries, keys and values also see the raw 3x3 neighbourhood (softmax, top-1)")
    depth: int = option(2, "3x3 conv layers of the CNN (receptive field 2 * depth + 1)")

    def __post_init__(self) -> None:
        _validate.choice("attention", self.attention, ATTENTIONS)
        _validate.positive_int("width", self.width)
        _validate.positive_int("attn_dim", self.attn_dim)
        _validate.positive_int("image_channels", self.image_channels)
        _validate.positive_int("image_size", self.image_size)
        _validate.positive_int("T", self.T, minimum=2)
        _validate.positive_int("depth", self.depth)
        _validate.finite_float("temperature", self.temperature, minimum=0.0, strict=True)
        object.__setattr__(self, "temperature", float(self.temperature))
        if not all(isinstance(b, bool) for b in (self.gumbel, self.coord_channels, self.attn_patch)):
            raise TypeError("gumbel, coord_channels and attn_patch must be bools")
        if self.attn_patch and self.attention not in ("softmax", "top1"):
            raise ValueError("attn_patch needs attention 'softmax' or 'top1' (learned projections)")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, T: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) float32 of integer timesteps ``t`` (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = (t.to(torch.float32) * (1000.0 / T)).unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


def patch_features(x: torch.Tensor) -> torch.Tensor:
    """The raw 3x3 neighbourhoods (B, H*W, 9C) of x (B, C, H, W), zero-padded: ``F.unfold(x, 3,
    padding=1).transpose(1, 2)``, feature ``c * 9 + k`` = x[c] at offset (k // 3 - 1, k % 3 - 1).
    Computed as one convolution with a fixed 0/1 kernel (weight[c*9 + k, c, k // 3, k % 3] = 1):
    CUDA's unfold launches one kernel per image. Each output is one input times 1 plus zeros, so it
    equals unfold exactly for finite x (a NaN/inf spreads to its neighbours' features), unless cuDNN
    rounds the inputs to TF32 (allowed by torch's default for convolutions; on an H100 it was measured
    bitwise equal, and a GPU test checks it)."""
    C = x.shape[1]
    weight = torch.eye(9 * C, dtype=x.dtype, device=x.device).view(9 * C, C, 3, 3)
    return F.conv2d(x, weight, padding=1).flatten(2).transpose(1, 2)


class ScoreNet(nn.Module):
    """eps-prediction score network; see the module docstring. ``backend`` picks the ops' path."""

    def __init__(self, attention: str = "none", width: int = 64, *, backend: str = "auto", **options) -> None:
        """``options``: the other ``ModelConfig`` fields (``attn_dim``, default ``width``; ``image_size``,
        ``attn_patch``, ...)."""
        super().__init__()
        self.config = ModelConfig(attention, width, **{"attn_dim": width, **options})
        self.backend = _validate.choice("backend", backend, ops.BACKENDS)
        c, w = self.config.image_channels, width
        coord_channels, attn_patch = self.config.coord_channels, self.config.attn_patch
        cin = c + (2 if coord_channels else 0)
        depth = self.config.depth
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, depth * w))
        for i in range(depth):         # conv1, conv2, ...: depth 2 keeps the names (and checkpoints) of before
            setattr(self, f"conv{i + 1}", nn.Conv2d(cin if i == 0 else w, w, 3, padding=1))
        d = self.config.attn_dim
        if attention in ("softmax", "top1"):
            self.qkv = nn.Linear(w + (9 * c if attn_patch else 0), 3 * d)
            self.proj = nn.Linear(d, w)
        self.head1 = nn.Conv2d(w, w, 1)
        self.head2 = nn.Conv2d(w, c, 1)
        self.last_index: torch.Tensor | None = None  # top-1 index map of the last forward

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.image_channels, c.image_size, c.image_size)

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The CNN embedding z (B, width, H, W) of noisy images x at timesteps t."""
        if self.config.coord_channels:
            B, _, H, W = x.shape
            r = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
            cc = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
            x = torch.cat([x, r, cc], dim=1)
        emb = self.time_mlp(timestep_embedding(t, self.config.width, self.config.T).to(x.dtype))
        h = x
        for i, e in enumerate(emb.chunk(self.config.depth, dim=1)):
            h = F.silu(getattr(self, f"conv{i + 1}")(h) + e[:, :, None, None])
        return h

    def _qkv_input(self, tok: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if not self.config.attn_patch:
            return tok
        if x is None:
            raise ValueError("attend needs x (the network input, (B, C, H, W)) when attn_patch=True")
        return torch.cat([tok, patch_features(x).to(tok.dtype)], dim=-1)

    def attention_scale(self) -> float:
        """The score scale of the attention layer: ``width**-0.5`` for identity attention (q = k = z),
        ``attn_dim**-0.5`` for the learned projections; top-1's surrogate temperature is
        ``temperature / attention_scale()``, i.e. the softmax model's scaling at temperature 1."""
        return (self.config.width if self.config.attention == "identity" else self.config.attn_dim) ** -0.5

    def attend(self, z: torch.Tensor, *, seed: int | torch.Tensor = 0, x: torch.Tensor | None = None) -> torch.Tensor:
        """Residual attention over the H*W tokens of z (B, width, H, W); returns the same shape.
        ``x`` (the network input) is needed with ``attn_patch``. One op, ``ops.attention_block``, on every
        backend (its torch path is this layer's composition, bit for bit)."""
        kind = self.config.attention
        if kind == "none":
            return z
        if self.config.attn_patch and x is None:
            raise ValueError("attend needs x (the network input, (B, C, H, W)) when attn_patch=True")
        scale = self.attention_scale()
        ws = () if kind == "identity" else tuple(w.to(z.dtype) for w in (self.qkv.weight, self.qkv.bias,
                                                                          self.proj.weight, self.proj.bias))
        res = ops.attention_block(z, x.to(z.dtype) if x is not None and self.config.attn_patch else None, *ws,
                                  kind=kind, scale=scale, temperature=self.config.temperature / scale,
                                  gumbel=self.config.gumbel and self.training, seed=seed, backend=self.backend)
        if isinstance(res, tuple):          # top-1: (out, index map)
            res, idx = res
            if not _batched(idx):   # under vmap the index map stays inside
                self.last_index = idx.detach()
        return res

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, seed: int | torch.Tensor = 0) -> torch.Tensor:
        """eps_hat (B, C, H, W) for x (B, C, H, W) and integer timesteps t (B,) (or a scalar).
        ``seed``: top-1's Gumbel seed in training (an int64 tensor per member under ``torch.func.vmap``)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        t = self._check_t(t, x)
        h = self.attend(self.embed(x, t), seed=seed, x=x)
        return self.head2(F.silu(self.head1(h)))

    def _check_t(self, t, x: torch.Tensor) -> torch.Tensor:
        """Integer timesteps (B,) in [0, T) on x's device (a scalar is broadcast)."""
        if not isinstance(t, torch.Tensor):
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
            t = torch.tensor(t, device=x.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) or be a scalar, got {tuple(t.shape)}")
        if not torch.compiler.is_compiling() and not t.is_cuda and t.numel() and not _batched(t) and \
                (int(t.min()) < 0 or int(t.max()) >= self.config.T):
            raise ValueError(f"t must lie in [0, T={self.config.T})")
        return t

    def attention_weights(self, x: torch.Tensor, t) -> torch.Tensor:
        """(B, N, N) float32 attention probabilities of the layer (for figures; materialises N x N).
        ``"top1"`` gives the one-hot argmax; ``"none"`` the identity."""
        kind = self.config.attention
        with torch.no_grad():
            t = self._check_t(t, x)
            z = self.embed(x, t)
            B, w, H, W = z.shape
            tok = z.flatten(2).transpose(1, 2).float()
            if kind == "none":
                return torch.eye(H * W, device=x.device).expand(B, -1, -1)
            if kind == "identity":
                q = k = tok
            else:
                q, k, _ = self.qkv(self._qkv_input(tok, x.float())).chunk(3, dim=-1)
            s = q @ k.transpose(1, 2)
            if kind == "top1":
                return F.one_hot(s.argmax(-1), H * W).float()
            return torch.softmax(s * self.attention_scale(), -1)


def _batched(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tensor inside ``torch.func.vmap`` (its values cannot reach the host)."""
    return torch._C._functorch.is_batchedtensor(x)


def build_model(config: ModelConfig, backend: str = "auto") -> ScoreNet:
    """A fresh ``ScoreNet`` from a ``ModelConfig``."""
    return ScoreNet(backend=backend, **config.to_dict())
