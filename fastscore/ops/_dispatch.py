"""Backend choice shared by the three ops."""
from __future__ import annotations

import os

import torch

from .. import _validate

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton absent on macOS/Windows
        return False
    return True


def resolve(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``backend`` and the tensors' device.

    ``"auto"``: Triton on CUDA tensors (when triton imports), the torch reference elsewhere.
    ``"triton"``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; else ValueError.
    """
    _validate.choice("backend", backend, BACKENDS)
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if not (on_cuda or interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return "triton"
