"""The backend rule shared by every op, and the ``backend="auto"`` table.

A caller names a *backend*: ``"auto"``, ``"triton"`` or ``"torch"``. An op runs one of three
*paths*: ``"triton"`` (our kernels), ``"sdpa"`` (torch's ``scaled_dot_product_attention`` on 4-D
inputs: torch's fastest attention, attention ops only) or ``"torch"`` (the eager reference, exact
in float64, what the tests compare against). The rule, the same for every op:

* ``"torch"``: the reference, always.
* ``"triton"``: the kernels, always; inputs the kernels cannot take (dtype, feature size), CPU
  tensors without ``TRITON_INTERPRET=1``, or a missing triton package raise TypeError / ValueError
  naming the limit. Never a silent fallback: the caller asked for the kernels.
* ``"auto"``: off CUDA, the reference. On CUDA, the path ``AUTO_ON_CUDA`` names for the op; where
  that is ``"triton"`` and the kernels cannot take the inputs, the reference.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .. import _validate

BACKENDS = ("auto", "triton", "torch")
PATHS = ("triton", "sdpa", "torch")

#: What ``backend="auto"`` runs on CUDA tensors, per op: never something slower than torch offers.
#: Measured on one H100 80GB (torch 2.11 + cu130, triton 3.6, main at 19d5887;
#: ``shared/gpu-h100/FINDINGS.md``, ``attention-vs-sdpa-h100.log``, ``bench_reverse_step-h100.log``):
#:
#: | op                 | auto on CUDA | measurement                                                     |
#: |--------------------|--------------|-----------------------------------------------------------------|
#: | softmax_attention  | sdpa         | SDPA (4-D inputs) fastest at every measured shape, 1.3-13x the  |
#: |                    |              | fused kernel; (1024, 64, 16) fp32 fwd+bwd 0.212 vs 1.131 ms     |
#: | identity_attention | sdpa         | same kernels and shapes as softmax; training step 5.6 ms with   |
#: |                    |              | torch vs 11.0 ms with the identity kernel                       |
#: | top1_attention     | torch        | training step (batch 64) 10.7 ms torch vs 47.4 ms Triton        |
#: | reverse_step       | triton       | 4096x3x32x32 fp32: 58.7 us = 2,573 GB/s, 6.5x eager             |
#:
#: Change a row only with a measurement that beats the row's current choice at the study's shapes.
AUTO_ON_CUDA: dict[str, str] = {
    "softmax_attention": "sdpa",
    "identity_attention": "sdpa",
    "top1_attention": "torch",
    "reverse_step": "triton",
}


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the triton package imports (it is absent on macOS and Windows)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton absent on macOS/Windows
        return False
    return True


def _interpreter_needs_patch() -> bool:
    """Triton's interpreter (3.6) turns kernel scalars into Python ints with ``int(ndarray of shape
    (1,))``, which NumPy >= 2.4 rejects: ``range(0, n)`` over a kernel argument then fails."""
    import numpy as np
    try:
        int(np.zeros(1, dtype=np.int32))
        return False
    except TypeError:
        return True


def patch_triton_interpreter() -> bool:
    """Make Triton's interpreter work with NumPy >= 2.4 (its ``tensor.__index__`` reads the single
    element). Applied by the ops themselves the first time a kernel launches under
    ``TRITON_INTERPRET=1`` (``prepare_launch``), never on import; call it yourself only to launch the
    kernels' launchers (``fastscore.kernels.*``) directly. Idempotent: does nothing (returns False)
    when not interpreting, when NumPy accepts the conversion, or when already applied; returns True
    when it patched."""
    if not (interpreting() and triton_available()) or not _interpreter_needs_patch():
        return False
    from triton.runtime import interpreter as interp
    if getattr(interp, "_fastscore_index_patch", False):
        return False
    original = interp._patch_lang_tensor

    def _patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patched
    interp._fastscore_index_patch = True
    return True


def prepare_launch() -> None:
    """Called before every kernel launch of an op: under ``TRITON_INTERPRET=1``, applies
    ``patch_triton_interpreter()`` (cheap once done).

    Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, not at launch, and its
    own standard library (``tl.max``, ``tl.zeros``, ...) is decorated when triton is imported. So the
    variable works when set before triton is first imported, which fastscore does only at the first
    kernel launch (``import fastscore`` and ``fastscore.ops`` do not). Set later, the kernels are JIT
    functions that cannot run on CPU tensors and re-decorating ours would not help (Triton's library
    calls would still fail): raises RuntimeError saying so."""
    if not interpreting():
        return
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(standard.zeros, InterpretedFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; Triton reads it when it "
                           "decorates kernels, its own library at import: set it before importing triton "
                           "or fastscore.kernels (e.g. in the environment)")
    patch_triton_interpreter()


def resolve(op: str, backend: str, tensors: tuple[torch.Tensor, ...],
            kernel_check: Callable[[], None]) -> str:
    """The path (``"triton"``, ``"sdpa"`` or ``"torch"``) op ``op`` runs for ``backend`` and
    ``tensors`` (module docstring). ``kernel_check()`` raises TypeError / ValueError when the
    kernels cannot take the inputs."""
    _validate.choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if backend == "auto":
        if not on_cuda:
            return "torch"
        path = AUTO_ON_CUDA[op]
        if path == "triton":
            if not triton_available():
                return "torch"
            try:
                kernel_check()
            except (TypeError, ValueError):
                return "torch"
            prepare_launch()
        return path
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if not (on_cuda or interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    kernel_check()
    prepare_launch()
    return "triton"
