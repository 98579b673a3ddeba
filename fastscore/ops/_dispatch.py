"""The backend rule shared by every op, and the ``backend="auto"`` table.

A caller names a *backend*: ``"auto"``, ``"triton"`` or ``"torch"``. An op runs one of three
*paths*: ``"triton"`` (our kernels), ``"sdpa"`` (torch's ``scaled_dot_product_attention`` on 4-D
inputs: torch's fastest attention, attention ops only) or ``"torch"`` (the eager reference, exact
in float64, what the tests compare against). The rule, the same for every op:

* ``"torch"``: the reference, always.
* ``"triton"``: the kernels, always; inputs the kernels cannot take (dtype, feature size), CPU
  tensors without ``TRITON_INTERPRET=1``, or a missing triton package raise TypeError / ValueError
  naming the limit. Never a silent fallback: the caller asked for the kernels.
* ``"auto"``: off CUDA, the reference. On CUDA, the path the measured table (``auto_path``,
  ``dispatch_table.json``) names for the op, GPU, dtype and shape; where that is ``"triton"`` and
  the kernels cannot take the inputs, the reference.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import _validate

BACKENDS = ("auto", "triton", "torch")
PATHS = ("triton", "sdpa", "torch")

#: The ``backend="auto"`` table: ``dispatch_table.json`` beside this file, shipped in the package.
#: Each row maps (op, device class, dtype, shape bucket) to a path; ``"*"`` matches anything. Rows
#: come from a GPU check's measurements (``benchmarks/gpu_check.py``, then
#: ``benchmarks/make_dispatch_table.py DIR``), never typed by hand; the ``"*"`` rows are the fallback
#: for GPUs never measured, each naming its source.
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
#: N (sequence length) bucket edges of the attention ops, numel edges of the reverse step
BUCKET_EDGES: dict[str, tuple[str, tuple[int, ...]]] = {
    "softmax_attention": ("N", (64, 256)), "identity_attention": ("N", (64, 256)),
    "top1_attention": ("N", (64, 256)), "reverse_step": ("numel", (1 << 20,)),
    "attention_block": ("N", (64, 256)),
}


def shape_bucket(op: str, shape: Sequence[int]) -> str:
    """The table's shape bucket of op ``op`` for its first input's shape: ``"N<=64"``, ``"N<=256"``,
    ``"N>256"`` for attention (``(B, N, D)``; the block's ``z`` (..., C, H, W): N = H * W), ``"numel<=1048576"`` / ``"numel>1048576"`` for the
    reverse step."""
    name, edges = BUCKET_EDGES[op]
    if name == "numel":
        size = math.prod(shape)
    elif op == "attention_block":   # z is (B, C, H, W) or (M, B, C, H, W): N = H * W
        size = int(shape[-1]) * int(shape[-2])
    else:
        size = int(shape[1])
    for edge in edges:
        if size <= edge:
            return f"{name}<={edge}"
    return f"{name}>{edges[-1]}"


def device_class(name: str) -> str:
    """A GPU's class in the table from its name: ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``."""
    name = name.strip()
    name = name.removeprefix("NVIDIA ")
    return re.split(r"[\s-]", name, maxsplit=1)[0] or "*"


@functools.cache
def load_table(path: str = str(TABLE_PATH)) -> dict[tuple[str, str, str, str], str]:
    """The table as ``{(op, device_class, dtype, bucket): path}``; raises ValueError naming the file
    and the row when a row is malformed or names an unknown op or path."""
    rows = json.loads(Path(path).read_text())["rows"]
    table = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or r.get("path") not in PATHS or r.get("op") not in BUCKET_EDGES or \
                not all(isinstance(r.get(f), str) for f in ("device_class", "dtype", "bucket")):
            raise ValueError(f"{path}: row {i} must name an op of {sorted(BUCKET_EDGES)}, a path of {list(PATHS)} "
                             f"and device_class, dtype, bucket strings, got {r!r}")
        table[(r["op"], r["device_class"], r["dtype"], r["bucket"])] = r["path"]
    for op in BUCKET_EDGES:
        if (op, "*", "*", "*") not in table:
            raise ValueError(f"{path}: no fallback row (device_class, dtype, bucket all '*') for op {op!r}")
    return table


@functools.cache
def _device_classes(index: int) -> tuple[str, ...]:
    major, minor = torch.cuda.get_device_capability(index)
    return device_class(torch.cuda.get_device_name(index)), f"sm_{major}{minor}"


def auto_path(op: str, tensors: tuple[torch.Tensor, ...]) -> str:
    """The table's path for op ``op`` on CUDA ``tensors``: the most specific row that matches, device
    class first (the name's class, then ``sm_XY``), then dtype, then shape bucket; else the fallback."""
    table = load_table()
    t = tensors[0] if tensors else None
    classes: tuple[str, ...] = ("*",)
    dtypes: tuple[str, ...] = ("*",)
    buckets: tuple[str, ...] = ("*",)
    if isinstance(t, torch.Tensor):
        if t.is_cuda:
            classes = (*_device_classes(t.device.index if t.device.index is not None else
                                        torch.cuda.current_device()), "*")
        dtypes = (str(t.dtype).removeprefix("torch."), "*")
        if t.dim() >= (3 if op != "reverse_step" else 1):
            buckets = (shape_bucket(op, tuple(t.shape)), "*")
    for c in classes:
        for d in dtypes:
            for b in buckets:
                path = table.get((op, c, d, b))
                if path is not None:
                    return path
    return table[(op, "*", "*", "*")]


#: What ``backend="auto"`` runs on CUDA on a GPU the table has no row for (its fallback rows).
AUTO_ON_CUDA: dict[str, str] = {op: load_table()[(op, "*", "*", "*")] for op in BUCKET_EDGES}


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
        path = auto_path(op, tensors)
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
