"""Ahead-of-time compile report: registers, spills and shared memory of every kernel configuration.

Compiles every configuration from ``compile_configs()`` of ``fastscore.kernels.attention``,
``fastscore.kernels.top1``, ``fastscore.kernels.reverse_step`` and ``fastscore.kernels.attention_block`` (a module that is missing or
lacks the function is skipped) for sm_80 and sm_90a with ``triton.compile`` and a ``GPUTarget``:
no GPU is needed. Registers and spill bytes come from ``ptxas -v`` on the generated PTX (the
ptxas bundled with Triton); shared memory is Triton's dynamic shared memory per program plus
ptxas's static shared memory.

    python benchmarks/compile_report.py [--jobs N] [--match SUBSTRING] [--targets 80,90]

prints a table and writes ``benchmarks/results/compile_report.json``. The compile runs with
``TRITON_INTERPRET`` unset: every compile runs in a freshly spawned worker process started without
it, so the result does not depend on the caller's environment (a pytest run under the interpreter, say),
which is restored as soon as the workers have started.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fastscore.kernels._common import TARGETS

MODULES = ("fastscore.kernels.attention", "fastscore.kernels.top1", "fastscore.kernels.reverse_step",
           "fastscore.kernels.attention_block")
#: dynamic shared memory a program may use (bytes): sm_80 163 KiB, sm_90 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
RESULTS = Path(__file__).resolve().parent / "results" / "compile_report.json"

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch``: triton >= 3.7 bundles two (CUDA 12.x ``ptxas`` and
    13.x ``ptxas-blackwell``, the one for sm_90 and up) and writes PTX of the version its ptxas for
    that arch accepts, which the other one may reject (PTX 9.4 and ptxas 12.9 with triton 3.9)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def _config_str(cfg: dict) -> str:
    parts = [cfg["dtype"]]
    for k, v in cfg["constexprs"].items():
        if isinstance(v, bool):
            parts.append(f"{k}={int(v)}")
        else:
            parts.append(f"{k}={v}")
    parts.append(f"w{cfg['num_warps']}s{cfg['num_stages']}" + (f"r{cfg['maxnreg']}" if cfg.get("maxnreg") else ""))
    return " ".join(parts)


def load_configs(modules=MODULES, match: str | None = None, select=None) -> list[tuple[str, int, dict]]:
    """(module, index, config) for every config of every importable module with compile_configs(),
    kept when ``match`` is in its name or config string and ``select(config)`` (if given) is true."""
    out = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        fn = getattr(mod, "compile_configs", None)
        if fn is None:
            continue
        for i, cfg in enumerate(fn()):
            if (match is None or match in cfg["name"] or match in _config_str(cfg)) and \
                    (select is None or select(cfg)):
                out.append((mod_name, i, cfg))
    return out


def _compile_one(job: tuple[str, int, int]) -> dict:
    """Compile config ``index`` of module ``mod_name`` for ``arch``; runs in a worker process."""
    mod_name, index, arch = job
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = importlib.import_module(mod_name).compile_configs()[index]
    row = {"module": mod_name, "kernel": cfg["name"], "config": _config_str(cfg),
           "target": TARGETS[arch], "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
           "maxnreg": cfg.get("maxnreg")}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(cfg["fn"], cfg["signature"], cfg["constexprs"], cfg.get("attrs")),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                                    **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})})
        with tempfile.TemporaryDirectory() as d:
            ptx = Path(d) / "k.ptx"
            ptx.write_text(k.asm["ptx"])
            res = subprocess.run([_ptxas(arch), "-v", "--gpu-name", TARGETS[arch], str(ptx), "-o",
                                  str(Path(d) / "k.cubin")], capture_output=True, text=True)
        info = res.stdout + res.stderr
        for key, rx in _PTXAS_RE.items():
            m = rx.search(info)
            row[key] = int(m.group(1)) if m else 0
        row["dynamic_smem"] = int(k.metadata.shared)
        row["smem"] = row["dynamic_smem"] + row["static_smem"]
        row["error"] = None if res.returncode == 0 else info.strip()[-500:]
    except Exception as e:  # a config that does not compile is a finding, not a crash
        row.update(registers=None, spill_stores=None, spill_loads=None, static_smem=None,
                   dynamic_smem=None, smem=None, error=f"{type(e).__name__}: {str(e)[-500:]}")
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    return row


#: (kernel prefix, data dtype) known to spill, reported but not counted as a problem: the fused attention
#: block in float32 (IEEE products are FMAs; docs/attention-block.md, "Registers and spills"); its bf16
#: configurations are checked like every other kernel's
KNOWN_SPILLS = (("attention_block.", "fp32"),)


def problems(row: dict) -> list[str]:
    """What is wrong with a report row: compile error, spills (except ``KNOWN_SPILLS``), or shared memory
    over the limit."""
    out = []
    if row.get("error"):
        out.append(f"error: {row['error']}")
        return out
    known = any(row["kernel"].startswith(k) and row["config"].split()[0] == dt for k, dt in KNOWN_SPILLS)
    if (row["spill_stores"] or row["spill_loads"]) and not known:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes")
    arch = 90 if row["target"].startswith("sm_90") else 80
    if row["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['smem']} > {SMEM_LIMIT[arch]}")
    return out


def run_report(match: str | None = None, archs=(80, 90), jobs: int | None = None,
               modules=MODULES, write: bool = True, path: Path = RESULTS, select=None) -> list[dict]:
    """Compile every selected config for every arch in ``archs``; return rows (and write JSON)."""
    configs = load_configs(modules, match, select)
    work = [(m, i, a) for (m, i, _) in configs for a in archs]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    import multiprocessing as mp
    # never in-process (see the module docstring); the workers are spawned without TRITON_INTERPRET,
    # because unpickling ``_compile_one`` imports this module, and so Triton and the kernel helpers of
    # ``kernels._common``, before any of its code runs
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            rows = list(ex.map(_compile_one, work, chunksize=4))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    if write:
        import triton
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"triton": triton.__version__, "match": match, "selected": select is not None,
                                    "smem_limit": {TARGETS[a]: SMEM_LIMIT[a] for a in archs},
                                    "rows": rows}, indent=1))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':28s} {'config':62s} {'target':7s} {'regs':>4s} {'spill st/ld':>11s} {'smem B':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['kernel']:28s} {r['config']:62s} {r['target']:7s} ERROR {r['error'][:60]}")
            continue
        lines.append(f"{r['kernel']:28s} {r['config']:62s} {r['target']:7s} {r['registers']:4d} "
                     f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11s} {r['smem']:7d}")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    """Per (kernel, target): configurations compiled, max registers, max shared memory, spill bytes."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["target"]), []).append(r)
    head = f"{'kernel':34s} {'target':7s} {'configs':>7s} {'max regs':>8s} {'max smem B':>10s} {'spill B':>7s} {'errors':>6s}"
    lines = [head, "-" * len(head)]
    for (kernel, target), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        spill = sum((r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in ok)
        lines.append(f"{kernel:34s} {target:7s} {len(rs):7d} {max((r['registers'] for r in ok), default=0):8d} "
                     f"{max((r['smem'] for r in ok), default=0):10d} {spill:7d} {len(rs) - len(ok):6d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--match", default=None, help="only configs whose name or config contains this")
    ap.add_argument("--targets", default="80,90", help="comma-separated: 80 (sm_80), 90 (sm_90a)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.targets.split(","))
    rows = run_report(a.match, archs, a.jobs, path=Path(a.out))
    print(format_table(rows))
    print("\n" + summarise(rows))
    bad = [(r, p) for r in rows for p in problems(r)]
    print(f"\n{len(rows)} compiles, {len(bad)} problems; JSON: {a.out}")
    for r, p in bad:
        print(f"  {r['kernel']} [{r['config']}] {r['target']}: {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
