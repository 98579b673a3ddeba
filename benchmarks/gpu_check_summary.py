"""summary.md of a GPU check (``gpu_check.py``): one section per part, and a diff against an earlier run.

    python benchmarks/gpu_check_summary.py DIR [--previous DIR]   # rewrite DIR/summary.md from its rows
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path


def _f(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def _key(r: dict) -> tuple:
    """What makes two rows the same measurement (across runs too)."""
    return (r.get("op"), r.get("provider"), tuple(r.get("shape") or ()), r.get("dtype"), r.get("pass"),
            r.get("network"), r.get("members"), r.get("backend"), r.get("kind"), r.get("attn_dim"))


def _ops_table(rows: list[dict]) -> list[str]:
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    providers: list[str] = []
    for r in rows:
        if r.get("part") == "ops" and r.get("shape") and r.get("provider") != "all":
            op = r["op"] + (f" {r['kind']} d={r['attn_dim']}" if r.get("kind") else "")
            cases[(op, r.get("pass"), tuple(r["shape"]), r["dtype"])][r["provider"]] = r
            if r["provider"] not in providers:
                providers.append(r["provider"])
    if not cases:
        return ["no rows"]
    short = {"ok": None, "unsupported": "unsup.", "skipped": "skip", "failed": "fail"}
    out = ["Median ms per provider (**bold**: fastest path of `triton`, `sdpa`, `torch`); `auto` names the path it ran. "
           "Shapes (B, N, D); the attention block's (B, C, H, W), its `torch` the composition as `auto` runs it.",
           "", "| op | pass | shape | dtype | " + " | ".join(providers) + " | triton / fastest |",
           "|---|---|---|---|" + "---|" * len(providers) + "---|"]
    for (op, pss, shape, dtype), by in cases.items():
        paths = {p: by[p]["median_ms"] for p in ("triton", "sdpa", "torch") if p in by and by[p].get("median_ms")}
        best = min(paths, key=paths.__getitem__) if paths else None
        cells = []
        for p in providers:
            r = by.get(p)
            if r is None:
                cells.append("")
            elif r.get("median_ms"):
                cell = f"{r['median_ms']:.4f}" + (f" ({r['auto_path']})" if r.get("auto_path") else "")
                cells.append(f"**{cell}**" if p == best else cell)
            else:
                cells.append(short.get(r["status"], r["status"]))
        ratio = f"{paths['triton'] / paths[best]:.2f}x" if best and "triton" in paths else "-"
        out.append(f"| {op} | {pss} | {shape} | {dtype} | " + " | ".join(cells) + f" | {ratio} |")
    return out


#: issue 21's targets: the block's fwd+bwd >= BLOCK_TARGET x the best composition at (B, N) = BLOCK_AT;
#: the M = 12 softmax ensemble's step <= ENSEMBLE_TARGET x the M = 12 CNN ensemble's
BLOCK_TARGET, BLOCK_AT, ENSEMBLE_TARGET, ENSEMBLE_M = 2.0, (768, 64), 1.3, 12


def targets(rows: list[dict]) -> list[str]:
    """Issue 21's target ratios read off the rows: per dtype and d, the best composition (fastest of the
    attention block's ``torch``, ``eager``, ``sdpa:*`` rows) / ``triton`` for fwd_bwd at BLOCK_AT (softmax);
    per (provider, backend) of the softmax ensemble, its median step / the CNN ensemble's at M = 12
    (eager or graphed, the CNN's default backend)."""
    out = [f"Block fwd+bwd, softmax, (B, N) = {BLOCK_AT}: best composition / triton (target >= {BLOCK_TARGET}).", "",
           "| dtype | d | triton ms | best composition | its ms | ratio | met |", "|---|---|---|---|---|---|---|"]
    cases: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("op") == "attention_block" and r.get("pass") == "fwd_bwd" and r.get("kind") == "softmax" and \
                r.get("median_ms") and (r["shape"][0], r["shape"][2] * r["shape"][3]) == BLOCK_AT:
            cases[(r["dtype"], r.get("attn_dim"))][r["provider"]] = r["median_ms"]
    for (dtype, d), by in sorted(cases.items(), key=str):
        comp = {p: ms for p, ms in by.items() if p in ("torch", "eager") or p.startswith("sdpa:")}
        best = min(comp, key=comp.__getitem__) if comp else None
        if best and "triton" in by:
            ratio = comp[best] / by["triton"]
            out.append(f"| {dtype} | {d} | {by['triton']:.4f} | {best} | {comp[best]:.4f} | {ratio:.2f} | "
                       f"{'yes' if ratio >= BLOCK_TARGET else 'no'} |")
    if not cases:
        out.append("| not measured | | | | | | |")
    out += ["", f"Ensemble step, M = {ENSEMBLE_M}: softmax / CNN median ms per step (target <= {ENSEMBLE_TARGET}).", "",
            "| provider | softmax backend | softmax ms | CNN ms | ratio | met |", "|---|---|---|---|---|---|"]
    step = {(r.get("network"), r["provider"], r.get("backend")): r["median_ms"] for r in rows
            if r.get("op") == "train_ensemble" and r.get("members") == ENSEMBLE_M and r.get("median_ms")}
    found = False
    for (net, provider, backend), ms in sorted(step.items(), key=str):
        cnn = step.get(("cnn", provider, None))
        if net == "softmax" and cnn:
            found = True
            out.append(f"| {provider} | {backend or 'default'} | {ms:.3f} | {cnn:.3f} | {ms / cnn:.2f} | "
                       f"{'yes' if ms / cnn <= ENSEMBLE_TARGET else 'no'} |")
    if not found:
        out.append("| not measured | | | | | |")
    return out


def _section(rows: list[dict], part: str) -> list[dict]:
    return [r for r in rows if r.get("part") == part and r.get("op") != "part"]


def render(rows: list[dict], previous: list[dict] | None = None, *, dry: bool = False, budget_s: float | None = None,
           seconds: float | None = None, files: list[tuple[str, int]] | None = None) -> str:
    """The summary's markdown from a run's rows (and an earlier run's, for the diff)."""
    env = next((r for r in rows if r.get("op") == "env"), {})
    lines = [f"# GPU check: {env.get('gpu') or env.get('device', '?')} at commit {env.get('commit', '?')}", ""]
    if dry:
        lines += ["**Dry run** on the CPU at tiny sizes: kernels in Triton's interpreter, perf_counter timings; "
                  "rows that need a GPU have status `skipped`. No number here is a GPU measurement.", ""]
    lines += [f"Budget {_f(budget_s, '.0f')} s, took {_f(seconds, '.0f')} s. Rows by status: " +
              ", ".join(f"{k} {v}" for k, v in Counter(r.get("status") for r in rows).most_common()) + ".", "",
              "## Parts", "", "| part | status | seconds | cap s |", "|---|---|---|---|"]
    for r in rows:
        if r.get("op") == "part":
            lines.append(f"| {r['provider']} | {r['status']} | {_f(r.get('seconds'), '.1f')} | {_f(r.get('cap_s'), '.0f')} |")
    lines += ["", "## Environment", ""]
    for k in ("gpu", "device", "memory_gib", "capability", "driver", "cuda", "torch", "triton", "python", "commit"):
        if env.get(k) is not None:
            lines.append(f"- {k}: {env[k]}")
    missing = [r["provider"] for r in rows if r.get("op") == "package" and r.get("status") == "missing"]
    lines.append(f"- missing packages: {', '.join(missing) if missing else 'none'}")
    sdpa = defaultdict(list)
    for r in rows:
        if r.get("op") == "sdpa_backend" and r.get("status") == "ok":
            sdpa[r["dtype"]].append(r["provider"])
    for dt, names in sdpa.items():
        lines.append(f"- SDPA backends that ran ({dt}, 4-D): {', '.join(names)}")
    bw = next((r for r in rows if r.get("op") == "copy_bandwidth" and r.get("status") == "ok"), None)
    if bw:
        lines.append(f"- peak copy bandwidth ({bw['provider']}): {bw['value']:.0f} GB/s")
    lines += ["", "## Tests", ""]
    for r in _section(rows, "tests"):
        lines.append(f"`pytest {r.get('command', '')}`: {r['status']}, {_f(r.get('seconds'), '.0f')} s, " +
                     ", ".join(f"{v} {k}" for k, v in (r.get("counts") or {}).items()))
        lines += [f"- {name}" for name in r.get("failures", [])[:60]]
    lines += ["", "## Ops", ""] + _ops_table(rows)
    lines += ["", "## Reverse step", "", "| shape | provider | median ms | GB/s | % of copy peak |", "|---|---|---|---|---|"]
    for r in _section(rows, "reverse_step"):
        if r.get("shape"):
            lines.append(f"| {tuple(r['shape'])} | {r['provider']} | {_f(r.get('median_ms'), '.4f')} | "
                         f"{_f(r.get('value'), '.4g')} | {_f(r.get('pct_of_peak'), '.3g')} |")
    lines += ["", "## Sampling", "", "| network | provider | status | first call ms | median ms | images/s | calls ms |",
              "|---|---|---|---|---|---|---|"]
    for r in _section(rows, "sample"):
        calls = ", ".join(f"{c:.1f}" for c in r.get("calls_ms", []))
        lines.append(f"| {r.get('network')} | {r['provider']} | {r['status']} | {_f(r.get('first_call_ms'), '.1f')} | "
                     f"{_f(r.get('median_ms'), '.1f')} | {_f(r.get('value'), '.0f')} | {calls} |")
    lines += ["", "## Training (model-steps/s, steady state; first steps apart)", "",
              "| op | network | M | provider | backend | status | model-steps/s | ms/step | first steps s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in _section(rows, "train"):
        if r.get("op") in ("train", "train_ensemble"):
            lines.append(f"| {r['op']} | {r.get('network')} | {r.get('members')} | {r['provider']} | "
                         f"{r.get('backend') or 'default'} | {r['status']} | "
                         f"{_f(r.get('value'), '.0f')} | {_f(r.get('median_ms'), '.2f')} | {_f(r.get('first_s'), '.1f')} |")
    lines += ["", "## Targets (issue 21)", ""] + targets(rows)
    if any(r.get("op") == "profile" for r in rows):
        lines.append("\nTop kernels of one eager step: profile.txt.")
    lines += ["", "## Study", "", "| study | status | seconds | rows done | last progress |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("op") == "study":
            last = (r.get("progress") or [""])[-1].replace("|", "/")[:120]
            lines.append(f"| {r['provider']} | {r['status']} | {_f(r.get('seconds'), '.0f')} | "
                         f"{len(r.get('rows_done', []))} | {last} |")
    bad = [r for r in rows if r.get("status") in ("failed", "crashed", "timeout")]
    if bad:
        lines += ["", "## Failed, crashed or stopped at the cap", ""]
        lines += [f"- {r.get('part')}: {r.get('op')} {r.get('provider')} {r.get('shape') or ''} {r.get('dtype') or ''}"
                  f" {r['status']}: {r.get('reason') or ' / '.join(r.get('log_tail') or [])}"[:300] for r in bad[:80]]
    if previous is not None:
        lines += ["", "## Against the previous run (same device, rows timed in both)", ""]
        old = {_key(r): r for r in previous if r.get("median_ms") and r.get("device") == env.get("device")}
        diffs = [(r["median_ms"] / old[_key(r)]["median_ms"], r) for r in rows
                 if r.get("median_ms") and _key(r) in old]
        if not diffs:
            lines.append("no row in common")
        else:
            lines += ["| op | provider | shape | dtype | pass | previous ms | now ms | now / previous |", "|---|---|---|---|---|---|---|---|"]
            for ratio, r in sorted(diffs, key=lambda d: -abs(d[0] - 1))[:60]:
                lines.append(f"| {r['op']} | {r['provider']} | {tuple(r.get('shape') or ())} | {r.get('dtype')} | "
                             f"{r.get('pass')} | {old[_key(r)]['median_ms']:.4f} | {r['median_ms']:.4f} | {ratio:.2f} |")
    if files:
        lines += ["", "## Files", ""] + [f"- {n}: {s:,} bytes" for n, s in files]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: list[dict], previous: list[dict] | None = None, **kw) -> Path:
    """Write ``out/summary.md`` (``render``'s keywords pass through)."""
    path = out / "summary.md"
    files = sorted((f.name, f.stat().st_size) for f in out.iterdir() if f.is_file() and f != path)
    path.write_text(render(rows, previous, files=files, **kw))
    return path


def main(argv: list[str] | None = None) -> int:
    from gpu_check import read_rows
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--previous", type=Path)
    a = ap.parse_args(argv)
    rows = read_rows(a.dir)
    dry = any(r.get("op") == "env" and not r.get("gpu") for r in rows)   # no GPU seen: a dry run
    print("wrote", write_summary(a.dir, rows, read_rows(a.previous) if a.previous else None, dry=dry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
