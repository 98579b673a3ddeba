"""Sweeps: one study per setting, one table. ``pairs_sweep`` varies the number of key-value pairs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..data import KVConfig, palette_of_size
from .config import LABELS, StudyConfig
from .figures import sweep_figure
from .report import fmt
from .run import reproduce


def pairs_sweep(config: StudyConfig, out: Path, pairs: Sequence[int], **kw) -> dict:
    """One study per number of pairs; writes ``out/pairs-K/`` per K and ``out/sweep.md``.

    Images grow where K pairs do not fit; if any K > 4 (beyond the four corners the zero padding
    marks), every study of the sweep gets coordinate channels, so all rows share one architecture."""
    sweep_md = Path(out) / "sweep.md"
    if sweep_md.exists() and not kw.get("force"):
        raise FileExistsError(f"{sweep_md} exists; pass --force to replace it")
    docs = {}
    need_coords = any(p > 4 for p in pairs)
    for p in pairs:
        size = config.image_size
        while True:
            try:
                KVConfig(n_pairs=p, palette=palette_of_size(config.n_colours), image_size=size)
                break
            except ValueError:
                size += 2
        c = replace(config, n_pairs=p, image_size=size, coord_channels=config.coord_channels or need_coords)
        docs[p] = reproduce(c, Path(out) / f"pairs-{p}", **kw)
    lines = sweep_table(config.networks, docs)
    sweep_figure(Path(out), config.networks, docs)
    atomic_write_text(sweep_md, lines, overwrite=True)
    print(lines)
    return docs


def sweep_table(networks: Sequence[str], docs: dict) -> str:
    """Markdown: per pair count, the image size, chance, each network's consistency among valid samples
    with its validity, and, with the CNN in the sweep, each attention network's gap over it in pp."""
    attn = [n for n in networks if n != "none"] if "none" in networks else []
    head = ["pairs", "image", "chance"] + [LABELS[n] for n in networks] + [f"{LABELS[n]} - CNN (pp)" for n in attn]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p, d in docs.items():
        s, size = d["summary"], d["config"]["image_size"]
        nets = s["networks"]
        cells = [f"{fmt(nets[n]['rates']['consistent_among_valid'])}, valid "
                 f"{100 * nets[n]['rates']['valid']['rate']:.1f}%" if n in nets else "-" for n in networks]
        gaps = []
        for n in attn:
            a, c = nets[n]["rates"]["consistent_among_valid"], nets["none"]["rates"]["consistent_among_valid"]
            gaps.append(f"{100 * (a['rate'] - c['rate']):+.1f}" if a["n"] and c["n"] else "n/a")
        lines.append(f"| {p} | {size}x{size} | {100 * s['baseline']['analytic_consistent']:.2f}% | "
                     + " | ".join(cells + gaps) + " |")
    return "\n".join(lines) + "\n"
