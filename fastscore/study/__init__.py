"""The study built on the library: the four score networks (and the analytic models) trained,
sampled, scored and probed; tables, figures, resumable runs, sweeps.

``reproduce(config, out)`` writes to ``out``: ``study.json`` (the config; a different config in the
same directory is refused without ``force``), ``rows/*.json`` (one finished row each, the unit of
resumption), ``checkpoints/*.safetensors``, ``samples/*.safetensors``, ``results.json`` (every
number, config, versions, device), ``results.md`` (the tables), PNG figures (with matplotlib
installed), ``invocations.json`` (wall time per invocation) and ``manifest.txt`` (every file it
wrote: all that ``force`` may remove). Every file is written atomically.

One module per job: ``config`` (``StudyConfig``), ``files`` (the directory, manifest, resumption),
``rows`` (``RunContext`` and one row), ``parallel`` (worker processes), ``report`` (pooled numbers,
markdown), ``figures``, ``run`` (``reproduce``), ``grid`` (a sweep's cells), ``sweep`` (``run_sweep``: a grid of studies over torchrun ranks; ``pairs_grid``, the grid over the number of pairs), ``creativity`` (``reproduce --study creativity``: a sweep over the number of training images, scored for copies and new consistent samples), ``halves`` (``reproduce --study halves``: networks on disjoint halves of each number of training images, sampled from the same noise: memorisation to generalisation), ``status`` (``fastscore status``: where a study or sweep stands, from its files). The coordination
probe is ``fastscore.probe``.
"""
from .config import ANALYTIC, LABELS, PAPER, StudyConfig
from .report import coordination_verdict, own_marginal_chance, results_markdown, summarise
from .rows import RunContext
from .run import Interrupted, reproduce
from .sweep import pairs_grid
from .sweep import run as run_sweep

__all__ = ["ANALYTIC", "LABELS", "PAPER", "Interrupted", "RunContext", "StudyConfig",
           "coordination_verdict", "own_marginal_chance", "pairs_grid", "reproduce",
           "results_markdown", "run_sweep", "summarise"]
