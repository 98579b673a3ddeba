"""Worker processes die with their parent (``fastscore.study.parallel``): a parent killed with SIGKILL,
as the out-of-memory killer would, leaves no worker behind, whatever the worker was doing.

No assertion here is on speed: each test waits for a readiness signal (a pid file, a finished row)
and then polls, up to a generous bound, for the state it checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

BOUND = 60.0   # seconds: a hang guard for the polls, not a speed requirement


def _default_sigint() -> None:
    """In a child: the default SIGINT handling, even when pytest runs from a shell that ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"   # a zombie has exited; only its parent's wait is missing


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_for(what, cond, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        assert time.monotonic() < deadline, f"still waiting after {bound:.0f} s for {what}"
        time.sleep(0.1)


# the middle process: starts a child that calls die_with_parent(its parent), writes the child's pid
# and then sleeps until killed
_MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(3600)
"""
# the worker: arms die_with_parent (optionally without the parent-death signal: the watchdog alone),
# says it is ready through a file, then keeps busy (pure Python, as a training step between ops)
_CHILD = """
import os, sys, time
from fastscore.study import parallel
if sys.argv[2] == "watchdog":
    parallel._parent_death_signal = lambda sig: False
parallel.die_with_parent(os.getppid())
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    sum(i * i for i in range(100_000))
"""


@pytest.mark.parametrize("how", ["pdeathsig", "watchdog"])
def test_a_worker_dies_with_its_sigkilled_parent(tmp_path, how):
    ready = tmp_path / "child.pid"
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE, _CHILD, str(ready), how],
                              start_new_session=True)
    try:
        _wait_for("the worker's pid file", lambda: ready.exists() or middle.poll() is not None)
        assert middle.poll() is None, "the middle process ended early"
        child = int(ready.read_text())
        assert _alive(child)
        middle.kill()   # SIGKILL: no handler, no clean-up in the parent
        middle.wait()
        _wait_for("the orphaned worker to exit", lambda: not _alive(child))
    finally:
        for pid in _session(middle.pid):
            os.kill(pid, signal.SIGKILL)


def test_die_with_parent_ends_a_process_whose_parent_is_already_gone(tmp_path):
    code = ("import os; from fastscore.study import parallel; parallel.die_with_parent(os.getppid() + 1); "
            "print('survived')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM and "survived" not in r.stdout, r.stderr


@pytest.mark.slow
def test_sigkill_of_reproduce_leaves_no_worker(tmp_path):
    """``kill -9`` of a running ``fastscore reproduce --workers 2`` mid-study: its workers (training, or
    idle after their unit) exit on their own."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "fastscore", "reproduce", "--tiny", "--out", str(out), "--workers", "2", "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=_default_sigint)
    try:
        def workers() -> list[int]:
            return [pid for pid in _session(p.pid) if pid != p.pid and b"spawn_main" in _cmdline(pid)]

        def mid_run() -> bool:   # a finished row: the workers have been training
            return p.poll() is not None or bool(list((out / "rows").glob("*.json")) if (out / "rows").exists() else [])

        _wait_for("a first finished row", mid_run, bound=600)
        assert p.poll() is None, "the study ended before it could be killed"
        spawned = workers()
        assert spawned, "no worker process found"
        p.kill()
        p.wait()
        _wait_for(f"workers {spawned} to exit", lambda: not any(_alive(w) for w in spawned))
    finally:
        for pid in _session(p.pid):
            os.kill(pid, signal.SIGKILL)


# a worker's SIGTERM arriving inside a weakref callback (as the import machinery's lock callbacks):
# Python cannot propagate the handler's SystemExit from there, swallows it and prints a traceback
_CALLBACK_STOP = """
import os, signal, sys, time, weakref
from fastscore.study import parallel
signal.signal(signal.SIGTERM, parallel._sigterm_exit)
sys.unraisablehook = parallel.stop_again(SystemExit, lambda: signal.SIGTERM)   # as _init_worker sets it
class A:
    pass
def cb(ref):
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(10))   # the handler runs here, inside the callback
a = A()
r = weakref.ref(a, cb)
try:
    del a
    deadline = time.monotonic() + 30   # a hang guard: the stop comes RESTOP_SECONDS after the callback
    while time.monotonic() < deadline:
        sum(range(10))
    print("carried on")
finally:
    print("unwound")
"""


def test_a_worker_stopped_inside_a_callback_stops_quietly():
    p = subprocess.run([sys.executable, "-c", _CALLBACK_STOP], capture_output=True, text=True, timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, (p.stdout, p.stderr)
    assert "unwound" in p.stdout and "carried on" not in p.stdout    # stopped at the next point, finally run
    assert "Traceback" not in p.stderr, p.stderr
