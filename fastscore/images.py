"""Real images, offline: scikit-learn's handwritten digits and user arrays, as (N, C, H, W) float32 in [-1, 1].

* ``digits()``: scikit-learn's 1,797 handwritten digits (8 x 8, one channel, 17 grey levels 0..16),
  shipped inside the scikit-learn wheel (the optional extra ``pip install "fastscore[data]"``), so
  nothing is downloaded at run time. Scaled by ``x / 8 - 1``: 0 -> -1 (background), 16 -> 1.
* ``from_array(a, value_range=...)``: any user array (N, C, H, W) (or (N, H, W), one channel),
  scaled linearly from ``value_range`` to [-1, 1] (default: (0, 255) for uint8, (0, 1) for bool and
  for floats within [0, 1], (-1, 1) for floats within [-1, 1] with a negative value).
* ``load_file(path)``: such an array from ``.npy`` or ``.safetensors`` (one tensor, or ``key=``).
* ``load_images(name)``: ``"digits"`` or a file path.

No image is resized or padded: the networks and the machines work at the images' own size (square
images only for ``ScoreNet``). scikit-image's ``lfw_subset`` faces are not offered: scikit-image is
not a dependency here, and a 25 x 25 image is odd-sized for the two-level UNets one would compare.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._validate import UsageError, UsageTypeError

DATASETS = ("digits",)
DATA_EXTRA = 'the optional extra: pip install "fastscore[data]" (scikit-learn)'


def digits(n: int | None = None) -> torch.Tensor:
    """scikit-learn's handwritten digits (n or all 1,797, in the shipped order), (n, 1, 8, 8) float32 in
    [-1, 1] (``x / 8 - 1`` of the 0..16 grey levels). ImportError naming the extra without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:                                      # pragma: no cover - depends on the install
        raise ImportError(f"the digits dataset needs scikit-learn: {DATA_EXTRA}") from e
    images = np.asarray(load_digits().images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    x = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0
    return x if n is None else x[:_check_n(n, x.shape[0])].clone()


def _check_n(n: Any, available: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"n must be a positive int, got {n!r}")
    if n > available:
        raise UsageError(f"n={n} is more than the {available} images available")
    return n


def _default_range(a: torch.Tensor) -> tuple[float, float]:
    if a.dtype == torch.uint8:
        return (0.0, 255.0)
    if a.dtype == torch.bool:
        return (0.0, 1.0)
    if a.is_floating_point():
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return (0.0, 1.0)
        if lo >= -1.0 and hi <= 1.0:
            return (-1.0, 1.0)
        raise UsageError(f"the array's values span [{lo:g}, {hi:g}], neither [0, 1] nor [-1, 1]: pass "
                         "value_range=(low, high), the values that map to -1 and 1")
    raise UsageError(f"an array of dtype {a.dtype} needs value_range=(low, high), the values that map to -1 and 1")


def from_array(a: np.ndarray | torch.Tensor, *, value_range: Sequence[float] | None = None) -> torch.Tensor:
    """Images (N, C, H, W) float32 in [-1, 1] from ``a`` (N, C, H, W) or (N, H, W) (a numpy array or a
    tensor, real numbers), mapped linearly from ``value_range = (low, high)`` (default: see the module
    docstring). ValueError for another shape, an empty array, NaN/inf, or values outside the range."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "biuf":
            raise UsageTypeError(f"the array must hold real numbers, got dtype {a.dtype}")
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, torch.Tensor):
        raise UsageTypeError(f"images must be a numpy array or a torch tensor, got {type(a).__name__}")
    if a.is_complex():
        raise UsageTypeError(f"the array must hold real numbers, got dtype {a.dtype}")
    if a.dim() == 3:
        a = a.unsqueeze(1)
    if a.dim() != 4:
        raise UsageError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(a.shape)}")
    if a.numel() == 0:
        raise UsageError(f"images must not be empty, got shape {tuple(a.shape)}")
    if a.is_floating_point() and not bool(torch.isfinite(a).all()):
        raise UsageError("images hold NaN or inf")
    if value_range is None:
        lo, hi = _default_range(a)
    else:
        if len(value_range) != 2:
            raise UsageError(f"value_range must be (low, high), got {value_range!r}")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise UsageError(f"value_range must be two finite numbers low < high, got {value_range!r}")
    x = a.detach().to(torch.float64)
    if float(x.min()) < lo or float(x.max()) > hi:
        raise UsageError(f"images span [{float(x.min()):g}, {float(x.max()):g}], outside value_range ({lo:g}, {hi:g})")
    return ((x - lo) * (2.0 / (hi - lo)) - 1.0).to(torch.float32).contiguous()


def load_file(path: str | os.PathLike, *, key: str | None = None,
              value_range: Sequence[float] | None = None) -> torch.Tensor:
    """Images from a ``.npy`` file (no pickles) or a ``.safetensors`` file (its one tensor, or the tensor
    ``key``), through ``from_array``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no image file at {p}")
    if p.suffix == ".npy":
        if key is not None:
            raise UsageError("key applies to .safetensors files, not .npy")
        arr: Any = np.load(p, allow_pickle=False)
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load
        tensors = st_load(str(p))
        if key is None:
            if len(tensors) != 1:
                raise UsageError(f"{p} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}): pass key=")
            arr = next(iter(tensors.values()))
        elif key not in tensors:
            raise UsageError(f"key {key!r} is not in {p} (it holds {', '.join(sorted(tensors))})")
        else:
            arr = tensors[key]
    else:
        raise UsageError(f"image files must be .npy or .safetensors, got {p.name}")
    return from_array(arr, value_range=value_range)


def load_images(name: str | os.PathLike, n: int | None = None) -> torch.Tensor:
    """``"digits"`` (``digits``) or a ``.npy`` / ``.safetensors`` path (``load_file``); the first ``n``
    images when given."""
    if isinstance(name, str) and name in DATASETS:
        return digits(n)
    if not isinstance(name, (str, os.PathLike)):
        raise UsageTypeError(f"name must be a dataset name ({', '.join(DATASETS)}) or a path, got {type(name).__name__}")
    p = Path(name)
    if p.suffix not in (".npy", ".safetensors"):
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)} or a .npy/.safetensors file, got {str(name)!r}")
    x = load_file(p)
    return x if n is None else x[:_check_n(n, x.shape[0])].clone()
