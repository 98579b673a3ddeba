"""Carry a sweep's finished cells (a creativity, halves or ``fastscore sweep`` run) to another place without
their samples, checkpoints and figures: the JSON and text files a rerun of the same command there needs to
skip them, and their reports need (creativity's ``creativity-cell.json``, halves' rows). A cell not finished
is left behind, except with ``rows``: then its finished rows travel too (right for the halves study, whose
rows need no samples; the creativity study refuses a row whose samples are gone). ``DST`` is a copy of
``SRC``'s files of those kinds: files there of the same names are replaced, others are left alone.

    python -m fastscore.scripts.carry runs/creativity-4c docs/four-colours/creativity-40000
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fastscore._validate import UsageError

#: what never travels: samples, checkpoints and partial training states, figures
LEFT = (".safetensors", ".png")


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and not p.name.endswith(LEFT))


def carry(src: str | Path, dst: str | Path, *, rows: bool = False) -> list[str]:
    """Copy the finished cells of the sweep at ``src`` (and its top-level reports) into ``dst``; returns the
    paths copied, relative to ``dst``. ``rows``: also the finished rows of unfinished cells. Refuses a
    ``src`` that is not a sweep and a ``dst`` that holds another sweep."""
    src, dst = Path(src), Path(dst)
    spec = src / "sweep.json"
    if not spec.is_file():
        raise UsageError(f"src: {src} holds no sweep.json; give the --out of a creativity, halves or sweep run")
    have = dst / "sweep.json"
    if have.exists() and json.loads(have.read_text()) != json.loads(spec.read_text()):
        raise UsageError(f"dst: {dst} holds another sweep (its sweep.json differs from {spec}); choose another dst")
    picked = [p for p in src.iterdir() if p.is_file() and not p.name.endswith(LEFT)]
    cells = src / "cells"
    for cell in sorted(cells.iterdir()) if cells.is_dir() else []:
        if (cell / "results.json").is_file():
            picked += _files(cell)
        elif rows and (cell / "rows").is_dir():
            picked += [p for p in (cell / "study.json", cell / "manifest.txt", cell / "invocations.json") if p.is_file()]
            picked += _files(cell / "rows")
    out = []
    for p in picked:
        rel = p.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / rel)
        out.append(str(rel))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the run's --out (it holds sweep.json)")
    ap.add_argument("dst", help="where the carried files go")
    ap.add_argument("--rows", action="store_true", help="also the finished rows of unfinished cells (halves)")
    a = ap.parse_args(argv)
    try:
        done = carry(a.src, a.dst, rows=a.rows)
    except UsageError as e:
        ap.error(str(e))
    cells = sorted({Path(r).parts[1] for r in done if Path(r).parts[0] == "cells" and len(Path(r).parts) > 2})
    print(f"carried {len(done)} files of {len(cells)} cells to {a.dst}: {', '.join(cells) or 'no cell'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
