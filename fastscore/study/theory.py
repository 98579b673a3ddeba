"""The theory study (issue 23): does the ELS machine predict a trained CNN's samples on real images, and
does a final self-attention layer escape it? Kamb & Ganguli's protocol (arXiv 2412.20292), our code.

Per dataset and network (``ScoreNet`` with ``depth`` 3x3 conv layers, without (``"none"``) and with
(``"softmax"``) the final self-attention layer, everything else shared; on request a diffusers
``UNet2DModel`` of two levels of widths ``width``, ``2 * width``, without (``"unet"``) and with
(``"unet_attn"``) attention blocks, ``fastscore.unet``, ``depth`` unused; ``n_seeds`` seeds) it
1. trains the network with ``fastscore.train`` on the cosine schedule;
2. calibrates each machine's patch size per sampling step to the network (``calibrate_patch_sizes``:
   odd sizes 3, 5, ... up to the image; the size whose eps has the highest cosine similarity with the
   network's along the network's own deterministic DDIM trajectory, median over ``n_calib`` samples),
   separately for the ELS machine with zero padding (boundary-broken), circular (the torus), circular
   with training patches at valid positions only (the reference's), and the position-specific machine;
3. samples the network, the four calibrated machines and the ideal score from the same initial noise
   (cosine schedule, deterministic DDIM, eta = 0, ``steps`` steps, the predicted x0 clamped to [-1, 1]:
   without it the first step, at alpha_bar = 2e-9, multiplies a difference in eps by ~1,600 and the
   network's and the machine's samples part however well their scores agree);
4. reports per network the per-sample Pearson r of mean-centred images (``sample_correlation``) with
   each machine: median and quartiles of r and r^2 with percentile bootstrap intervals.

Layout of ``out``: ``<dataset>/config.json``; ``<dataset>/nets/<net>-s<seed>.safetensors`` (trained
networks); ``<dataset>/machines/<machine>-<sizes>.safetensors`` (machine samples, keyed by their patch
schedule: networks whose calibrations agree share them); ``<dataset>/rows/<net>-s<seed>.json`` (the
calibrations, per-sample r, timings); ``theory.json``, ``theory.md`` and ``theory-pairs-<dataset>.png``
over every dataset in ``out``. Each file is written once, atomically: a rerun resumes; another
configuration for a dataset already there raises unless ``force`` (which replaces that dataset's files;
its trained networks only when a setting they depend on changed; another list of ``networks`` alone
keeps every finished row and needs no ``force``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import _validate
from .._validate import UsageError, UsageTypeError
from ..checkpoint import atomic_write_text, load_model, load_tensors, save_model, save_tensors
from ..models import ScoreNet
from ..sampling import sample, timesteps
from ..schedule import Schedule, make_schedule
from ..theory import (
    ELSScore,
    IdealScore,
    LocalScore,
    bootstrap_summary,
    calibrate_patch_sizes,
    odd_sizes,
    sample_correlation,
)
from ..training import TrainConfig, train

if TYPE_CHECKING:
    from ..unet import DiffusersUNet

NETWORKS = ("none", "softmax")
# diffusers UNet2DModels (fastscore.unet, the "unet" extra): width config.width at 2 levels, without and
# with attention blocks; accepted in ``networks``, not in the default
UNETS = ("unet", "unet_attn")
LABELS = {"none": "CNN", "softmax": "CNN + softmax attention", "unet": "UNet2DModel (diffusers)",
          "unet_attn": "UNet2DModel + attention (diffusers)"}
# machine -> (label, ELS padding or "local"; None: not calibrated)
MACHINES: dict[str, tuple[str, str | None]] = {
    "els_zeros": ("ELS, zero padding (boundary-broken)", "zeros"),
    "els_circular": ("ELS, circular", "circular"),
    "els_circular_valid": ("ELS, circular, valid training patches (reference)", "circular_valid"),
    "local": ("position-specific local machine", "local"),
    "ideal": ("ideal score", None)}
ELS_MACHINES = ("els_zeros", "els_circular", "els_circular_valid")
# Kamb & Ganguli's published median r^2 between the calibrated ELS machine and trained networks
PUBLISHED = {"MNIST (CNNs)": 0.94, "FashionMNIST (CNNs)": 0.94, "CIFAR-10 (CNNs)": 0.95, "CelebA (CNNs)": 0.96,
             "CIFAR-10 (UNet + self-attention)": 0.77}
T = 1000
# the settings a trained network depends on: force keeps the networks when only others changed
TRAINING_FIELDS = ("dataset", "n_train", "data_seed", "depth", "width", "train_steps", "batch_size", "lr", "ema")
MODEL_SEED, SAMPLE_SEED, BOOT_SEED = 1000, 10_000, 5


@dataclass(frozen=True)
class TheoryConfig:
    """Everything that defines one dataset's numbers (JSON-serialisable). ``dataset``: ``"digits"``
    (scikit-learn), ``"kv"`` (the key-value images, ``fastscore.data`` defaults, ``data_seed``) or a
    ``.npy``/``.safetensors`` path; ``n_train``: its first n images (None: all; kv: 2000)."""
    dataset: str = "digits"
    n_train: int | None = None
    data_seed: int = 0
    networks: tuple[str, ...] = NETWORKS
    depth: int = 3
    width: int = 64
    train_steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-3
    ema: float = 0.999
    n_seeds: int = 3
    n_samples: int = 1000
    n_calib: int = 64
    steps: int = 20
    clip_x0: bool = True
    machines: tuple[str, ...] = tuple(MACHINES)
    n_boot: int = 2000

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or (self.dataset not in ("digits", "kv")
                                                 and Path(self.dataset).suffix not in (".npy", ".safetensors")):
            raise UsageError(f"dataset must be 'digits', 'kv' or a .npy/.safetensors path, got {self.dataset!r}")
        for n in self.networks:
            _validate.choice("networks", n, NETWORKS + UNETS)
        for m in self.machines:
            _validate.choice("machines", m, tuple(MACHINES))
        object.__setattr__(self, "networks", tuple(self.networks))
        object.__setattr__(self, "machines", tuple(self.machines))
        if self.n_train is not None:
            _validate.positive_int("n_train", self.n_train)
        for name in ("depth", "width", "train_steps", "batch_size", "n_seeds", "n_samples", "n_calib", "n_boot"):
            _validate.positive_int(name, getattr(self, name))
        _validate.seed("data_seed", self.data_seed)
        timesteps(T, self.steps)
        self.train_config(0)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.train_steps, batch_size=self.batch_size, lr=self.lr, ema=self.ema, seed=seed)

    @property
    def name(self) -> str:
        """The dataset's folder name in ``out``."""
        return self.dataset if self.dataset in ("digits", "kv") else Path(self.dataset).stem

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": dict(n_train=500, width=32, batch_size=64, train_steps=4000, n_seeds=1, n_samples=200, n_calib=16,
                  n_boot=1000),
    "tiny": dict(n_train=24, width=8, batch_size=16, train_steps=10, n_seeds=1, n_samples=6, n_calib=3, steps=4,
                 n_boot=200)}


def preset(mode: str, **overrides: Any) -> TheoryConfig:
    """``"full"``, ``"quick"`` or ``"tiny"`` with ``overrides`` (None values ignored)."""
    _validate.choice("mode", mode, tuple(PRESETS))
    known = {f.name for f in fields(TheoryConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UsageError(f"{', '.join(bad)} do not apply to the theory study (its settings: {', '.join(sorted(known))})")
    return TheoryConfig(**{**PRESETS[mode], **{k: v for k, v in overrides.items() if v is not None}})


def load_data(config: TheoryConfig) -> torch.Tensor:
    """The training images (N, C, H, W) float32 in [-1, 1] of ``config``'s dataset (square images)."""
    if config.dataset == "kv":
        from ..data import KVConfig, make_dataset
        x, _ = make_dataset(KVConfig(), config.n_train or 2000, config.data_seed)
    else:
        from ..images import load_images
        x = load_images(config.dataset, config.n_train)
    if x.shape[2] != x.shape[3]:
        raise UsageError(f"the theory study needs square images, got {tuple(x.shape[2:])}")
    return x.float().contiguous()


# ---------------------------------------------------------------------------------------------
# the steps of one row
# ---------------------------------------------------------------------------------------------
def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[theory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _unet(config: TheoryConfig, data: torch.Tensor, net: str) -> DiffusersUNet:
    """The untrained diffusers UNet of network ``net`` ("unet", "unet_attn") for ``data``'s images."""
    from ..unet import DiffusersUNet, UNetConfig
    return DiffusersUNet(UNetConfig(channels=int(data.shape[1]), image_size=int(data.shape[2]), width=config.width,
                                    attention=net == "unet_attn", T=T))


def _network(config: TheoryConfig, data: torch.Tensor, net: str, seed: int, path: Path, device: torch.device,
             backend: str, progress: bool) -> tuple[torch.nn.Module, dict]:
    """The trained network (from ``path`` when there) and ``{"train_seconds", "final_loss"}``. ScoreNets are
    saved with ``save_model``; UNets as their state dict with their ``UNetConfig`` (kind "theory-unet")."""
    if path.exists():
        if net in UNETS:
            state, meta = load_tensors(path, "theory-unet")
            unet = _unet(config, data, net)
            unet.load_state_dict(state)
            return unet.to(device).eval(), meta["extra"]
        net_model, meta = load_model(path, backend=backend, device=device)
        return net_model, meta["extra"]
    torch.manual_seed(MODEL_SEED + seed)
    model: DiffusersUNet | ScoreNet = _unet(config, data, net) if net in UNETS else \
        ScoreNet(net, config.width, backend=backend, image_channels=int(data.shape[1]),
                 image_size=int(data.shape[2]), depth=config.depth)
    res = train(model, data, config.train_config(seed), schedule=make_schedule("cosine", T), device=device,
                progress=progress, desc=f"{net}-s{seed}")
    losses = res.losses[-max(1, len(res.losses) // 20):]
    extra = {"train_seconds": res.seconds, "final_loss": sum(losses) / len(losses)}
    if net in UNETS:
        save_tensors(path, res.model.state_dict(), {"kind": "theory-unet", "unet": model.config.to_dict(),
                                                    "train": config.train_config(seed).to_dict(), "extra": extra},
                     overwrite=True)
    else:
        save_model(path, res.model, train_config=config.train_config(seed), extra=extra, overwrite=True)
    _log(f"trained {net}-s{seed} in {res.seconds:.0f} s (loss {extra['final_loss']:.4f})", progress)
    return res.model, extra


def _machine(name: str, data: torch.Tensor, sched: Schedule, sizes: list[int] | None, ts: list[int],
             backend: str) -> torch.nn.Module:
    if name == "ideal":
        return IdealScore(data, sched, backend=backend)
    assert sizes is not None
    per_t = [sizes[0]] * T                  # every sampled timestep gets its calibrated size
    for t, k in zip(ts, sizes):
        per_t[t] = int(k)
    pad = MACHINES[name][1]
    if pad == "local":
        return LocalScore(data, sched, per_t, backend=backend)
    return ELSScore(data, sched, per_t, padding=str(pad), backend=backend)


def _sample(model, config: TheoryConfig, shape: tuple[int, ...], sched: Schedule, device: torch.device,
            backend: str) -> torch.Tensor:
    return sample(model, config.n_samples, shape=shape, schedule=sched, sampler="ddim", steps=config.steps, eta=0.0,
                  clip_x0=config.clip_x0, seed=SAMPLE_SEED, batch_size=min(config.n_samples, 500), device=device,
                  backend=backend).cpu()


def _machine_samples(name: str, sizes: list[int] | None, root: Path, config: TheoryConfig, data: torch.Tensor,
                     sched: Schedule, ts: list[int], device: torch.device, backend: str, progress: bool) -> torch.Tensor:
    """The machine's samples from the study's noise, computed once per patch schedule."""
    key = name if sizes is None else f"{name}-{'.'.join(map(str, sizes))}"
    path = root / "machines" / f"{key}.safetensors"
    if path.exists():
        return load_tensors(path, "theory-machine")[0]["samples"]
    start = time.perf_counter()
    x = _sample(_machine(name, data.to(device), sched, sizes, ts, backend), config, tuple(data.shape[1:]), sched,
                device, backend)
    secs = time.perf_counter() - start
    save_tensors(path, {"samples": x}, {"kind": "theory-machine", "machine": name, "sizes": sizes, "seconds": secs},
                 overwrite=True)
    _log(f"sampled {key} in {secs:.0f} s", progress)
    return x


def run_row(config: TheoryConfig, root: Path, net: str, seed: int, data: torch.Tensor, device: torch.device,
            backend: str, progress: bool) -> dict:
    """Train (or load), calibrate, sample and correlate one network; the row document (also written to
    ``root/rows/<net>-s<seed>.json``)."""
    row_path = root / "rows" / f"{net}-s{seed}.json"
    if row_path.exists():
        return json.loads(row_path.read_text())
    start = time.perf_counter()
    sched = make_schedule("cosine", T)
    ts = timesteps(T, config.steps)
    model, extra = _network(config, data, net, seed, root / "nets" / f"{net}-s{seed}.safetensors", device, backend,
                            progress)
    t0 = time.perf_counter()
    x_net = _sample(model, config, tuple(data.shape[1:]), sched, device, backend)
    net_secs = time.perf_counter() - t0
    sizes = odd_sizes(int(data.shape[2]))
    doc: dict[str, Any] = {"network": net, "seed": seed, **extra, "sample_seconds": net_secs,
                           "calibration": {}, "r": {}, "calibration_seconds": {}}
    for name in config.machines:
        pad = MACHINES[name][1]
        schedule_k = None
        if pad is not None:
            t0 = time.perf_counter()
            cal = calibrate_patch_sizes(model, data.to(device), sched, sizes, t_values=ts, n=config.n_calib, eta=0.0,
                                        padding="zeros" if pad == "local" else pad, seed=SAMPLE_SEED,
                                        clip_x0=config.clip_x0, device=device, backend=backend,
                                        machine="local" if pad == "local" else "els")
            doc["calibration"][name] = cal.to_dict()
            doc["calibration_seconds"][name] = time.perf_counter() - t0
            schedule_k = cal.median.tolist()
            _log(f"{net}-s{seed} {name}: sizes {schedule_k} ({doc['calibration_seconds'][name]:.0f} s)", progress)
        x_m = _machine_samples(name, schedule_k, root, config, data, sched, ts, device, backend, progress)
        doc["r"][name] = sample_correlation(x_net, x_m).tolist()
    save_tensors(root / "rows" / f"{net}-s{seed}-samples.safetensors", {"samples": x_net},
                 {"kind": "theory-network-samples", "network": net, "seed": seed}, overwrite=True)
    doc["seconds"] = time.perf_counter() - start
    atomic_write_text(row_path, json.dumps(doc), overwrite=True)
    return doc


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------
def _prepare(config: TheoryConfig, root: Path, force: bool) -> None:
    cfg_path = root / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        # rows are per network: another list of networks keeps every finished row and needs no force
        only_networks = {**old, "networks": None} == {**config.to_dict(), "networks": None}
        if old != config.to_dict() and not only_networks:
            if not force:
                diff = sorted(k for k in set(old) | set(config.to_dict()) if old.get(k) != config.to_dict().get(k))
                raise UsageError(f"{root} holds a theory study of other settings ({', '.join(diff)}): pass force=True "
                                 "(--force) to replace it, or another output directory")
            same_nets = all(old.get(k) == config.to_dict().get(k) for k in TRAINING_FIELDS)
            for sub in ("machines", "rows") if same_nets else ("nets", "machines", "rows"):
                d = root / sub
                if d.is_dir():
                    for f in d.iterdir():
                        if f.suffix in (".json", ".safetensors"):
                            f.unlink()
    atomic_write_text(cfg_path, json.dumps(config.to_dict(), indent=1), overwrite=True)


def run(config: TheoryConfig, out: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str = "auto",
        force: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the study of ``config``'s dataset in ``out/<dataset>``, then write the report over
    every dataset in ``out``; returns the report document."""
    if not isinstance(config, TheoryConfig):
        raise UsageTypeError(f"config must be a TheoryConfig, got {type(config).__name__}")
    device = _validate.device("device", device)
    data = load_data(config)
    for net in config.networks:
        if net in UNETS:   # diffusers installed, the images fit: before any work
            _unet(config, data, net)
    root = Path(out) / config.name
    _prepare(config, root, force)
    start = time.perf_counter()
    for net in config.networks:
        for seed in range(config.n_seeds):
            run_row(config, root, net, seed, data, device, backend, progress)
    runs_path = root / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    runs.append({"seconds": time.perf_counter() - start, "load": os.getloadavg()[0] if hasattr(os, "getloadavg")
                 else None, "threads": torch.get_num_threads(), "device": str(device)})
    atomic_write_text(runs_path, json.dumps(runs), overwrite=True)
    return report(out)


def _row_summary(rows: list[dict], machine: str, n_boot: int) -> dict:
    r = torch.tensor([v for row in rows for v in row["r"].get(machine, [])], dtype=torch.float64)
    return bootstrap_summary(r, n_boot=n_boot, seed=BOOT_SEED)


def report(out: str | os.PathLike) -> dict:
    """``theory.json``, ``theory.md`` and the figures from every finished dataset in ``out``."""
    out = Path(out)
    doc: dict[str, Any] = {"published": PUBLISHED, "datasets": {}}
    for cfg_path in sorted(out.glob("*/config.json")):
        root = cfg_path.parent
        saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in json.loads(cfg_path.read_text()).items()}
        config = TheoryConfig(**saved)
        rows = [json.loads(p.read_text()) for p in sorted((root / "rows").glob("*.json"))]
        if not rows:
            continue
        nets: dict[str, Any] = {}
        for net in config.networks:
            mine = [r for r in rows if r["network"] == net]
            if not mine:
                continue
            nets[net] = {"seeds": [r["seed"] for r in mine],
                         "summary": {m: _row_summary(mine, m, config.n_boot) for m in config.machines},
                         "calibration": {str(r["seed"]): r["calibration"] for r in mine},
                         "train_seconds": [r.get("train_seconds") for r in mine],
                         "final_loss": [r.get("final_loss") for r in mine],
                         "seconds": [r["seconds"] for r in mine]}
        runs = json.loads((root / "runs.json").read_text()) if (root / "runs.json").exists() else []
        doc["datasets"][config.name] = {"config": config.to_dict(), "networks": nets, "runs": runs,
                                        "verdict": verdict(nets),
                                        "figure": _figure(out, root, config, [r for r in rows if r["seed"] == 0])}
    atomic_write_text(out / "theory.json", json.dumps(doc, indent=1), overwrite=True)
    atomic_write_text(out / "theory.md", markdown(doc), overwrite=True)
    return doc


def best_els(net_doc: dict) -> str | None:
    """The ELS variant with the highest median r^2 for this network."""
    s = net_doc["summary"]
    cands = [m for m in ELS_MACHINES if m in s and s[m]["n"]]
    return max(cands, key=lambda m: s[m]["r2"]["median"]) if cands else None


def verdict(nets: dict) -> dict:
    """Does the best calibrated ELS machine predict the CNN (median r^2 >= 0.9), and the attention network
    less, with intervals of the median r^2 that do not overlap?"""
    out: dict[str, Any] = {}
    if "none" in nets:
        m = best_els(nets["none"])
        if m is not None:
            d = nets["none"]["summary"][m]["r2"]
            out["cnn"] = {"machine": m, "median_r2": d["median"], "ci": d["median_ci"], "meets_0.9": d["median"] >= 0.9}
    if "softmax" in nets and "cnn" in out:
        m = best_els(nets["softmax"])
        if m is not None:
            d = nets["softmax"]["summary"][m]["r2"]
            lower = d["median"] < out["cnn"]["median_r2"]
            out["attention"] = {"machine": m, "median_r2": d["median"], "ci": d["median_ci"],
                                "lower_and_separate": bool(lower and d["median_ci"][1] < out["cnn"]["ci"][0])}
    for net in UNETS:
        m = best_els(nets[net]) if net in nets else None
        if m is not None:
            d = nets[net]["summary"][m]["r2"]
            out[net] = {"machine": m, "median_r2": d["median"], "ci": d["median_ci"]}
    return out


def _fmt(d: dict) -> str:
    if not d or d.get("median") is None or math.isnan(d["median"]):
        return "-"
    return f"{d['median']:.3f} [{d['median_ci'][0]:.3f}, {d['median_ci'][1]:.3f}] ({d['q25']:.3f}-{d['q75']:.3f})"


def markdown(doc: dict) -> str:
    """The report: per dataset and network, median r^2 [95% bootstrap interval] (quartiles) per machine."""
    lines = ["# The theory against trained networks (Kamb & Ganguli's protocol)", "",
             "Per-sample Pearson r between a network's sample and each machine's from the same initial noise "
             "(cosine schedule, deterministic DDIM). Cells: median r^2 [95% bootstrap interval of the median] "
             "(quartiles). ELS and local machines calibrated per step to each network.", ""]
    for name, d in doc["datasets"].items():
        c = d["config"]
        machines = c["machines"]
        lines += [f"## {name}", "",
                  f"{c['n_train'] or 'all'} training images; depth {c['depth']}, width {c['width']}; "
                  f"{c['train_steps']} steps of batch {c['batch_size']}; {c['n_seeds']} seed(s); "
                  f"{c['n_samples']} samples per network; calibration on {c['n_calib']} samples; {c['steps']} steps.",
                  "", "| network | seeds | " + " | ".join(MACHINES[m][0] for m in machines) + " |",
                  "|---|---|" + "---|" * len(machines)]
        for net, nd in d["networks"].items():
            lines.append(f"| {LABELS[net]} | {len(nd['seeds'])} | "
                         + " | ".join(_fmt(nd["summary"][m]["r2"]) for m in machines) + " |")
        lines += ["", "Median r (same layout):", "", "| network | " + " | ".join(MACHINES[m][0] for m in machines)
                  + " |", "|---|" + "---|" * len(machines)]
        for net, nd in d["networks"].items():
            lines.append(f"| {LABELS[net]} | " + " | ".join(_fmt(nd["summary"][m]["r"]) for m in machines) + " |")
        lines += ["", "Calibrated patch sizes per sampling step (high noise first; seed 0):", ""]
        for net, nd in d["networks"].items():
            for m, cal in nd["calibration"].get("0", nd["calibration"].get(str(nd["seeds"][0]), {})).items():
                sat = f"; saturates at {max(cal['sizes'])} at {len(cal['saturated'])} of {len(cal['timesteps'])} steps"
                lines.append(f"- {LABELS[net]}, {MACHINES[m][0]}: {cal['median']}{sat}")
        v = d["verdict"]
        if "cnn" in v:
            lines += ["", f"CNN vs best ELS ({v['cnn']['machine']}): median r^2 {v['cnn']['median_r2']:.3f}, "
                      f"{'meets' if v['cnn']['meets_0.9'] else 'misses'} the 0.9 target."]
        if "attention" in v:
            lines.append(f"Attention vs best ELS ({v['attention']['machine']}): median r^2 "
                         f"{v['attention']['median_r2']:.3f}; lower with a separate interval: "
                         f"{'yes' if v['attention']['lower_and_separate'] else 'no'}.")
        for net in UNETS:
            if net in v:
                lines.append(f"{LABELS[net]} vs best ELS ({v[net]['machine']}): median r^2 {v[net]['median_r2']:.3f} "
                             f"[{v[net]['ci'][0]:.3f}, {v[net]['ci'][1]:.3f}].")
        for run in d["runs"]:
            load = "-" if run["load"] is None else f"{run['load']:.1f}"
            lines.append(f"Run: {run['seconds']:.0f} s wall (1-minute load average at the end {load}), "
                         f"{run['threads']} torch thread(s), {run['device']}.")
        if d["figure"]:
            lines += ["", f"![sample pairs]({d['figure']})"]
        lines.append("")
    lines += ["Kamb & Ganguli (arXiv 2412.20292), median r^2 of the calibrated ELS machine with trained networks "
              "(32x32): " + "; ".join(f"{k} {v}" for k, v in PUBLISHED.items()) + "."]
    return "\n".join(lines) + "\n"


def _figure(out: Path, root: Path, config: TheoryConfig, rows: list[dict]) -> str | None:
    """Seed 0's first 8 samples of each network above each machine's from the same noise."""
    from .figures import pyplot
    plt = pyplot()
    if plt is None or not rows:
        return None
    blocks = []
    for row in rows:
        net = row["network"]
        x = load_tensors(root / "rows" / f"{net}-s0-samples.safetensors")[0]["samples"]
        blocks.append((LABELS[net], x))
        for m in config.machines:
            cal = row["calibration"].get(m)
            key = m if cal is None else f"{m}-{'.'.join(map(str, cal['median']))}"
            path = root / "machines" / f"{key}.safetensors"
            if path.exists():
                blocks.append((f"  {MACHINES[m][0]}", load_tensors(path)[0]["samples"]))
    n = min(8, config.n_samples)
    fig, axes = plt.subplots(len(blocks), n, figsize=(1.1 * n + 3, 1.1 * len(blocks)), squeeze=False)
    for i, (label, x) in enumerate(blocks):
        for j in range(n):
            img = ((x[j].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax = axes[i][j]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    rel = f"theory-pairs-{config.name}.png"

    def write(tmp) -> None:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    from ..checkpoint import atomic_write
    atomic_write(out / rel, write, overwrite=True)
    plt.close(fig)
    return rel
