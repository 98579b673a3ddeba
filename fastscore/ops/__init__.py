"""The three fused ops, one file each: contract, torch reference, Triton custom op, dispatch.

Every op takes ``backend``: ``"torch"`` runs the eager reference, ``"triton"`` the kernels (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``; inputs they cannot take raise), ``"auto"``
the fastest measured path on CUDA (``AUTO_ON_CUDA``: SDPA for softmax/identity attention, the
torch path for top-1, the kernel for the reverse step) and the reference elsewhere.
``resolve_backend`` says which path a call would take. Importing this package changes nothing
in Triton (nor imports it); under ``TRITON_INTERPRET=1`` the first kernel launch applies the
interpreter's fix (``patch_triton_interpreter``) itself.
"""
from __future__ import annotations

import torch

from . import attention as _attention
from . import reverse_step as _reverse_step
from . import top1 as _top1
from ._dispatch import AUTO_ON_CUDA, BACKENDS, PATHS, patch_triton_interpreter
from .attention import identity_attention, softmax_attention, softmax_attention_reference, softmax_attention_sdpa
from .attention_block import attention_block, attention_block_reference
from .reverse_step import StepCoefficients, ddim_coefficients, noise_like, reverse_step, reverse_step_reference
from .top1 import top1_attention, top1_attention_reference

OPS = ("softmax_attention", "identity_attention", "top1_attention", "reverse_step")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """The path (``"triton"``, ``"sdpa"`` or ``"torch"``) that op ``op`` (one of ``OPS``) takes for
    ``backend`` and its input tensors, in the op's argument order: ``(q, k, v)`` for softmax and
    top-1 attention, ``(z,)`` for identity attention, ``(x_t,)`` or ``(x_t, eps)`` for the reverse
    step. Raises what the op would raise for ``backend="triton"`` on inputs the kernels cannot take."""
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    want = {"identity_attention": 1, "reverse_step": (1, 2)}.get(op, 3)
    if len(tensors) not in (want if isinstance(want, tuple) else (want,)) or \
            not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"resolve_backend(op={op!r}) takes the op's input tensors, got {len(tensors)} arguments")
    if op == "reverse_step":
        return _reverse_step._resolve(backend, *tensors)
    q, k, v = tensors if len(tensors) == 3 else tensors * 3
    if op == "top1_attention":
        return _top1._resolve(backend, q, k, v)
    return _attention._resolve(backend, q, k, v, op)


__all__ = ["attention_block", "attention_block_reference", "softmax_attention", "identity_attention", "softmax_attention_reference", "softmax_attention_sdpa",
           "top1_attention", "top1_attention_reference", "reverse_step", "reverse_step_reference",
           "StepCoefficients", "ddim_coefficients", "noise_like", "resolve_backend", "patch_triton_interpreter",
           "BACKENDS", "PATHS", "AUTO_ON_CUDA", "OPS"]
