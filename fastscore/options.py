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
import json
import re
from collections.abc import Mapping
from typing import Any

from . import _validate


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


def build(cls: type, config: Any, **values: Any) -> Any:
    """``cls`` built from ``config``'s fields declared with ``inherit(cls, ...)`` (``values`` added or
    overriding). A ValueError or TypeError from ``cls``'s checks becomes a ``UsageError`` that names
    the setting as ``config`` declares it (the study's ``train_steps``, not ``TrainConfig``'s ``steps``)."""
    own = {f.metadata["source"][1]: f.name for f in dataclasses.fields(config)
           if f.metadata.get("source", (None,))[0] is cls}
    try:
        return cls(**{**values_for(config, cls), **values})
    except (ValueError, TypeError) as e:
        msg = str(e)
        m = re.match(r"[A-Za-z_]\w*", msg)
        if m and m[0] in own:
            msg = own[m[0]] + msg[m.end():]
        raise _validate.usage(e, msg) from None


def _json(v: Any) -> Any:
    return json.loads(json.dumps(v))


def matches(stored: Mapping[str, Any], config: Any) -> bool:
    """Whether ``stored`` (a configuration dataclass saved as JSON: a study.json, a results.json's
    config) describes ``config``: every stored setting equals the current value, and every setting
    missing from it has its default value now. So a setting added with a default never makes a study,
    a row or a sweep cell written before it look unfinished. A stored setting ``config`` does not have
    never matches."""
    now = _json(dataclasses.asdict(config))
    if not set(stored) <= set(now):
        return False
    for f in dataclasses.fields(config):
        if f.name in stored:
            if stored[f.name] != now[f.name]:
                return False
        elif f.default is dataclasses.MISSING or _json(f.default) != now[f.name]:
            return False
    return True
