"""The ``fastscore`` command line: train, sample, score, probe, reproduce."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import __version__


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--pairs", type=int, default=4, help="key-value pairs per image (default 4)")
    g.add_argument("--colours", type=int, default=4, help="palette size, 2..8 (default 4: R, G, B, Y)")
    g.add_argument("--image-size", type=int, default=8, help="image side in pixels (default 8)")
    g.add_argument("--n-train", type=int, default=5000, help="training images (default 5000)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the training set (default 0)")


def _data_config(a):
    from .data import KVConfig, palette_of_size
    return KVConfig(n_pairs=a.pairs, palette=palette_of_size(a.colours), image_size=a.image_size)


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
    from .models import ScoreNet
    from .training import TrainConfig, train
    cfg = _data_config(a)
    if Path(a.out).exists() and not a.force:
        raise FileExistsError(f"{a.out} exists; pass --force to replace it")
    images, _ = make_dataset(cfg, a.n_train, a.data_seed)
    torch.manual_seed(a.seed)
    model = ScoreNet(a.attention, a.width, image_size=cfg.image_size, temperature=a.temperature,
                     coord_channels=a.coord_channels, backend=a.backend)
    tc = TrainConfig(steps=a.train_steps, batch_size=a.train_batch, lr=a.lr, ema=a.ema, seed=a.seed)
    res = train(model, images, tc, device=a.device, progress=not a.quiet, desc=f"train {a.attention}")
    save_model(a.out, res.model, data_config=cfg, train_config=tc,
               extra={"n_train": a.n_train, "data_seed": a.data_seed, "losses": res.losses[::10],
                      "seconds": res.seconds}, overwrite=a.force)
    print(f"trained {a.attention} for {a.train_steps} steps in {res.seconds:.1f} s "
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
    kw = {k: getattr(a, k) for k in ("train_steps", "n_samples", "n_seeds", "width", "temperature") if
          getattr(a, k) is not None}
    if a.networks:
        kw["networks"] = tuple(a.networks.split(","))
    cfg = StudyConfig.preset("quick" if a.quick else ("tiny" if a.tiny else "full"), n_pairs=a.pairs,
                             n_colours=a.colours, image_size=a.image_size, sampler=a.sampler, steps=a.steps,
                             eta=a.eta, coord_channels=a.coord_channels, **kw)
    if a.pairs_sweep:
        from .experiment import pairs_sweep
        pairs_sweep(cfg, Path(a.out), [int(p) for p in a.pairs_sweep.split(",")], device=a.device,
                    backend=a.backend, force=a.force, progress=not a.quiet)
        return 0
    reproduce(cfg, Path(a.out), device=a.device, backend=a.backend, force=a.force, progress=not a.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastscore", description="Creativity in diffusion models: key-value "
                                "data, CNN and attention score networks, sampling and scoring.")
    p.add_argument("--version", action="version", version=f"fastscore {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one score network and save a checkpoint")
    t.add_argument("--attention", choices=("none", "identity", "top1", "softmax"), default="softmax")
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--temperature", type=float, default=1.0, help="top-1 surrogate temperature")
    t.add_argument("--coord-channels", action="store_true", help="give the CNN two coordinate input channels")
    t.add_argument("--train-steps", type=int, default=3000)
    t.add_argument("--train-batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="checkpoint file (.safetensors)")
    _data_args(t)
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
    mode.add_argument("--quick", action="store_true", help="the few-minute version")
    mode.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    r.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    r.add_argument("--networks", default=None, help="comma list of none,identity,top1,softmax")
    r.add_argument("--train-steps", type=int, default=None)
    r.add_argument("--n-samples", type=int, default=None)
    r.add_argument("--n-seeds", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--temperature", type=float, default=None)
    r.add_argument("--coord-channels", action="store_true")
    r.add_argument("--pairs", type=int, default=4)
    r.add_argument("--colours", type=int, default=4)
    r.add_argument("--image-size", type=int, default=8)
    r.add_argument("--pairs-sweep", default=None, help="e.g. 2,4,6,8: one study per pair count, one table")
    r.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default ddim")
    r.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; tiny: 8)")
    r.add_argument("--eta", type=float, default=None, help="DDIM eta (default 1)")
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
