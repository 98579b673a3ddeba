"""Argument checks shared by the public API. Each raises before any work starts.

Every check raises ``UsageError`` (a ValueError; ``UsageTypeError`` is also a TypeError): bad input
from the caller. The command line reports exactly these as one line (exit 2); any other exception
is a bug in the library and keeps its traceback."""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch


class UsageError(ValueError):
    """Bad input from the caller (a value, a setting, a file it named), found before any work."""


class UsageTypeError(UsageError, TypeError):
    """A ``UsageError`` about an argument's type (also a TypeError)."""


def usage(error: Exception, message: str | None = None) -> UsageError:
    """``error`` (a ValueError or TypeError about the caller's input) as a usage error of the same
    kind, with ``message`` (default: its own)."""
    cls = UsageTypeError if isinstance(error, TypeError) else UsageError
    return cls(str(error) if message is None else message)


def tensor(name: str, x: Any, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """Check that ``x`` is a tensor (of ``ndim`` dims, floating point when asked)."""
    if not isinstance(x, torch.Tensor):
        raise UsageTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise UsageError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise UsageTypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def same(names: Sequence[str], xs: Sequence[torch.Tensor], *, dtype: bool = True, device: bool = True) -> None:
    """Check that tensors share dtype and device."""
    for n, x in zip(names[1:], xs[1:]):
        if device and x.device != xs[0].device:
            raise UsageError(f"{n} is on {x.device} but {names[0]} is on {xs[0].device}")
        if dtype and x.dtype != xs[0].dtype:
            raise UsageTypeError(f"{n} has dtype {x.dtype} but {names[0]} has dtype {xs[0].dtype}")


def positive_int(name: str, x: Any, *, minimum: int = 1) -> int:
    """Check that ``x`` is an int (not bool) of at least ``minimum``."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise UsageTypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {x}")
    return x


def distinct_sizes(name: str, xs: Any) -> tuple[int, ...]:
    """Check that ``xs`` is a non-empty sequence of distinct ints >= 1 (numbers of training images);
    returns them as a tuple."""
    sizes = tuple(positive_int(name, x) for x in xs)
    if not sizes or len(set(sizes)) != len(sizes):
        raise UsageError(f"{name} must be distinct numbers of training images, got {sizes}")
    return sizes


def finite_float(name: str, x: Any, *, minimum: float | None = None, strict: bool = False) -> float:
    """Check that ``x`` is a finite real number (>= or > ``minimum`` when given)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UsageTypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise UsageError(f"{name} must be finite, got {x}")
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise UsageError(f"{name} must be {'>' if strict else '>='} {minimum}, got {x}")
    return x


def choice(name: str, x: Any, options: Collection[str]) -> str:
    """Check that ``x`` is one of ``options`` (a sequence, or a mapping's keys)."""
    if x not in options:
        raise UsageError(f"{name} must be one of {list(options)}, got {x!r}")
    return x


def seed(name: str, x: Any) -> int:
    """Check that ``x`` is an int seed in [0, 2**63)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise UsageTypeError(f"{name} must be an int, got {type(x).__name__}")
    if not 0 <= x < 2**63:
        raise UsageError(f"{name} must be in [0, 2**63), got {x}")
    return x


def device(name: str, x: Any) -> torch.device:
    """A ``torch.device`` this torch can use: ValueError for an unknown device string or a CUDA/MPS
    device that this build or machine does not have (checked before any work)."""
    try:
        d = torch.device(x)
    except (RuntimeError, TypeError):
        raise UsageError(f"{name} must be a torch device such as cpu, cuda or cuda:0, got {x!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"{name} {x!r} is not available: {why} (torch {torch.__version__}); use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"{name} {x!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{name} {x!r} is not available on this machine; use cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{name} must be cpu, cuda or mps, got {x!r}")
    return d
