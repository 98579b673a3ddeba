"""One row of the study: a model (trained, loaded or analytic) sampled, scored and probed.

``RunContext`` carries what every row needs (config, directory, device, backend, data, progress),
so a new kind of row is one more entry in ``MODELS``: a function ``(ctx, name, seed) -> Built``.

The unit of work is a network with its seeds (``units``, ``run_unit``): with ``group_seeds`` the
seeds whose checkpoints are missing are trained together as one ensemble (``fastscore.train`` on a
list: each member gets its row's model config, train config and init seed; the same engine trains a
row alone, so each checkpoint is the one the row would train alone up to float32 summation order);
then each row is evaluated and saved as it would be alone. Without it, one row at a time.

Training resumes: a row (or a unit's rows) saves its partial-training state (``train``'s ``resume``) in
``checkpoints/<name>.partial.safetensors`` every ``SAVE_EVERY`` steps and when stopped, and the same
command continues from it, to the same bits; the file is removed once the checkpoints are saved."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_meta
from ..data import make_dataset
from ..metrics import score
from ..models import ModelConfig, build_model
from ..probe import coordination_probe, probe_json
from ..sampling import sample
from ..schedule import Schedule, make_schedule
from ..training import STATE_KIND, TrainResult, train
from .config import ANALYTIC, MODEL_SEED, PROBE_SEED, SAMPLE_SEED, StudyConfig
from .files import StudyDir, load_checked_model, row_name

#: training steps between two saves of a row's partial-training state: ~1 min of a CPU row (a 10,000-step
#: softmax row took ~525 s) for a save of milliseconds; on a GPU a few seconds
SAVE_EVERY = 1000


@dataclass
class RunContext:
    """What a row needs. ``images``/``train_set``: the training set (``with_data`` builds it, e.g. in a
    worker process); ``bar``: a progress bar (``update(n)``) or None; ``weights``: progress units per
    training step, per sample and per probe (``progress_weights``)."""
    config: StudyConfig
    out: StudyDir
    device: torch.device
    backend: str = "auto"
    images: torch.Tensor | None = None
    train_set: Any = None
    bar: Any = None
    weights: dict = field(default_factory=dict)

    def with_data(self) -> RunContext:
        if self.images is not None:
            return self
        images, train_set = make_dataset(self.config.data_config(), self.config.n_train, self.config.data_seed)
        return replace(self, images=images, train_set=train_set)

    def portable(self) -> RunContext:
        """The context without data and progress bar: what is sent to a worker process."""
        return replace(self, images=None, train_set=None, bar=None)

    def on_train_step(self) -> Callable | None:
        """``train``'s callback ``(step, loss)``: one training step of progress (None without a bar)."""
        bar, w = self.bar, self.weights.get("train")
        return None if bar is None else lambda step, loss: bar.update(w)

    def on_ensemble_step(self) -> Callable | None:
        """``train``'s callback ``(step, losses)`` for a list of members: one training step per member."""
        if self.bar is None:
            return None
        bar, w = self.bar, self.weights["train"]
        return lambda step, losses: bar.update(w * len(losses))

    def on_sample_batch(self) -> Callable | None:
        """``sample``'s callback ``(n)``: ``n`` samples of progress (None without a bar)."""
        bar, w = self.bar, self.weights.get("sample")
        return None if bar is None else lambda n: bar.update(w * n)


def progress_weights(config: StudyConfig) -> tuple[dict, Callable[[str], float]]:
    """Progress in image-forward equivalents: a training step is ~3 passes over a batch, a sample one
    pass per sampler step, the probe two passes per image and t. Returns the weights and the total
    of one row by name."""
    w = {"train": 3 * config.batch_size, "sample": ModelConfig.T if config.sampler == "ddpm" else config.steps,
         "probe": 2 * config.probe_n * len(config.probe_t)}
    return w, lambda net: (0 if net in ANALYTIC else w["train"] * config.train_steps) + w["sample"] * config.n_samples \
        + w["probe"]


@dataclass
class Built:
    """A model ready to sample: its schedule (None: the sampler's default) and training record."""
    model: Any
    schedule: Schedule | None = None
    train_seconds: float = 0.0
    losses: list = field(default_factory=list)


def network(ctx: RunContext, net: str, seed: int) -> Built:
    """Train ``ScoreNet`` ``net`` (init seed ``MODEL_SEED + seed``), or load its saved checkpoint."""
    c = ctx.config
    ckpt = ctx.out.checkpoint(net, seed)
    if ckpt.exists():
        model, meta = load_checked_model(ckpt, c, net, seed, backend=ctx.backend, device=ctx.device)
        if ctx.bar is not None:
            ctx.bar.update(ctx.weights["train"] * c.train_steps)
        return Built(model, None, meta["extra"].get("seconds", 0.0), meta["extra"].get("losses", []))
    assert ctx.images is not None, "run_row gives the context its data"
    torch.manual_seed(MODEL_SEED + seed)
    model = build_model(c.model_config(net), backend=ctx.backend)
    partial = ctx.out.partial(row_name(net, seed))
    _count_resumed(ctx, partial, 1)
    res = train(model, ctx.images, c.train_config(seed), device=ctx.device, progress=False,
                callback=ctx.on_train_step(), resume=partial, save_every=SAVE_EVERY)
    built = _save_trained(ctx, net, seed, res)
    partial.unlink(missing_ok=True)
    return built


def _count_resumed(ctx: RunContext, partial: Path, members: int) -> None:
    """Progress for the steps a partial-training state holds (``train``'s callback sees only the steps
    it runs); a file ``train`` will refuse counts nothing."""
    if ctx.bar is None or not partial.exists():
        return
    try:
        step = read_meta(partial, STATE_KIND).get("step", 0)
    except ValueError:
        return
    ctx.bar.update(ctx.weights["train"] * members * (step if isinstance(step, int) else 0))


def _save_trained(ctx: RunContext, net: str, seed: int, res: TrainResult) -> Built:
    """Save row ``(net, seed)``'s trained network as its checkpoint (losses every 10th step)."""
    c = ctx.config
    losses = res.losses[::10]
    ctx.out.save_model(str(ctx.out.checkpoint(net, seed).relative_to(ctx.out.path)), res.model,
                       data_config=c.data_config(), train_config=c.train_config(seed),
                       extra={"n_train": c.n_train, "data_seed": c.data_seed, "init_seed": MODEL_SEED + seed,
                              "losses": losses, "seconds": res.seconds})
    return Built(res.model, None, res.seconds, losses)


def train_together(ctx: RunContext, net: str, seeds: list[int]) -> dict[int, Built]:
    """Train the networks ``net`` of ``seeds`` as one ensemble, each exactly its row's member (model
    config, train config, init seed ``MODEL_SEED + seed``), and save each checkpoint as ``network``
    does (``seconds``: the ensemble's wall time over its size). Returns ``{seed: Built}``."""
    c = ctx.config
    assert ctx.images is not None, "run_unit gives the context its data"
    models = []
    for s in seeds:
        torch.manual_seed(MODEL_SEED + s)
        models.append(build_model(c.model_config(net), backend=ctx.backend))
    partial = ctx.out.partial(f"{net}-seeds{'-'.join(map(str, seeds))}")
    _count_resumed(ctx, partial, len(seeds))
    results = train(models, ctx.images, [c.train_config(s) for s in seeds], device=ctx.device, progress=False,
                    callback=ctx.on_ensemble_step(), resume=partial, save_every=SAVE_EVERY)
    built = {s: _save_trained(ctx, net, s, res) for s, res in zip(seeds, results)}
    partial.unlink(missing_ok=True)
    return built


def analytic(ctx: RunContext, kind: str, seed: int) -> Built:
    """An analytic score model (``fastscore.theory``) of the training set."""
    from ..theory import ELSScore, IdealScore
    assert ctx.images is not None, "run_row gives the context its data"
    sched = make_schedule("linear", ModelConfig.T)
    model = IdealScore(ctx.images, sched, backend=ctx.backend) if kind == "ideal" else \
        ELSScore(ctx.images, sched, ctx.config.els_patch, padding="zeros", backend=ctx.backend)
    return Built(model, sched)


MODELS: dict[str, Callable[[RunContext, str, int], Built]] = {"ideal": analytic, "els": analytic}


def evaluate(ctx: RunContext, name: str, seed: int, built: Built) -> dict:
    """Sample (initial noise of seed ``SAMPLE_SEED + seed``), save and score the samples, run the probe
    (seed ``PROBE_SEED + seed``): the study's row for the model."""
    c = ctx.config
    cfg = c.data_config()
    t1 = time.perf_counter()
    x = sample(built.model, c.n_samples, schedule=built.schedule, sampler=c.sampler, steps=c.steps, eta=c.eta,
               clip_x0=c.clip_x0, seed=SAMPLE_SEED + seed, device=ctx.device, backend=ctx.backend,
               callback=ctx.on_sample_batch())
    sample_seconds = time.perf_counter() - t1
    ctx.out.save_samples(row_name(name, seed), x, c)
    scores = score(cfg, x.cpu(), ctx.train_set)
    probe = coordination_probe(built.model, cfg, c.probe_t, n=c.probe_n, seed=PROBE_SEED + seed, device=ctx.device)
    if ctx.bar is not None:
        ctx.bar.update(ctx.weights["probe"])
    return {"network": name, "seed": seed, "rates": scores.to_dict(), "probe": probe_json(probe),
            "train_seconds": built.train_seconds, "sample_seconds": sample_seconds,
            "seconds": built.train_seconds + (time.perf_counter() - t1), "losses": built.losses or [],
            "preview": x[:64].cpu().tolist()}


def run_row(ctx: RunContext, name: str, seed: int, built: Built | None = None) -> dict:
    """One row (build or load the model unless ``built`` is given, sample, score, probe), saved to
    ``rows/`` atomically."""
    ctx = ctx.with_data()
    if built is None:
        built = MODELS.get(name, network)(ctx, name, seed)
    row = evaluate(ctx, name, seed, built)
    ctx.out.write_json(f"rows/{row_name(name, seed)}.json", row)
    return row


def units(todo: list[tuple[str, int]], group_seeds: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The rows ``todo`` as units of work ``(name, seeds)``: with ``group_seeds`` one per trained
    network (its seeds in ``todo``, in order), else (and for the analytic models) one per row."""
    grouped: dict[str, list[int]] = {}
    out: list[tuple[str, tuple[int, ...]]] = []
    for n, s in todo:
        if group_seeds and n not in MODELS:
            grouped.setdefault(n, []).append(s)
        else:
            out.append((n, (s,)))
    return out + [(n, tuple(ss)) for n, ss in grouped.items()]


def run_unit(ctx: RunContext, name: str, seeds: tuple[int, ...]) -> dict[tuple[str, int], dict]:
    """The rows ``(name, s)`` of ``seeds``: saved checkpoints are loaded; the missing ones are trained
    together when there are several (``train_together``), else as ``run_row`` trains one. Each row is
    saved as soon as it is evaluated. Returns ``{(name, seed): row}``."""
    ctx = ctx.with_data()
    missing = [s for s in seeds if name not in MODELS and not ctx.out.checkpoint(name, s).exists()]
    built = train_together(ctx, name, missing) if len(missing) > 1 else {}
    return {(name, s): run_row(ctx, name, s, built.get(s)) for s in seeds}
