"""The three fused ops: each has one contract, a torch reference, and a Triton path.

``backend="auto"`` runs Triton on CUDA tensors and the reference elsewhere; ``"triton"`` and
``"torch"`` force a path (``"triton"`` on CPU needs ``TRITON_INTERPRET=1``).
"""
from . import _dispatch

if _dispatch.interpreting() and _dispatch.triton_available():
    _dispatch.patch_interpreter()

from .attention import identity_attention, softmax_attention, softmax_attention_reference
from .reverse_step import StepCoefficients, ddim_coefficients, noise_like, reverse_step, reverse_step_reference
from .top1 import top1_attention

__all__ = ["softmax_attention", "identity_attention", "softmax_attention_reference", "top1_attention",
           "reverse_step", "reverse_step_reference", "StepCoefficients", "ddim_coefficients", "noise_like"]
