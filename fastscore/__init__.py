"""fastscore: fast experiments on creativity in diffusion models.

Data flows one way: ``data -> training -> sampling -> metrics``; ``models`` and ``sampling``
call ``ops``; ``ops`` calls the Triton kernels (``fastscore.kernels``) or the torch reference.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .checkpoint import load_model, save_model  # noqa: E402
from .data import KVConfig, decode, generate, make_dataset, render  # noqa: E402
from .metrics import analytic_random_consistency, score  # noqa: E402
from .models import ScoreNet  # noqa: E402
from .sampling import sample  # noqa: E402
from .schedule import make_schedule  # noqa: E402
from .training import TrainConfig, train  # noqa: E402

__all__ = ["ops", "KVConfig", "generate", "render", "decode", "make_dataset", "ScoreNet", "make_schedule",
           "TrainConfig", "train", "sample", "score", "analytic_random_consistency", "save_model", "load_model"]
