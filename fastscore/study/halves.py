"""Memorisation to generalisation, the Kadkhodaie et al. way (ICLR 2024): two networks trained on disjoint
training sets of the same size draw the same sample from the same noise once they learned the same
function instead of their data.

For each number ``n`` of training images (the grid's axis, ``n_train``) and each network kind of
``networks`` (default the CNN, ``"none"``, and ``"softmax"``; any ``ModelConfig`` attention):

1. the training set is split in two halves, A and B, of ``n`` images each with no decoded content in
   common (``split``): ``2 n`` distinct contents are drawn from the data distribution without replacement
   and dealt alternately to A and B. A content is the image's (keys, values) (``metrics.content_codes``;
   an image is its content rendered, so distinct contents are distinct images); ``fastscore.data.generate``
   draws contents in fixed chunks of ``CHUNK`` (chunk ``i`` seeded from ``data_seed`` and ``i``) and a
   content is kept at its first appearance. Every drawn content is consistent, so a setting has
   ``novelty.n_consistent_contents(n_pairs, n_colours)`` of them (4 pairs: 60 with 2 colours, 16,720 with
   4), and ``2 n`` beyond that is a ValueError. The draw order does not depend on ``n``: the halves of a
   smaller ``n`` are the first images of a larger ``n``'s;
2. per seed ``s``, network A and network B start from the same initial weights (seed ``MODEL_SEED + s``)
   and train with the same ``TrainConfig`` (seed ``s``: the same batch positions, timesteps and noise at
   every step; only the images differ); they are trained one after the other (the ensemble engine
   trains its members on one data set);
3. both sample ``n_samples`` images from the same initial noise and the same per-step noise (sampler
   seed ``SAMPLE_SEED + s``), and the pair measures (``compare``): *same content*, the fraction of
   sample pairs that are both valid and decode to the same content (95% Wilson interval; also among
   the pairs that are both valid), the per-pair Pearson r of the mean-centred pixels
   (``theory.sample_correlation``; median and quartiles), and each network's *copy rate*, the fraction
   of its samples (of all, invalid ones included) whose content is a training image of its own half
   (beside it, copies of the other half: what a network that generalises draws as often as its own).

A memorising pair copies its own half, so it draws the same content only by accident (never, when both
copy every sample: the halves share no content); a pair that generalised draws the same content from
the same noise. The curve of same content and copy rate against ``n`` shows where each kind stops
memorising.

Two references: the *rule copy rate* of a half (``rule_copy_rate``, computed by ``report`` from the
halves), the copy rate
of a network that learned the rule and samples the data distribution, i.e. the half's mass under the
data distribution; and the *shuffled* pairing (``shuffled``), A's sample i against B's sample
(i + 1) mod N (other noise), the same content and r of unrelated samples of the two networks, kept in
each row (``report`` computes it from the saved samples for a row written before rows kept it). So a
cell's JSON files (its finished rows, a finished cell's results.json) carry it to another machine
without samples or checkpoints: a rerun there trains only the unfinished pairs.

``run`` is a sweep (``fastscore.study.sweep.run`` with this module's ``run_cell``): a cell per ``n`` in
``out/cells/n_train=<n>/`` (``study.json``, the cell's ``StudyConfig``; ``checkpoints/<net>-<half>-seed<s>``,
``samples/<net>-<half>-seed<s>`` (kind ``halves-samples``), ``rows/<net>-seed<s>.json`` one finished pair
each, ``results.json``; every file in the cell's manifest). A cell whose ``results.json`` holds its config
(``StudyConfig.matches``) is finished and not rerun; a finished row is not retrained; another config in a
cell is refused without ``force``, which removes only the files the cell wrote. ``report`` writes
``halves.json``, ``halves.md`` and, with matplotlib, ``halves.png`` (same content and copy rate against
``n``, per kind), beside the sweep's ``sweep.md`` (each network's own rates, the halves as networks
``<net>-a`` and ``<net>-b``).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .. import _validate
from .._validate import UsageError
from ..checkpoint import atomic_write, atomic_write_text, load_tensors, save_tensors
from ..data import KVBatch, KVConfig, decode, generate, render
from ..metrics import Rate, analytic_random_consistency, content_codes, score
from ..models import build_model
from ..novelty import coverage, n_consistent_contents, training_codes
from ..sampling import sample
from ..theory import correlation_summary, sample_correlation
from ..training import train
from .config import LABELS, MODEL_SEED, SAMPLE_SEED, StudyConfig
from .files import StudyDir, check_checkpoint, load_checked_model, row_name, versions
from .grid import Grid
from .report import fmt
from .rows import SAVE_EVERY
from .run import Interrupted
from .sweep import cell_config, finished_cells
from .sweep import run as run_sweep

# training images per half, per preset: from a few dozen to most of the 4-colour setting's 16,720
# contents (2 x 8,000 of them); a preset size that does not fit the setting is left out (``grid``)
SIZES: dict[str, tuple[int, ...]] = {"full": (16, 64, 256, 1024, 2048, 5000, 8000), "quick": (16, 128, 1024),
                                     "tiny": (4, 16)}
# what the study changes in its preset: the paper's 4 colours (2 colours have 60 contents: 30 per half at
# most), the CNN beside softmax attention, no analytic models and no coordination probe
DEFAULTS: dict[str, Any] = {"n_colours": 4, "networks": ("none", "softmax"), "analytic": (), "probe_t": ()}
HALVES = ("a", "b")
CHUNK = 4096                 # contents drawn per chunk by ``split``
_CHUNK_STRIDE = 1_000_003    # chunk i of data seed d is generated with seed d * stride + i


def distinct_contents(config: KVConfig, m: int, seed: int = 0) -> KVBatch:
    """The first ``m`` distinct contents of the data distribution's draws (see the module docstring);
    ValueError naming ``m`` when the setting has fewer than ``m`` contents."""
    if not isinstance(config, KVConfig):
        raise TypeError(f"config must be a KVConfig, got {type(config).__name__}")
    _validate.positive_int("m", m)
    _validate.seed("seed", seed)
    total = n_consistent_contents(config.n_pairs, config.n_colours)
    if m > total:
        raise ValueError(f"m must be <= {total}, the distinct contents of {config.n_pairs} pairs of "
                         f"{config.n_colours} colours, got {m}")
    seen = torch.empty(0, dtype=torch.int64)
    parts: list[KVBatch] = []
    have, i = 0, 0
    while have < m:
        b = generate(config, CHUNK, (seed * _CHUNK_STRIDE + i) % 2**63)
        i += 1
        codes = content_codes(b.keys, b.values, config.n_colours)
        uniq, inv = torch.unique(codes, return_inverse=True)
        first = torch.full((uniq.numel(),), CHUNK, dtype=torch.int64).scatter_reduce(
            0, inv, torch.arange(CHUNK), reduce="amin")
        keep = first[~torch.isin(uniq, seen)].sort().values[:m - have]       # new contents, in draw order
        seen = torch.cat([seen, codes[keep]])
        parts.append(KVBatch(b.keys[keep], b.values[keep], b.functions[keep]))
        have += keep.numel()
    return KVBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("keys", "values", "functions")))


def split(config: KVConfig, n: int, seed: int = 0) -> tuple[KVBatch, KVBatch]:
    """Halves A and B of ``n`` contents each with no content in common: ``distinct_contents(config, 2 n,
    seed)`` dealt alternately (A the 1st, 3rd, ...). ValueError naming ``n`` when ``n < 1`` or ``2 n``
    exceeds the setting's contents."""
    _validate.positive_int("n", n)
    total = n_consistent_contents(config.n_pairs, config.n_colours)
    if 2 * n > total:
        raise ValueError(f"n must be <= {total // 2}: two halves of n images need 2 n = {2 * n} distinct contents "
                         f"and {config.n_pairs} pairs of {config.n_colours} colours have {total}, got {n}")
    c = distinct_contents(config, 2 * n, seed)
    return tuple(KVBatch(c.keys[h::2], c.values[h::2], c.functions[h::2]) for h in (0, 1))  # type: ignore[return-value]


def copies(config: KVConfig, samples: torch.Tensor, train_set: KVBatch) -> torch.Tensor:
    """(N,) bool: the sample is valid and its decoded content is one of ``train_set``'s."""
    d = decode(config, samples)
    codes = content_codes(d.keys.clamp(min=0), d.values.clamp(min=0), config.n_colours)
    return d.valid & torch.isin(codes, training_codes(config, train_set))


def compare(config: KVConfig, a: torch.Tensor, b: torch.Tensor) -> dict:
    """Pairs of samples ``a``, ``b`` (N, 3, H, W) drawn from the same noise: ``same_content`` (both valid,
    same decoded content; ``Rate.to_dict`` over all N pairs), ``same_content_among_valid`` (over the
    pairs both valid), ``r`` (per-pair Pearson r of the mean-centred pixels, a list of floats; NaN where
    a sample is constant) and ``r_summary`` (``theory.correlation_summary``)."""
    _validate.tensor("a", a, ndim=4)
    _validate.tensor("b", b, ndim=4)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    da, db = decode(config, a), decode(config, b)
    both = da.valid & db.valid
    P = config.n_colours
    same = both & (content_codes(da.keys.clamp(min=0), da.values.clamp(min=0), P)
                   == content_codes(db.keys.clamp(min=0), db.values.clamp(min=0), P))
    r = sample_correlation(a, b)
    return {"same_content": Rate(int(same.sum()), int(same.numel())).to_dict(),
            "same_content_among_valid": Rate(int(same.sum()), int(both.sum())).to_dict(),
            "r": r.tolist(), "r_summary": correlation_summary(r)}


def shuffled(config: KVConfig, a: torch.Tensor, b: torch.Tensor) -> dict:
    """The shuffled-pairing control: ``compare(config, a, b.roll(-1, 0))``, A's sample i against B's sample
    (i + 1) mod N, drawn from other noise."""
    return compare(config, a, b.roll(-1, 0))


def rule_copy_rate(config: KVConfig, train_set: KVBatch) -> Fraction:
    """Exact probability that a draw of the data distribution is one of ``train_set``'s contents (1 -
    ``novelty.coverage``'s ``rule_novel``): the copy rate of a network that learned the rule and samples the
    data distribution."""
    return 1 - Fraction(coverage(config, train_set)["rule_novel_exact"])


# ---------------------------------------------------------------------------------------------
# one cell: a number of training images, every network kind and seed
# ---------------------------------------------------------------------------------------------
def _samples_rel(net: str, half: str, seed: int) -> str:
    return f"samples/{row_name(f'{net}-{half}', seed)}.safetensors"


def _network(sd: StudyDir, config: StudyConfig, net: str, half: str, seed: int, images: torch.Tensor,
             device: torch.device, backend: str) -> tuple[torch.nn.Module, dict]:
    """Half ``half``'s trained network ``net`` of seed ``seed`` (its saved checkpoint when there) and
    ``{"train_seconds", "losses"}`` (every 10th step)."""
    ckpt = sd.checkpoint(f"{net}-{half}", seed)
    if ckpt.exists():
        model, meta = load_checked_model(ckpt, config, net, seed, backend=backend, device=device, half=half)
        return model, {"train_seconds": meta["extra"]["seconds"], "losses": meta["extra"]["losses"]}
    torch.manual_seed(MODEL_SEED + seed)
    model = build_model(config.model_config(net), backend=backend)
    partial = sd.partial(row_name(f"{net}-{half}", seed))     # resumes mid-training (rows.SAVE_EVERY)
    res = train(model, images, config.train_config(seed), device=device, progress=False, resume=partial,
                save_every=SAVE_EVERY)
    extra = {"half": half, "n_train": config.n_train, "data_seed": config.data_seed, "init_seed": MODEL_SEED + seed,
             "losses": res.losses[::10], "seconds": res.seconds}
    sd.save_model(str(ckpt.relative_to(sd.path)), res.model, data_config=config.data_config(),
                  train_config=config.train_config(seed), extra=extra)
    partial.unlink(missing_ok=True)
    return res.model, {"train_seconds": res.seconds, "losses": extra["losses"]}


def run_row(sd: StudyDir, config: StudyConfig, net: str, seed: int, halves: tuple[KVBatch, KVBatch],
            device: torch.device, backend: str) -> dict:
    """Train (or load) the two networks ``net`` of seed ``seed``, sample them from the same noise, and
    measure the pair (``compare``) and each half's rates; the row is saved to ``rows/`` atomically."""
    cfg = config.data_config()
    row: dict[str, Any] = {"network": net, "seed": seed, "halves": {}}
    xs = []
    for half, contents in zip(HALVES, halves):
        images = render(cfg, contents.keys, contents.values)
        model, rec = _network(sd, config, net, half, seed, images, device, backend)
        t0 = time.perf_counter()
        x = sample(model, config.n_samples, sampler=config.sampler, steps=config.steps, eta=config.eta,
                   clip_x0=config.clip_x0, seed=SAMPLE_SEED + seed, device=device, backend=backend).cpu()
        rec["sample_seconds"] = time.perf_counter() - t0
        meta = {"kind": "halves-samples", "data": cfg.to_dict(), "half": half,
                "extra": {"n_train": config.n_train, "data_seed": config.data_seed}}

        def write(path: Path, x: torch.Tensor = x, meta: dict = meta) -> None:
            save_tensors(path, {"samples": x}, meta, overwrite=True)
        sd._write(_samples_rel(net, half, seed), write)   # through the cell's manifest, as StudyDir.save_samples
        other = halves[1 - HALVES.index(half)]
        rec["rates"] = score(cfg, x, contents).to_dict()
        rec["copy"] = Rate(int(copies(cfg, x, contents).sum()), x.shape[0]).to_dict()
        rec["copy_of_other"] = Rate(int(copies(cfg, x, other).sum()), x.shape[0]).to_dict()
        row["halves"][half] = rec
        xs.append(x)
    row.update(compare(cfg, xs[0], xs[1]))
    row["r"] = [round(v, 6) for v in row["r"]]
    row["shuffled"] = shuffled(cfg, xs[0], xs[1])    # the control, kept with the row: it travels without samples
    sd.write_json(f"rows/{row_name(net, seed)}.json", row)
    return row


def _check_checkpoints(sd: StudyDir, config: StudyConfig, jobs: list[tuple[str, int]]) -> None:
    """The checkpoints that rows ``jobs`` (``(net, seed)``, not finished) will load, checked against their
    rows before any training (``files.check_checkpoint``): a wrong one is found at the start, not hours in."""
    for net, s in jobs:
        for half in HALVES:
            ckpt = sd.checkpoint(f"{net}-{half}", s)
            if ckpt.exists():
                check_checkpoint(ckpt, config, net, s, half)


def run_cell(config: StudyConfig, out: str | Path, *, device: str | torch.device = "cpu", backend: str = "auto",
             force: bool = False, progress: bool = False, workers: int | None = None,
             group_seeds: bool | None = None) -> dict:
    """Run (or resume) one cell (``config.n_train`` images per half) into ``out``; returns its
    ``results.json`` document, shaped as ``sweep.run`` reads a study's (``rows``: each half as network
    ``<net>-<half>``; ``summary.baseline``), with the pairs in ``pairs``. ``progress``, ``workers`` and
    ``group_seeds`` are accepted for ``sweep.run`` and unused: rows run one at a time."""
    device = _validate.device("device", device)
    sd = StudyDir(Path(out))
    sd.prepare(config, force)
    start = time.perf_counter()
    jobs = [(net, s) for net in config.networks for s in range(config.n_seeds)]
    done = sd.finished_rows(jobs)
    _check_checkpoints(sd, config, [j for j in jobs if j not in done])
    resumed = len(done)
    try:
        halves = split(config.data_config(), config.n_train, config.data_seed)
        for net, s in jobs:
            if (net, s) not in done:
                done[(net, s)] = run_row(sd, config, net, s, halves, device, backend)
    except KeyboardInterrupt:
        kept = len(sd.finished_rows(jobs))
        sd.record_invocation(time.perf_counter() - start, kept - resumed, interrupted=True)
        raise Interrupted(f"interrupted; kept {kept} of {len(jobs)} finished pairs in {sd.path}; run the same "
                          "command again to resume") from None
    runs = sd.record_invocation(time.perf_counter() - start, len(jobs) - resumed)
    cfg = config.data_config()
    an = analytic_random_consistency(cfg.n_pairs, cfg.n_colours)
    pairs = [done[j] for j in jobs]
    doc = {"config": config.to_dict(), "data_config": cfg.to_dict(), "versions": versions(device),
           "wall_seconds": sum(r["seconds"] for r in runs), "invocations": runs,
           "summary": {"baseline": {"analytic_fraction": str(an), "analytic_consistent": float(an)}},
           "rows": [{"network": f"{p['network']}-{h}", "seed": p["seed"], "rates": p["halves"][h]["rates"],
                     "losses": p["halves"][h]["losses"]} for p in pairs for h in HALVES],
           "pairs": [{k: v for k, v in p.items() if k not in ("r", "shuffled")} for p in pairs]}
    sd.write_json("results.json", doc, indent=1)
    return doc


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------
def grid(mode: str = "full", sizes: tuple[int, ...] | None = None, **overrides: Any) -> Grid:
    """The study's grid: preset ``mode``, the ``DEFAULTS`` and ``overrides`` (study settings; None values
    ignored) as base settings, and ``n_train`` over ``sizes`` (default: the sizes of ``SIZES[mode]`` that
    fit the setting, 2 n <= its distinct contents). Every cell is validated here: a size below 1, or one
    whose two halves need more contents than the setting has, is a ValueError naming ``sizes``."""
    _validate.choice("mode", mode, tuple(SIZES))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "n_train" in overrides:
        raise UsageError("n_train is the halves study's axis; give sizes=(...) instead of n_train")
    base = {**DEFAULTS, **overrides}
    if base["analytic"] or base["probe_t"]:
        raise UsageError("the halves study trains networks only: analytic and probe_t must be empty, got "
                         f"{base['analytic']} and {base['probe_t']}")
    data = replace(StudyConfig.preset(mode), **base).data_config()
    total = n_consistent_contents(data.n_pairs, data.n_colours)
    if sizes is None:
        sizes = tuple(n for n in SIZES[mode] if 2 * n <= total)
        if not sizes:
            raise UsageError(f"sizes: none of the preset's {SIZES[mode]} fits {data.n_pairs} pairs of "
                             f"{data.n_colours} colours ({total} contents); give sizes")
    sizes = _validate.distinct_sizes("sizes", sizes)
    for n in sizes:
        if 2 * n > total:
            raise UsageError(f"sizes: {n} images per half need 2 x {n} = {2 * n} distinct contents, but "
                             f"{data.n_pairs} pairs of {data.n_colours} colours have {total} (largest size "
                             f"{total // 2})")
    g = Grid(base, {"n_train": tuple(sorted(sizes))}, mode)
    for c in g.cells():
        cell_config(g, c)
    return g


def run(g: Grid, out: str | Path, *, device: str | torch.device = "cpu", backend: str = "auto", force: bool = False,
        progress: bool = True, workers: int | None = None) -> dict | None:
    """Run (or resume) the study ``g`` (``grid(...)``) into ``out`` and write its report; returns the
    report (None on torchrun ranks other than 0). ``force`` as ``fastscore sweep``'s."""
    if set(g.axes) != {"n_train"}:
        raise UsageError(f"a halves grid sweeps n_train only, got axes {sorted(g.axes)}")
    t0 = time.perf_counter()
    res = run_sweep(g, out, device=device, backend=backend, force=force, progress=progress, workers=workers,
                    run_cell=run_cell)
    if res is None:
        return None
    return report(g, out, run_seconds=time.perf_counter() - t0)


def _pool(rates: list[dict]) -> dict:
    return Rate(sum(r["k"] for r in rates), sum(r["n"] for r in rates)).to_dict()


def _shuffled_row(sd: StudyDir, cfg: KVConfig, row: dict) -> dict:
    """``shuffled`` of the pair ``row``: the row's own (written since the control existed), else computed
    from the saved samples (a row of older code)."""
    if "shuffled" in row:
        return row["shuffled"]
    paths = [sd.path / _samples_rel(row["network"], h, row["seed"]) for h in HALVES]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing, and row {row['network']} seed {row['seed']} was written "
                                    "before rows kept their shuffled control; run the study again")
    a, b = (load_tensors(p, "halves-samples")[0]["samples"] for p in paths)
    return shuffled(cfg, a, b)


def report(g: Grid, out: str | Path, *, run_seconds: float | None = None, partial: bool = False) -> dict:
    """Pool every cell of ``g`` under ``out`` over seeds and write ``halves.json``, ``halves.md`` and
    ``halves.png`` (with matplotlib); returns the document. The rule copy rates (per cell) are computed
    here from the cell's halves, the shuffled control read from each row (or computed from the saved
    samples of a row written before rows kept it), so a cell carried without its samples reports too.
    ``partial``: the finished cells only, the others listed as ``unfinished`` (a FileNotFoundError when
    none is finished); without it an unfinished cell is one."""
    out = Path(out)
    done, unfinished = finished_cells(g, out, partial=partial, study="halves")
    wall = sum(res.get("wall_seconds", 0.0) for _, _, res in done)
    vers = next((res["versions"] for _, _, res in done if res.get("versions")), None)
    cells = []
    for c, config, res in done:
        sd = StudyDir(out / "cells" / c.dirname)
        cfg = config.data_config()
        rule = dict(zip(HALVES, (rule_copy_rate(cfg, h) for h in split(cfg, config.n_train, config.data_seed))))
        nets = {}
        for net in config.networks:
            rows = [json.loads(sd.row_path(net, s).read_text()) for s in range(config.n_seeds)]
            shuf = [_shuffled_row(sd, cfg, row) for row in rows]
            r = torch.tensor([v for row in rows for v in row["r"]], dtype=torch.float64)
            r_shuf = torch.tensor([v for sh in shuf for v in sh["r"]], dtype=torch.float64)
            h = {k: _pool([row["halves"][x][k] for row in rows for x in HALVES])
                 for k in ("copy", "copy_of_other")}
            nets[net] = {"label": LABELS[net], "seeds": [row["seed"] for row in rows],
                         "same_content": _pool([row["same_content"] for row in rows]),
                         "same_content_among_valid": _pool([row["same_content_among_valid"] for row in rows]),
                         "r": correlation_summary(r),
                         "shuffled": {"same_content": _pool([sh["same_content"] for sh in shuf]),
                                      "same_content_among_valid": _pool([sh["same_content_among_valid"]
                                                                         for sh in shuf]),
                                      "r": correlation_summary(r_shuf)},
                         **{f"copy_{x}": _pool([row["halves"][x]["copy"] for row in rows]) for x in HALVES}, **h,
                         "valid": _pool([row["halves"][x]["rates"]["valid"] for row in rows for x in HALVES]),
                         "per_seed": [{"seed": row["seed"], "same_content": row["same_content"],
                                       "r_median": row["r_summary"]["median"],
                                       "shuffled_same_content": sh["same_content"],
                                       "shuffled_r_median": sh["r_summary"]["median"],
                                       **{f"copy_{x}": row["halves"][x]["copy"] for x in HALVES}}
                                      for row, sh in zip(rows, shuf)]}
        cells.append({"cell": c.name, "n_train": config.n_train, "wall_seconds": res.get("wall_seconds", 0.0),
                      "rule_copy": {**{x: float(rule[x]) for x in HALVES},
                                    "mean": float((rule["a"] + rule["b"]) / 2),
                                    **{f"{x}_exact": f"{rule[x].numerator}/{rule[x].denominator}" for x in HALVES}},
                      "networks": nets})
    first = cell_config(g, g.cells()[0])
    doc: dict[str, Any] = {"grid": g.to_dict(), "config": first.to_dict() | {"n_train": [c["n_train"] for c in cells]},
                           "data_config": first.data_config().to_dict(), "versions": vers,
                           "study_wall_seconds": wall, "run_seconds": run_seconds, "cells": cells,
                           "unfinished": unfinished}
    doc["figure"] = _figure(out / "halves.png", doc)
    atomic_write_text(out / "halves.json", json.dumps(doc, indent=1), overwrite=True)
    atomic_write_text(out / "halves.md", markdown(doc), overwrite=True)
    return doc


def _r(s: dict) -> str:
    return "n/a" if not s["n"] else f"{s['median']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(doc: dict) -> str:
    """``halves.md``: per number of training images and network, same content and r (paired and shuffled),
    copy rates and the rule copy rates."""
    c, v = doc["config"], doc["versions"] or {}
    lines = [f"# fastscore halves study: {c['n_pairs']} pairs, {c['n_colours']} colours, "
             f"{c['image_size']}x{c['image_size']}", "",
             f"Preset {doc['grid']['preset']}; per number n of training images, two networks of each kind trained "
             f"on disjoint halves of n images each (no content in common; data seed {c['data_seed']}), the same "
             f"initial weights and training noise ({c['train_steps']} steps x {c['n_seeds']} seed(s)), sampled "
             f"from the same noise ({c['n_samples']} pairs per seed, {c['sampler']} {c['steps']} steps). Device "
             f"{v.get('device_name', '?')} ({v.get('device', '?')}), torch {v.get('torch', '?')}; wall time "
             f"{doc['study_wall_seconds']:.0f} s (sum over cells and invocations)."
             + (f" **Not finished yet: {', '.join(doc['unfinished'])}** (this report has the finished cells only)."
                if doc.get("unfinished") else ""), "",
             "Same content: both samples valid and decoded to the same content, of all pairs [95% Wilson interval] "
             "(and of the pairs both valid). r: per-pair Pearson r of the mean-centred pixels, median "
             "[quartiles]. Shuffled: the same measures with A's sample i paired with B's sample (i + 1) mod N "
             "(other noise), what unrelated samples of the two networks give (the shared grey background raises "
             "it above 0). The paired r is also raised by the shared initial weights and noise, so read it "
             "against the shuffled r and the copy rates, not alone. Copy rate: samples whose content "
             "is a training image of the network's own half, of all samples; copies of the other half: of the "
             "other half's (both networks pooled). Rule copy rate A, B: each half's probability mass under the "
             "data distribution, the copy rate of a network that learned the rule and samples the data "
             "distribution (every sample valid).", "",
             "| n per half | network | seeds | same content | same content, shuffled | same content, both valid | "
             "median r [quartiles] | median r, shuffled [quartiles] | copy rate A | copy rate B | "
             "rule copy rate A, B | copies of the other half | valid |", "|---" * 13 + "|"]
    for cell in doc["cells"]:
        rule = cell["rule_copy"]
        for m in cell["networks"].values():
            sh = m["shuffled"]
            lines.append(f"| {cell['n_train']} | {m['label']} | {len(m['seeds'])} | {fmt(m['same_content'])} | "
                         f"{fmt(sh['same_content'])} | {fmt(m['same_content_among_valid'])} | {_r(m['r'])} | "
                         f"{_r(sh['r'])} | {fmt(m['copy_a'])} | {fmt(m['copy_b'])} | "
                         f"{_pct(rule['a'])}, {_pct(rule['b'])} | {fmt(m['copy_of_other'])} | {fmt(m['valid'])} |")
    lines += ["", "Per seed:", "", "| n per half | network | seed | same content | same content, shuffled | "
              "median r | median r, shuffled | copy rate A | copy rate B |", "|---" * 9 + "|"]
    for cell in doc["cells"]:
        for m in cell["networks"].values():
            for s in m["per_seed"]:
                lines.append(f"| {cell['n_train']} | {m['label']} | {s['seed']} | {fmt(s['same_content'])} | "
                             f"{fmt(s['shuffled_same_content'])} | {s['r_median']:.3f} | "
                             f"{s['shuffled_r_median']:.3f} | {fmt(s['copy_a'])} | {fmt(s['copy_b'])} |")
    if doc.get("figure"):
        lines += ["", f"![same content and copy rate]({doc['figure']})"]
    return "\n".join(lines) + "\n"


def _figure(path: Path, doc: dict) -> str | None:
    """Same content (solid, 95% intervals) and copy rate (dashed, both halves) against n, per network kind,
    and the rule copy rate (dotted, mean of the halves); None without matplotlib."""
    from .figures import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    nets = list(dict.fromkeys(n for cell in doc["cells"] for n in cell["networks"]))
    for i, net in enumerate(nets):
        colour = f"C{i}"
        pts = [(cell["n_train"], cell["networks"][net]) for cell in doc["cells"] if net in cell["networks"]]
        xs = [n for n, _ in pts]
        same = [m["same_content"] for _, m in pts]
        ys = [100 * s["rate"] for s in same]
        err = [[y - 100 * s["ci95"][0] for y, s in zip(ys, same)], [100 * s["ci95"][1] - y for y, s in zip(ys, same)]]
        ax.errorbar(xs, ys, yerr=err, color=colour, marker="o", capsize=3, label=f"{LABELS[net]}: same content")
        copy = [100 * _pool([m["copy_a"], m["copy_b"]])["rate"] for _, m in pts]
        ax.plot(xs, copy, color=colour, marker="s", linestyle="--", label=f"{LABELS[net]}: copy rate")
    ax.plot([cell["n_train"] for cell in doc["cells"]], [100 * cell["rule_copy"]["mean"] for cell in doc["cells"]],
            color="0.4", linestyle=":", label="rule copy rate")
    ax.set_xscale("log")
    ax.set_xlabel("training images per half (n)")
    ax.set_ylabel("% of sample pairs / samples")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=6)

    def write(tmp) -> None:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    atomic_write(path, write, overwrite=True)
    plt.close(fig)
    return path.name


__all__ = ["CHUNK", "DEFAULTS", "HALVES", "SIZES", "compare", "copies", "distinct_contents", "grid", "markdown",
           "report", "rule_copy_rate", "run", "run_cell", "run_row", "shuffled", "split"]
