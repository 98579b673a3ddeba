"""The ``fastscore`` command line: train, sample, score, probe, reproduce, sweep, status.

The study's options are generated from ``StudyConfig``'s fields (name, help and default declared
once, ``fastscore.options``). Bad input (a ``UsageError`` from validation, checked before any work,
or an ``OSError`` about a file the user named) is one line on stderr naming the option as typed, exit
code 2; any other exception is a bug and keeps its traceback. Ctrl-C or SIGTERM stops a command with
one line (exit 130 or 143)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import signal
import sys
from pathlib import Path

from . import __version__
from ._signals import stop_again


def setup() -> None:
    """Process-wide set-up of a command-line run, before any command. The place for run-time
    patches that belong to the command line, not to ``import fastscore`` (e.g. the Triton
    interpreter's)."""
    from .ops import patch_triton_interpreter
    patch_triton_interpreter()   # a no-op unless TRITON_INTERPRET=1 and NumPy needs it


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) if v else "none"
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two integers), got {text!r}") from None
    return lo, hi


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _study_fields(groups: tuple[str, ...]):
    from .study.config import StudyConfig
    return [f for f in dataclasses.fields(StudyConfig) if f.metadata.get("cli") and f.metadata.get("group") in groups]


def _add_study_options(p: argparse.ArgumentParser, groups: tuple[str, ...], presets: bool = False,
                       concrete: bool = False) -> None:
    """One option per ``StudyConfig`` field of ``groups`` (``metadata["cli"]``); default None (the
    study's or its preset's, shown in the help, with the --quick/--tiny values when ``presets``), or
    with ``concrete`` the field's default itself (for commands that use the value, not a study)."""
    from .study.config import PRESETS
    made = {}
    for f in _study_fields(groups):
        group = f.metadata["group"]
        if group not in made:
            made[group] = p.add_argument_group(group)
        note = f"default {_show(f.default)}"
        if presets:
            note += "".join(f"; --{m}: {_show(PRESETS[m][f.name])}" for m in ("quick", "tiny") if f.name in PRESETS[m])
        kw: dict = {"dest": f.name, "default": f.default if concrete else None, "help": f"{f.metadata['help']} ({note})",
                    "metavar": f.metadata["cli"].lstrip("-").upper().replace("-", "_")}
        t = str(f.type)
        if t == "bool":
            kw["action"] = argparse.BooleanOptionalAction
            del kw["metavar"]
        elif t.startswith("tuple[int, int]"):
            kw.update(type=_pair, metavar="LO,HI")
        elif t.startswith("tuple[str"):
            kw.update(type=_names, metavar="A,B,...")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[t]
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        made[group].add_argument(f.metadata["cli"], **kw)


def _study_options(a) -> dict:
    """The study settings the user gave on the command line (by field name)."""
    from .study.config import DATA, RECIPE, RUN, SAMPLER
    return {f.name: getattr(a, f.name) for f in _study_fields((DATA, RECIPE, RUN, SAMPLER))
            if getattr(a, f.name, None) is not None}


def _study_config(a, mode: str, **fixed):
    """The ``StudyConfig`` of preset ``mode`` with the options the user set (a bad value raises a
    ``UsageError`` naming the field, which ``main`` reports under its option's name)."""
    from .study.config import StudyConfig
    return StudyConfig.preset(mode, **{**_study_options(a), **fixed})


def _flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """``{dest: --option}`` of a command's options: how an error names what the user typed."""
    return {a.dest: next(o for o in a.option_strings if o.startswith("--")) for a in p._actions
            if any(o.startswith("--") for o in a.option_strings)}


def _as_typed(message: str, flags: dict[str, str]) -> str:
    """``message`` with its leading setting name (``train_steps must be >= 1``) written as the option
    the user typed (``--train-steps must be >= 1``)."""
    m = re.match(r"[A-Za-z_]\w*", message)
    return flags[m[0]] + message[m.end():] if m and m[0] in flags else message


def _load(load, path, *args, **kw):
    """``load(path, ...)`` for a file the user named: a file that is not what it should be is a usage
    error (one line), not a bug."""
    from ._validate import usage
    try:
        return load(path, *args, **kw)
    except ValueError as e:
        raise usage(e) from None


def _device_option(p: argparse.ArgumentParser) -> None:
    import torch
    default = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default,
                   help=f"where to compute: cpu, cuda or cuda:N (default {default}: this machine's)")


def _common(p: argparse.ArgumentParser) -> None:
    _device_option(p)
    from .ops import AUTO_ON_CUDA, BACKENDS
    auto = ", ".join(f"{op}: {path}" for op, path in AUTO_ON_CUDA.items())
    p.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0],
                   help=f"the ops' path: auto (on CUDA the fastest measured path per op, fastscore.ops.AUTO_ON_CUDA: "
                        f"{auto}; the torch reference elsewhere), triton (always our kernels) or torch (the "
                        f"reference) (default {BACKENDS[0]})")
    p.add_argument("--force", action="store_true", help="replace an existing output (reproduce: only the files its study wrote)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_start(a, *, directory: bool = False) -> None:
    """Everything that can be checked before any work: the device and the output."""
    from . import _validate
    from .checkpoint import check_writable
    _validate.device("--device", a.device)
    check_writable(a.out, overwrite=getattr(a, "force", False), directory=directory)


def cmd_train(a) -> int:
    from .checkpoint import save_model
    from .data import make_dataset
    from .models import build_model
    from .training import train
    study = _study_config(a, "full", networks=(a.attention,))
    _check_start(a)
    cfg = study.data_config()
    images, _ = make_dataset(cfg, study.n_train, study.data_seed)
    import torch
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
    _study_config(a, "full")                     # the sampler's settings, checked as the study checks them
    _check_start(a)
    model, meta = _load(load_model, a.checkpoint, backend=a.backend, device=a.device)
    x = sample(model, a.n, sampler=a.sampler, steps=a.steps, eta=a.eta, clip_x0=a.clip_x0, seed=a.seed,
               batch_size=a.batch_size, device=a.device, backend=a.backend, progress=not a.quiet)
    save_tensors(a.out, {"samples": x}, {"kind": "samples", "checkpoint": str(a.checkpoint), "data": meta["data"],
                                         "extra": meta.get("extra", {}), "seed": a.seed, "sampler": a.sampler,
                                         "steps": a.steps, "eta": a.eta}, overwrite=a.force)
    print(f"drew {a.n} samples -> {a.out}")
    return 0


def cmd_score(a) -> int:
    from ._validate import UsageError
    from .checkpoint import load_tensors
    from .data import KVConfig, generate
    from .metrics import score
    tensors, meta = _load(load_tensors, a.samples, "samples")
    if meta.get("data") is None:
        raise UsageError(f"{a.samples} records no dataset config; it cannot be scored")
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
    from . import _validate
    from .checkpoint import load_model
    from .data import KVConfig
    from .probe import coordination_probe, format_probe
    _validate.device("--device", a.device)
    model, meta = _load(load_model, a.checkpoint, backend=a.backend, device=a.device)
    cfg = KVConfig.from_dict(meta["data"])
    rows = coordination_probe(model, cfg, a.t, n=a.n, seed=a.seed, device=a.device)
    print(format_probe(rows))
    return 0


def cmd_reproduce(a) -> int:
    from ._validate import UsageError
    from .study import reproduce
    mode = "quick" if a.quick else ("tiny" if a.tiny else "full")
    if a.out is None:
        a.out = f"runs/{a.study if a.study in ('creativity', 'halves', 'theory') else 'reproduce'}"
    if a.dataset is not None and a.study != "theory":
        raise UsageError("--dataset belongs to --study theory")
    if a.sizes is not None and a.study not in _SIZED_STUDIES:
        raise UsageError("--sizes belongs to --study creativity or halves (their numbers of training images)")
    if a.study in _SIZED_STUDIES:
        return _sized_study(a, mode, a.study)
    if a.study == "theory":
        return _theory(a, mode)
    if a.pairs_sweep:
        return _pairs_sweep(a, mode)
    cfg = _study_config(a, mode)
    _check_start(a, directory=True)
    reproduce(cfg, Path(a.out), device=a.device, backend=a.backend, force=a.force, progress=not a.quiet,
              workers=a.workers, group_seeds=a.group_seeds)
    return 0


def _pairs_sweep(a, mode: str) -> int:
    """``reproduce --pairs-sweep K1,K2,...``: the sweep over ``n_pairs`` (``study.pairs_grid``), as
    ``fastscore sweep`` runs it."""
    from ._validate import UsageError
    from .study import pairs_grid
    try:
        pairs = tuple(int(p) for p in a.pairs_sweep.split(","))
    except ValueError:
        raise UsageError(f"--pairs-sweep expects numbers of pairs such as 2,4,6, got {a.pairs_sweep!r}") from None
    if a.n_pairs is not None:
        raise UsageError("--pairs and --pairs-sweep: give one (the sweep sets the number of pairs)")
    _study_config(a, mode)                       # a bad value is reported under its option's name
    out = Path(a.out)
    if not (out / "sweep.json").exists() and any(out.glob("pairs-*/study.json")):
        raise UsageError(f"{out} holds a pairs sweep of an earlier fastscore (one study per OUT/pairs-K); its "
                         "studies resume one at a time (reproduce --pairs K --out OUT/pairs-K with the settings "
                         "in their study.json); choose another --out for the sweep")
    return _sweep(a, pairs_grid(mode, _study_options(a), pairs))


def _theory(a, mode: str) -> int:
    """``reproduce --study theory``: Kamb & Ganguli's test on each dataset of ``--dataset``, one report."""
    from ._validate import UsageError
    from .study import theory
    if a.pairs_sweep:
        raise UsageError("--pairs-sweep belongs to --study coordination")
    given = _study_options(a)
    configs = [theory.preset(mode, dataset=d, **given) for d in (a.dataset or "digits").split(",")]
    out = Path(a.out)
    _check_start(a, directory=True)
    for cfg in configs:
        theory.run(cfg, out, device=a.device, backend=a.backend, force=a.force, progress=not a.quiet)
    print((out / "theory.md").read_text())
    return 0


#: the studies that sweep the number of training images themselves: what their axis counts
_SIZED_STUDIES = {"creativity": "the number of training images",
                  "halves": "the number of training images per half (those that fit the setting)"}


def _sized_study(a, mode: str, name: str) -> int:
    """``reproduce --study creativity|halves``: the study's sweep over the number of training images
    (``study.creativity``, ``study.halves``), then its report."""
    import importlib

    from ._validate import UsageError
    study = importlib.import_module(f".study.{name}", __package__)
    if a.pairs_sweep:
        raise UsageError(f"--pairs-sweep belongs to --study coordination; the {name} study sweeps --n-train")
    if a.n_train is not None:
        raise UsageError(f"--n-train: the {name} study sweeps {_SIZED_STUDIES[name]} itself "
                         f"({', '.join(map(str, study.SIZES[mode]))} here); choose them with --sizes N1,N2,...")
    sizes = None
    if a.sizes is not None:
        try:
            sizes = tuple(int(n) for n in a.sizes.split(","))
        except ValueError:
            raise UsageError(f"--sizes expects numbers of training images such as 64,256,5000, got {a.sizes!r}") from None
    _study_config(a, mode)                       # a bad value is reported under its option's name
    g = study.grid(mode, sizes=sizes, **_study_options(a))
    _check_start(a, directory=True)
    doc = study.run(g, Path(a.out), device=a.device, backend=a.backend, force=a.force, progress=not a.quiet,
                    workers=a.workers)
    if doc is not None:                          # rank 0 (or the only process)
        print((Path(a.out) / f"{name}.md").read_text())
    return 0


def cmd_sweep(a) -> int:
    from ._validate import UsageError
    from .study import StudyConfig, grid
    if a.file and (a.grid or a.set or a.preset):
        raise UsageError("give the grid either as a TOML file or as --grid/--set/--preset options, not both")
    if a.file:
        g = grid.from_toml(StudyConfig, a.file)
    else:
        if not a.grid:
            raise UsageError("nothing to sweep: give a TOML file or at least one --grid NAME=V1,V2,...")
        g = grid.from_cli(StudyConfig, a.set, a.grid, a.preset or "full")
    return _sweep(a, g)


def _sweep(a, g) -> int:
    """Run grid ``g`` into ``--out`` (every cell's settings checked before any work); rank 0 prints
    the table."""
    from .study import run_sweep
    from .study.sweep import cell_config
    for cell in g.cells():
        cell_config(g, cell)
    _check_start(a, directory=True)
    res = run_sweep(g, Path(a.out), device=a.device, backend=a.backend, force=a.force, progress=not a.quiet,
                    workers=a.workers, group_seeds=a.group_seeds)
    if res is not None:                          # rank 0 (or the only process)
        print((Path(a.out) / "sweep.md").read_text())
    return 0


def cmd_status(a) -> int:
    from .study import status
    doc = status.status(a.dir)
    print(json.dumps(doc, indent=1) if a.json else status.text(doc))
    return 0


def _run_options(p: argparse.ArgumentParser) -> None:
    """How a study's rows are run: worker processes and grouped seeds."""
    p.add_argument("--workers", type=int, default=None,
                   help="rows trained at once in separate processes (default 2 on a CPU with >= 2 cores, 1 on a GPU)")
    p.add_argument("--group-seeds", action=argparse.BooleanOptionalAction, default=None,
                   help="train the seeds of a network together, as one ensemble (default: on a GPU, not on a CPU, "
                        "where it is no faster; --no-group-seeds: one row at a time, the reference)")


def build_parser() -> argparse.ArgumentParser:
    from .data import KVConfig
    from .models import ATTENTIONS, ModelConfig
    from .options import help_of
    from .sampling import sample
    from .study.config import DATA, PRESETS, RECIPE, RUN, SAMPLER, StudyConfig
    from .study.creativity import SIZES
    from .study.halves import SIZES as HALVES_SIZES
    study = StudyConfig()
    p = argparse.ArgumentParser(prog="fastscore", description="Creativity in diffusion models: key-value "
                                "data, CNN and attention score networks, sampling and scoring.")
    p.add_argument("--version", action="version", version=f"fastscore {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one score network and save a checkpoint")
    t.add_argument("--attention", choices=ATTENTIONS, default="softmax",
                   help=help_of(ModelConfig, "attention") + " (default softmax)")
    t.add_argument("--seed", type=int, default=0, help="initialisation and training seed (default 0)")
    t.add_argument("--out", required=True, help="checkpoint file (.safetensors)")
    _add_study_options(t, (DATA, RECIPE))
    _common(t)
    t.set_defaults(fn=cmd_train, flags=_flags(t))

    s = sub.add_parser("sample", help="draw samples from a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--n", type=int, default=1000, help="samples (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="default 0")
    s.add_argument("--out", required=True, help="sample file (.safetensors)")
    batch = inspect.signature(sample).parameters["batch_size"].default
    s.add_argument("--batch-size", type=int, default=batch, help=f"samples per batch (default {batch})")
    _add_study_options(s, (SAMPLER,), concrete=True)
    _common(s)
    s.set_defaults(fn=cmd_sample, flags=_flags(s))

    c = sub.add_parser("score", help="score a sample file against its training set")
    c.add_argument("samples")
    c.add_argument("--tolerance", type=float, default=None,
                   help=f"decoding tolerance (default: the dataset's; KVConfig's default {KVConfig.tolerance:g})")
    c.add_argument("--n-train", type=int, default=study.n_train,
                   help=f"used only if the file does not record it (default {study.n_train})")
    c.add_argument("--data-seed", type=int, default=study.data_seed,
                   help=f"used only if the file does not record it (default {study.data_seed})")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_score, flags=_flags(c))

    pr = sub.add_parser("probe", help="coordination probe: does the network use the other pairs?")
    pr.add_argument("checkpoint")
    pr.add_argument("--t", type=int, nargs="+", default=list(study.probe_t),
                    help=f"timesteps (default the study's: {' '.join(map(str, study.probe_t))})")
    pr.add_argument("--n", type=int, default=4000, help="probe images per case (default 4000)")
    pr.add_argument("--seed", type=int, default=0, help="default 0")
    _common(pr)
    pr.set_defaults(fn=cmd_probe, flags=_flags(pr))

    r = sub.add_parser("reproduce", help="the paper's experiment end to end (train, sample, score, probe)",
                       description=f"Train the networks ({_show(study.networks)}), sample, score and probe them, "
                       f"beside the ideal score and the ELS machine. The full study: {study.n_seeds} seeds x "
                       f"{study.train_steps} training steps, {study.n_samples} samples per network and seed. "
                       "Measured wall times: docs/results-full.md, docs/results-quick.md. Rerunning the same "
                       "command resumes; Ctrl-C keeps finished rows.")
    mode = r.add_mutually_exclusive_group()
    flag = {f.name: f.metadata["cli"] for f in _study_fields((DATA, RECIPE, RUN, SAMPLER))}
    for m, what in (("quick", "the few-minute version"), ("tiny", "a seconds-long smoke run (CI)")):
        mode.add_argument(f"--{m}", action="store_true", help=f"{what}: " + ", ".join(
            f"{flag.get(k, k)} {_show(v)}" for k, v in PRESETS[m].items()))
    r.add_argument("--study", choices=("coordination", "creativity", "halves", "theory"), default="coordination",
                   help="coordination: the networks (--networks) at one training set (results.md). creativity: are "
                        "consistent samples new or copies? A sweep over the number of training images "
                        f"({_show(SIZES['full'])}; --quick {_show(SIZES['quick'])}; --tiny {_show(SIZES['tiny'])}) "
                        "of the CNN and softmax attention "
                        "beside the ideal score and the ELS machine, without the probe; cells in OUT/cells/, "
                        "creativity.md, creativity.json and figures in OUT. halves: memorisation to "
                        "generalisation (Kadkhodaie et al.): per number n of training images "
                        f"({_show(HALVES_SIZES['full'])}; --quick {_show(HALVES_SIZES['quick'])}; --tiny "
                        f"{_show(HALVES_SIZES['tiny'])}, those that fit), two networks of each kind (default none,"
                        "softmax; 4 colours) on disjoint halves of n images, sampled from the same noise: the "
                        "fraction of pairs with the same content and their pixel r (beside a shuffled pairing), the copy "
                        "rates (beside the rule copy rates) (halves.md, "
                        "halves.json, halves.png in OUT, default runs/halves; docs/halves.md). theory: does Kamb & Ganguli's calibrated "
                        "ELS machine predict the CNN's samples, and the attention network's, from the same noise; "
                        "its --networks: none, softmax (the default), unet, unet_attn (diffusers UNet2DModels, "
                        "pip install fastscore[unet]) "
                        "(theory.md in OUT, default runs/theory; docs/theory-real-images.md) (default coordination)")
    r.add_argument("--dataset", default=None, help="--study theory: comma list of digits (scikit-learn), kv (the "
                   "key-value images) or .npy/.safetensors files (N, C, H, W) (default digits)")
    r.add_argument("--out", default=None,
                   help="output directory (default runs/reproduce; --study creativity: runs/creativity; --study halves: "
                        "runs/halves)")
    _run_options(r)
    r.add_argument("--sizes", default=None, metavar="N1,N2,...",
                   help="--study creativity or halves: the numbers of training images (halves: per half) to sweep, "
                        "instead of the preset's (listed under --study); other sizes in an existing OUT are another "
                        "grid: --force, which keeps the finished cells of sizes in both")
    r.add_argument("--pairs-sweep", default=None, metavar="K1,K2,...",
                   help="e.g. 2,4,6,8: fastscore sweep's grid over n_pairs (a cell per count in OUT/cells/, one "
                        "table sweep.md; a larger image where the pairs do not fit, coordinate channels for all "
                        "cells if a count is above 4) (default: none, one study)")
    _add_study_options(r, (RUN, SAMPLER, DATA, RECIPE), presets=True)
    _common(r)
    r.set_defaults(fn=cmd_reproduce, flags=_flags(r))

    w = sub.add_parser("sweep", help="a grid of studies: one per cell, one table (torchrun for several GPUs)",
                       description="Cross study settings into a grid; each cell is one study (as reproduce) in "
                       "OUT/cells/<cell>/, resumable per cell; a finished sweep rerun trains nothing. One table "
                       "(sweep.md, sweep.csv, sweep-results.json) and a figure. Several processes or GPUs: "
                       "torchrun --nproc-per-node N -m fastscore sweep ... (each rank takes every N-th cell; "
                       "rank 0 writes the tables). Settings are StudyConfig's field names: "
                       + ", ".join(StudyConfig.__dataclass_fields__) + ".")
    w.add_argument("file", nargs="?", default=None, help="a TOML sweep file: preset = ..., [base], [grid], [[cell]]")
    w.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a swept setting and its values (repeat for more axes; tuple values joined by +, "
                        "e.g. t_focus=50+400,none)")
    w.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting fixed for every cell (tuples comma-separated, e.g. networks=none,softmax)")
    w.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="the study preset the cells start from (default full)")
    w.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    _run_options(w)
    _common(w)
    w.set_defaults(fn=cmd_sweep, flags=_flags(w))

    st = sub.add_parser("status", help="where a study or sweep stands: rows finished, training (step, rate), to start",
                        description="Where the study or sweep in DIR (reproduce's or sweep's --out) stands, read from "
                        "its files while it runs or after it stopped: per row finished, trained (sampling and scoring "
                        "left), training (the step of its saved state, and its rate so far) or to start; per sweep "
                        "cell finished, started or to start. Reads only; writes nothing.")
    st.add_argument("dir", help="a study or sweep directory (the --out of reproduce or sweep)")
    st.add_argument("--json", action="store_true", help="the state as JSON")
    st.set_defaults(fn=cmd_status, flags=_flags(st))

    return p


def main(argv: list[str] | None = None) -> int:
    stop = {"signal": "SIGINT"}
    pending: list[str] = []

    def on_term(signum, frame) -> None:
        stop["signal"] = "SIGTERM"
        raise KeyboardInterrupt

    def defer(signum, frame) -> None:   # while torch imports: an interrupt inside its C++ init aborts
        pending.append(signal.Signals(signum).name)

    main_thread = _main_thread()
    previous = None
    previous_hook = sys.unraisablehook
    if main_thread:
        previous = signal.signal(signal.SIGTERM, defer), signal.signal(signal.SIGINT, defer)
        # a stop swallowed where Python cannot propagate it (a weakref callback): sent again
        sys.unraisablehook = stop_again(KeyboardInterrupt, lambda: signal.SIGTERM if stop["signal"] == "SIGTERM"
                                        else signal.SIGINT)
    name, args = "fastscore", None
    try:
        try:
            parser = build_parser()   # imports torch (seconds)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, on_term)
                signal.signal(signal.SIGINT, signal.default_int_handler)
        if pending:
            stop["signal"] = pending[0]
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        name = f"fastscore {args.command}"
        setup()
        return args.fn(args)
    except (ValueError, OSError) as e:
        if not _usage(e):
            raise                        # a bug in the library: its traceback is what to read
        print(f"{name}: error: {_as_typed(str(e), getattr(args, 'flags', {}))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{name}: {stop['signal']}: {str(e) or 'interrupted; nothing was saved'}", file=sys.stderr)
        return 143 if stop["signal"] == "SIGTERM" else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
            sys.unraisablehook = previous_hook


def _usage(e: BaseException) -> bool:
    """Whether ``e`` is bad input: a ``UsageError`` (``fastscore._validate``, looked up without importing
    torch) or an ``OSError`` about a file."""
    v = sys.modules.get(f"{__package__}._validate")
    return isinstance(e, OSError) or (v is not None and isinstance(e, v.UsageError))


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
