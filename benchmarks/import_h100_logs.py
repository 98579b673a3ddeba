"""Rows (the GPU check's format) from the one H100 run that predates the GPU check (main at 19d5887).

    python benchmarks/import_h100_logs.py    -> benchmarks/results/h100-19d5887/rows.jsonl

Only ``attention-vs-sdpa-h100.log`` measured all three paths of an op side by side, forward and
forward + backward: softmax attention, ``fused`` (-> ``triton``), ``eager`` (-> ``torch``) and SDPA
on 4-D inputs (-> ``sdpa``, the path ``auto`` runs); SDPA on 3-D inputs is kept as provider
``sdpa-3d``, which is not a path. The log has medians only (p20/p80 None). The other logs are left
out: ``bench_attention-h100.log`` timed SDPA on 3-D inputs only and top-1 forward only, and
``bench_reverse_step-h100.log`` never timed the op's torch path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

DIR = Path(__file__).resolve().parent / "results" / "h100-19d5887"
META = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "19d5887",
        "part": "legacy-log", "metric": "ms", "p20_ms": None, "p80_ms": None, "status": "ok"}
PROVIDERS = {"fused": "triton", "eager": "torch", "sdpa4d": "sdpa", "sdpa3d": "sdpa-3d"}
LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+torch\.(\w+)\s+(fwd\+bwd|fwd)\s+(\w+)\s+([\d.]+) ms\s*$")


def rows_from_log(path: Path) -> list[dict]:
    """One row per line of ``attention-vs-sdpa-h100.log`` (B N D dtype pass provider median)."""
    out = []
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            B, N, D, dtype, pss, provider, ms = m.groups()
            out.append({"op": "softmax_attention", "provider": PROVIDERS[provider], "shape": [int(B), int(N), int(D)],
                        "dtype": dtype, "pass": "fwd_bwd" if pss == "fwd+bwd" else "fwd", "median_ms": float(ms),
                        "value": None, "source": f"{path.name}: {line.strip()}", **META})
    return out


def main() -> int:
    rows = rows_from_log(DIR / "attention-vs-sdpa-h100.log")
    (DIR / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {DIR / 'rows.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
