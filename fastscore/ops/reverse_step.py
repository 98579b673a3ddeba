"""One reverse-diffusion update, shared by DDPM ancestral and DDIM (eta >= 0).

With ``a = sqrt(alpha_bar_t)``, ``b = sqrt(1 - alpha_bar_t)``:
  x0  = (x_t - b * eps) / a;     if clip_x0: x0 = clamp(x0, -1, 1) and eps = (x_t - a * x0) / b
  x_{t-1} = sqrt(alpha_bar_prev) * x0 + dir_coef * eps + sigma * z
DDIM: ``sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)``,
``dir_coef = sqrt(1 - ab_prev - sigma**2)``. DDPM ancestral (posterior variance) is DDIM with
eta = 1 on consecutive steps. The last step uses ``ab_prev = 1``, ``sigma = dir_coef = 0``.

``z`` is standard normal from ``philox.normal(seed, e, c2=step)``, ``e`` the element's global index
in the whole sampling run: ``e = (sample_offset + i) * (C*H*W) + j`` for sample ``i`` of the batch
and element ``j`` within it, so a sample's noise never depends on batch size or position.

Paths (``fastscore.ops._dispatch`` has the rule and the ``backend="auto"`` table):
  * ``"torch"``: ``reverse_step_reference``, eager float32 (what the tests compare against).
  * ``"triton"``: one fused launch (``fastscore.kernels.reverse_step``) that reads ``x_t`` and
    ``eps``, draws the noise in the kernel and writes ``out``; ``seed`` and ``sample_offset`` may
    be device tensors that the kernel reads, so a captured CUDA graph serves every batch. Takes
    float32/float16/bfloat16 (other dtypes raise under ``backend="triton"``, run the reference
    under ``"auto"``). ``auto`` on CUDA. No autograd: sampling runs without gradients.

vmap (``torch.func``): over members with their own ``seed`` (and ``sample_offset``), one update per
member, so member m's noise is the one it draws alone (folding the members into the batch would
shift their element indices).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _validate
from . import _dispatch, philox
from .attention import member, per_member


class StepCoefficients(NamedTuple):
    """Per-step scalars of one reverse update (all floats; see module docstring)."""
    sqrt_alpha_bar: float
    sqrt_one_minus_alpha_bar: float
    sqrt_alpha_bar_prev: float
    dir_coef: float
    sigma: float


def _check(x_t, eps, coef, seed, step, sample_offset, out) -> StepCoefficients:
    _validate.tensor("x_t", x_t)
    _validate.tensor("eps", eps)
    if eps.shape != x_t.shape:
        raise ValueError(f"eps must have the shape of x_t {tuple(x_t.shape)}, got {tuple(eps.shape)}")
    _validate.same(("x_t", "eps"), (x_t, eps))
    if x_t.dim() < 1 or x_t.shape[0] == 0:
        raise ValueError(f"x_t must have a non-empty batch dimension, got shape {tuple(x_t.shape)}")
    if not isinstance(coef, StepCoefficients):
        if isinstance(coef, (tuple, list)) and len(coef) == 5:
            coef = StepCoefficients(*coef)
        else:
            raise TypeError(f"coefficients must be a StepCoefficients (or a 5-tuple of floats), got {coef!r}")
    for name, c in zip(StepCoefficients._fields, coef):
        _validate.finite_float(f"coefficients.{name}", c)
    for name in ("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar"):
        if getattr(coef, name) <= 0:
            raise ValueError(f"coefficients.{name} must be > 0, got {getattr(coef, name)}")
    for name in ("sigma", "dir_coef"):
        if getattr(coef, name) < 0:
            raise ValueError(f"coefficients.{name} must be >= 0, got {getattr(coef, name)}")
    for name, v in (("seed", seed), ("sample_offset", sample_offset)):
        if isinstance(v, torch.Tensor):  # device scalars, so a captured CUDA graph can change them
            if v.dtype != torch.int64 or v.numel() != 1 or v.device != x_t.device:
                raise ValueError(f"{name} given as a tensor must be one int64 on {x_t.device}, got "
                                 f"{v.dtype} x {v.numel()} on {v.device}")
        elif name == "seed":
            _validate.seed("seed", v)
        else:
            _validate.positive_int("sample_offset", v, minimum=0)
    _validate.positive_int("step", step, minimum=0)
    if step >= 2**31:
        raise ValueError(f"step must be < 2**31, got {step}")
    if out is not None:
        _validate.tensor("out", out)
        if out.shape != x_t.shape or out.dtype != x_t.dtype or out.device != x_t.device:
            raise ValueError(f"out must match x_t in shape, dtype and device: x_t is {tuple(x_t.shape)} {x_t.dtype} "
                             f"on {x_t.device}, out is {tuple(out.shape)} {out.dtype} on {out.device}")
    return StepCoefficients(*(float(c) for c in coef))


def noise_like(x_t: torch.Tensor, seed: int, step: int, sample_offset: int = 0) -> torch.Tensor:
    """The float32 standard normal noise that ``reverse_step`` adds (documented stream); no host sync."""
    per = x_t[0].numel()
    return philox.normal_range(seed, sample_offset * per, x_t.numel(), c2=step, device=x_t.device).view(x_t.shape)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_check(x_t: torch.Tensor) -> None:
    """Raise TypeError for dtypes the Triton kernel cannot take (it takes float32/float16/bfloat16)."""
    if x_t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"x_t: the Triton reverse-step kernel takes float32/float16/bfloat16, got {x_t.dtype}")


def _resolve(backend: str, *tensors: torch.Tensor) -> str:
    return _dispatch.resolve("reverse_step", backend, tensors, lambda: kernel_check(tensors[0]))


def _triton_reverse_step(x_t: torch.Tensor, eps: torch.Tensor, coef: StepCoefficients, seed, step: int,
                         sample_offset, clip_x0: bool, out: torch.Tensor | None) -> torch.Tensor:
    from fastscore.kernels import reverse_step as kernel  # on first use: imports without triton
    c = (coef.sqrt_alpha_bar, coef.sqrt_one_minus_alpha_bar, coef.sqrt_alpha_bar_prev, coef.dir_coef, coef.sigma)
    return kernel.reverse_step(x_t, eps, c, seed, step, sample_offset, clip_x0=clip_x0, out=out)


def reverse_step_reference(x_t: torch.Tensor, eps: torch.Tensor, coef: StepCoefficients, *, seed: int,
                           step: int, sample_offset: int = 0, clip_x0: bool = False,
                           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Eager float32 update; ``noise`` overrides the Philox draw (for closed-form tests)."""
    a, b, a_prev, d, s = coef
    x = x_t.float()
    e = eps.float()
    x0 = (x - b * e) / a
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        e = (x - a * x0) / b
    y = a_prev * x0 + d * e
    if s > 0:
        z = noise_like(x_t, seed, step, sample_offset) if noise is None else noise.float()
        y = y + s * z
    return y.to(x_t.dtype)


def _host(v, d, m: int):
    """Member ``m``'s seed / offset as a host int (the member's own call validates it)."""
    v = member(v, d, m)
    return int(v) if isinstance(v, torch.Tensor) else v


# reverse_step under torch.func.vmap: one update per member, each keyed by its own seed and offset
_PerMember = per_member("_PerMember", lambda m, d, x_t, eps, coefficients, seed, step, sample_offset, clip_x0, backend:
                        reverse_step(member(x_t, d[0], m), member(eps, d[1], m), coefficients, seed=_host(seed, d[3], m),
                                     step=step, sample_offset=_host(sample_offset, d[5], m), clip_x0=clip_x0,
                                     backend=backend))


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, coefficients: StepCoefficients, *, seed: int | torch.Tensor,
                 step: int, sample_offset: int | torch.Tensor = 0, clip_x0: bool = False, out: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """x_{t-1} from x_t (B, ...) and eps (same shape, dtype); ``out=x_t`` updates in place.

    ``seed`` (in [0, 2**63)) and ``sample_offset`` may be 1-element int64 tensors on x_t's device:
    the Triton kernel reads them from memory, so one captured CUDA graph serves every batch.
    Under ``torch.func.vmap`` (not with ``out``) each member may have its own seed and offset.
    """
    if any(isinstance(v, torch.Tensor) and torch._C._functorch.is_batchedtensor(v)
           for v in (x_t, eps, seed, sample_offset)):
        if out is not None:
            raise ValueError("out cannot be given under vmap (an in-place update of a batched tensor)")
        return _PerMember.apply(x_t, eps, coefficients, seed, step, sample_offset, clip_x0, backend)
    coef = _check(x_t, eps, coefficients, seed, step, sample_offset, out)
    if _resolve(backend, x_t, eps) == "triton":
        return _triton_reverse_step(x_t, eps, coef, seed, step, sample_offset, clip_x0, out)
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    if isinstance(sample_offset, torch.Tensor):
        sample_offset = int(sample_offset.item())
    y = reverse_step_reference(x_t, eps, coef, seed=seed, step=step, sample_offset=sample_offset,
                               clip_x0=clip_x0)
    if out is not None:
        out.copy_(y)
        return out
    return y


def ddim_coefficients(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> StepCoefficients:
    """DDIM(eta) step coefficients from alpha_bar at t and at the previous (less noisy) step."""
    _validate.finite_float("eta", eta, minimum=0.0)
    _validate.finite_float("alpha_bar_t", alpha_bar_t, minimum=0.0, strict=True)
    _validate.finite_float("alpha_bar_prev", alpha_bar_prev)
    if not alpha_bar_t < 1.0 or not alpha_bar_t <= alpha_bar_prev <= 1.0:
        raise ValueError(f"need 0 < alpha_bar_t < 1 and alpha_bar_t <= alpha_bar_prev <= 1, "
                         f"got {alpha_bar_t}, {alpha_bar_prev}")
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * math.sqrt(1 - alpha_bar_t / alpha_bar_prev)
    d = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    return StepCoefficients(math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t), math.sqrt(alpha_bar_prev), d, sigma)
