"""Moved: the study is the package ``fastscore.study`` and the probe ``fastscore.probe``. This module
re-exports their public names for code written against ``fastscore.experiment``."""
from .probe import coordination_probe, format_probe  # noqa: F401
from .study import (  # noqa: F401
    ANALYTIC,
    LABELS,
    PAPER,
    StudyConfig,
    coordination_verdict,
    own_marginal_chance,
    pairs_sweep,
    reproduce,
    results_markdown,
    summarise,
    sweep_table,
)
