"""Regenerate ``backend="auto"``'s table (``fastscore/ops/dispatch_table.json``) from a GPU check's rows.

    python benchmarks/make_dispatch_table.py DIR [--table PATH]

``DIR`` is a ``benchmarks/gpu_check.py --out`` directory (its ``rows.jsonl``). For each (op, device
class, dtype, shape bucket) the measured shapes and passes are gathered from the rows whose provider
is a path (``triton``, ``sdpa``, ``torch``; ``sdpa`` is torch's own SDPA choice, what ``auto`` runs)
and whose status is ``ok``; unsupported, skipped and failed rows are ignored. A path is a candidate
only if it was measured at every (shape, pass) of the bucket, and the candidate with the smallest
summed median time wins (an attention bucket needs both passes, fwd and fwd_bwd, measured: ``auto``
serves training and sampling): a path never measured is never chosen, and a bucket with no candidate gets
no row (the fallback applies). The new rows replace the table's rows for the same device class; the
fallback rows (device class ``"*"``) are kept.

The fused block (op ``attention_block``, ``bench_attention_block.measure``): its rows' shape is z's
(B, C, H, W), bucketed by N = H*W; a case is (shape, pass, kind, attention width d), so the kinds and
widths measured in a bucket all count toward one path (the table has no kind axis). Its paths are
``triton`` (the fused kernels) and ``torch`` (the composition, whose attention core takes its own
``auto`` path: SDPA on CUDA); ``eager`` and ``sdpa:<BACKEND>`` rows are not paths and are ignored.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import gpu_check

from fastscore.ops import _dispatch


def read_rows(directory: Path) -> list[dict]:
    """The rows of ``directory/rows.jsonl`` (``gpu_check.read_rows``); ValueError when it is absent."""
    path = Path(directory) / "rows.jsonl"
    if not path.is_file():
        raise ValueError(f"DIR must hold a GPU check's rows.jsonl, not found: {path}")
    return gpu_check.read_rows(directory)


def choose(rows: list[dict]) -> list[dict]:
    """Table rows (op, device_class, dtype, bucket, path, source) chosen from measured rows (module
    docstring)."""
    times: dict[tuple, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    sources: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if r.get("status") != "ok" or r.get("op") not in _dispatch.BUCKET_EDGES or r.get("provider") not in _dispatch.PATHS:
            continue
        if not isinstance(r.get("median_ms"), (int, float)) or not r.get("shape") or not r.get("device"):
            continue
        key = (r["op"], _dispatch.device_class(r["device"]), r["dtype"], _dispatch.shape_bucket(r["op"], r["shape"]))
        case = (tuple(r["shape"]), r.get("pass", "fwd"), r.get("kind"), r.get("attn_dim"))
        times[key][r["provider"]][case] = float(r["median_ms"])
        sources[key].add(f"{r['device']}, commit {r.get('commit', '?')}, torch {r.get('torch')}, triton {r.get('triton')}, "
                         f"part {r.get('part', '?')}")
    out = []
    for key in sorted(times):
        per_path = times[key]
        cases = set().union(*(set(t) for t in per_path.values()))
        if key[0] != "reverse_step" and {case[1] for case in cases} != {"fwd", "fwd_bwd"}:
            continue   # auto serves training and sampling: an attention bucket needs both passes measured
        totals = {p: sum(t.values()) for p, t in per_path.items() if set(t) == cases}
        if not totals:
            continue
        best = min(totals, key=totals.__getitem__)
        op, dc, dtype, bucket = key
        summary = ", ".join(f"{p} {totals[p]:.3f} ms" for p in sorted(totals, key=totals.__getitem__))
        out.append({"op": op, "device_class": dc, "dtype": dtype, "bucket": bucket, "path": best,
                    "source": f"rows of {'; '.join(sorted(sources[key]))}: summed median over "
                              f"{len(cases)} shape x pass cases: {summary}"})
    return out


def merge(table: dict, new_rows: list[dict]) -> dict:
    """``table`` with its rows for the device classes in ``new_rows`` replaced by ``new_rows``."""
    classes = {r["device_class"] for r in new_rows}
    kept = [r for r in table["rows"] if r["device_class"] not in classes or r["device_class"] == "*"]
    return {**table, "rows": kept + new_rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="a gpu_check.py --out directory")
    ap.add_argument("--table", type=Path, default=_dispatch.TABLE_PATH, help="the table to update (default: the package's)")
    a = ap.parse_args(argv)
    new_rows = choose(read_rows(a.dir))
    table = merge(json.loads(a.table.read_text()), new_rows)
    tmp = a.table.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    _dispatch.load_table(str(tmp))   # refuses a malformed result before it replaces the table
    tmp.replace(a.table)
    for r in new_rows:
        print(f"{r['op']:20s} {r['device_class']:8s} {r['dtype']:9s} {r['bucket']:16s} -> {r['path']}")
    print(f"wrote {len(new_rows)} measured rows to {a.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
