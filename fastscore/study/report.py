"""The study's numbers: rows pooled over seeds, chance controls, the coordination verdict, markdown."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..data import decode
from ..metrics import Rate, shuffled_consistency
from .config import ANALYTIC, LABELS, PAPER, RATE_KEYS, StudyConfig
from .files import StudyDir, row_name


def correlations(out: StudyDir, config: StudyConfig) -> dict:
    """Per network: median and quartiles of the per-sample Pearson r between its seed-0 samples and the
    ELS machine's, drawn from the same initial noise (Kamb & Ganguli's comparison)."""
    from ..theory import correlation_summary, sample_correlation
    els = out.load_samples(row_name("els", 0))
    if els is None:
        return {}
    res = {}
    for net in config.networks + tuple(a for a in config.analytic if a != "els"):
        x = out.load_samples(row_name(net, 0))
        if x is not None:
            res[net] = correlation_summary(sample_correlation(x.double(), els.double()))
    return res


def pooled(rows: list[dict], key: str) -> dict:
    k = sum(r["rates"][key]["k"] for r in rows)
    n = sum(r["rates"][key]["n"] for r in rows)
    per_seed = [r["rates"][key]["rate"] if r["rates"][key]["n"] else None for r in rows]  # None: no samples
    defined = [p for p in per_seed if p is not None]
    mean = sum(defined) / len(defined) if defined else float("nan")
    std = (sum((p - mean) ** 2 for p in defined) / (len(defined) - 1)) ** 0.5 if len(defined) > 1 else 0.0
    return {**Rate(k, n).to_dict(), "per_seed": per_seed, "mean": mean, "std": std}


def fmt(d: dict) -> str:
    if d["n"] == 0:
        return "n/a"
    lo, hi = d["ci95"]
    s = f"{100 * d['rate']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    if len(d.get("per_seed", [])) > 1:
        s += f" (seeds {100 * d['mean']:.1f}±{100 * d['std']:.1f})"
    return s


def summarise(config: StudyConfig, rows: list[dict], baseline: dict) -> dict:
    """Pool per-seed rows per network: rates with Wilson intervals, per-seed mean and spread."""
    nets = {}
    for net in tuple(config.analytic) + tuple(config.networks):
        rs = [r for r in rows if r["network"] == net]
        if not rs:
            continue
        probe = []
        for i, t in enumerate(config.probe_t):
            m = Rate(sum(r["probe"][i]["matched"]["k"] for r in rs), sum(r["probe"][i]["matched"]["n"] for r in rs))
            u = Rate(sum(r["probe"][i]["unmatched"]["k"] for r in rs),
                     sum(r["probe"][i]["unmatched"]["n"] for r in rs))
            gaps = [r["probe"][i]["gap"] for r in rs]
            halves = [(r["probe"][i]["gap_ci95"][1] - r["probe"][i]["gap_ci95"][0]) / 2 for r in rs]
            gap = sum(gaps) / len(gaps)
            half = math.sqrt(sum(h * h for h in halves)) / len(halves)   # independent seeds
            probe.append({"t": t, "matched": m.to_dict(), "unmatched": u.to_dict(), "gap": gap,
                          "gap_ci95": [gap - half, gap + half], "per_seed_gap": gaps,
                          "changed": sum(r["probe"][i]["changed"] for r in rs) / len(rs)})
        nets[net] = {"label": LABELS[net], "rates": {k: pooled(rs, k) for k in RATE_KEYS}, "probe": probe,
                     "seconds": sum(r["seconds"] for r in rs), "train_seconds": sum(r["train_seconds"] for r in rs),
                     "sample_seconds": sum(r["sample_seconds"] for r in rs), "seeds": [r["seed"] for r in rs]}
    return {"baseline": baseline, "networks": nets}


def results_markdown(config: StudyConfig, summary: dict, versions: dict, wall: float, invocations: int = 1) -> str:
    """The results tables as markdown."""
    b = summary["baseline"]
    head = ("| model | valid | consistent | consistent among valid | novel | nearest-colour consistent | wall s |\n"
            "|---|---|---|---|---|---|---|")
    lines = [f"# fastscore study: {config.n_pairs} pairs, {config.n_colours} colours, {config.image_size}x"
             f"{config.image_size}", "",
             f"{config.train_steps} training steps x {config.n_seeds} seed(s), {config.n_samples} samples per "
             f"network and seed ({config.sampler}, {config.steps} steps, eta {config.eta}); device "
             f"{versions['device_name']} ({versions['device']}), torch {versions['torch']}; total wall time "
             f"{wall:.0f} s" + (f" over {invocations} invocations (resumed)" if invocations > 1 else "") + ".", "",
             head]
    an = b["analytic_consistent"]
    lines.append(f"| random, analytic | 100% | {100 * an:.2f}% (exact: {b['analytic_fraction']}) | {100 * an:.2f}% | "
                 f"- | - | 0 |")
    e = b["empirical"]
    lines.append(f"| random, empirical | {fmt(e['valid'])} | {fmt(e['consistent'])} | "
                 f"{fmt(e['consistent_among_valid'])} | {fmt(e['novel'])} | {fmt(e['nearest_consistent'])} | "
                 f"{b['seconds']:.1f} |")
    for s in summary["networks"].values():
        r = s["rates"]
        lines.append(f"| {s['label']} | {fmt(r['valid'])} | {fmt(r['consistent'])} | "
                     f"{fmt(r['consistent_among_valid'])} | {fmt(r['novel'])} | {fmt(r['nearest_consistent'])} | "
                     f"{s['seconds']:.0f} |")
    if config.n_seeds > 1:
        lines += ["", "## Per seed", "", "| model | seed | valid | consistent | consistent among valid | novel |",
                  "|---|---|---|---|---|---|"]
        for s in summary["networks"].values():
            r = s["rates"]
            for i, seed in enumerate(s["seeds"]):
                cells = [r[k]["per_seed"][i] for k in ("valid", "consistent", "consistent_among_valid", "novel")]
                lines.append(f"| {s['label']} | {seed} | "
                             + " | ".join("n/a" if c is None else f"{100 * c:.2f}%" for c in cells) + " |")
    ours = [net for net in summary["networks"] if net in PAPER]
    if ours and (config.n_pairs, config.n_colours) == (4, 4):      # the paper's setting only
        lines += ["", "## Beside the paper", "",
                  "Finn et al. (2025) report the share of all samples that are consistent (their headline column). "
                  "Their random baseline is not uniformly random pairs (25.51% consistent here), so that row is "
                  "not comparable.", "",
                  "| model | consistent, here | consistent, paper | consistent among valid, here |", "|---|---|---|---|",
                  f"| random | {100 * an:.2f}% (uniform pairs) | {PAPER['random']:.2f}% | {100 * an:.2f}% |"]
        for net in ours:
            r = summary["networks"][net]["rates"]
            lines.append(f"| {LABELS[net]} | {fmt(r['consistent'])} | {PAPER[net]:.2f}% | "
                         f"{fmt(r['consistent_among_valid'])} |")
    verdict, own = summary.get("coordination") or {}, summary.get("own_marginal_chance") or {}
    if own:
        lines += ["", "## Consistency among valid samples against chance", "",
                  "Own-marginal chance: each model's valid samples with each pair's values shuffled across samples "
                  "of the same seed (200 shuffles), which keeps every colour marginal and breaks the link between "
                  "pairs. Coordination: the 95% interval lies above the analytic chance, above the CNN's interval, "
                  "and above the own-marginal chance. The intervals count samples; *(not in every seed)* follows a "
                  "yes where some seed's own rate is not above the analytic chance, the CNN's pooled rate and the "
                  "own-marginal chance.", "",
                  "| model | consistent among valid | analytic chance | own-marginal chance | coordination |",
                  "|---|---|---|---|---|"]
        for net, s in summary["networks"].items():
            v = dict(verdict.get(net) or {})
            every = v.pop("every_seed_above", None)
            names = {"above_chance": "chance", "above_cnn": "the CNN", "above_own_marginals": "own marginals"}
            word = "-" if not v else ("yes" + (" (not in every seed)" if every is False else "") if all(v.values())
                                      else "no: not above " + ", ".join(names[k] for k, b in v.items() if not b))
            mean = own[net]["mean"] if net in own else float("nan")
            lines.append(f"| {s['label']} | {fmt(s['rates']['consistent_among_valid'])} | "
                         f"{100 * summary['baseline']['analytic_consistent']:.2f}% | "
                         + (f"{100 * mean:.2f}% (n = {own[net]['n']})" if mean == mean else "n/a") + f" | {word} |")
    lines += ["", "## Coordination probe", "",
              "Accuracy of pair 1's denoised value (nearest colour of x0_hat) when pair 0 shares its key vs not, "
              "on the same images and noise (only pair 0 differs). A local network scores a gap of exactly 0; "
              "a network that uses the other pair to denoise shows a positive gap.", "",
              "| model | t | key shared | key not shared | gap [95% CI] | predictions changed |",
              "|---|---|---|---|---|---|"]
    for s in summary["networks"].values():
        for p in s["probe"]:
            lo, hi = p["gap_ci95"]
            lines.append(f"| {s['label']} | {p['t']} | {fmt(p['matched'])} | {fmt(p['unmatched'])} | "
                         f"{100 * p['gap']:+.2f} pp [{100 * lo:+.2f}, {100 * hi:+.2f}] | {100 * p['changed']:.1f}% |")
    corr = summary.get("correlation_with_els") or {}
    if corr:
        lines += ["", "## Samples against the ELS machine", "",
                  f"Per-sample Pearson r (mean-centred, flattened) between each model's samples and the ELS machine's "
                  f"(patch {config.els_patch}, zero padding) from the same initial noise (seed 0).", "",
                  "| model | median r | quartiles | n |", "|---|---|---|---|"]
        for net, c in corr.items():
            lines.append(f"| {LABELS[net]} | {c['median']:.3f} | [{c['q25']:.3f}, {c['q75']:.3f}] | {c['n']} |")
    lines += ["", "Paper (Finn et al. 2025, consistency): random 5.38%, CNN 10.88%, top-1 21.64%, identity 25.44%, "
              "softmax attention 64.03%.", ""]
    return "\n".join(lines)


def own_marginal_chance(out: StudyDir, config: StudyConfig) -> dict:
    """Per model: the consistency its valid samples would have with their values shuffled across
    samples of the same seed (``metrics.shuffled_consistency``), pooled over seeds weighted by the
    number of valid samples: chance under the model's own colour marginals."""
    res = {}
    for net in tuple(config.analytic) + tuple(config.networks):
        seeds = range(1) if net in ANALYTIC else range(config.n_seeds)
        per = []
        for s in seeds:
            x = out.load_samples(row_name(net, s))
            if x is None:
                continue
            d = decode(config.data_config(), x)
            per.append(shuffled_consistency(d.keys[d.valid], d.values[d.valid], seed=s))
        n = sum(p["n"] for p in per)
        if per:
            res[net] = {"mean": sum(p["mean"] * p["n"] for p in per if p["n"]) / n if n else float("nan"),
                        "n": n, "per_seed": per}
    return res


def coordination_verdict(summary: dict) -> dict:
    """Per attention network: is its consistency among valid samples above chance and above the CNN's,
    with non-overlapping 95% intervals (the study's criterion for coordination)? With
    ``summary["own_marginal_chance"]``, also: is it above the chance its own colour marginals give? With
    several seeds, ``every_seed_above``: is each seed's own rate above chance, the CNN's pooled rate and
    the own-marginal chance (the intervals count samples, not seeds)?"""
    nets, chance = summary["networks"], summary["baseline"]["analytic_consistent"]
    own = summary.get("own_marginal_chance") or {}
    cnn = nets.get("none", {}).get("rates", {}).get("consistent_among_valid")
    out = {}
    for net in (n for n in nets if n not in ("none",) + ANALYTIC):
        r = nets[net]["rates"]["consistent_among_valid"]
        lo = r["ci95"][0] if r["n"] else float("nan")
        out[net] = {"above_chance": bool(lo > chance),
                    "above_cnn": bool(cnn is not None and cnn["n"] > 0 and lo > cnn["ci95"][1])}
        if net in own:
            out[net]["above_own_marginals"] = bool(lo > own[net]["mean"])
        # the intervals count samples, not seeds: does each seed's own rate clear the same bars?
        marg = own[net]["mean"] if net in own else 0.0
        bar = max(chance, cnn["rate"] if cnn is not None and cnn["n"] else 0.0, 0.0 if marg != marg else marg)
        every = every_seed_above(r.get("per_seed") or [], bar)
        if every is not None:
            out[net]["every_seed_above"] = every
    return out


def every_seed_above(seeds: Sequence[float | None], bar: float) -> bool | None:
    """Is each seed's own rate above ``bar`` (a seed without samples, None or NaN, is not)? None with fewer
    than two seeds. The verdicts' intervals count samples, not seeds; this says whether every seed agrees."""
    return all(x is not None and x > bar for x in seeds) if len(seeds) > 1 else None
