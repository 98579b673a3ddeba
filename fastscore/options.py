"""One declaration per setting: dataclass fields that carry their help text.

A configuration dataclass (``ModelConfig``, ``TrainConfig``, ``KVConfig``, ``StudyConfig``) declares
each setting once, as ``name: type = option(default, "help")``. The API (the dataclass itself), the
command-line options (``fastscore.cli`` generates them from the fields) and the saved metadata
(``to_dict`` of the dataclass, stored in checkpoints and ``study.json``) all read that one field.
``inherit`` lets a larger configuration (the study) reuse a component's declaration, with its own
default where the study's recipe differs.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, *, cli: str | None = None, group: str | None = None, **meta: Any) -> Any:
    """A dataclass field with ``default`` and ``help``; ``cli`` names its command-line option (e.g.
    ``"--pairs"``; None: no option), ``group`` the option group. Extra keywords go into the metadata."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli, "group": group, **meta})


def inherit(cls: type, name: str, *, default: Any = dataclasses.MISSING, help: str | None = None,
            cli: str | None = None, group: str | None = None) -> Any:
    """A field that re-declares ``cls.name`` (same help, same default unless ``default`` is given) and
    records where it comes from (``metadata["source"] = (cls, name)``), so ``values_for`` can build
    ``cls`` from it by name."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise AttributeError(f"{cls.__name__} has no field {name!r}")
    return option(f.default if default is dataclasses.MISSING else default, help or f.metadata.get("help", ""),
                  cli=cli, group=group, source=(cls, name))


def help_of(cls: type, name: str) -> str:
    """The help text declared for field ``name`` of dataclass ``cls``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def values_for(config: Any, cls: type) -> dict[str, Any]:
    """``{cls field name: value}`` for every field of ``config`` declared with ``inherit(cls, ...)``."""
    return {f.metadata["source"][1]: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("source", (None,))[0] is cls}
