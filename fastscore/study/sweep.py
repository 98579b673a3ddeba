"""Sweeps: one study per setting, one table.

``run`` (``fastscore sweep``) runs a grid of studies (``fastscore.study.grid``): each cell is one study
(``reproduce``) in ``out/cells/<cell>/``; a cell whose ``results.json`` holds its config is finished
and is not run again, so a finished sweep rerun trains nothing and only rewrites the tables. Under
``torchrun --nproc-per-node N -m fastscore sweep ...`` every rank takes every N-th cell (longest
first) and rank 0 writes the merged ``sweep-results.json``, ``sweep.md``, ``sweep.csv`` and ``sweep.png``
(``sweep.json`` holds the grid): one row per cell, network and seed, with 95% Wilson intervals, and
pooled rows per cell and network.

``pairs_grid`` (``reproduce --pairs-sweep``) is the grid over the number of key-value pairs, with a
larger image where the pairs do not fit.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._validate import UsageError, usage
from ..checkpoint import atomic_write_text
from ..data import KVConfig, palette_of_size
from ..metrics import Rate
from .config import StudyConfig
from .figures import _save, pyplot
from .grid import Cell, Grid, from_doc
from .run import reproduce

RATES = ("valid", "consistent", "consistent_among_valid", "novel")


def cell_config(grid: Grid, cell: Cell):
    """The study configuration of ``cell`` (the preset, then the base settings, then the cell's values);
    validated here, so a bad value fails, naming its cell, before any cell runs."""
    try:
        return replace(StudyConfig.preset(grid.preset), **dict(cell.settings))
    except UsageError as e:
        raise usage(e, f"cell {cell.name}: {e}") from None


def _cost(config) -> float:
    """Relative work of a cell: training image-passes plus sampling image-passes, over all seeds."""
    per_net = 3 * config.train_steps * config.batch_size + config.n_samples * config.steps
    return float(per_net * len(config.networks) * config.n_seeds)


def finished_cell(path: Path, config: StudyConfig) -> dict | None:
    """The results of a finished cell study at ``path`` with this ``config`` (``StudyConfig.matches``),
    else None."""
    res = path / "results.json"
    if not res.exists():
        return None
    try:
        doc = json.loads(res.read_text())
    except json.JSONDecodeError:    # cut short or damaged: not finished (a rerun writes it again from the rows)
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("config"), dict) and config.matches(doc["config"]) \
        else None


def finished_cells(grid: Grid, out: Path, *, partial: bool, study: str) -> tuple[list[tuple[Cell, Any, dict]], list[str]]:
    """The cells of ``grid`` under ``out`` with a ``results.json``: (cell, its config, that document) each, in
    the grid's order, and the names of the others. An unfinished cell is a FileNotFoundError (naming
    ``study``, the study to run) unless ``partial``; with it, only no finished cell at all is one."""
    done, unfinished = [], []
    for c in grid.cells():
        path = out / "cells" / c.dirname / "results.json"
        if path.exists():
            done.append((c, cell_config(grid, c), json.loads(path.read_text())))
        elif partial:
            unfinished.append(c.name)
        else:
            raise FileNotFoundError(f"{path.parent} holds no finished cell; run the {study} study first")
    if not done:
        raise FileNotFoundError(f"{out}: no cell of the {study} study is finished yet")
    return done, unfinished


def _read_spec(spec: Path) -> dict | None:
    """A sweep.json's document; None if the file is JSON but not a fastscore sweep's (UsageError if not JSON)."""
    try:
        doc = json.loads(spec.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{spec} is not valid JSON ({e}); is this a fastscore sweep?") from None
    return doc if isinstance(doc, dict) and doc.get("kind") == "fastscore-sweep" else None


def read_grid(out: str | Path) -> Grid:
    """The grid of the sweep in directory ``out`` (its ``sweep.json``); UsageError if there is none."""
    spec = Path(out) / "sweep.json"
    if not spec.is_file():
        raise UsageError(f"{out} holds no fastscore sweep (no sweep.json)")
    doc = _read_spec(spec)
    if doc is None:
        raise UsageError(f"{spec} was not written by fastscore sweep")
    if "grid" not in doc:
        raise UsageError(f"{spec} holds no grid")
    return from_doc(StudyConfig, doc["grid"], str(spec))


def _prepare(out: Path, grid: Grid, force: bool) -> None:
    """Refuse another sweep's directory (without ``force``) and any non-empty directory that is not a
    sweep. With ``force`` the new grid runs there: cells of the old grid at other names are kept; a cell
    at the same name with other settings is replaced as ``reproduce --force`` replaces a study (only the
    files its study wrote)."""
    spec = out / "sweep.json"
    want = json.loads(json.dumps({"kind": "fastscore-sweep", "grid": grid.to_dict()}))  # as it reads back
    if spec.exists():
        have = _read_spec(spec)
        if have is None:
            raise FileExistsError(f"{spec} was not written by fastscore sweep; choose another --out")
        if have.get("grid") != want["grid"] and not force:
            raise FileExistsError(f"{out} holds a sweep over another grid; pass --force to run this grid there "
                                  "(a cell of the old grid with the same name but other settings is replaced), "
                                  "or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a fastscore sweep; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec, json.dumps(want, indent=1), overwrite=True)


def _rows(grid: Grid, cell: Cell, config: StudyConfig, doc: dict) -> list[dict]:
    """One flat row per network and seed of a finished cell (its settings in ``grid.columns``), with the
    chance level."""
    chance = doc["summary"]["baseline"]["analytic_consistent"]
    return [{"cell": cell.name, **{k: _plain(getattr(config, k)) for k in grid.columns}, "network": r["network"],
             "seed": r["seed"],
             "chance": chance, "final_loss": r["losses"][-1] if r.get("losses") else None,
             **{k: r["rates"][k] for k in RATES}} for r in doc["rows"]]


def _plain(v: Any) -> Any:
    return "+".join(map(str, v)) if isinstance(v, (tuple, list)) else v


def run(grid: Grid, out: str | Path, *, device: str | torch.device = "cpu", backend: str = "auto",
        force: bool = False, progress: bool = True, workers: int | None = None, group_seeds: bool | None = None,
        run_cell: Callable[..., dict] | None = None) -> dict | None:
    """Run (or resume) every cell of ``grid`` under ``out``; returns the merged document on rank 0
    (``None`` on other ranks). ``run_cell(config, path, device=, backend=, force=, progress=, workers=,
    group_seeds=)`` runs one study (default: ``reproduce``)."""
    if run_cell is None:
        run_cell = reproduce
    out = Path(out)
    cells = grid.cells()
    configs = {c.name: cell_config(grid, c) for c in cells}          # every cell checked before any work
    rank = distributed.init(device)
    dev = rank.device(device)
    if rank.is_root:
        _prepare(out, grid, force)
    distributed.barrier(rank)
    order = sorted(cells, key=lambda c: -_cost(configs[c.name]))     # longest first balances the ranks
    mine = distributed.shard(order, rank)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(_cost(configs[c.name]) for c in mine), desc=f"sweep rank {rank.rank}"
                   if rank.world > 1 else "sweep", unit="img", unit_scale=True, dynamic_ncols=True,
                   position=rank.rank)
    docs = {}
    for c in mine:
        path = out / "cells" / c.dirname
        doc = finished_cell(path, configs[c.name])
        if doc is None:
            if bar is not None:
                bar.set_description(f"sweep [{c.name}]")
            with contextlib.redirect_stdout(io.StringIO()):   # the per-cell tables go to files, not the terminal
                doc = run_cell(configs[c.name], path, device=dev, backend=backend, force=force, progress=False,
                               workers=workers, group_seeds=group_seeds)
        docs[c.name] = {"rows": _rows(grid, c, configs[c.name], doc), "wall_seconds": doc.get("wall_seconds", 0.0)}
        if bar is not None:
            bar.update(_cost(configs[c.name]))
    if bar is not None:
        bar.close()
    merged = distributed.gather_to_root(docs, rank)
    distributed.finish(rank)
    if merged is None:
        return None
    per_cell = {k: v for part in merged for k, v in part.items()}
    result: dict[str, Any] = {"grid": grid.to_dict(), "cells": [c.name for c in cells], "world_size": rank.world,
              "rows": [r for c in cells for r in per_cell[c.name]["rows"]],
              "wall_seconds": {c.name: per_cell[c.name]["wall_seconds"] for c in cells}}
    result["pooled"] = pooled(result["rows"])
    _write(out, grid, result)
    return result


def pooled(rows: list[dict]) -> list[dict]:
    """Per cell and network: every rate pooled over seeds (counts summed, Wilson interval)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["cell"], r["network"]), []).append(r)
    out = []
    for rs in groups.values():
        pooled_rates = {k: Rate(sum(r[k]["k"] for r in rs), sum(r[k]["n"] for r in rs)).to_dict() for k in RATES}
        out.append({**{k: v for k, v in rs[0].items() if k not in RATES + ("seed", "final_loss")}, "seeds": [r["seed"] for r in rs],
                    **pooled_rates})
    return out


def _pct(d: dict) -> str:
    if not d["n"]:
        return "n/a"
    lo, hi = d["ci95"]
    return f"{100 * d['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(grid: Grid, result: dict) -> str:
    """The merged table: pooled rows per cell and network, then one row per seed."""
    axes = grid.columns
    head = axes + ["network", "seeds", "chance"] + list(RATES)
    lines = ["# fastscore sweep", "", f"preset {grid.preset}; base settings: "
             + (", ".join(f"{k}={_plain(v)}" for k, v in grid.base.items()) or "none") + "; "
             f"{len(result['cells'])} cells, {result['world_size']} rank(s); 95% Wilson intervals.", "",
             "## Pooled over seeds", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in result["pooled"]:
        lines.append("| " + " | ".join([str(r[a]) for a in axes] + [r["network"], str(len(r["seeds"])),
                                        f"{100 * r['chance']:.2f}%"] + [_pct(r[k]) for k in RATES]) + " |")
    head = axes + ["network", "seed"] + list(RATES)
    lines += ["", "## Per seed", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in result["rows"]:
        lines.append("| " + " | ".join([str(r[a]) for a in axes] + [r["network"], str(r["seed"])]
                                       + [_pct(r[k]) for k in RATES]) + " |")
    return "\n".join(lines) + "\n"


def csv_text(grid: Grid, result: dict) -> str:
    """One CSV line per cell, network and seed: each rate's k, n, rate and interval."""
    axes = grid.columns
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", *axes, "network", "seed", "chance"]
               + [f"{k}_{p}" for k in RATES for p in ("k", "n", "rate", "lo", "hi")])
    for r in result["rows"]:
        w.writerow([r["cell"], *(r[a] for a in axes), r["network"], r["seed"], r["chance"]]
                   + [x for k in RATES for x in (r[k]["k"], r[k]["n"], r[k]["rate"], *r[k]["ci95"])])
    return buf.getvalue()


def _write(out: Path, grid: Grid, result: dict) -> None:
    atomic_write_text(out / "sweep-results.json", json.dumps(result, indent=1), overwrite=True)
    atomic_write_text(out / "sweep.md", markdown(grid, result), overwrite=True)
    atomic_write_text(out / "sweep.csv", csv_text(grid, result), overwrite=True)
    figure(out / "sweep.png", grid, result)


def figure(path: Path, grid: Grid, result: dict) -> str | None:
    """Consistency among valid samples against the first numeric axis, one line per network (and per
    value of the other axes), with chance; None without matplotlib or without a numeric axis."""
    axis = next((a for a, vs in grid.axes.items() if all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in vs)), None)
    plt = pyplot()
    if plt is None or axis is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    lines: dict[tuple, list] = {}
    for r in result["pooled"]:
        rest = tuple((a, r[a]) for a in grid.axes if a != axis)
        lines.setdefault((r["network"], rest), []).append(r)
    for (net, rest), rs in lines.items():
        rs = sorted((r for r in rs if r["consistent_among_valid"]["n"]), key=lambda r: r[axis])
        label = net + "".join(f", {a}={v}" for a, v in rest)
        ys = [100 * r["consistent_among_valid"]["rate"] for r in rs]
        lo = [y - 100 * r["consistent_among_valid"]["ci95"][0] for y, r in zip(ys, rs)]
        hi = [100 * r["consistent_among_valid"]["ci95"][1] - y for y, r in zip(ys, rs)]
        ax.errorbar([r[axis] for r in rs], ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    chance = sorted({(r[axis], r["chance"]) for r in result["pooled"]})
    ax.plot([c[0] for c in chance], [100 * c[1] for c in chance], "k--", label="chance")
    ax.set_xlabel(axis)
    ax.set_ylabel("consistent among valid (%)")
    if len(chance) > 1 and min(c[0] for c in chance) > 0 and max(c[0] for c in chance) / min(c[0] for c in chance) > 20:
        ax.set_xscale("log")
    ax.legend(fontsize=6)
    return _save(plt, fig, path.name, path.parent)


def pairs_grid(preset: str, base: Mapping[str, Any], pairs: Sequence[int]) -> Grid:
    """The grid over the number of pairs (``reproduce --pairs-sweep``): ``base`` settings on ``preset``,
    one cell per count in ``pairs``. A count that does not fit the image gets the smallest image that
    holds it (2 pixels larger at a time), as a cell rule; if any count is above 4 (beyond the four
    corners the zero padding marks), every cell gets coordinate channels, so all share one architecture."""
    pairs = tuple(pairs)
    if len(set(pairs)) != len(pairs) or not pairs:
        raise UsageError(f"pairs must be distinct numbers of pairs, got {list(pairs)}")
    if "n_pairs" in base:
        raise UsageError("n_pairs is the pairs sweep's axis; give the counts as its values, not as a base setting")
    base = dict(base)
    if any(p > 4 for p in pairs):
        base["coord_channels"] = True
    size0 = base.get("image_size", StudyConfig.image_size)
    palette = palette_of_size(base.get("n_colours", StudyConfig.n_colours))
    rules = []
    for p in pairs:
        size = size0
        while size < size0 + 64:
            try:
                KVConfig(n_pairs=p, palette=palette, image_size=size)
                break
            except ValueError:
                size += 2
        else:
            size = size0   # fits no image: the cell's own check says why, before any cell runs
        if size != size0:
            rules.append(({"n_pairs": p}, {"image_size": size}))
    return Grid(base, {"n_pairs": pairs}, preset, tuple(rules))
