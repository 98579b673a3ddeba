"""Where a run stands (``fastscore status DIR``): a study's rows, or a sweep's cells (``fastscore sweep``,
``reproduce --study creativity`` / ``halves``) and their studies' rows, read from the files alone.

It reads ``study.json``, ``sweep.json``, ``rows/``, ``results.json`` and the headers of the files in
``checkpoints/`` (never their tensors), and writes nothing, so it is safe beside the run itself. A row is
``finished`` (its ``rows/<row>.json`` is saved), ``trained`` (its checkpoint is saved: sampling and scoring
are left), ``training`` (a ``.partial`` training state covers it: its step and its rate so far) or ``to start``.
A row in training shows as ``to start`` until its first saved state (``rows.SAVE_EVERY`` steps), and the
analytic rows (ideal score, ELS machine) until they finish: they save nothing before.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .._validate import UsageError
from ..checkpoint import read_meta
from ..training import STATE_KIND
from .config import StudyConfig
from .files import StudyDir, read_study_json, row_name
from .sweep import cell_config, finished_cell, read_grid

PARTIAL = ".partial.safetensors"


def status(path: str | Path) -> dict[str, Any]:
    """The state of the study or sweep in directory ``path`` (see the module docstring): a JSON-ready
    document, ``{"kind": "study", ...}`` or ``{"kind": "sweep", ...}``. UsageError if ``path`` holds neither."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; give the --out directory of a study or sweep")
    if (path / "sweep.json").exists():
        return _sweep(path)
    if (path / "study.json").exists():
        return _study(path)
    inside = sorted(d.name for d in path.iterdir() if (d / "study.json").exists() or (d / "sweep.json").exists())
    hint = f"; these directories in it are: {', '.join(inside)}" if inside else ""
    raise UsageError(f"{path} holds no fastscore study or sweep (no study.json or sweep.json); give the --out "
                     f"directory of one{hint}")


def _sweep(path: Path) -> dict[str, Any]:
    grid = read_grid(path)
    cells: list[dict[str, Any]] = []
    for c in grid.cells():
        where = path / "cells" / c.dirname
        if finished_cell(where, cell_config(grid, c)) is not None:
            cells.append({"name": c.name, "state": "finished"})
        elif (where / "study.json").exists():
            if not cell_config(grid, c).matches(read_study_json(where / "study.json")):
                cells.append({"name": c.name, "state": "another config (a rerun refuses it without --force)"})
                continue
            cells.append({"name": c.name, "state": "started", "study": _study(where)})
        else:
            cells.append({"name": c.name, "state": "to start"})
    return {"kind": "sweep", "path": str(path), "cells": cells, "tables": (path / "sweep.md").exists()}


def _study(path: Path) -> dict[str, Any]:
    config = StudyConfig.from_dict(read_study_json(path / "study.json"))
    sd = StudyDir(path)
    ckpt = path / "checkpoints"
    partials = {p.name[:-len(PARTIAL)]: _partial(p) for p in sorted(ckpt.glob("*" + PARTIAL))}
    rows: list[dict[str, Any]] = []
    for net, seed in config.jobs():
        name = row_name(net, seed)
        halves = [ckpt / f"{row_name(f'{net}-{h}', seed)}.safetensors" for h in "ab"]
        training = [dict(p, file=stem) for stem, p in partials.items() if _covers(stem, net, seed)]
        if sd.row_path(net, seed).exists():
            rows.append({"name": name, "state": "finished", "consistent_among_valid": _rate(sd.row_path(net, seed))})
        elif sd.checkpoint(net, seed).exists() or all(h.exists() for h in halves):
            rows.append({"name": name, "state": "trained"})   # a checkpoint is never retrained: a partial beside it is stale
        elif training or any(h.exists() for h in halves):
            rows.append({"name": name, "state": "training", "partials": training})
        else:
            rows.append({"name": name, "state": "to start"})
    return {"kind": "study", "path": str(path), "n_colours": config.n_colours, "train_steps": config.train_steps,
            "precision": config.precision, "rows": rows, "results": finished_cell(path, config) is not None}


def _rate(path: Path) -> float | None:
    """A finished row's consistency among valid samples (None: a row without it, e.g. a halves pair)."""
    try:
        r = json.loads(path.read_text())["rates"]["consistent_among_valid"]
        return float(r["rate"]) if r["n"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _covers(stem: str, net: str, seed: int) -> bool:
    """Does the partial training state ``stem`` train row (net, seed)? ``<net>-seed<s>``, a halves study's
    ``<net>-a-seed<s>`` / ``<net>-b-seed<s>``, grouped seeds' ``<net>-seeds<s1>-<s2>-...``."""
    if stem in (row_name(net, seed), row_name(f"{net}-a", seed), row_name(f"{net}-b", seed)):
        return True
    m = re.fullmatch(re.escape(net) + r"-seeds([0-9]+(?:-[0-9]+)*)", stem)
    return m is not None and str(seed) in m.group(1).split("-")


def _partial(p: Path) -> dict[str, Any]:
    """A training state's step, total steps, training seconds so far and rate (steps per second of training)."""
    try:
        meta = read_meta(p, STATE_KIND)
    except (ValueError, OSError) as e:   # corrupt, or removed since the listing (its row just finished training)
        return {"error": str(e)}
    step, seconds, configs = meta.get("step"), meta.get("seconds") or 0.0, meta.get("configs")
    steps = configs[0].get("steps") if isinstance(configs, list) and configs and isinstance(configs[0], dict) else None
    if not (isinstance(step, int) and isinstance(steps, int) and steps > 0 and isinstance(seconds, (int, float))):
        return {"error": "an incomplete training state (no step, steps or seconds)"}
    rate = step / seconds if seconds > 0 else None
    left = (steps - step) / rate if rate else None
    return {"step": step, "steps": steps, "seconds": float(seconds), "steps_per_second": rate, "seconds_left": left}


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


def text(doc: dict[str, Any], indent: str = "", title: str | None = None) -> str:
    """``status``'s document as the lines ``fastscore status`` prints (``title``: the first line's
    name, default the directory)."""
    if doc["kind"] == "sweep":
        count = {s: sum(c["state"] == s for c in doc["cells"]) for s in ("finished", "started", "to start")}
        count["with another config"] = len(doc["cells"]) - sum(count.values())
        lines = [f"{indent}{doc['path']}: sweep of {len(doc['cells'])} cells: "
                 + ", ".join(f"{n} {s}" for s, n in count.items() if n)
                 + ("; tables written" if doc["tables"] else "; tables not yet written")]
        for c in doc["cells"]:
            if c["state"] == "started":
                lines.append(text(c["study"], indent + "  ", f"cell {c['name']}: started"))
            else:
                lines.append(f"{indent}  cell {c['name']}: {c['state']}")
        return "\n".join(lines)
    rows = doc["rows"]
    head = (f"{indent}{title or doc['path'] + ': study'}, {doc['n_colours']} colours, {doc['train_steps']:,} training steps "
            f"({doc['precision']}), {len(rows)} rows; "
            + ("results written" if doc["results"] else "results not yet written"))
    lines = [head]
    for state, note in (("finished", ""), ("trained", " (checkpoints saved; sampling and scoring left)"),
                        ("training", ""), ("to start", "")):
        names = [r for r in rows if r["state"] == state]
        if not names:
            continue
        if state == "finished":
            rates = [r["consistent_among_valid"] for r in names]
            listed = ", ".join(r["name"] + ("" if x is None else f" {100 * x:.1f}%") for r, x in zip(names, rates))
            note = " (consistent among valid)" if any(x is not None for x in rates) else ""
            lines.append(f"{indent}  finished {len(names)}: {listed}{note}")
            continue
        if state != "training":
            lines.append(f"{indent}  {state} {len(names)}: {', '.join(r['name'] for r in names)}{note}")
            continue
        lines.append(f"{indent}  training {len(names)}:")
        for r in names:
            for p in r["partials"] or [{"file": r["name"] + " (one half saved)"}]:
                if "error" in p:
                    lines.append(f"{indent}    {p['file']}: unreadable ({p['error']})")
                elif "step" not in p:       # one half's checkpoint saved, the other's training not yet saved
                    lines.append(f"{indent}    {p['file']}")
                else:
                    rate = p["steps_per_second"]
                    more = "" if rate is None else (f", {rate:.1f} steps/s so far, ~{_duration(p['seconds_left'])} "
                                                    "more at that rate")
                    lines.append(f"{indent}    {p['file']}: step {p['step']:,} of {p['steps']:,} "
                                 f"({100 * p['step'] / p['steps']:.1f}%){more}")
    return "\n".join(lines)
