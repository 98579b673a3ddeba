"""The creativity study: are consistent samples new, or copies, as the training set grows?

``run`` is a sweep (``fastscore.study.sweep.run``) over the number of training images: each cell is one
study (``reproduce``) in ``out/cells/n_train=<n>/`` (CNN and softmax attention by default, beside the
ideal score and the ELS machine; no coordination probe), resumable per cell, so a finished creativity
study rerun trains nothing. Then ``report`` reads each cell's saved samples (``samples/*.safetensors``)
and rebuilds its training set (``make_dataset`` with the cell's ``n_train`` and ``data_seed``) to measure,
per model (``fastscore.novelty``): valid samples, consistent among valid, copies among valid (content
equal to a training image's), consistent-and-new among valid with its 95% Wilson interval and per-seed
spread, the exact chances (uniform random pairs; the mosaic of the training set's pairs; the model's own
per-pair marginals), the distance of new samples to their nearest training image, and, on seed 0, the
agreement with the ELS machine drawn from the same noise, pair by pair (``fastscore.theory.agreement``).

It writes ``creativity.json`` (every number), ``creativity.md`` (the tables and verdicts),
``creativity-curve.png`` (consistent-and-new among valid against the number of training images per model,
with both chances) and ``creativity-novel-<model>.png`` (new consistent samples beside their nearest
training images, at the grid's middle number of training images), beside the sweep's own tables.
Each cell's measurement is also saved in the cell (``creativity-cell.json``, with the cell's config), so a
cell carried to another machine without its samples and checkpoints (its JSON files only: 3.4 MB instead of
65 MB for a 4-colour cell of 8 rows x 10,000 samples) is reported from that file, and ``report(..., partial=True)`` reports the finished
cells of a study still running (docs/creativity.md, "Carrying cells").

Verdict per model and number of training images: *memorises* when copies are >= 95% of its consistent
samples and the 95% interval of new among consistent lies below ``rule_novel`` (the share of new contents
that a model sampling the rule would draw, ``fastscore.novelty.coverage``: when the training set covers
nearly every consistent content, copies are what a rule-follower produces too); *creative* when the 95% interval of consistent-and-new among valid lies above the larger of the
uniform and own-mosaic chances, and, for an attention network, above the CNN's interval; otherwise
*neither* (with the reasons).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import _validate
from ..checkpoint import atomic_write_text
from ..data import KVConfig, make_dataset
from ..metrics import Rate
from ..novelty import coverage, distance_summary, mosaic_chance, novelty, recolour_distances
from .config import ANALYTIC, LABELS
from .files import StudyDir, row_name
from .grid import Grid
from .report import every_seed_above, fmt, pooled
from .run import reproduce
from .sweep import cell_config, finished_cells
from .sweep import run as run_sweep

# numbers of training images per preset: from a few contents seen to all of them in the study's 2 colours
# (4 pairs: 5,000 images cover all 60 consistent contents; with 4 colours they cover 3,831 of 16,720, and
# --sizes chooses others)
SIZES: dict[str, tuple[int, ...]] = {"full": (8, 16, 32, 64, 128, 256, 5000), "quick": (16, 64, 256), "tiny": (8, 32)}
# what the creativity study changes in its preset: the CNN beside softmax attention, and no coordination
# probe (the probe answers another question and costs a third of a quick row)
DEFAULTS: dict[str, Any] = {"networks": ("none", "softmax"), "probe_t": ()}
#: a cell's measurement, written beside its results.json when the cell finishes and by ``report`` (read when
#: its samples are gone); CELL_FORMAT changes whenever what ``_cell_models`` measures does
CELL_FILE = "creativity-cell.json"
CELL_FORMAT = 1
MEMORISES = 0.95          # copies' share of consistent samples above which a model memorises
RATES = ("valid", "consistent_among_valid", "copy_among_valid", "novel_among_valid", "novel_among_consistent")


def grid(mode: str = "full", sizes: tuple[int, ...] | None = None, **overrides: Any) -> Grid:
    """The creativity study's grid: preset ``mode``, the ``DEFAULTS`` and ``overrides`` (study settings;
    None values are ignored) as base settings, and ``n_train`` over ``sizes`` (default ``SIZES[mode]``).
    Every cell is validated here."""
    _validate.choice("mode", mode, tuple(SIZES))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "n_train" in overrides:
        raise _validate.UsageError("n_train is the creativity study's axis; give sizes=(...) instead of n_train")
    sizes = _validate.distinct_sizes("sizes", SIZES[mode] if sizes is None else sizes)
    g = Grid({**DEFAULTS, **overrides}, {"n_train": tuple(sorted(sizes))}, mode)
    for c in g.cells():
        cell_config(g, c)
    return g


def run(g: Grid, out: str | Path, *, device: str | torch.device = "cpu", backend: str = "auto", force: bool = False,
        progress: bool = True, workers: int | None = None) -> dict | None:
    """Run (or resume) the creativity study ``g`` (``grid(...)``) into ``out`` and write its report;
    returns the report (``None`` on torchrun ranks other than 0). ``force`` as ``fastscore sweep``'s: a
    directory of another grid is reused, each cell study of another config replaced (only the files
    it wrote); Ctrl-C stops with ``Interrupted`` (finished rows kept; the same call resumes)."""
    if set(g.axes) != {"n_train"}:
        raise ValueError(f"a creativity grid sweeps n_train only, got axes {sorted(g.axes)}")
    t0 = time.perf_counter()
    res = run_sweep(g, out, device=device, backend=backend, force=force, progress=progress, workers=workers,
                    run_cell=run_cell)
    if res is None:
        return None
    return report(g, out, run_seconds=time.perf_counter() - t0)


def run_cell(config, path: str | Path, **kw: Any) -> dict:
    """One cell: ``reproduce(config, path, **kw)``, then its measurement saved as ``CELL_FILE`` (so the cell
    can be carried without its samples as soon as it is finished). A finished row whose samples are gone
    (a cell carried before it finished) is refused before any work: its numbers could not be measured."""
    path = Path(path)
    if not (path / "results.json").exists():
        lost = [row_name(n, s) for n, s in config.jobs() if (path / "rows" / f"{row_name(n, s)}.json").exists()
                and not (path / "samples" / f"{row_name(n, s)}.safetensors").exists()]
        if lost:
            raise _validate.UsageError(
                f"{path}: rows {', '.join(lost)} are finished but their samples are missing (a cell carried before "
                "it finished?); the creativity report measures samples: remove those rows/<row>.json files to "
                "sample them again from their checkpoints, or the cell to start it again")
    doc = reproduce(config, path, **kw)
    _measure_cell(config, path, None)
    return doc


def _cell_models(config, path: Path, figure: Path | None) -> dict:
    """Novelty per model of one finished cell study at ``path``, and its training set's ``coverage`` and
    ``mosaic`` chance; with ``figure``, also writes ``<figure>-<model>.png`` for the trained networks and
    the ELS machine (seed 0)."""
    from ..theory import agreement
    cfg = config.data_config()
    _, train = make_dataset(cfg, config.n_train, config.data_seed)
    sd = StudyDir(path)
    els = sd.load_samples(row_name("els", 0)) if "els" in config.analytic else None
    models: dict[str, dict] = {}
    figures: list[str] = []
    for name in tuple(config.analytic) + tuple(config.networks):
        seeds = [s for n, s in config.jobs() if n == name]
        per_seed, dist, novel, copy = [], [], [], []
        own = []
        for s in seeds:
            x = sd.load_samples(row_name(name, s))
            if x is None:
                raise FileNotFoundError(f"{path}: the samples of {name} seed {s} are missing; run the study again")
            nv = novelty(cfg, x, train)
            r = nv.rates
            rates = {"valid": Rate(int(nv.valid.sum()), int(nv.valid.numel())),
                     "consistent_among_valid": Rate(int(nv.consistent.sum()), int(nv.valid.sum())),
                     "copy_among_valid": r["copy_among_valid"], "novel_among_valid": r["novel_among_valid"],
                     "novel_among_consistent": r["novel_among_consistent"]}
            per_seed.append({"seed": s, "rates": {k: v.to_dict() for k, v in rates.items()},
                             "novelty": nv.to_dict()})
            dist.append(nv.nearest_distance)
            novel.append(nv.novel)
            copy.append(nv.copy)
            if nv.own_mosaic is not None:
                own.append((float(nv.own_mosaic), int(nv.valid.sum())))
            if s == 0 and figure is not None and (name in config.networks or name == "els"):
                from ..novelty_figures import plot_novel_beside_nearest
                rate = r["novel_among_valid"]
                figures.append(str(plot_novel_beside_nearest(
                    cfg, x, train, f"{figure}-{name}.png", result=nv, overwrite=True,
                    title=f"{LABELS[name]}, {config.n_train} training images, seed 0\n"
                          f"consistent and new: {rate} of valid")))
        d, nov, cp = torch.cat(dist), torch.cat(novel), torch.cat(copy)
        n_valid = sum(w for _, w in own)
        m = {"label": LABELS[name], "seeds": seeds, "rates": {k: pooled(per_seed, k) for k in RATES},
             # the model's own per-pair marginals, each seed's chance weighted by its valid samples
             "own_mosaic_chance": sum(c * w for c, w in own) / n_valid if n_valid else None,
             "nearest_distance": {"all": distance_summary(d), "copy": distance_summary(d, cp),
                                  "novel": distance_summary(d, nov)},
             "per_seed": per_seed, "agreement_with_els": None}
        if els is not None and name != "els":
            x0 = sd.load_samples(row_name(name, 0))
            assert x0 is not None       # loaded above
            m["agreement_with_els"] = agreement(cfg, x0, els).summary()
        models[name] = m
    return {"models": models, "figures": figures, "coverage": coverage(cfg, train),
            "mosaic": float(mosaic_chance(cfg, train))}


def _measure_cell(config, path: Path, figure: Path | None) -> dict:
    """``_cell_models`` of the cell at ``path`` when every row's samples are there, saved as ``CELL_FILE``
    with the cell's config; without them, the saved measurement of this config (no figures)."""
    sd = StudyDir(path)
    rows = [r["rates"] for r in json.loads((path / "results.json").read_text())["rows"]]
    missing = [row_name(n, s) for n, s in config.jobs() if not (path / "samples" / f"{row_name(n, s)}.safetensors").exists()]
    if not missing:
        measured = _cell_models(config, path, figure)
        sd.write_json(CELL_FILE, {"format": CELL_FORMAT, "config": config.to_dict(), "rows": rows,
                                  **{k: measured[k] for k in ("models", "coverage", "mosaic")}}, indent=1)
        return measured
    saved = path / CELL_FILE
    again = (f"; rerun the cell: remove its rows/ files of {', '.join(missing)} and its results.json to sample them "
             "again from their checkpoints, or the cell to train it again")
    if not saved.exists():
        raise FileNotFoundError(f"{path}: the samples of {missing[0]} are missing (and no {CELL_FILE})" + again)
    doc = json.loads(saved.read_text())
    why = ("measured by another version of the report" if not isinstance(doc, dict) or doc.get("format") != CELL_FORMAT
           else "measured another config" if not isinstance(doc.get("config"), dict) or not config.matches(doc["config"])
           else "measured other rows than results.json's" if json.dumps(doc.get("rows")) != json.dumps(rows) else None)
    if why:
        raise FileNotFoundError(f"{path}: the samples of {missing[0]} are missing and {CELL_FILE} there {why}" + again)
    return {"models": doc["models"], "coverage": doc["coverage"], "mosaic": doc["mosaic"], "figures": []}


def verdicts(models: Mapping[str, dict], chance: float, rule_novel: float) -> dict[str, dict]:
    """Per model: ``verdict`` ("memorises", "creative", "neither: ..." or "no consistent samples") and the
    tests behind it (see the module docstring); ``models`` as in a cell of ``report``'s document,
    ``chance`` the uniform chance of consistent-and-new among valid, ``rule_novel`` the rule sampler's
    share of new contents among consistent ones."""
    cnn = models.get("none", {}).get("rates", {}).get("novel_among_valid")
    out: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        r, c = m["rates"]["novel_among_valid"], m["rates"]["novel_among_consistent"]
        if c["n"] == 0:
            out[name] = {"verdict": "no consistent samples"}
            continue
        copies = 1 - c["rate"]
        own = m["own_mosaic_chance"]
        lo = r["ci95"][0]
        tests: dict[str, bool | None] = {
            "mostly_copies": copies >= MEMORISES, "below_rule_novel": c["ci95"][1] < rule_novel,
            "above_chance": lo > chance,
            "above_own_mosaic": own is not None and lo > own,
            "above_cnn": None if name == "none" or name in ANALYTIC or cnn is None
            else bool(cnn["n"] > 0 and lo > cnn["ci95"][1])}
        why = [text for key, text in (("above_chance", "uniform chance"), ("above_own_mosaic", "own-mosaic chance"),
                                      ("above_cnn", "the CNN")) if tests[key] is False]
        if tests["mostly_copies"] and tests["below_rule_novel"]:
            word = "memorises"
        elif not why:
            word = "creative"
        else:
            word = "neither: not above " + ", ".join(why)
            if tests["mostly_copies"]:
                word += f"; copies {100 * copies:.0f}% of consistent, as a rule sampler's could be " \
                        f"({100 * (1 - rule_novel):.1f}%)"
        # the intervals count samples, not seeds (seeds differ more than samples do): say whether each
        # seed's own rate clears the same bars, beside the verdict (None for one seed)
        seeds = [ps["rates"]["novel_among_valid"]["rate"] for ps in m.get("per_seed", ())]
        bar = max(chance, own or 0.0, cnn["rate"] if tests["above_cnn"] is not None and cnn else 0.0)
        every = every_seed_above(seeds, bar)
        out[name] = {"verdict": word, "copies_of_consistent": copies, **tests, "every_seed_above": every}
    return out


def _verdict(v: dict) -> str:
    """A verdict as the report writes it: "creative" not carried by every seed says so."""
    return v["verdict"] + (" (not in every seed)" if v["verdict"] == "creative" and v.get("every_seed_above") is False
                           else "")


def report(g: Grid, out: str | Path, *, run_seconds: float | None = None, partial: bool = False) -> dict:
    """Measure every cell of the creativity study ``g`` under ``out`` and write ``creativity.json``,
    ``creativity.md`` and the figures (with matplotlib); returns the document. A cell without its
    samples is reported from its ``CELL_FILE``. ``partial``: the finished cells only, the others listed
    as ``unfinished`` (a FileNotFoundError when none is finished); without it an unfinished cell is one."""
    from .figures import pyplot
    out = Path(out)
    t0 = time.perf_counter()
    plot = pyplot() is not None
    cells = g.cells()
    sizes = [dict(c.point)["n_train"] for c in cells]
    fig_n = sizes[len(sizes) // 2]
    done, unfinished = finished_cells(g, out, partial=partial, study="creativity")
    wall = sum(res.get("wall_seconds", 0.0) for _, _, res in done)
    vers = next((res["versions"] for _, _, res in done if res.get("versions")), None)
    doc_cells, figures = [], []
    for c, config, res in done:
        fig = out / "creativity-novel" if plot and config.n_train == fig_n else None
        measured = _measure_cell(config, out / "cells" / c.dirname, fig)
        figures += measured["figures"]
        cov, mosaic, models = measured["coverage"], measured["mosaic"], measured["models"]
        doc_cells.append({"cell": c.name, "n_train": config.n_train, "coverage": cov, "chance": cov["chance"],
                          "chance_exact": cov["chance_exact"], "mosaic_chance": mosaic, "wall_seconds":
                          res.get("wall_seconds", 0.0), "models": models,
                          "verdicts": verdicts(models, cov["chance"], cov["rule_novel"])})
    first = cell_config(g, cells[0])
    doc = {"grid": g.to_dict(), "config": first.to_dict() | {"n_train": [c["n_train"] for c in doc_cells]},
           "data_config": first.data_config().to_dict(), "versions": vers, "study_wall_seconds": wall,
           "run_seconds": run_seconds, "cells": doc_cells, "figure_n_train": fig_n,
           "unfinished": unfinished}
    if plot:
        figures.insert(0, _curve(out / "creativity-curve.png", doc))
    doc["figures"] = figures
    doc["report_seconds"] = time.perf_counter() - t0
    if run_seconds is not None:
        doc["run_seconds"] = run_seconds + doc["report_seconds"]
    atomic_write_text(out / "creativity.json", json.dumps(doc, indent=1), overwrite=True)
    atomic_write_text(out / "creativity.md", markdown(doc), overwrite=True)
    return doc


def _curve(path: Path, doc: dict) -> str:
    from ..novelty_figures import plot_novelty_curve
    curves: dict[str, dict[int, Rate]] = {}
    refs: dict[str, dict[int, float]] = {"chance (uniform pairs)": {}, "mosaic chance (training pairs)": {}}
    for cell in doc["cells"]:
        n = cell["n_train"]
        refs["chance (uniform pairs)"][n] = cell["chance"]
        refs["mosaic chance (training pairs)"][n] = cell["mosaic_chance"]
        for m in cell["models"].values():
            r = m["rates"]["novel_among_valid"]
            if r["n"]:
                curves.setdefault(m["label"], {})[n] = Rate(r["k"], r["n"])
    return str(plot_novelty_curve(curves, refs, path, overwrite=True))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def _short(d: dict) -> str:
    return "n/a" if not d["n"] else f"{100 * d['rate']:.1f}% ({d['k']}/{d['n']})"


def _recoloured(doc: dict) -> str:
    """How far one recoloured cell is, in this report's palette: "2.83" or "2.00 to 3.46"."""
    lo, hi = recolour_distances(KVConfig.from_dict(doc["data_config"]))
    return f"{lo:.2f}" if hi - lo < 5e-3 else f"{lo:.2f} to {hi:.2f}"


def markdown(doc: dict) -> str:
    """``creativity.md``: the consistent-and-new table with verdicts, then distances and ELS agreement."""
    c, v = doc["config"], doc["versions"] or {}
    sizes = ", ".join(str(x["n_train"]) for x in doc["cells"])
    wall = doc["study_wall_seconds"]
    lines = [f"# fastscore creativity study: {c['n_pairs']} pairs, {c['n_colours']} colours, "
             f"{c['image_size']}x{c['image_size']}", "",
             f"Preset {doc['grid']['preset']}; training images {sizes} (data seed {c['data_seed']}); networks "
             f"{', '.join(LABELS[n] for n in c['networks'])} ({c['train_steps']} steps x {c['n_seeds']} seed(s), "
             f"{c['n_samples']} samples per model and seed, {c['sampler']} {c['steps']} steps) beside "
             f"{', '.join(LABELS[a] for a in c['analytic']) or 'no analytic model'}. Device "
             f"{v.get('device_name', '?')} ({v.get('device', '?')}), torch {v.get('torch', '?')}; training and "
             f"sampling wall time {wall:.0f} s (sum over cells and invocations); this report "
             f"{doc.get('report_seconds', 0):.0f} s" + ("" if doc.get("run_seconds") is None else
                                                      f"; the invocation that wrote it {doc['run_seconds']:.0f} s")
             + "." + (f" **Not finished yet: {', '.join(doc['unfinished'])}** (this report has the finished cells "
                      "only)." if doc.get("unfinished") else ""), "",
             "*Copy*: a valid sample whose decoded content equals a training image's (copies are consistent). "
             "*New*: consistent and not a copy. Percentages are of valid samples, with 95% Wilson intervals "
             "(and the spread over seeds when there are several). Chances (exact) of consistent-and-new among valid: "
             "*uniform*, random keys and values; *mosaic*, each pair drawn from the training set's pairs at its "
             "position; *own mosaic*, from the model's own valid samples' pairs. *Rule novel*: the share of new contents "
             "among consistent ones for a model that learned the rule and samples the data distribution. Verdict: "
             f"*memorises* when copies are >= {100 * MEMORISES:.0f}% of consistent samples and the interval of new "
             "among consistent lies below the rule-novel share; *creative* when the interval of consistent-and-new "
             "lies above the larger of the uniform and own-mosaic chances and, for an attention network, above the "
             "CNN's interval. The intervals count samples; *(not in every seed)* follows a verdict whose bars "
             "(the chances and the CNN's rate) some seed's own rate does not clear.", "",
             "| training images | consistent contents covered | rule novel | uniform chance | mosaic chance | model | "
             "valid | consistent among valid | copies among valid | consistent and new among valid | own-mosaic "
             "chance | verdict |", "|---" * 12 + "|"]
    for cell in doc["cells"]:
        cov = cell["coverage"]
        for name, m in cell["models"].items():
            r = m["rates"]
            lines.append(f"| {cell['n_train']} | {cov['covered']}/{cov['consistent_contents']} | "
                         f"{_pct(cov['rule_novel'])} | {_pct(cell['chance'])} | {_pct(cell['mosaic_chance'])} | {m['label']} | "
                         f"{_short(r['valid'])} | {fmt(r['consistent_among_valid'])} | {fmt(r['copy_among_valid'])} | "
                         f"{fmt(r['novel_among_valid'])} | {_pct(m['own_mosaic_chance'])} | "
                         f"{_verdict(cell['verdicts'][name])} |")
    lines += ["", "## Distance to the training set and agreement with the ELS machine", "",
              "Nearest training image by pixel L2 distance (float64, values in [-1, 1]; one recoloured cell is "
              f"{_recoloured(doc)} away): median [quartiles] over new samples and over copies, all seeds. Agreement with "
              "the ELS machine from the same initial noise (seed 0): Pearson r over the cells' pixels (median), "
              "cells with the same decoded colour (and the agreement expected from the two colour frequencies "
              "alone), and pairs whose key and value both agree, split by whether the sample's pair is *alone* "
              "(its key appears once) or *coordinated* (its key is shared and every pair with it has the same "
              "value). The CNN is the local reference: a network that coordinates should depart from the ELS "
              "machine on coordinated pairs more than the CNN does.", "",
              "| training images | model | nearest distance, new | nearest distance, copies | cell r | cells "
              "agreeing (chance) | alone pairs agreeing | coordinated pairs agreeing |", "|---" * 8 + "|"]
    for cell in doc["cells"]:
        for m in cell["models"].values():
            nd = m["nearest_distance"]
            dist = ["n/a" if not s["n"] else f"{s['q50']:.2f} [{s['q25']:.2f}, {s['q75']:.2f}] (n = {s['n']})"
                    for s in (nd["novel"], nd["copy"])]
            a = m["agreement_with_els"]
            if a is None:
                agree = ["-"] * 4
            else:
                agree = [f"{a['cell_r']['median']:.3f}", f"{_short(a['cells'])} ({_pct(a['cell_chance'])})",
                         _short(a["pairs"]["alone"]["agree"]), _short(a["pairs"]["coordinated"]["agree"])]
            lines.append(f"| {cell['n_train']} | {m['label']} | " + " | ".join(dist + agree) + " |")
    lines.append("")
    return "\n".join(lines)


__all__ = ["DEFAULTS", "SIZES", "grid", "markdown", "report", "run", "run_cell", "verdicts"]
