"""The study: train the four score networks, sample, score, probe; tables, figures, resumable runs.

``reproduce(config, out)`` writes to ``out``: ``study.json`` (the config; a different config in the
same directory is refused without ``force``), ``rows/*.json`` (one finished row each, the unit of
resumption), ``checkpoints/*.safetensors``, ``results.json`` (every number, config, versions,
device), ``results.md`` (the tables) and PNG figures (with matplotlib installed). Every file is
written atomically.

``coordination_probe`` measures whether a network uses the other pairs: clean images are noised
to level t; the accuracy of the denoised value of pair 1 (nearest colour of x0_hat at its value
cell) is compared between images where pair 0 shares pair 1's key ("matched") and where it does
not ("unmatched"). An optimal denoiser is more accurate when matched (two noisy views of one value).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from . import __version__, _validate
from .checkpoint import atomic_write_text, load_model, save_model
from .data import KVConfig, decode, generate, make_dataset, palette_of_size, render
from .metrics import Z95, Rate, analytic_random_consistency, random_images, score, shuffled_consistency
from .models import ATTENTIONS, ModelConfig, build_model
from .sampling import sample
from .schedule import make_schedule
from .training import TrainConfig, train

LABELS = {"none": "CNN", "top1": "CNN + top-1 attention", "identity": "CNN + identity attention",
          "softmax": "CNN + softmax attention", "ideal": "ideal score (theory)", "els": "ELS machine (theory)"}
ANALYTIC = ("ideal", "els")
PAPER = {"random": 5.38, "none": 10.88, "top1": 21.64, "identity": 25.44, "softmax": 64.03}
RATE_KEYS = ("valid", "consistent", "consistent_among_valid", "novel", "nearest_consistent")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study's numbers (JSON-serialisable).

    The defaults are the recipe under which attention coordinates pairs (docs/coordination_search.md):
    2 colours, 4 pairs on 8x8; width 64 with ``attn_patch``; 10,000 steps of batch 64 with half the
    timesteps drawn from t in [50, 400]. With 4 colours no configuration tried coordinated."""
    n_pairs: int = 4
    n_colours: int = 2
    image_size: int = 8
    n_train: int = 5000
    data_seed: int = 0
    networks: tuple[str, ...] = ("none", "top1", "identity", "softmax")
    analytic: tuple[str, ...] = ANALYTIC
    els_patch: int = 5
    width: int = 64
    attn_dim: int = 64
    attn_patch: bool = True
    temperature: float = 1.0
    coord_channels: bool = False
    train_steps: int = 10000
    batch_size: int = 64
    lr: float = 2e-3
    ema: float = 0.999
    t_focus: tuple[int, int] | None = (50, 400)
    t_focus_prob: float = 0.5
    n_seeds: int = 3
    n_samples: int = 10000
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 1.0
    clip_x0: bool = True
    probe_t: tuple[int, ...] = (100, 200, 400, 600)
    probe_n: int = 2000
    n_random: int = 10000

    def __post_init__(self) -> None:
        for n in self.networks:
            _validate.choice("networks", n, ATTENTIONS)
        for n in self.analytic:
            _validate.choice("analytic", n, ANALYTIC)
        if len(set(self.networks)) != len(self.networks) or len(set(self.analytic)) != len(self.analytic):
            raise ValueError("networks and analytic must not repeat an entry")
        if self.n_pairs < 2:
            raise ValueError(f"n_pairs must be >= 2 for the study (consistency needs two pairs), got {self.n_pairs}")
        _validate.choice("sampler", self.sampler, ("ddim", "ddpm"))
        _validate.finite_float("eta", self.eta, minimum=0.0)
        _validate.positive_int("els_patch", self.els_patch)
        if self.els_patch % 2 == 0:
            raise ValueError(f"els_patch must be odd, got {self.els_patch}")
        from .sampling import timesteps
        timesteps(1000, self.steps)
        for t in self.probe_t:
            _validate.positive_int("probe_t", t, minimum=0)
            if t >= 1000:
                raise ValueError(f"probe_t must lie in [0, 1000), got {t}")
        if self.t_focus is not None:
            object.__setattr__(self, "t_focus", tuple(self.t_focus))
        self.train_config(0)
        for net in self.networks:
            self.model_config(net)
        object.__setattr__(self, "networks", tuple(self.networks))
        object.__setattr__(self, "analytic", tuple(self.analytic))
        object.__setattr__(self, "probe_t", tuple(self.probe_t))
        for name in ("n_seeds", "n_samples", "train_steps", "n_train", "probe_n", "n_random"):
            _validate.positive_int(name, getattr(self, name))
        self.data_config()  # validates the geometry
        if self.n_pairs > 4 and not self.coord_channels:
            raise ValueError(f"n_pairs={self.n_pairs} > 4 uses the border layout, where a translation-equivariant "
                             "CNN cannot tell key from value cells: set coord_channels=True")

    @classmethod
    def preset(cls, mode: str, **overrides) -> "StudyConfig":
        """``"full"`` (the defaults), ``"quick"`` (minutes on a CPU) or ``"tiny"`` (seconds; CI)."""
        _validate.choice("mode", mode, ("full", "quick", "tiny"))
        base = {"full": {}, "quick": dict(train_steps=5000, n_samples=1000, n_seeds=1, probe_n=1000, n_random=2000),
                "tiny": dict(train_steps=20, n_samples=48, n_seeds=1, n_train=300, probe_n=48, n_random=200,
                             steps=8, width=16, probe_t=(200,))}[mode]
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def data_config(self) -> KVConfig:
        return KVConfig(n_pairs=self.n_pairs, palette=palette_of_size(self.n_colours), image_size=self.image_size)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.train_steps, batch_size=self.batch_size, lr=self.lr, ema=self.ema, seed=seed,
                           t_focus=self.t_focus, t_focus_prob=self.t_focus_prob)

    def model_config(self, net: str) -> ModelConfig:
        """The network ``net``; ``attn_patch`` applies to the attentions with learned projections."""
        return ModelConfig(net, self.width, self.attn_dim, 3, self.image_size, 1000, float(self.temperature), True,
                           self.coord_channels, self.attn_patch and net in ("softmax", "top1"))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _versions(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"fastscore": __version__, "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "device": str(device), "device_name": name, "threads": torch.get_num_threads()}


def _prepare_dir(out: Path, config: StudyConfig, force: bool) -> None:
    study = out / "study.json"
    want = config.to_dict()
    if out.exists() and any(out.iterdir()):
        if study.exists():
            have = json.loads(study.read_text())
            if have == want:
                return  # resume
            if not force:
                raise FileExistsError(f"{out} holds a study with another config; pass --force (force=True) to "
                                      "replace it, or choose another --out")
        else:  # never delete anything in a directory the study did not make, --force or not
            raise FileExistsError(f"{out} exists, is not empty and is not a fastscore study; choose another --out")
        for sub in ("rows", "checkpoints", "figures", "samples"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("results.json", "results.md", "study.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study, json.dumps(want, indent=2), overwrite=True)


@torch.no_grad()
def coordination_probe(model, config: KVConfig, t_values: Sequence[int], *, n: int = 2000, seed: int = 0,
                       device: str | torch.device = "cpu", batch_size: int = 1000) -> list[dict]:
    """Per t: accuracy of pair 1's denoised value when pair 0 shares its key vs when it does not.

    Paired design: each of ``n`` images appears twice, identical but for pair 0 (its key set equal to
    pair 1's, or to another colour; its value ``f(key)``), with the same noise. A network that does
    not look at pair 0 (any local network: pair 0 is outside pair 1's receptive field) gives exactly
    the same prediction in both copies, so its gap is exactly 0; a positive gap means the network
    uses pair 0 to denoise pair 1. Returns rows ``{"t", "matched": Rate, "unmatched": Rate, "gap",
    "gap_ci95": (lo, hi), "changed": fraction of images whose prediction differs}``; the interval
    is the normal interval of a paired difference. Needs ``config.n_pairs >= 2``.
    """
    if config.n_pairs < 2:
        raise ValueError("the coordination probe needs n_pairs >= 2")
    _validate.positive_int("n", n)
    sched = make_schedule("linear", getattr(getattr(model, "config", None), "T", 1000))
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    b = generate(config, n, seed)
    P = config.n_colours
    km, ku = b.keys.clone(), b.keys.clone()
    km[:, 0] = km[:, 1]                                                    # matched: pair 0 shares pair 1's key
    ku[:, 0] = (ku[:, 1] + torch.randint(1, P, (n,), generator=g)) % P     # unmatched: another key
    keys = torch.cat([km, ku])
    values = b.functions.repeat(2, 1).gather(1, keys)
    x0 = render(config, keys, values)
    target = values[:n, 1]                                                 # pair 1 is the same in both copies
    (vr, vc) = config.positions[1][1]
    s = config.cell_size
    pal = torch.tensor(config.palette)
    rows = []
    for t in t_values:
        t = _validate.positive_int("t", int(t), minimum=0)
        if t >= sched.T:
            raise ValueError(f"t must be < T={sched.T}, got {t}")
        ab = float(sched.alpha_bar[t])
        eps = torch.randn((n, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        pred = []
        for start in range(0, 2 * n, batch_size):
            xb = x0[start:start + batch_size].to(device)
            xt = math.sqrt(ab) * xb + math.sqrt(1 - ab) * eps[start:start + batch_size].to(device)
            tt = torch.full((xb.shape[0],), t, dtype=torch.int64, device=device)
            x0_hat = (xt - math.sqrt(1 - ab) * model(xt, tt)) / math.sqrt(ab)
            cell = x0_hat[:, :, vr * s:(vr + 1) * s, vc * s:(vc + 1) * s].mean((2, 3)).float().cpu()
            pred.append(((cell[:, None, :] - pal[None]) ** 2).sum(-1).argmin(1))
        p = torch.cat(pred)
        cm, cu = p[:n] == target, p[n:] == target
        d = cm.double() - cu.double()
        gap = float(d.mean())
        half = Z95 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
        rows.append({"t": t, "matched": Rate(int(cm.sum()), n), "unmatched": Rate(int(cu.sum()), n), "gap": gap,
                     "gap_ci95": (gap - half, gap + half), "changed": float((p[:n] != p[n:]).double().mean())})
    return rows


def format_probe(rows: list[dict]) -> str:
    """A markdown table of ``coordination_probe`` rows."""
    lines = ["| t | accuracy, key shared | accuracy, key not shared | gap [95% CI] | predictions changed |",
             "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["gap_ci95"]
        lines.append(f"| {r['t']} | {r['matched']} | {r['unmatched']} | {100 * r['gap']:+.2f} pp "
                     f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {100 * r['changed']:.1f}% |")
    return "\n".join(lines)


def _probe_json(rows: list[dict]) -> list[dict]:
    return [{"t": r["t"], "matched": r["matched"].to_dict(), "unmatched": r["unmatched"].to_dict(), "gap": r["gap"],
             "gap_ci95": list(r["gap_ci95"]), "changed": r["changed"]} for r in rows]


def _row_name(net: str, seed: int) -> str:
    return f"{net}-seed{seed}"


def _run_row(config: StudyConfig, out: Path, net: str, seed: int, images, train_set, device, backend, bar,
             weights: dict) -> dict:
    cfg = config.data_config()
    ckpt = out / "checkpoints" / f"{_row_name(net, seed)}.safetensors"
    losses: list[float] = []
    if ckpt.exists():
        model, meta = load_model(ckpt, backend=backend, device=device)
        losses = meta["extra"].get("losses", [])
        train_seconds = meta["extra"].get("seconds", 0.0)
        if bar is not None:
            bar.update(weights["train"] * config.train_steps)
    else:
        torch.manual_seed(1000 + seed)
        model = build_model(config.model_config(net), backend=backend)
        res = train(model, images, config.train_config(seed), device=device, progress=False,
                    callback=(lambda s, l: bar.update(weights["train"])) if bar is not None else None)
        model, losses, train_seconds = res.model, res.losses[::10], res.seconds
        save_model(ckpt, model, data_config=cfg, train_config=config.train_config(seed),
                   extra={"n_train": config.n_train, "data_seed": config.data_seed, "losses": losses,
                          "seconds": train_seconds}, overwrite=True)
    return _evaluate(config, out, model, net, seed, train_set, device, backend, bar, weights,
                     train_seconds=train_seconds, losses=losses)


def _evaluate(config: StudyConfig, out: Path, model, name: str, seed: int, train_set, device, backend, bar,
              weights: dict, *, train_seconds: float = 0.0, losses: list | None = None, schedule=None) -> dict:
    """Sample ``model`` (initial noise of seed ``10_000 + seed``), save and score the samples, run the
    probe (seed ``20_000 + seed``): the study's row for it."""
    cfg = config.data_config()
    t1 = time.perf_counter()
    x = sample(model, config.n_samples, schedule=schedule, sampler=config.sampler, steps=config.steps,
               eta=config.eta, clip_x0=config.clip_x0, seed=10_000 + seed, device=device, backend=backend,
               callback=(lambda b: bar.update(weights["sample"] * b)) if bar is not None else None)
    sample_seconds = time.perf_counter() - t1
    _save_samples(out, _row_name(name, seed), x, config)
    scores = score(cfg, x.cpu(), train_set)
    probe = coordination_probe(model, cfg, config.probe_t, n=config.probe_n, seed=20_000 + seed, device=device)
    if bar is not None:
        bar.update(weights["probe"])
    return {"network": name, "seed": seed, "rates": scores.to_dict(), "probe": _probe_json(probe),
            "train_seconds": train_seconds, "sample_seconds": sample_seconds,
            "seconds": train_seconds + (time.perf_counter() - t1), "losses": losses or [],
            "preview": x[:64].cpu().tolist()}


def _save_samples(out: Path, name: str, x: torch.Tensor, config: StudyConfig) -> None:
    """Samples as a file ``fastscore score`` can read (it records the dataset and training set)."""
    from .checkpoint import save_tensors
    save_tensors(out / "samples" / f"{name}.safetensors", {"samples": x},
                 {"kind": "samples", "data": config.data_config().to_dict(),
                  "extra": {"n_train": config.n_train, "data_seed": config.data_seed}}, overwrite=True)


def _load_samples(out: Path, name: str) -> torch.Tensor | None:
    from .checkpoint import load_tensors
    path = out / "samples" / f"{name}.safetensors"
    return load_tensors(path, "samples")[0]["samples"] if path.exists() else None


def _run_analytic_row(config: StudyConfig, out: Path, kind: str, images, train_set, device, backend, bar,
                      weights: dict) -> dict:
    """Sample and score an analytic score model (``fastscore.theory``); seed 0's initial noise."""
    from .theory import ELSScore, IdealScore
    sched = make_schedule("linear", 1000)
    model = IdealScore(images, sched, backend=backend) if kind == "ideal" else \
        ELSScore(images, sched, config.els_patch, padding="zeros", backend=backend)
    return _evaluate(config, out, model, kind, 0, train_set, device, backend, bar, weights, schedule=sched)


def correlations(out: Path, config: StudyConfig) -> dict:
    """Per network: median and quartiles of the per-sample Pearson r between its seed-0 samples and the
    ELS machine's, drawn from the same initial noise (Kamb & Ganguli's comparison)."""
    from .theory import correlation_summary, sample_correlation
    els = _load_samples(out, _row_name("els", 0))
    if els is None:
        return {}
    res = {}
    for net in config.networks + tuple(a for a in config.analytic if a != "els"):
        x = _load_samples(out, _row_name(net, 0))
        if x is not None:
            res[net] = correlation_summary(sample_correlation(x.double(), els.double()))
    return res


def _pooled(rows: list[dict], key: str) -> dict:
    k = sum(r["rates"][key]["k"] for r in rows)
    n = sum(r["rates"][key]["n"] for r in rows)
    per_seed = [r["rates"][key]["rate"] if r["rates"][key]["n"] else None for r in rows]  # None: no samples
    defined = [p for p in per_seed if p is not None]
    mean = sum(defined) / len(defined) if defined else float("nan")
    std = (sum((p - mean) ** 2 for p in defined) / (len(defined) - 1)) ** 0.5 if len(defined) > 1 else 0.0
    return {**Rate(k, n).to_dict(), "per_seed": per_seed, "mean": mean, "std": std}


def _fmt(d: dict) -> str:
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
        nets[net] = {"label": LABELS[net], "rates": {k: _pooled(rs, k) for k in RATE_KEYS}, "probe": probe,
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
    lines.append(f"| random, empirical | {_fmt(e['valid'])} | {_fmt(e['consistent'])} | "
                 f"{_fmt(e['consistent_among_valid'])} | {_fmt(e['novel'])} | {_fmt(e['nearest_consistent'])} | "
                 f"{b['seconds']:.1f} |")
    for s in summary["networks"].values():
        r = s["rates"]
        lines.append(f"| {s['label']} | {_fmt(r['valid'])} | {_fmt(r['consistent'])} | "
                     f"{_fmt(r['consistent_among_valid'])} | {_fmt(r['novel'])} | {_fmt(r['nearest_consistent'])} | "
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
    verdict, own = summary.get("coordination") or {}, summary.get("own_marginal_chance") or {}
    if own:
        lines += ["", "## Consistency among valid samples against chance", "",
                  "Own-marginal chance: each model's valid samples with each pair's values shuffled across samples "
                  "of the same seed (200 shuffles), which keeps every colour marginal and breaks the link between "
                  "pairs. Coordination: the 95% interval lies above the analytic chance, above the CNN's interval, "
                  "and above the own-marginal chance.", "",
                  "| model | consistent among valid | analytic chance | own-marginal chance | coordination |",
                  "|---|---|---|---|---|"]
        for net, s in summary["networks"].items():
            v = verdict.get(net)
            names = {"above_chance": "chance", "above_cnn": "the CNN", "above_own_marginals": "own marginals"}
            word = "-" if v is None else ("yes" if all(v.values()) else
                                          "no: not above " + ", ".join(names[k] for k, b in v.items() if not b))
            mean = own[net]["mean"] if net in own else float("nan")
            lines.append(f"| {s['label']} | {_fmt(s['rates']['consistent_among_valid'])} | "
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
            lines.append(f"| {s['label']} | {p['t']} | {_fmt(p['matched'])} | {_fmt(p['unmatched'])} | "
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


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (figures are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figures(out: Path, config: StudyConfig, rows: list[dict], device, backend, summary: dict | None = None
             ) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    nets = [n for n in tuple(config.analytic) + tuple(config.networks) if any(r["network"] == n for r in rows)]
    # sample grids
    fig, axes = plt.subplots(1, len(nets), figsize=(3.2 * len(nets), 3.4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        r = next(r for r in rows if r["network"] == net)
        x = torch.tensor(r["preview"][:36])
        k = int(math.ceil(math.sqrt(max(len(x), 1))))
        H = x.shape[-1] if len(x) else 1
        grid = torch.ones(3, k * (H + 1), k * (H + 1))
        for i, im in enumerate(x):
            gy, gx = divmod(i, k)
            grid[:, gy * (H + 1):gy * (H + 1) + H, gx * (H + 1):gx * (H + 1) + H] = (im.clamp(-1, 1) + 1) / 2
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(LABELS[net], fontsize=9)
        ax.axis("off")
    written.append(_savefig(fig, fig_dir / "samples.png"))
    plt.close(fig)
    if summary is not None:
        written.append(_consistency_figure(plt, fig_dir / "consistency.png", config, summary))
    # loss curves
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for net in nets:
        for r in rows:
            if r["network"] == net and r["losses"]:
                l = torch.tensor(r["losses"])
                w = max(1, len(l) // 30)
                sm = l.unfold(0, w, w).mean(1) if len(l) >= w else l
                ax.plot(torch.arange(len(sm)) * w * 10, sm, label=f"{LABELS[net]} s{r['seed']}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    written.append(_savefig(fig, fig_dir / "loss.png"))
    plt.close(fig)
    # attention maps: where the value cell of pair 1 attends, on one training image at a few t
    cfg = config.data_config()
    att_nets = [n for n in nets if n not in ("none",) + ANALYTIC]
    if att_nets:
        x0, _ = make_dataset(cfg, 1, seed=config.data_seed + 7)
        ts = [100, 300, 600]
        fig, axes = plt.subplots(len(att_nets), len(ts) + 1, figsize=(2.2 * (len(ts) + 1), 2.3 * len(att_nets)),
                                 squeeze=False)
        (vr, vc) = cfg.positions[1][1]
        H = cfg.image_size
        for i, net in enumerate(att_nets):
            model, _ = load_model(out / "checkpoints" / f"{_row_name(net, 0)}.safetensors", backend=backend,
                                  device=device)
            axes[i][0].imshow(((x0[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i][0].set_title("image", fontsize=8)
            axes[i][0].set_ylabel(LABELS[net], fontsize=7)
            sched = make_schedule("linear", model.config.T)
            g = torch.Generator().manual_seed(0)
            for j, t in enumerate(ts):
                ab = float(sched.alpha_bar[t])
                xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g)
                w = model.attention_weights(xt.to(device), torch.tensor([t], device=device))[0].cpu()
                axes[i][j + 1].imshow(w[vr * H + vc].view(H, H).numpy(), cmap="viridis", interpolation="nearest")
                axes[i][j + 1].set_title(f"t={t}", fontsize=8)
            for ax in axes[i]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle("attention of pair 1's value cell", fontsize=9)
        written.append(_savefig(fig, fig_dir / "attention.png"))
        plt.close(fig)
    return written


def _consistency_figure(plt, path: Path, config: StudyConfig, summary: dict) -> str:
    """Consistency among valid samples per model: pooled rate with its 95% interval, seeds as dots,
    the analytic chance as a line and each model's own-marginal chance as a tick."""
    nets = summary["networks"]
    own = summary.get("own_marginal_chance") or {}
    names = [n for n in nets if nets[n]["rates"]["consistent_among_valid"]["n"]]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 1.5, 3.4))
    for i, n in enumerate(names):
        r = nets[n]["rates"]["consistent_among_valid"]
        lo, hi = r["ci95"]
        ax.bar(i, 100 * r["rate"], color="tab:orange" if n not in ("none",) + ANALYTIC else "tab:grey", alpha=0.8)
        ax.errorbar(i, 100 * r["rate"], yerr=[[100 * (r["rate"] - lo)], [100 * (hi - r["rate"])]], color="k",
                    capsize=4)
        seeds = [p for p in r.get("per_seed", []) if p is not None]
        if len(seeds) > 1:
            ax.scatter([i] * len(seeds), [100 * p for p in seeds], color="k", s=10, zorder=3)
        if n in own and own[n]["mean"] == own[n]["mean"]:
            ax.hlines(100 * own[n]["mean"], i - 0.4, i + 0.4, colors="tab:blue", linestyles="dotted")
    ax.axhline(100 * summary["baseline"]["analytic_consistent"], color="tab:red", ls="--", lw=1,
               label="analytic chance")
    ax.plot([], [], color="tab:blue", ls="dotted", label="own-marginal chance")
    ax.set_xticks(range(len(names)), [LABELS[n].replace("CNN + ", "+ ").replace(" (theory)", "") for n in names],
                  fontsize=7, rotation=20)
    ax.set_ylabel("consistent among valid (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{config.n_pairs} pairs, {config.n_colours} colours, {config.n_seeds} seed(s) x "
                 f"{config.n_samples} samples", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    path = _savefig(fig, path)
    plt.close(fig)
    return path


def _savefig(fig, path: Path) -> str:
    from .checkpoint import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"), overwrite=True)
    return str(path)


def _job(config: StudyConfig, out: Path, net: str, seed: int, images, train_set, device, backend, bar,
         weights: dict) -> dict:
    """One row (train or load, sample, score, probe), saved to ``rows/`` atomically."""
    if net in ANALYTIC:
        row = _run_analytic_row(config, out, net, images, train_set, device, backend, bar, weights)
    else:
        row = _run_row(config, out, net, seed, images, train_set, device, backend, bar, weights)
    atomic_write_text(out / "rows" / f"{_row_name(net, seed)}.json", json.dumps(row), overwrite=True)
    return row


def _default_workers(device: torch.device) -> int:
    """Two rows at a time on a CPU with >= 2 cores (small convs scale poorly across threads: two
    single-threaded trainings do ~1.4x the work of one two-threaded one); one on a GPU."""
    return 2 if device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


class _QueueBar:
    """Progress from a worker process: counts locally, sends to the parent's queue every 0.5 s."""

    def __init__(self, queue) -> None:
        self.queue, self.pending, self.last = queue, 0, time.perf_counter()

    def update(self, n: float = 1) -> None:
        self.pending += n
        if time.perf_counter() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.queue.put(self.pending)
        self.pending, self.last = 0, time.perf_counter()


def _worker_job(config: StudyConfig, out: Path, net: str, seed: int, device, backend, weights: dict, threads: int,
                queue) -> dict:
    torch.set_num_threads(threads)
    images, train_set = make_dataset(config.data_config(), config.n_train, config.data_seed)
    if queue is None:
        return _job(config, out, net, seed, images, train_set, device, backend, None, weights)
    queue.put(("start", net, seed))
    bar = _QueueBar(queue)
    row = _job(config, out, net, seed, images, train_set, device, backend, bar, weights)
    bar.flush()
    queue.put(("end", net, seed))
    return row


# relative cost of a row (CPU, width 64, 10k steps; measured in the full run: top-1 ~630 s, softmax
# ~510 s, identity ~345 s, CNN ~320 s per row on one thread; the analytic rows sample only)
_COST = {"top1": 4, "softmax": 3, "identity": 2, "none": 1}


def _run_parallel(config: StudyConfig, out: Path, todo: list, device, backend, bar, weights: dict,
                  workers: int) -> dict:
    """Rows in ``workers`` spawned processes, each with cpu_count // workers threads; the bar
    follows them all. A failed row raises here; finished rows stay saved for the rerun."""
    import concurrent.futures as cf
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    results, running = {}, []

    def drain(queue) -> None:
        while not queue.empty():
            msg = queue.get()
            if isinstance(msg, tuple):
                (running.append if msg[0] == "start" else running.remove)(msg[1:])
            else:
                bar.update(msg)
        bar.set_description("reproduce [" + "; ".join(f"{LABELS[n]}, seed {s}" for n, s in running) + "]")

    with ctx.Manager() as manager, cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue() if bar is not None else None
        # longest rows first, so the last row does not run alone on one core while the others idle
        order = sorted(todo, key=lambda j: -_COST.get(j[0], 0))
        futures = {pool.submit(_worker_job, config, out, net, s, device, backend, weights, threads, queue): (net, s)
                   for net, s in order}
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                results[futures[f]] = f.result()
            if queue is not None:
                drain(queue)
    return results


def reproduce(config: StudyConfig, out: str | Path, *, device: str | torch.device = "cpu", backend: str = "auto",
              force: bool = False, progress: bool = True, workers: int | None = None) -> dict:
    """Run (or resume) the study into directory ``out``; returns the results document.

    ``workers``: rows trained at once in separate processes (default: 2 on a CPU with >= 2 cores,
    1 on a GPU). Rows are the same config either way; float results may differ in the last bits
    (thread count changes summation order)."""
    out = Path(out)
    device = torch.device(device)
    if workers is not None:
        _validate.positive_int("workers", workers)
    _prepare_dir(out, config, force)
    (out / "rows").mkdir(exist_ok=True)
    start = time.perf_counter()
    cfg = config.data_config()
    images, train_set = make_dataset(cfg, config.n_train, config.data_seed)
    t0 = time.perf_counter()
    rnd = score(cfg, random_images(cfg, config.n_random, seed=config.data_seed + 1), train_set).to_dict()
    an = analytic_random_consistency(cfg.n_pairs, cfg.n_colours)
    baseline = {"analytic_fraction": str(an), "analytic_consistent": float(an), "empirical": rnd,
                "seconds": time.perf_counter() - t0}
    jobs = [(a, 0) for a in config.analytic] + [(net, s) for net in config.networks for s in range(config.n_seeds)]
    # progress in image-forward equivalents: a training step is ~3 passes over a batch, a sample is one
    # pass per sampler step; scoring and the probe count as a few thousand
    w_train, w_sample = 3 * config.batch_size, (1000 if config.sampler == "ddpm" else config.steps)
    per_job = {net: (0 if net in ANALYTIC else w_train * config.train_steps) + w_sample * config.n_samples
               + 2 * config.probe_n * len(config.probe_t) for net, _ in jobs}
    weights = {"train": w_train, "sample": w_sample, "probe": 2 * config.probe_n * len(config.probe_t)}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(per_job[n] for n, _ in jobs), desc="reproduce", dynamic_ncols=True, unit="img",
                   unit_scale=True)
    done = {}
    for net, s in jobs:
        path = out / "rows" / f"{_row_name(net, s)}.json"
        if path.exists():
            done[(net, s)] = json.loads(path.read_text())
            if bar is not None:
                bar.update(per_job[net])
    todo = [j for j in jobs if j not in done]
    workers = _default_workers(device) if workers is None else workers
    if workers > 1 and len(todo) > 1:
        done.update(_run_parallel(config, out, todo, device, backend, bar, weights, workers))
    else:
        for net, s in todo:
            if bar is not None:
                bar.set_description(f"reproduce [{LABELS[net]}, seed {s}]")
            done[(net, s)] = _job(config, out, net, s, images, train_set, device, backend, bar, weights)
    rows = [done[j] for j in jobs]
    if bar is not None:
        bar.close()
    versions = _versions(device)
    summary = summarise(config, rows, baseline)
    summary["correlation_with_els"] = correlations(out, config)
    summary["own_marginal_chance"] = own_marginal_chance(out, config)
    summary["coordination"] = coordination_verdict(summary)
    figures = _figures(out, config, rows, device, backend, summary)
    runs = _record_invocation(out, time.perf_counter() - start, len(todo))
    wall = sum(r["seconds"] for r in runs)
    doc = {"config": config.to_dict(), "data_config": cfg.to_dict(), "versions": versions, "wall_seconds": wall,
           "invocations": runs, "workers": workers,
           "summary": summary, "rows": [{k: v for k, v in r.items() if k != "preview"} for r in rows],
           "figures": figures, "paper": PAPER}
    md = results_markdown(config, summary, versions, wall, len(runs))
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1), overwrite=True)
    atomic_write_text(out / "results.md", md, overwrite=True)
    print(md)
    return doc


def _record_invocation(out: Path, seconds: float, rows_run: int) -> list[dict]:
    """Append this invocation's wall time to ``out/invocations.json``; the study's wall time is their
    sum. A results.json written before this file existed contributes its recorded wall time."""
    path = out / "invocations.json"
    if path.exists():
        runs = json.loads(path.read_text())
    elif (out / "results.json").exists():
        runs = [{"seconds": json.loads((out / "results.json").read_text())["wall_seconds"], "rows_run": None}]
    else:
        runs = []
    runs.append({"seconds": seconds, "rows_run": rows_run})
    atomic_write_text(path, json.dumps(runs, indent=1), overwrite=True)
    return runs


def own_marginal_chance(out: Path, config: StudyConfig) -> dict:
    """Per model: the consistency its valid samples would have with their values shuffled across
    samples of the same seed (``metrics.shuffled_consistency``), pooled over seeds weighted by the
    number of valid samples: chance under the model's own colour marginals."""
    res = {}
    for net in tuple(config.analytic) + tuple(config.networks):
        seeds = range(1) if net in ANALYTIC else range(config.n_seeds)
        per = []
        for s in seeds:
            x = _load_samples(out, _row_name(net, s))
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
    ``summary["own_marginal_chance"]``, also: is it above the chance its own colour marginals give?"""
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
    return out


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
    _sweep_figure(Path(out) / "sweep.png", config.networks, docs)
    atomic_write_text(Path(out) / "sweep.md", lines, overwrite=True)
    print(lines)
    return docs


def _sweep_figure(path: Path, networks: Sequence[str], docs: dict) -> str | None:
    """Consistency among valid samples against the number of pairs, per network, with the analytic chance."""
    plt = _pyplot()
    if plt is None:
        return None
    pairs = list(docs)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(pairs, [100 * docs[p]["summary"]["baseline"]["analytic_consistent"] for p in pairs], "r--",
            label="analytic chance")
    for net in networks:
        xs, ys, los, his = [], [], [], []
        for p in pairs:
            r = docs[p]["summary"]["networks"].get(net, {}).get("rates", {}).get("consistent_among_valid")
            if r and r["n"]:
                xs.append(p)
                ys.append(100 * r["rate"])
                los.append(100 * (r["rate"] - r["ci95"][0]))
                his.append(100 * (r["ci95"][1] - r["rate"]))
        ax.errorbar(xs, ys, yerr=[los, his], marker="o", capsize=3, label=LABELS[net])
    ax.set_xlabel("pairs per image")
    ax.set_ylabel("consistent among valid (%)")
    ax.set_xticks(pairs)
    ax.legend(fontsize=7)
    out = _savefig(fig, path)
    plt.close(fig)
    return out


def sweep_table(networks: Sequence[str], docs: dict) -> str:
    """Markdown: per pair count, the image size, chance, each network's consistency among valid samples
    with its validity, and, with the CNN in the sweep, each attention network's gap over it in pp."""
    attn = [n for n in networks if n != "none"] if "none" in networks else []
    head = ["pairs", "image", "chance"] + [LABELS[n] for n in networks] + [f"{LABELS[n]} - CNN (pp)" for n in attn]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p, d in docs.items():
        s, size = d["summary"], d["config"]["image_size"]
        nets = s["networks"]
        cells = [f"{_fmt(nets[n]['rates']['consistent_among_valid'])}, valid "
                 f"{100 * nets[n]['rates']['valid']['rate']:.1f}%" if n in nets else "-" for n in networks]
        gaps = []
        for n in attn:
            a, c = nets[n]["rates"]["consistent_among_valid"], nets["none"]["rates"]["consistent_among_valid"]
            gaps.append(f"{100 * (a['rate'] - c['rate']):+.1f}" if a["n"] and c["n"] else "n/a")
        lines.append(f"| {p} | {size}x{size} | {100 * s['baseline']['analytic_consistent']:.2f}% | "
                     + " | ".join(cells + gaps) + " |")
    return "\n".join(lines) + "\n"
