"""The GPU check: one bounded command that measures every GPU claim and writes rows as it goes.

    python benchmarks/gpu_check.py --out DIR [--budget-s 420] [--previous DIR] [--dry-run] [--parts a,b]

Parts, in this order, each in its own subprocess with its own cap (a CUDA fault poisons a process;
a crash or a hang is recorded as the part's row and the next part runs). The budget is split by
``PARTS``' weights; time a part leaves unused passes on to the parts after it.

1. ``env``: GPU, memory, driver, CUDA, torch, triton, commit, SDPA backends that run, the peak
   device-to-device copy bandwidth (``roofline.copy_bandwidth``), missing packages.
2. ``tests``: ``pytest -n 8 -m "not cpu_only"`` (counts, names of failures; output in pytest.txt).
3. ``ops``: every attention op x pass x provider (``bench_attention.measure``: triton, torch, sdpa
   and each SDPA backend named; unsupported and > 2^31-score rows marked) at the study's shapes, and
   the fused attention block (``bench_attention_block.measure``: triton, torch (the composition as
   ``auto`` runs it), eager, the composition with each SDPA backend forced) at issue 21's shapes.
4. ``reverse_step``: GB/s and % of the measured copy bandwidth (``bench_reverse_step.measure``).
5. ``sample``: ``fastscore.sample`` of 4,096 images x 50 steps, eager vs CUDA graph, repeated calls.
6. ``train``: model-steps/s of ``train`` and of the ensemble at M = 1, 12, 48 (CNN, softmax), eager
   and graphed (``bench_ensemble.step_rate``), and the M = 12 softmax ensemble eager with
   ``backend="triton"`` (the fused block forced; issue 21's 1.3x target); profile.txt: top kernels of
   one eager M = 12 step.
7. ``study``, ``study_quick``: ``fastscore reproduce`` and ``reproduce --quick``, stopped at the cap
   with their progress recorded (results in study.md / study-quick.md when they finish).

Output in DIR (at most 8 files, none over 16 MB; ``MAX_FILES``, ``MAX_BYTES``): rows.jsonl (one JSON
row per measurement, appended as measured: op, provider, shape, dtype, pass, median_ms, p20_ms,
p80_ms, metric and value (GB/s, TFLOP/s, ...), device, torch, triton, commit, status, part),
summary.md (with a diff against ``--previous DIR``'s rows for the same device), log.txt,
pytest.txt, profile.txt, study.md, study-quick.md. Statuses: ``ok``, ``unsupported``, ``skipped``,
``failed``, ``timeout``, ``crashed``, ``missing`` (a package).

``--dry-run`` runs every part on the CPU at tiny sizes in about a minute (idle machine): kernels in Triton's
interpreter, a handful of tests, ``time.perf_counter`` instead of ``do_bench``; rows that need a GPU
are written with status ``skipped``. Nothing is installed and nothing goes to the network.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: (part, share of the budget), in the order they run
#: (ops 16 -> 22% and study 18 -> 12% when the fused block's rows joined ops: the full study, 4 min 54 s
#: on an H100 at 19d5887, stops at its cap at the default budget either way)
PARTS = [("env", 0.04), ("tests", 0.28), ("ops", 0.22), ("reverse_step", 0.03), ("sample", 0.07),
         ("train", 0.12), ("study", 0.12), ("study_quick", 0.12)]
MAX_FILES, MAX_BYTES = 8, 16 * 2 ** 20
#: the shapes the ops part measures, in order of importance: the study's, then the large-N cases
OP_SHAPES = [(B, 64, D) for B in (64, 768, 4096) for D in (16, 64)] + \
    [(B, N, D) for B, N in ((1024, 256), (256, 1024)) for D in (16, 64)]
#: the fused attention block (``bench_attention_block.SIZES``: (B, N = H*W, C, d)) is measured for softmax
#: (the study's network) at every shape, for every kind at these (the table has one path for all kinds)
BLOCK_ALL_KINDS = [(768, 64, 64, 64)]
PACKAGES = ("triton", "safetensors", "tqdm", "pytest", "xdist", "hypothesis", "matplotlib", "sklearn")
STATUSES = ("ok", "unsupported", "skipped", "failed", "timeout", "crashed", "missing")
MIN_CAP_S = 5.0


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
class Rows:
    """Appends rows to ``DIR/rows.jsonl`` as they are measured (flushed per row), each tagged with
    its part; a row without device/version fields gets them from ``_common.env``."""

    def __init__(self, out: Path, part: str) -> None:
        self.path, self.part = out / "rows.jsonl", part

    def __call__(self, row: dict) -> dict:
        from _common import env
        row = {"part": self.part, **env(), **row}
        row.setdefault("status", "ok")
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
        print(f"[{self.part}] {_brief(row)}", flush=True)
        return row


def _brief(r: dict) -> str:
    t = f"{r['median_ms']:.4f} ms" if isinstance(r.get("median_ms"), (int, float)) else ""
    v = f"{r['value']:.4g} {r.get('metric', '')}" if isinstance(r.get("value"), (int, float)) else ""
    return " ".join(str(x) for x in (r.get("op"), r.get("provider"), r.get("shape") or "", r.get("dtype") or "",
                                     r.get("pass") or "", r["status"], t, v, r.get("reason", "")) if x != "")


def read_rows(directory: Path) -> list[dict]:
    """The rows of ``directory/rows.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(directory) / "rows.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


#: every row carries these; a timed row (a median_ms) also the TIMED fields
COMMON = ("part", "op", "provider", "status", "device", "torch", "triton", "commit")
TIMED = ("shape", "dtype", "median_ms", "p20_ms", "p80_ms", "metric", "value")


def row_problems(rows: list[dict]) -> list[str]:
    """What is wrong with rows against the schema: missing fields, unknown statuses, a timed row without
    its times (or p20 <= median <= p80 broken), an unmeasured row without a reason, an ops row without
    its pass."""
    out = [] if rows else ["no rows"]
    for i, r in enumerate(rows):
        missing = [k for k in COMMON if k not in r]
        if missing:
            out.append(f"row {i}: missing {missing}")
        if r.get("status") not in STATUSES:
            out.append(f"row {i}: status {r.get('status')!r} not in {STATUSES}")
        if r.get("median_ms") is not None and (any(r.get(k) is None for k in TIMED) or
                                               not 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]):
            out.append(f"row {i}: a timed row needs {TIMED} with 0 < p20 <= median <= p80: {r}")
        if r.get("status") in ("unsupported", "skipped", "failed") and r.get("op") not in ("study", "pytest") \
                and not r.get("reason"):
            out.append(f"row {i}: status {r['status']} without a reason")
        if r.get("part") == "ops" and r.get("op") not in ("cap", "part") and r.get("provider") != "all" \
                and r.get("pass") not in ("fwd", "fwd_bwd"):
            out.append(f"row {i}: an ops row needs pass fwd or fwd_bwd")
    return out


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: " + ((str(e).strip().splitlines() or [""])[0][:300])


# ------------------------------------------------------------------------------------------------
# the parts (each runs in a child process: ``gpu_check.py --part NAME``)
# ------------------------------------------------------------------------------------------------
class Ctx:
    """What a part needs: the output directory, the row writer, dry run or not, the device, the
    deadline (a part stops starting new measurements after it) and the timer."""

    def __init__(self, out: Path, part: str, dry: bool, cap_s: float) -> None:
        import torch
        self.out, self.dry, self.emit = out, dry, Rows(out, part)
        self.cuda = torch.cuda.is_available() and not dry
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cap_s - min(10.0, 0.1 * cap_s)
        from _common import cpu_time, gpu_time
        self.timer = functools.partial(gpu_time, warmup=5, rep=25) if self.cuda else \
            functools.partial(cpu_time, reps=1 if dry else 5)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skipped(self, op: str, provider: str, reason: str, **extra) -> None:
        self.emit({"op": op, "provider": provider, "status": "skipped", "reason": reason, **extra})

    def out_of_time(self, what: str) -> bool:
        if self.left() > 0:
            return False
        self.emit({"op": "cap", "provider": what, "status": "timeout",
                   "reason": f"the part's cap was reached before {what}"})
        return True


def part_env(c: Ctx) -> None:
    import torch
    from _common import env
    from roofline import copy_bandwidth
    info: dict = {"op": "env", "provider": "system", "python": sys.version.split()[0],
                  "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), **env()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f"sm_{p.major}{p.minor}",
                    sm_count=p.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = _reason(e)
    c.emit(info)
    for name in PACKAGES:
        found = importlib.util.find_spec(name) is not None
        c.emit({"op": "package", "provider": name, "status": "ok" if found else "missing"})
    # the SDPA backends that run a small 4-D call, per dtype
    from _common import SDPA_BACKENDS
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 1, 64, 16, device=c.device, dtype=dtype)
        for name in SDPA_BACKENDS:
            row = {"op": "sdpa_backend", "provider": name, "dtype": str(dtype).removeprefix("torch."),
                   "shape": [2, 1, 64, 16]}
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                c.emit(row)
            except (RuntimeError, AttributeError) as e:
                c.emit({**row, "status": "unsupported", "reason": _reason(e)})
    n = (1 << 22) if c.dry else (1 << 28)
    bw = copy_bandwidth(str(c.device), n, c.timer)
    c.emit({"op": "copy_bandwidth", "provider": "d2d" if c.cuda else "cpu", "shape": [n], "dtype": "float32",
            "metric": "GB/s", "value": bw / 1e9, "bytes_per_s": bw,
            "note": "copy of n float32, read + write counted: the denominator of every % of peak bandwidth"})


def _pytest_counts(text: str) -> dict:
    """Counts from pytest's last summary line (``3 failed, 10 passed, 1 skipped in 4.2s``)."""
    counts: dict = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)", line)
        if found and re.search(r" in [\d.]+s", line):
            for n, k in found:
                counts[k.rstrip("s") if k in ("errors", "warnings") else k] = int(n)
            break
    return counts


def part_tests(c: Ctx) -> None:
    have_xdist = importlib.util.find_spec("xdist") is not None
    cmd = [sys.executable, "-m", "pytest", "-m", "not cpu_only", "-q", "-rfE", "-p", "no:cacheprovider"]
    if c.dry:   # a handful of tests: the dispatch table's (fast, no kernels)
        cmd += ["tests/test_dispatch_table.py"]
    elif have_xdist:
        cmd += ["-n", "8"]
    log = c.out / "pytest.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            p.wait(timeout=max(1.0, c.left()))
            status = "ok"
        except subprocess.TimeoutExpired:
            _kill(p)
            status = "timeout"
    text = log.read_text(errors="replace")
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    counts = _pytest_counts(text)
    if status == "timeout":   # the progress characters seen so far (., F, E, s, x)
        progress = "".join(re.findall(r"^[.FEsx]+(?=\s*(?:\[\s*\d+%\])?\s*$)", text, flags=re.M))
        counts = {k: progress.count(ch) for k, ch in (("passed", "."), ("failed", "F"), ("error", "E"),
                                                          ("skipped", "s"))}
    c.emit({"op": "pytest", "provider": "xdist-8" if have_xdist and not c.dry else "serial", "status": status,
            "seconds": time.monotonic() - t0, "returncode": p.returncode, "counts": counts,
            "failures": failures[:200], "command": " ".join(cmd[3:])})


def part_ops(c: Ctx) -> None:
    import torch
    from _common import SDPA_BACKENDS
    from bench_attention import measure
    from bench_attention_block import SIZES, TINY
    if c.dry:
        shapes, dtypes, backends = [(2, 16, 16)], [torch.float32], ("FLASH_ATTENTION", "MATH")
        blocks = TINY
    else:
        shapes, dtypes, backends = OP_SHAPES, [torch.float32, torch.bfloat16], SDPA_BACKENDS
        blocks = SIZES
    # the study's N = 64 first, then N = 256 and 1024; in each, the fused block (never measured on a GPU)
    # before the attention ops (measured on an H100 at 19d5887)
    for small in (True, False):
        if not _blocks(c, [s for s in blocks if (s[1] <= 64) == small], dtypes, backends):
            return
        for shape in [s for s in shapes if (s[1] <= 64) == small]:
            for dtype in dtypes:
                if c.out_of_time(f"ops at {shape} {dtype}"):
                    return
                for r in measure([shape], [dtype], c.device, c.timer, sdpa_backends=backends):
                    c.emit(r)
    if c.dry:
        c.skipped("softmax_attention", "all", "dry run: the GPU shapes " + ", ".join(map(str, OP_SHAPES)) +
                  " in float32 and bfloat16")
        c.skipped("attention_block", "all", "dry run: the GPU shapes (B, N, C, d) " + ", ".join(map(str, SIZES))
                  + " in float32 and bfloat16")


def _blocks(c: Ctx, shapes: list[tuple[int, int, int, int]], dtypes: list, backends) -> bool:
    """The fused block's rows (``bench_attention_block.measure``) at ``shapes``: softmax everywhere, every
    kind at the shapes of BLOCK_ALL_KINDS (all kinds in a dry run); False when the cap was reached."""
    from bench_attention_block import KINDS
    from bench_attention_block import measure as measure_block
    for shape in shapes:
        for dtype in dtypes:
            if c.out_of_time(f"attention_block at {shape} {dtype}"):
                return False
            kinds = KINDS if c.dry or shape in BLOCK_ALL_KINDS else ("softmax",)
            for r in measure_block([shape], [dtype], c.device, c.timer, kinds=kinds, sdpa_backends=backends):
                c.emit(r)
    return True


def _peak(out: Path) -> float | None:
    for r in read_rows(out):
        if r.get("op") == "copy_bandwidth" and r.get("status") == "ok":
            return float(r["bytes_per_s"])
    return None


def part_reverse_step(c: Ctx) -> None:
    from bench_reverse_step import SHAPES, measure
    shapes = [(4, 3, 8, 8)] if c.dry else SHAPES
    for r in measure(shapes, c.device, c.timer, _peak(c.out)):
        c.emit(r)
    if c.dry:
        c.skipped("reverse_step", "all", f"dry run: the GPU shapes {SHAPES}")


def _network(attention: str, device):
    from fastscore.models import ScoreNet
    return ScoreNet(attention, 64, attn_patch=attention == "softmax").to(device).eval()


def part_sample(c: Ctx) -> None:
    from bench_end_to_end import time_sample
    n, steps, repeats = (4, 2, 2) if c.dry else (4096, 50, 3)
    for attention in ("none", "softmax"):
        model = _network(attention, c.device)
        for graph in (False, True):
            provider = "graph" if graph else "eager"
            if graph and not c.cuda:
                c.skipped(f"sample_ddim{steps}", provider, "a CUDA graph needs a GPU", network=attention)
                continue
            if c.out_of_time(f"sample {attention} {provider}"):
                return
            try:
                c.emit(time_sample(model, n, steps, graph, repeats, network=attention))
            except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
                c.emit({"op": f"sample_ddim{steps}", "provider": provider, "network": attention,
                        "status": "failed", "reason": _reason(e)})


def part_train(c: Ctx) -> None:
    from bench_ensemble import profile_step, step_rate

    from fastscore.data import KVConfig, make_dataset, palette_of_size
    data, _ = make_dataset(KVConfig(palette=palette_of_size(2)), 256 if c.dry else 5000, seed=0)
    steps, warm, sizes = (5, 2, (1, 2)) if c.dry else (24, 4, (1, 12, 48))
    target = sizes[1]   # issue 21: the M = 12 softmax ensemble within 1.3x of the CNN's step, block forced too
    cases: list[tuple[str, int, bool, str | None]] = [(net, 0, False, None) for net in ("cnn", "softmax")]
    cases += [(net, M, graph, None) for net in ("cnn", "softmax") for M in sizes for graph in (False, True)]
    cases.insert(cases.index(("softmax", target, True, None)) + 1, ("softmax", target, False, "triton"))
    for net, M, graph, backend in cases:
        op = "train" if M == 0 else "train_ensemble"
        extra = {"backend": backend} if backend else {}
        if graph and not c.cuda:
            c.skipped(op, "graph", "a CUDA graph needs a GPU", network=net, members=M)
            continue
        if c.out_of_time(f"{op} {net} M={M}" + (f" backend={backend}" if backend else "")):
            return
        # the block forced in the interpreter costs seconds per step at batch 64: a dry run takes batch 4
        batch = 4 if backend and c.dry else 64
        try:
            c.emit(step_rate(net, M, steps, c.device, data, graph, warm, backend=backend, batch_size=batch))
        except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
            c.emit({"op": op, "provider": "graph" if graph else "eager", "network": net, "members": max(M, 1),
                    "status": "failed", "reason": _reason(e), **extra})
    M = 2 if c.dry else 12
    if c.out_of_time("the profile"):
        return
    table = profile_step("softmax", M, c.device, data)
    (c.out / "profile.txt").write_text(f"torch.profiler: one eager ensemble step, softmax, M = {M}, {c.device}\n\n"
                                       + table + "\n")
    c.emit({"op": "profile", "provider": "eager", "network": "softmax", "members": M, "file": "profile.txt"})


def _study(c: Ctx, quick: bool) -> None:
    name = "study-quick" if quick else "study"
    if c.dry:   # a seconds-long study: --tiny, one network, few samples
        args = ["--tiny", "--device", "cpu", "--workers", "1", "--networks", "none", "--n-samples", "16",
                "--train-steps", "3"]
    else:
        args = (["--quick"] if quick else []) + ["--device", "cuda"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-study-") as tmp:
        out = Path(tmp) / name
        cmd = [sys.executable, "-m", "fastscore", "reproduce", *args, "--out", str(out)]
        log = Path(tmp) / "log.txt"
        t0 = time.monotonic()
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                p.wait(timeout=max(1.0, c.left()))
                status = "ok" if p.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill(p)
                status = "timeout"
        seconds = time.monotonic() - t0
        text = log.read_text(errors="replace")
        lines = [s.strip() for s in re.split(r"[\r\n]+", text) if s.strip()]
        rows_done = sorted(Path(f).stem for f in glob.glob(str(out / "rows" / "*.json")))
        if (out / "results.md").is_file():
            shutil.copy(out / "results.md", c.out / f"{name}.md")
        print(f"[{name}] last lines of `{' '.join(cmd[1:])}`:\n" + "\n".join(lines[-15:]), flush=True)
    c.emit({"op": "study", "provider": "quick" if quick else "full", "status": status, "seconds": seconds,
            "returncode": p.returncode, "rows_done": rows_done, "progress": lines[-3:],
            "command": " ".join(["fastscore", *cmd[3:-2]])})


def part_study(c: Ctx) -> None:
    _study(c, quick=False)


def part_study_quick(c: Ctx) -> None:
    _study(c, quick=True)


PART_FNS: dict[str, Callable[[Ctx], None]] = {
    "env": part_env, "tests": part_tests, "ops": part_ops, "reverse_step": part_reverse_step,
    "sample": part_sample, "train": part_train, "study": part_study, "study_quick": part_study_quick}


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the process group of ``p`` (started with ``start_new_session=True``) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def caps(budget_s: float, parts: list[str], spent: float = 0.0, dry: bool = False) -> dict[str, float]:
    """Each part's cap if every part used its whole share (the driver recomputes as parts finish); a
    dry run shares equally (its parts are tiny, each mostly a process start and imports)."""
    w = {p: 1.0 for p, _ in PARTS} if dry else dict(PARTS)
    total = sum(w[p] for p in parts)
    return {p: max(MIN_CAP_S, (budget_s - spent) * w[p] / total) for p in parts}


def run_part(part: str, out: Path, cap_s: float, dry: bool, inject: dict[str, str]) -> dict:
    """Run one part in a child process with a hard cap; the row that records how it ended."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out), "--cap-s", f"{cap_s:.1f}"]
    if dry:
        cmd.append("--dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
    if part in inject:
        env["FASTSCORE_GPU_CHECK_INJECT"] = inject[part]
    t0 = time.monotonic()
    with open(out / "log.txt", "a") as log:
        log.write(f"\n===== part {part}: cap {cap_s:.1f} s =====\n")
        log.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=cap_s)
            status = "ok" if rc == 0 else "crashed"
        except subprocess.TimeoutExpired:
            _kill(p)
            rc, status = p.returncode, "timeout"
    seconds = time.monotonic() - t0
    tail = (out / "log.txt").read_text(errors="replace").splitlines()[-5:] if status != "ok" else []
    return Rows(out, part)({"op": "part", "provider": part, "status": status, "seconds": round(seconds, 2),
                            "cap_s": round(cap_s, 1), "returncode": rc, "log_tail": tail})


def _child(part: str, out: Path, cap_s: float, dry: bool) -> None:
    sys.path.insert(0, str(HERE))   # the benchmark modules, when this file is imported by a test
    inject = os.environ.get("FASTSCORE_GPU_CHECK_INJECT")
    if inject == "crash":
        raise SystemExit("injected crash (FASTSCORE_GPU_CHECK_INJECT=crash)")
    if inject == "hang":
        time.sleep(10 * cap_s + 60)
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from fastscore.ops import patch_triton_interpreter
        patch_triton_interpreter()
    PART_FNS[part](Ctx(out, part, dry, cap_s))


def check_files(out: Path) -> list[str]:
    """Problems with DIR's files against the carry-off limits (MAX_FILES files, MAX_BYTES each)."""
    files = [f for f in out.rglob("*") if f.is_file()]
    problems = [f"{f.name}: {f.stat().st_size} bytes > {MAX_BYTES}" for f in files if f.stat().st_size > MAX_BYTES]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}: {sorted(f.name for f in files)}")
    return problems


def _shrink_logs(out: Path) -> None:
    """Keep each text log within MAX_BYTES (its head and tail) so the directory can be carried off."""
    for name in ("log.txt", "pytest.txt", "profile.txt"):
        f = out / name
        if f.is_file() and f.stat().st_size > MAX_BYTES:
            data = f.read_bytes()
            keep = MAX_BYTES // 2 - 1024
            f.write_bytes(data[:keep] + b"\n\n[... cut to fit 16 MB ...]\n\n" + data[-keep:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory (created; rows.jsonl is appended to)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run, compilation included (default 420; --dry-run 240, "
                         "a ceiling: a dry run takes about a minute on an idle machine)")
    ap.add_argument("--previous", type=Path, help="an earlier run's directory: summary.md diffs against its rows")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    ap.add_argument("--parts", default=",".join(p for p, _ in PARTS),
                    help="comma list of the parts to run, in their fixed order (default all)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 unless every part ended ok and every row follows the schema (CI's dry run)")
    ap.add_argument("--inject", default="", help=argparse.SUPPRESS)   # PART=crash|hang,...: tests of the driver
    ap.add_argument("--part", help=argparse.SUPPRESS)                 # internal: run one part (child process)
    ap.add_argument("--cap-s", type=float, default=60.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.part:
        _child(a.part, a.out, a.cap_s, a.dry_run)
        return 0
    names = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in dict(PARTS)]
    if unknown or not names:
        ap.error(f"--parts must name parts of {[p for p, _ in PARTS]}, got {a.parts!r}")
    budget = a.budget_s if a.budget_s is not None else (240.0 if a.dry_run else 420.0)
    if not budget > 0:
        ap.error(f"--budget-s must be > 0, got {budget}")
    if a.previous is not None and not (a.previous / "rows.jsonl").is_file():
        ap.error(f"--previous must be a GPU check's directory with rows.jsonl, not found: {a.previous / 'rows.jsonl'}")
    inject = dict(kv.split("=", 1) for kv in a.inject.split(",") if "=" in kv)
    a.out.mkdir(parents=True, exist_ok=True)
    order = [p for p, _ in PARTS if p in names]
    t0 = time.monotonic()
    for i, part in enumerate(order):
        cap = caps(budget, order[i:], time.monotonic() - t0, a.dry_run)[part]
        print(f"part {part}: cap {cap:.0f} s", flush=True)
        r = run_part(part, a.out, cap, a.dry_run, inject)
        print(f"part {part}: {r['status']} in {r['seconds']:.1f} s", flush=True)
    from gpu_check_summary import write_summary
    _shrink_logs(a.out)
    write_summary(a.out, read_rows(a.out), read_rows(a.previous) if a.previous else None, dry=a.dry_run,
                  budget_s=budget, seconds=time.monotonic() - t0)
    problems = check_files(a.out)
    if a.strict:
        rows = read_rows(a.out)
        problems += row_problems(rows)
        problems += [f"part {r['provider']} ended {r['status']}" for r in rows if r.get("op") == "part" and r["status"] != "ok"]
    for p in problems:
        print("output limit:", p, file=sys.stderr)
    print(f"wrote {a.out} in {time.monotonic() - t0:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
