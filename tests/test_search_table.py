"""scripts/search_table: every planned cell of a recipe search against its baseline (files made here as a
finished sweep cell writes them)."""
import json

import pytest

from fastscore.metrics import Rate
from fastscore.scripts import search_table
from fastscore.study import StudyConfig, grid, sweep


def _finish(out, g, name, k_valid, k_cons, seeds, wall=600.0):
    cell = next(c for c in g.cells() if c.name == name)
    path = out / "cells" / cell.dirname
    path.mkdir(parents=True)
    cav = {**Rate(k_cons, k_valid).to_dict(), "per_seed": seeds}
    net = {"rates": {"valid": Rate(k_valid, 4000).to_dict(), "consistent_among_valid": cav,
                     "novel": Rate(k_cons // 2, 4000).to_dict()},
           "probe": [{"t": 200, "gap": 0.031}, {"t": 400, "gap": -0.002}]}
    (path / "results.json").write_text(json.dumps({"config": sweep.cell_config(g, cell).to_dict(), "wall_seconds": wall,
                                                   "summary": {"networks": {"softmax": net}}}))


@pytest.fixture
def search(tmp_path):
    out = tmp_path / "search"
    g = grid.from_cli(StudyConfig, ["networks=softmax", "n_colours=4"], ["lr=1e-3,2e-3,4e-3,8e-3"], "tiny")
    sweep._prepare(out / "lr", g, force=False)
    _finish(out / "lr", g, "lr=0.002", 4000, 1400, [0.36, 0.34])          # 35.0% [33.5, 36.5]
    _finish(out / "lr", g, "lr=0.001", 4000, 1600, [0.41, 0.39])          # 40.0%: above
    _finish(out / "lr", g, "lr=0.004", 4000, 1440, [0.37, 0.35], 90.0)    # 36.0%: overlaps
    return out


def test_each_cell_reads_against_the_baseline_and_unfinished_cells_are_listed(search):
    table = search_table.main([str(search), "--baseline", "lr=0.002"])
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert list(rows) == ["lr=0.001", "lr=0.002 (baseline)", "lr=0.004", "lr=0.008"]
    assert rows["lr=0.001"].endswith("| **above** |") and rows["lr=0.004"].endswith("| overlaps |")
    assert "| 40.00% [38.5, 41.5] (41.0, 39.0) |" in rows["lr=0.001"] and "+3.10 / -0.20 pp | 10 min |" in rows["lr=0.001"]
    assert "| 2 min |" in rows["lr=0.004"] and rows["lr=0.008"] == "| lr=0.008 | not started | | | | | |"
    below = search_table.compare(Rate(1200, 4000).to_dict(), Rate(1400, 4000).to_dict())
    assert below == "below"


def test_write_replaces_only_the_marked_table(search, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# top\n\nprose before\n{search_table.BEGIN}\nold table\n{search_table.END}\nprose after\n")
    table = search_table.main([str(search / "lr"), "--baseline", "lr=0.002", "--write", str(page)])
    assert page.read_text() == f"# top\n\nprose before\n{search_table.BEGIN}\n{table}{search_table.END}\nprose after\n"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="must hold the lines"):
        search_table.main([str(search), "--baseline", "lr=0.002", "--write", str(page)])
    assert page.read_text() == "no markers\n"
    with pytest.raises(SystemExit, match="no cell named 'lr=9'"):
        search_table.main([str(search), "--baseline", "lr=9"])
