"""A recipe search's table: every cell of one or more sweeps (one factor each, e.g. runs/search4c/lr,
runs/search4c/batch) against a baseline cell, for one network: valid, consistent among valid (pooled,
95% Wilson interval, per seed), consistent and new, the probe gap, the cell's wall time, and whether the
cell's interval lies above, below or overlaps the baseline's. The cells of these sweeps that are not
finished are listed as such (a sweep not yet started has no directory, so none of its cells).

    python -m fastscore.scripts.search_table runs/search4c --baseline lr=0.002 [--network softmax]
        [--write docs/coordination_search.md]

A directory that is not a sweep is searched one level down for sweeps. ``--write PAGE`` replaces the text
between the lines ``<!-- search-table: begin -->`` and ``<!-- search-table: end -->`` in PAGE (both must
be there) and leaves the rest of the page as it is.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastscore.checkpoint import atomic_write_text
from fastscore.study.report import fmt
from fastscore.study.sweep import cell_config, finished_cell, read_grid

BEGIN, END = "<!-- search-table: begin -->", "<!-- search-table: end -->"
PROBE_T = (200, 400)


def sweeps(paths: list[str]) -> list[Path]:
    """The sweep directories among ``paths`` and, for a path that is not a sweep, its subdirectories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "sweep.json").exists():
            out.append(p)
        else:
            found = sorted(d for d in p.iterdir() if (d / "sweep.json").exists()) if p.is_dir() else []
            if not found:
                raise SystemExit(f"search_table: {p} is not a sweep and holds none")
            out += found
    return out


def cells(dirs: list[Path], network: str) -> list[dict[str, Any]]:
    """One entry per cell of each sweep, in grid order: its name, sweep, and the network's numbers if
    the cell is finished (else ``None``)."""
    out = []
    for d in dirs:
        g = read_grid(d)
        for c in g.cells():
            doc = finished_cell(d / "cells" / c.dirname, cell_config(g, c))
            net = None if doc is None else doc["summary"]["networks"].get(network)
            out.append({"sweep": d.name, "name": c.name, "doc": doc, "net": net,
                        "started": (d / "cells" / c.dirname / "study.json").exists()})
    return out


def compare(r: dict, base: dict) -> str:
    """"above" / "below" the baseline when the 95% intervals do not overlap, else "overlaps"."""
    if r["ci95"][0] > base["ci95"][1]:
        return "**above**"
    if r["ci95"][1] < base["ci95"][0]:
        return "below"
    return "overlaps"


def markdown(entries: list[dict[str, Any]], baseline: str, network: str) -> str:
    base = next((e for e in entries if e["name"] == baseline), None)
    if base is None:
        raise SystemExit(f"search_table: no cell named {baseline!r} in these sweeps "
                         f"({', '.join(e['name'] for e in entries)})")
    b = base["net"]["rates"]["consistent_among_valid"] if base["net"] else None
    lines = [f"| configuration | valid | consistent among valid [95%] (seeds) | consistent and new | probe gap "
             f"t = {' / '.join(map(str, PROBE_T))} | wall | against the baseline ({baseline}) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        name = e["name"] + (" (baseline)" if e is base else "")
        if e["net"] is None:
            state = "running or stopped" if e["started"] else "not started"
            lines.append(f"| {name} | {state} | | | | | |")
            continue
        rates, probe = e["net"]["rates"], {p["t"]: p for p in e["net"].get("probe") or []}
        cav = rates["consistent_among_valid"]
        seeds = ", ".join(f"{100 * x:.1f}" for x in cav.get("per_seed") or [] if x is not None)
        gaps = " / ".join(f"{100 * probe[t]['gap']:+.2f}" if t in probe else "-" for t in PROBE_T) + " pp"
        against = "-" if e is base or b is None or not b["n"] or not cav["n"] else compare(cav, b)
        lines.append(f"| {name} | {fmt(rates['valid'])} | {fmt({k: v for k, v in cav.items() if k != 'per_seed'})} ({seeds}) | {fmt(rates['novel'])} | {gaps} "
                     f"| {e['doc']['wall_seconds'] / 60:.0f} min | {against} |")
    return "\n".join(lines) + "\n"


def write(page: Path, table: str) -> None:
    text = page.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"search_table: {page} must hold the lines {BEGIN} and {END} once each, in that order")
    head, rest = text.split(BEGIN)
    atomic_write_text(page, head + BEGIN + "\n" + table + END + rest.split(END, 1)[1], overwrite=True)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="sweep directories, or directories holding sweeps")
    p.add_argument("--baseline", required=True, help="the baseline cell's name, e.g. lr=0.002")
    p.add_argument("--network", default="softmax", help="the network compared (default softmax)")
    p.add_argument("--write", default=None, metavar="PAGE", help="replace the table between the markers in PAGE")
    a = p.parse_args(argv)
    table = markdown(cells(sweeps(a.dirs), a.network), a.baseline, a.network)
    if a.write:
        write(Path(a.write), table)
    print(table, end="")
    return table


if __name__ == "__main__":
    main()
