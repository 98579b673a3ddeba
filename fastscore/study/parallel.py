"""Units of work (a network with its seeds, or one row: ``rows.units``) in worker processes, with
one progress bar, and a clean stop on Ctrl-C or SIGTERM.

Workers are spawned processes of a ``ProcessPoolExecutor``, each with ``cpu_count // workers``
threads. They ignore SIGINT (Ctrl-C reaches the whole process group; only the parent decides) and
turn SIGTERM into ``SystemExit``, so a stopped worker unwinds its ``finally`` blocks (no temporary
files left). Workers die with their parent, however it ends (``kill -9``, the OOM killer): on Linux
the kernel sends them SIGTERM when it dies (``prctl(PR_SET_PDEATHSIG)``), and on every platform a
watchdog thread polls ``os.getppid()`` and, once the parent is gone, sends the worker SIGTERM and
ends it with ``os._exit`` after ``STOP_SECONDS`` whatever it is doing. When the parent is interrupted it terminates the workers, kills any that do not stop
within ``STOP_SECONDS``, and never waits on the pool (``shutdown(wait=True)`` would hang on
workers still finishing their rows). Finished rows are saved by then; the rerun resumes."""
from __future__ import annotations

import ctypes
import os
import queue as queue_mod
import signal
import sys
import threading
import time
from typing import Any

import torch

from .._signals import stop_again
from .config import LABELS
from .rows import RunContext, run_unit

STOP_SECONDS = 3.0
#: how often a worker's watchdog checks that its parent is alive (seconds)
WATCH_SECONDS = 0.5
PR_SET_PDEATHSIG = 1   # <linux/prctl.h>
# relative cost of a row (CPU, width 64, 10k steps; measured in the full run: top-1 ~630 s, softmax
# ~525 s, identity ~345 s, CNN ~320 s per row on one thread; the analytic rows sample only)
COST = {"top1": 4, "softmax": 3, "identity": 2, "none": 1}


def default_workers(device: torch.device) -> int:
    """Two rows at a time on a CPU with >= 2 cores (small convs scale poorly across threads: two
    single-threaded trainings do ~1.4x the work of one two-threaded one); one on a GPU."""
    return 2 if device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def _cost(unit: tuple[str, tuple[int, ...]]) -> int:
    return COST.get(unit[0], 0) * len(unit[1])


def balance(todo: list[tuple[str, tuple[int, ...]]], workers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Split (by halves of its seeds) any unit that costs more than a worker's share of the total, so
    that grouping seeds never leaves a worker idle that one-row units would have kept busy (on a CPU
    an ensemble of M costs M networks: there is nothing to gain from a bigger one)."""
    out = list(todo)
    share = sum(_cost(u) for u in out) / workers
    while True:
        big = [i for i, u in enumerate(out) if len(u[1]) > 1 and _cost(u) > share]
        if not big:
            return out
        i = max(big, key=lambda j: _cost(out[j]))
        (net, seeds), h = out[i], (len(out[i][1]) + 1) // 2
        out[i:i + 1] = [(net, seeds[:h]), (net, seeds[h:])]


class QueueBar:
    """Progress from a worker process: counts locally, sends to the parent's queue every 0.5 s."""

    def __init__(self, queue) -> None:
        self.queue, self.pending, self.last = queue, 0.0, time.perf_counter()

    def update(self, n: float = 1) -> None:
        self.pending += n
        if time.perf_counter() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.queue.put(self.pending)
        self.pending, self.last = 0.0, time.perf_counter()


_QUEUE: Any = None


def _sigterm_exit(signum, frame) -> None:
    sys.exit(128 + signum)


def _parent_death_signal(sig: int) -> bool:
    """Ask Linux to send this process ``sig`` when its parent dies; False where that is unavailable.
    (The kernel means the parent *thread*: the pool starts its workers from the caller's thread, which
    outlives them.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Poll until the parent is gone (``os.getppid()`` changes: the worker was re-parented), then stop
    this worker: SIGTERM (its handler unwinds the running unit), and ``os._exit`` after ``STOP_SECONDS``
    in case that did not end it (an idle worker blocked on the pool's queues, a long C++ call)."""
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_SECONDS)
    os._exit(128 + signal.SIGTERM)


def die_with_parent(parent: int) -> None:
    """Make this process end soon after process ``parent`` (its parent) dies: a parent-death signal
    where the OS has one, and a watchdog thread everywhere. Ends the process now if the parent is
    already gone."""
    _parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:   # it died before the signal was armed
        os._exit(128 + signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(parent,), name="fastscore-parent-watch", daemon=True).start()


def _init_worker(queue, threads: int, parent: int) -> None:
    global _QUEUE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _sigterm_exit)
    sys.unraisablehook = stop_again(SystemExit, lambda: signal.SIGTERM)   # a SIGTERM swallowed: again
    die_with_parent(parent)
    torch.set_num_threads(threads)
    _QUEUE = queue


def unit_label(net: str, seeds: tuple[int, ...]) -> str:
    """``"CNN, seed 0"`` or ``"CNN, seeds 0,1,2"``: a unit of work for the progress bar."""
    return f"{LABELS.get(net, net)}, seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"


def _worker_unit(ctx: RunContext, net: str, seeds: tuple[int, ...]) -> dict:
    try:
        if _QUEUE is None:
            return run_unit(ctx, net, seeds)
        _QUEUE.put(("start", net, seeds))
        bar = QueueBar(_QUEUE)
        ctx.bar = bar
        rows = run_unit(ctx, net, seeds)
        bar.flush()
        _QUEUE.put(("end", net, seeds))
        return rows
    except SystemExit as e:
        # SIGTERM: the row's finally blocks have run (no temporary files left); leave now, instead of
        # reporting the exit to the pool and waiting for the next row
        os._exit(e.code if isinstance(e.code, int) else 1)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop(pool) -> None:
    """Terminate the pool's workers now (SIGTERM, then SIGKILL after ``STOP_SECONDS``)."""
    procs = list(getattr(pool, "_processes", {}).values())   # the executor has no public kill
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    pool.shutdown(wait=False, cancel_futures=True)


def run_parallel(ctx: RunContext, todo: list[tuple[str, tuple[int, ...]]], workers: int, done: dict) -> None:
    """Run the units ``todo`` (``(name, seeds)``, ``rows.units``) in ``workers`` processes; the rows of
    each finished unit are added to ``done`` as it arrives. A failed unit raises here, after the units
    still running are stopped (rows finished before, in any unit, stay saved for the rerun)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    mpc = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    bar, running = ctx.bar, []  # type: Any, list[tuple[str, tuple[int, ...]]]
    queue = mpc.Queue() if bar is not None else None

    def drain() -> None:
        assert queue is not None
        while True:
            try:
                msg = queue.get_nowait()
            except queue_mod.Empty:
                break
            if isinstance(msg, tuple):
                (running.append if msg[0] == "start" else running.remove)(msg[1:])
            else:
                bar.update(msg)
        bar.set_description("reproduce [" + "; ".join(unit_label(n, s) for n, s in running) + "]")

    pool = cf.ProcessPoolExecutor(workers, mp_context=mpc, initializer=_init_worker, initargs=(queue, threads, os.getpid()))
    try:
        # longest units first, so the last one does not run alone on one core while the others idle
        order = sorted(todo, key=lambda j: -_cost(j))
        portable = ctx.portable()
        # submit spawns the workers: with SIGINT ignored meanwhile, they start ignoring it (an ignored
        # signal survives exec, and Python then installs no KeyboardInterrupt handler), so a Ctrl-C to
        # the process group while they import torch prints no traceback from them
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            futures = [pool.submit(_worker_unit, portable, net, seeds) for net, seeds in order]
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                done.update(f.result())
            if queue is not None:
                drain()
    except BaseException:
        _stop(pool)
        raise
    finally:
        if queue is not None:
            queue.cancel_join_thread()   # never block exit on progress messages nobody reads
    pool.shutdown(wait=True)
