"""Backend choice shared by the three ops."""
from __future__ import annotations

import os

import torch

from .. import _validate

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def patch_interpreter() -> bool:
    """Triton 3.6's interpreter turns kernel scalars into Python ints with ``int(ndarray of shape
    (1,))``, which NumPy >= 2.4 rejects, so ``range(0, n)`` over a kernel argument fails there.
    Patch ``tensor.__index__`` of the interpreter to read the single element instead. Only applied
    when interpreting and only when NumPy rejects the conversion; idempotent."""
    import numpy as np
    try:
        int(np.zeros(1, dtype=np.int32))
        return False
    except TypeError:
        pass
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
