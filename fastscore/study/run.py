"""``reproduce``: run (or resume) a study into a directory; stop cleanly when interrupted."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import _validate
from ..metrics import analytic_random_consistency, random_images, score
from ..ops import BACKENDS
from .config import ANALYTIC, PAPER, RANDOM_IMAGES_SEED, StudyConfig
from .figures import study_figures
from .files import StudyDir, check_checkpoint, versions
from .parallel import balance, default_workers, run_parallel, unit_label
from .report import coordination_verdict, correlations, own_marginal_chance, results_markdown, summarise
from .rows import RunContext, progress_weights, run_unit, units


class Interrupted(KeyboardInterrupt):
    """A study stopped by Ctrl-C or SIGTERM; ``str()`` says what was kept and how to resume."""


def reproduce(config: StudyConfig, out: str | Path, *, device: str | torch.device = "cpu", backend: str = "auto",
              force: bool = False, progress: bool = True, workers: int | None = None,
              group_seeds: bool | None = None) -> dict:
    """Run (or resume) the study into directory ``out``; returns the results document.

    ``workers``: rows trained at once in separate processes (default: 2 on a CPU with >= 2 cores,
    1 on a GPU). Rows are the same config either way; float results may differ in the last bits
    (thread count changes summation order). On KeyboardInterrupt (Ctrl-C; the CLI turns SIGTERM
    into one) the workers are stopped, the invocation's time is recorded, and ``Interrupted`` is
    raised: finished rows are kept and the same call resumes.

    ``group_seeds``: train the seeds of a network together, as one ensemble
    (``fastscore.ensemble``), then evaluate each row; each checkpoint is the one its row trains alone
    up to float32 rounding. False: one row at a time (the reference). None (default): grouped on a
    GPU, where one step of M networks costs about what one network's does; one row at a time on a
    CPU, where the ensemble runs its members one after another anyway and fewer, larger jobs
    balanced worse over two worker processes (grouped 8-58% slower in tiny 3-seed studies). A unit of work (a network's
    missing seeds, or one row) runs in one worker; with several workers a network whose seeds cost
    more than a worker's share is split (``parallel.balance``)."""
    device = _validate.device("device", device)
    _validate.choice("backend", backend, BACKENDS)
    if workers is not None:
        _validate.positive_int("workers", workers)
    if group_seeds is None:
        group_seeds = device.type == "cuda"
    if not isinstance(group_seeds, bool):
        raise TypeError(f"group_seeds must be a bool or None, got {type(group_seeds).__name__}")
    sd = StudyDir(Path(out))
    sd.prepare(config, force)
    start = time.perf_counter()
    jobs = config.jobs()
    done = sd.finished_rows(jobs)
    for net, seed in jobs:                  # a checkpoint a row will load is checked now, not hours in
        if net not in ANALYTIC and (net, seed) not in done and sd.checkpoint(net, seed).exists():
            check_checkpoint(sd.checkpoint(net, seed), config, net, seed)
    resumed = len(done)
    bar = None
    try:
        cfg = config.data_config()
        weights, row_total = progress_weights(config)
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(row_total(n) for n, _ in jobs), desc="reproduce", dynamic_ncols=True, unit="img",
                       unit_scale=True)
            bar.update(sum(row_total(n) for n, _ in done))
        ctx = RunContext(config, sd, device, backend, bar=bar, weights=weights).with_data()
        t0 = time.perf_counter()
        rnd = score(cfg, random_images(cfg, config.n_random, seed=config.data_seed + RANDOM_IMAGES_SEED), ctx.train_set).to_dict()
        an = analytic_random_consistency(cfg.n_pairs, cfg.n_colours)
        baseline = {"analytic_fraction": str(an), "analytic_consistent": float(an), "empirical": rnd,
                    "seconds": time.perf_counter() - t0}
        todo = [j for j in jobs if j not in done]
        workers = default_workers(device) if workers is None else workers
        jobs_todo = units(todo, group_seeds)
        if workers > 1:
            jobs_todo = balance(jobs_todo, workers)
        if workers > 1 and len(jobs_todo) > 1:
            run_parallel(ctx, jobs_todo, workers, done)
        else:
            for net, seeds in jobs_todo:
                if bar is not None:
                    bar.set_description(f"reproduce [{unit_label(net, seeds)}]")
                done.update(run_unit(ctx, net, seeds))
    except BaseException as e:
        if bar is not None:
            bar.close()
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        kept = len(sd.finished_rows(jobs))   # from disk: rows saved just before the stop count too
        sd.record_invocation(time.perf_counter() - start, kept - resumed, interrupted=True)
        raise Interrupted(f"interrupted; kept {kept} of {len(jobs)} finished rows in {sd.path} "
                          f"(the time so far counts in its wall time); run the same command again to resume") from None
    rows = [done[j] for j in jobs]
    if bar is not None:
        bar.close()
    vers = versions(device)
    summary = summarise(config, rows, baseline)
    summary["correlation_with_els"] = correlations(sd, config)
    summary["own_marginal_chance"] = own_marginal_chance(sd, config)
    summary["coordination"] = coordination_verdict(summary)
    figures = study_figures(sd, config, rows, device, backend, summary)
    runs = sd.record_invocation(time.perf_counter() - start, len(todo))
    wall = sum(r["seconds"] for r in runs)
    doc = {"config": config.to_dict(), "data_config": cfg.to_dict(), "versions": vers, "wall_seconds": wall,
           "invocations": runs, "workers": workers, "group_seeds": group_seeds,
           "summary": summary, "rows": [{k: v for k, v in r.items() if k != "preview"} for r in rows],
           "figures": figures, "paper": PAPER}
    md = results_markdown(config, summary, vers, wall, len(runs))
    sd.write_json("results.json", doc, indent=1)
    sd.write_text("results.md", md)
    print(md)
    return doc


