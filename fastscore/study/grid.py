"""A sweep's grid: study settings crossed into cells, read from a TOML file or from CLI lists.

A grid is ``base`` settings shared by every cell and ``axes``, each a study setting with a list of
values; the cells are the Cartesian product of the axes, in the order the axes are given (the last
axis varies fastest). Settings are the fields of the study configuration (``n_pairs``, ``n_colours``,
``n_train``, ``width``, ``lr``, ``t_focus``, ``networks``, ...), checked by name and converted to the
field's type, so a typo fails before any work. A TOML file looks like::

    preset = "quick"                      # optional: "full" (default), "quick" or "tiny"
    [base]
    networks = ["none", "softmax"]
    n_seeds = 2
    [grid]
    n_train = [8, 64, 512, 5000]
    lr = [1e-3, 2e-3]
    [[cell]]                              # optional: settings of the cells whose axis values match
                                          # (over [base]'s)
    where = {n_train = 5000}
    set = {n_samples = 2000}

On the command line the same is ``--set networks=none,softmax --set n_seeds=2 --grid n_train=8,64,512,5000
--grid lr=1e-3,2e-3`` (``[[cell]]`` rules are TOML-only; ``reproduce --pairs-sweep`` builds them: a
larger image where the pairs do not fit). A cell's name lists its axis values (``n_train=8,lr=0.001``); its directory
name is the same with filesystem-safe separators, so a rerun finds the same cell again.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._validate import UsageError, UsageTypeError, usage
from .config import PRESETS


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its axis values (``point``) and every setting it overrides (``settings``)."""
    point: tuple[tuple[str, Any], ...]
    settings: Mapping[str, Any] = field(hash=False)

    @property
    def name(self) -> str:
        return ",".join(f"{k}={_show(v)}" for k, v in self.point) or "base"

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", self.name.replace(",", "__"))


@dataclass(frozen=True)
class Grid:
    """``base`` settings, ``axes`` (setting -> values, in order), the study ``preset`` they start from,
    and ``rules``: ``(where, settings)`` pairs that give ``settings`` to every cell whose axis values
    include all of ``where``."""
    base: Mapping[str, Any] = field(default_factory=dict)
    axes: Mapping[str, tuple] = field(default_factory=dict)
    preset: str = "full"
    rules: tuple[tuple[Mapping[str, Any], Mapping[str, Any]], ...] = ()

    def cells(self) -> list[Cell]:
        names = list(self.axes)
        out = []
        for values in itertools.product(*(self.axes[n] for n in names)):
            point = tuple(zip(names, values))
            settings = {**self.base, **dict(point)}
            for where, extra in self.rules:
                if all(settings.get(k) == v for k, v in where.items()):
                    settings.update(extra)
            out.append(Cell(point, settings))
        return out

    @property
    def columns(self) -> list[str]:
        """The settings that differ between cells: the axes, then those the rules set."""
        return list(dict.fromkeys([*self.axes, *(k for _, extra in self.rules for k in extra)]))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"preset": self.preset, "base": dict(self.base), "grid": {k: list(v) for k, v in self.axes.items()}}
        if self.rules:   # absent without rules, so a grid saved before rules existed reads back the same
            d["cell"] = [{"where": dict(w), "set": dict(e)} for w, e in self.rules]
        return d


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "+".join(_show(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _convert(config_cls: type, name: str, value: Any) -> Any:
    """``value`` (a TOML value or a CLI string) as the type of ``config_cls``'s field ``name``."""
    fields = _fields(config_cls)
    if name not in fields:
        raise UsageError(f"unknown study setting {name!r}; expected one of {sorted(fields)}")
    default = getattr(config_cls(), name)
    optional = "None" in str(fields[name].type)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
        return None
    if isinstance(value, str) and not isinstance(default, str):
        value = _from_text(name, value, default)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageTypeError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageTypeError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageTypeError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            return (value,)
        return tuple(value)
    return value


def _from_text(name: str, text: str, default: Any) -> Any:
    """A CLI string for a field whose default is ``default``: ``true``/``false``, numbers, ``a+b`` tuples."""
    t = text.strip()
    if isinstance(default, bool):
        if t.lower() in ("true", "1", "yes", "on"):
            return True
        if t.lower() in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"{name} must be true or false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(t)
        except ValueError:
            raise UsageError(f"{name} must be an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(t)
        except ValueError:
            raise UsageError(f"{name} must be a number, got {text!r}") from None
    if isinstance(default, tuple):
        parts = [p for p in t.split("+") if p]
        sample = default[0] if isinstance(default, tuple) and default else 0
        return tuple(_from_text(name, p, sample) if not isinstance(sample, str) else p for p in parts)
    return t


def _split_assignment(option: str, text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UsageError(f"{option} expects NAME=VALUE[,VALUE...], got {text!r}")
    name, _, values = text.partition("=")
    return name.strip().replace("-", "_"), values


def from_cli(config_cls: type, sets: Sequence[str] = (), grids: Sequence[str] = (), preset: str = "full") -> Grid:
    """A grid from ``--set NAME=VALUE`` (lists of a tuple field: ``a,b``) and ``--grid NAME=V1,V2,...``.

    In ``--grid``, a tuple setting's values are separated by commas and each value's items by ``+``
    (``--grid t_focus=50+400,none``)."""
    base: dict[str, Any] = {}
    for s in sets:
        name, values = _split_assignment("--set", s)
        default = getattr(config_cls(), name, None) if name in _fields(config_cls) else None
        text = values.replace(",", "+") if isinstance(default, tuple) else values
        base[name] = _convert(config_cls, name, text)
    axes: dict[str, tuple] = {}
    for g in grids:
        name, values = _split_assignment("--grid", g)
        if name in axes:
            raise UsageError(f"--grid {name} given twice")
        axes[name] = tuple(_convert(config_cls, name, v) for v in values.split(",") if v.strip())
        if not axes[name]:
            raise UsageError(f"--grid {name} has no values")
    return _checked(config_cls, Grid(base, axes, preset))


def from_toml(config_cls: type, path: str | Path) -> Grid:
    """A grid from a TOML file (see the module docstring). Needs Python >= 3.11 (``tomllib``) or the
    ``tomli`` package."""
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]  # Python >= 3.11; mypy targets 3.10
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ModuleNotFoundError:
            raise ModuleNotFoundError("reading a sweep file needs Python >= 3.11 or `pip install tomli`; "
                                      "or give the grid as --grid/--set options") from None
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    return from_doc(config_cls, doc, str(path))


def from_doc(config_cls: type, doc: Mapping[str, Any], source: str = "grid") -> Grid:
    """A grid from its document: the TOML file's tables as a dict, or ``Grid.to_dict()``'s (a sweep's
    ``sweep.json`` holds it); ``source`` names it in errors."""
    try:
        return _from_doc(config_cls, doc, source)
    except UsageError as e:
        msg = str(e)
        raise usage(e, msg if msg.startswith(source) else f"{source}: {msg}") from None


def _from_doc(config_cls: type, doc: Mapping[str, Any], source: str) -> Grid:
    def table(v: Any, what: str) -> Mapping[str, Any]:
        if not isinstance(v, Mapping):
            raise UsageError(f"{source}: {what} must be a table of settings, got {v!r}")
        return v

    table(doc, "the grid document")
    unknown = set(doc) - {"preset", "base", "grid", "cell"}
    if unknown:
        raise UsageError(f"{source}: unknown top-level keys {sorted(unknown)}; expected preset, [base], [grid], "
                         "[[cell]]")
    base = {k: _convert(config_cls, k, v) for k, v in table(doc.get("base", {}), "base").items()}
    axes = {}
    for k, vs in table(doc.get("grid", {}), "grid").items():
        if not isinstance(vs, list) or not vs:
            raise UsageError(f"{source}: grid.{k} must be a non-empty list, got {vs!r}")
        axes[k] = tuple(_convert(config_cls, k, v) for v in vs)
    rules = []
    cell_rules = doc.get("cell", [])
    if not isinstance(cell_rules, list):
        raise UsageError(f"{source}: cell must be a list of [[cell]] rules, got {cell_rules!r}")
    for rule in cell_rules:
        if not isinstance(rule, dict) or set(rule) != {"where", "set"}:
            raise UsageError(f"{source}: each [[cell]] must hold exactly where = {{...}} and set = {{...}}, got {rule!r}")
        rules.append(({k: _convert(config_cls, k, v) for k, v in table(rule["where"], "a rule's where").items()},
                      {k: _convert(config_cls, k, v) for k, v in table(rule["set"], "a rule's set").items()}))
    return _checked(config_cls, Grid(base, axes, doc.get("preset", "full"), tuple(rules)))


def _checked(config_cls: type, grid: Grid) -> Grid:
    if grid.preset not in PRESETS:
        raise UsageError(f"preset must be one of {list(PRESETS)}, got {grid.preset!r}")
    both = set(grid.base) & set(grid.axes)
    if both:
        raise UsageError(f"settings both fixed and swept: {sorted(both)}")
    for where, extra in grid.rules:
        if not set(where) <= set(grid.axes):
            raise UsageError(f"a cell rule's where names settings that are not swept: {sorted(set(where) - set(grid.axes))}")
        if set(extra) & set(grid.axes):      # a base setting it may override: the rule is the more specific
            raise UsageError(f"a cell rule sets swept settings: {sorted(set(extra) & set(grid.axes))}")
    return grid
