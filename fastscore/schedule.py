"""Noise schedules: ``x_t = sqrt(alpha_bar[t]) x_0 + sqrt(1 - alpha_bar[t]) eps``, t in [0, T).

Timesteps are integers ``0 .. T-1``; t = 0 is the least noisy level (``alpha_bar[0] = 1 - beta[0]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _validate

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """A discrete schedule. ``betas`` and ``alpha_bar`` are float64 CPU tensors of shape (T,)."""
    kind: str
    betas: torch.Tensor
    alpha_bar: torch.Tensor

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t`` for clean ``x0`` (B, ...), timesteps ``t`` (B,) int64 and noise ``eps`` (like x0)."""
        ab = self.alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def eps_to_score(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score ``grad log p_t(x) = -eps / sqrt(1 - alpha_bar[t])`` for predicted noise ``eps``."""
        ab = self.alpha_bar.to(eps.device)[t].to(eps.dtype).view(-1, *([1] * (eps.dim() - 1)))
        return -eps / (1 - ab).sqrt()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "T": self.T}


def make_schedule(kind: str = "linear", T: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
    """Linear betas or the cosine schedule (Nichol & Dhariwal).

    Linear: ``beta_start..beta_end`` (DDPM's 1e-4..0.02) for T = 1000, scaled by 1000 / T for other
    T (Nichol & Dhariwal), so that alpha_bar[T-1] is near 0 (x_T pure noise) for any T."""
    _validate.choice("kind", kind, SCHEDULES)
    _validate.positive_int("T", T, minimum=2)
    _validate.finite_float("beta_start", beta_start, minimum=0.0, strict=True)
    _validate.finite_float("beta_end", beta_end, minimum=0.0, strict=True)
    if not beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    if kind == "linear":
        scale = 1000.0 / T
        if beta_end * scale >= 1:
            raise ValueError(f"T={T} is too small for beta_end={beta_end} (scaled beta would reach 1)")
        betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, 0)
    else:
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        ab = f / f[0]
        betas = (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
        alpha_bar = torch.cumprod(1 - betas, 0)
    return Schedule(kind, betas, alpha_bar)
