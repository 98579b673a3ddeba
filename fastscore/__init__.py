"""fastscore: fast experiments on creativity in diffusion models.

Data flows one way: ``data -> training -> sampling -> metrics``; ``models`` and ``sampling``
call ``ops``; ``ops`` calls the Triton kernels (``fastscore.kernels``) or the torch reference.

The names below load on first use (PEP 562), so ``import fastscore`` is instant and the command
line can catch a Ctrl-C that arrives while torch is still importing.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {"ops": ".ops", "load_model": ".checkpoint", "save_model": ".checkpoint", "KVConfig": ".data",
         "decode": ".data", "generate": ".data", "make_dataset": ".data", "render": ".data",
         "analytic_random_consistency": ".metrics", "score": ".metrics", "ScoreNet": ".models",
         "sample": ".sampling", "make_schedule": ".schedule", "TrainConfig": ".training", "train": ".training",
         "UsageError": "._validate"}

__all__ = ["ops", "KVConfig", "generate", "render", "decode", "make_dataset", "ScoreNet", "make_schedule",
           "TrainConfig", "train", "sample", "score", "analytic_random_consistency", "save_model", "load_model",
           "UsageError"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastscore' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


if TYPE_CHECKING:  # the names for type checkers and IDEs
    from . import ops
    from ._validate import UsageError
    from .checkpoint import load_model, save_model
    from .data import KVConfig, decode, generate, make_dataset, render
    from .metrics import analytic_random_consistency, score
    from .models import ScoreNet
    from .sampling import sample
    from .schedule import make_schedule
    from .training import TrainConfig, train
