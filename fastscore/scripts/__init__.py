"""Research scripts built on the library, run from a source checkout as ``python -m fastscore.scripts.NAME``
(each has ``--help`` and does nothing on import): ``coordination_search``, ``key_readout``,
``value_shuffle_control``, ``theory_compare``, ``make_dataset_figure``, ``creativity_groundwork``.
Scripts that write into ``docs/`` find it beside the package (a source checkout)."""
