"""fastscore: fast experiments on creativity in diffusion models."""
from . import ops

__version__ = "0.1.0"
