"""Triton path of ``fastscore.ops.reverse_step`` (arguments already validated by the op)."""
from __future__ import annotations

import torch

from fastscore.kernels import reverse_step as _kernel


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, coef, seed, step: int, sample_offset, clip_x0: bool,
                 out: torch.Tensor | None) -> torch.Tensor:
    """One fused launch: reads ``x_t`` and ``eps``, draws the noise, writes ``out`` (or a new tensor)."""
    coef = (coef.sqrt_alpha_bar, coef.sqrt_one_minus_alpha_bar, coef.sqrt_alpha_bar_prev, coef.dir_coef, coef.sigma)
    return _kernel.reverse_step(x_t, eps, coef, seed, step, sample_offset, clip_x0=clip_x0, out=out)
