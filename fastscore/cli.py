"""The ``fastscore`` command line: train, sample, score, probe, reproduce."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import __version__


def _study_defaults():
    from .experiment import StudyConfig
    return StudyConfig()


def _data_args(p: argparse.ArgumentParser) -> None:
    d = _study_defaults()
    g = p.add_argument_group("dataset (defaults: the study's)")
    g.add_argument("--pairs", type=int, default=None, help=f"key-value pairs per image (default {d.n_pairs})")
    g.add_argument("--colours", type=int, default=None,
                   help=f"palette size, 2..8, in the order R, G, B, Y, C, M, W, K (default {d.n_colours})")
    g.add_argument("--image-size", type=int, default=None, help=f"image side in pixels (default {d.image_size})")
    g.add_argument("--n-train", type=int, default=None, help=f"training images (default {d.n_train})")
    g.add_argument("--data-seed", type=int, default=None, help=f"seed of the training set (default {d.data_seed})")


def _t_focus(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two integers), got {text!r}") from None
    return lo, hi


def _recipe_args(p: argparse.ArgumentParser) -> None:
    """Network and training options; ``None`` means the study's default (``StudyConfig``)."""
    d = _study_defaults()
    on = "on" if d.attn_patch else "off"
    g = p.add_argument_group("network and training (defaults: the study's)")
    g.add_argument("--width", type=int, default=None, help=f"CNN channels (default {d.width})")
    g.add_argument("--attn-dim", type=int, default=None, help=f"query/key width (default {d.attn_dim})")
    g.add_argument("--attn-patch", action=argparse.BooleanOptionalAction, default=None,
                   help=f"queries, keys and values also see the raw 3x3 neighbourhood (softmax, top-1; default {on})")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"top-1 surrogate temperature (default {d.temperature:g})")
    g.add_argument("--coord-channels", action=argparse.BooleanOptionalAction, default=None,
                   help=f"two coordinate input channels (default {'on' if d.coord_channels else 'off'})")
    g.add_argument("--train-steps", type=int, default=None, help=f"default {d.train_steps}")
    g.add_argument("--train-batch", type=int, default=None, dest="batch_size", help=f"default {d.batch_size}")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--ema", type=float, default=None, help=f"EMA decay (default {d.ema:g})")
    focus = ",".join(map(str, d.t_focus)) if d.t_focus else "none"
    g.add_argument("--t-focus", type=_t_focus, default=None, metavar="LO,HI",
                   help=f"draw training timesteps from [LO, HI] with probability --t-focus-prob (default {focus})")
    g.add_argument("--t-focus-prob", type=float, default=None,
                   help=f"default {d.t_focus_prob:g}; 0 draws all t uniformly")


_STUDY_KEYS = {"pairs": "n_pairs", "colours": "n_colours", "image_size": "image_size", "n_train": "n_train",
               "data_seed": "data_seed", "width": "width", "attn_dim": "attn_dim", "attn_patch": "attn_patch",
               "temperature": "temperature", "coord_channels": "coord_channels", "train_steps": "train_steps",
               "batch_size": "batch_size", "lr": "lr", "ema": "ema", "t_focus": "t_focus",
               "t_focus_prob": "t_focus_prob"}


def _study_overrides(a) -> dict:
    """The StudyConfig fields the user set on the command line."""
    return {f: getattr(a, k) for k, f in _STUDY_KEYS.items() if getattr(a, k, None) is not None}


def _sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1: strided DDPM)")
    g.add_argument("--no-clip", action="store_true", help="do not clamp the predicted x0 to [-1, 1]")
    g.add_argument("--batch-size", type=int, default=1000)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_train(a) -> int:
    from .checkpoint import save_model
    from .data import make_dataset
    from .experiment import StudyConfig
    from .models import build_model
    from .training import train
    study = StudyConfig.preset("full", networks=(a.attention,), **_study_overrides(a))
    cfg = study.data_config()
    if Path(a.out).exists() and not a.force:
        raise FileExistsError(f"{a.out} exists; pass --force to replace it")
    images, _ = make_dataset(cfg, study.n_train, study.data_seed)
    torch.manual_seed(a.seed)
    model = build_model(study.model_config(a.attention), backend=a.backend)
    tc = study.train_config(a.seed)
    res = train(model, images, tc, device=a.device, progress=not a.quiet, desc=f"train {a.attention}")
    save_model(a.out, res.model, data_config=cfg, train_config=tc,
               extra={"n_train": study.n_train, "data_seed": study.data_seed, "losses": res.losses[::10],
                      "seconds": res.seconds}, overwrite=a.force)
    print(f"trained {a.attention} for {tc.steps} steps in {res.seconds:.1f} s "
          f"(final loss {sum(res.losses[-100:]) / len(res.losses[-100:]):.4f}) -> {a.out}")
    return 0


def cmd_sample(a) -> int:
    from .checkpoint import load_model, save_tensors
    from .sampling import sample
    if Path(a.out).exists() and not a.force:
        raise FileExistsError(f"{a.out} exists; pass --force to replace it")
    model, meta = load_model(a.checkpoint, backend=a.backend, device=a.device)
    x = sample(model, a.n, sampler=a.sampler, steps=a.steps, eta=a.eta, clip_x0=not a.no_clip, seed=a.seed,
               batch_size=a.batch_size, device=a.device, backend=a.backend, progress=not a.quiet)
    save_tensors(a.out, {"samples": x}, {"kind": "samples", "checkpoint": str(a.checkpoint), "data": meta["data"],
                                         "extra": meta.get("extra", {}), "seed": a.seed, "sampler": a.sampler,
                                         "steps": a.steps, "eta": a.eta}, overwrite=a.force)
    print(f"drew {a.n} samples -> {a.out}")
    return 0


def cmd_score(a) -> int:
    from .checkpoint import load_tensors
    from .data import KVConfig, generate
    from .metrics import score
    tensors, meta = load_tensors(a.samples, "samples")
    if meta.get("data") is None:
        raise ValueError(f"{a.samples} records no dataset config; it cannot be scored")
    cfg = KVConfig.from_dict(meta["data"])
    extra = meta.get("extra", {})
    train = generate(cfg, int(extra.get("n_train", a.n_train)), int(extra.get("data_seed", a.data_seed)))
    s = score(cfg, tensors["samples"], train, tolerance=a.tolerance)
    rates = s.to_dict()
    if a.json:
        print(json.dumps(rates, indent=2))
    else:
        for k, r in s.rates.items():
            print(f"{k:24s} {r}  ({r.k}/{r.n})")
    return 0


def cmd_probe(a) -> int:
    from .checkpoint import load_model
    from .data import KVConfig
    from .experiment import coordination_probe, format_probe
    model, meta = load_model(a.checkpoint, backend=a.backend, device=a.device)
    cfg = KVConfig.from_dict(meta["data"])
    rows = coordination_probe(model, cfg, a.t, n=a.n, seed=a.seed, device=a.device)
    print(format_probe(rows))
    return 0


def cmd_reproduce(a) -> int:
    from .experiment import StudyConfig, reproduce
    kw = _study_overrides(a)
    kw.update({k: getattr(a, k) for k in ("n_samples", "n_seeds", "sampler", "steps", "eta")})
    if a.networks:
        kw["networks"] = tuple(a.networks.split(","))
    cfg = StudyConfig.preset("quick" if a.quick else ("tiny" if a.tiny else "full"), **kw)
    if a.pairs_sweep:
        from .experiment import pairs_sweep
        pairs_sweep(cfg, Path(a.out), [int(p) for p in a.pairs_sweep.split(",")], device=a.device,
                    backend=a.backend, force=a.force, progress=not a.quiet, workers=a.workers)
        return 0
    reproduce(cfg, Path(a.out), device=a.device, backend=a.backend, force=a.force, progress=not a.quiet,
              workers=a.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastscore", description="Creativity in diffusion models: key-value "
                                "data, CNN and attention score networks, sampling and scoring.")
    p.add_argument("--version", action="version", version=f"fastscore {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one score network and save a checkpoint")
    t.add_argument("--attention", choices=("none", "identity", "top1", "softmax"), default="softmax")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="checkpoint file (.safetensors)")
    _data_args(t)
    _recipe_args(t)
    _common(t)
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="sample file (.safetensors)")
    _sampler_args(s)
    _common(s)
    s.set_defaults(fn=cmd_sample)

    c = sub.add_parser("score", help="score a sample file against its training set")
    c.add_argument("samples")
    c.add_argument("--tolerance", type=float, default=None, help="decoding tolerance (default: the dataset's, 0.4)")
    c.add_argument("--n-train", type=int, default=5000, help="used only if the file does not record it")
    c.add_argument("--data-seed", type=int, default=0, help="used only if the file does not record it")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_score)

    pr = sub.add_parser("probe", help="coordination probe: does the network use the other pairs?")
    pr.add_argument("checkpoint")
    pr.add_argument("--t", type=int, nargs="+", default=[100, 200, 300, 400, 500, 600, 800])
    pr.add_argument("--n", type=int, default=4000, help="probe images per case")
    pr.add_argument("--seed", type=int, default=0)
    _common(pr)
    pr.set_defaults(fn=cmd_probe)

    r = sub.add_parser("reproduce", help="the paper's experiment end to end (train, sample, score, probe)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the few-minute version: 5,000 training steps, 1 seed, 1,000 samples per network")
    mode.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    r.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    r.add_argument("--networks", default=None, help="comma list of none,identity,top1,softmax")
    r.add_argument("--n-samples", type=int, default=None, help="samples per network and seed")
    r.add_argument("--n-seeds", type=int, default=None, help="training seeds per network")
    r.add_argument("--workers", type=int, default=None,
                   help="rows trained at once in separate processes (default 2 on a CPU with >= 2 cores, 1 on a GPU)")
    r.add_argument("--pairs-sweep", default=None, help="e.g. 2,4,6,8: one study per pair count, one table")
    r.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default ddim")
    r.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; tiny: 8)")
    r.add_argument("--eta", type=float, default=None, help="DDIM eta (default 1)")
    _data_args(r)
    _recipe_args(r)
    _common(r)
    r.set_defaults(fn=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"fastscore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
