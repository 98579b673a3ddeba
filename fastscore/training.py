"""Denoising score matching with eps-prediction: loss = E_{x0, t, eps} |eps_hat(x_t, t) - eps|^2.

One engine trains one network or M networks of one architecture (any ``nn.Module`` that
``torch.func``'s ensembling takes; ``fastscore.ensemble.Ensemble`` stacks them and runs their own
``forward``, as a vmap or a loop over members: two schedules of one step). ``train(model)`` is that
engine at M = 1. Per member, from its own ``TrainConfig``:
- data: a ``torch.Generator`` seeded ``config.seed`` draws per step the batch indices, the timesteps
  (uniform on [0, T), or from ``t_focus`` with probability ``t_focus_prob``) and the noise. With
  ``stream="train"`` the generators live on the CPU (the same draws on every device); ``"device"``
  puts them on the training device (on CUDA a different, equally seeded stream a CUDA graph can capture);
- loss: its own mean squared error (the step differentiates the sum of the M losses);
- clipping by its own global gradient norm (``clip_grad_norm_``'s formula); AdamW
  (``torch.optim.AdamW``'s update: decoupled weight decay, betas (0.9, 0.999), eps 1e-8) on stacked
  tensors; lr and beta1 of the lr schedule (OneCycle by default) read from torch's own scheduler
  into a per-step table; EMA of the weights with decay ``min(ema, (1 + step) / (10 + step))`` (the
  usual warm-up, so short runs do not average in the random initial weights); the EMA copy is what
  sampling should use;
- top-1's Gumbel seed ``gumbel_seed(config.seed, step)``, passed as ``seed`` when ``forward`` takes one.
Seeded: the same configs, data and seeds give the same weights on the same device, backend and
schedule.
Resumable (``train(..., resume=path)``): the state between two steps is the stacked parameters and
buffers, the AdamW moments, the EMA, the step, the losses so far and the generators' states (the
members' data generators and torch's global ones, for modules that draw from them); the lr schedule
is a table of the configs and the Gumbel seed a function of the step, so the step restores both. A run
saved at step k and continued gives the bits of the run that never stopped (same device and threads). A member of M agrees with the same network trained alone: bitwise on the loop schedule (the
CPU default), up to float32 summation order under vmap or on CUDA (measured in tests/test_training.py).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import torch
import torch.nn as nn

from . import _validate, graphs
from .checkpoint import check_writable, load_tensors, save_tensors
from .ensemble import Ensemble, takes_seed
from .options import matches, option
from .schedule import Schedule, make_schedule

LR_SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
STREAMS = ("train", "device")
_BETA2, _ADAM_EPS = 0.999, 1e-8   # torch.optim.AdamW's defaults
#: ``train``'s default ``save_every`` with ``resume``: a save (a few MB, milliseconds) per this many steps
#: costs < 0.1% of the steps' time on a CPU
SAVE_EVERY = 1000
STATE_KIND = "train_state"


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (JSON-serialisable). ``ema=0`` turns EMA off.

    Loss weighting over t: with probability ``t_focus_prob`` a training timestep is drawn uniformly
    from ``t_focus = (lo, hi)`` (inclusive) instead of from [0, T); the default draws all uniformly."""
    steps: int = option(3000, "training steps")
    batch_size: int = option(128, "training batch size")
    lr: float = option(2e-3, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_schedule: str = option("onecycle", "learning-rate schedule: onecycle, cosine or constant")
    ema: float = option(0.999, "EMA decay of the weights (0: off)")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    seed: int = option(0, "seed of the batches, timesteps and noise drawn in training")
    t_focus: tuple[int, int] | None = option(None, "draw training timesteps from [LO, HI] with probability t_focus_prob")
    t_focus_prob: float = option(0.0, "probability of drawing a timestep from t_focus (0: all t uniformly)")
    precision: str = option("fp32", "training arithmetic: fp32, or bf16 (autocast: convolutions and matmuls in "
                            "bfloat16; weights, optimiser, EMA and loss in float32)")

    def __post_init__(self) -> None:
        _validate.positive_int("steps", self.steps)
        _validate.positive_int("batch_size", self.batch_size)
        _validate.finite_float("lr", self.lr, minimum=0.0, strict=True)
        _validate.finite_float("weight_decay", self.weight_decay, minimum=0.0)
        _validate.choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _validate.choice("precision", self.precision, PRECISIONS)
        _validate.finite_float("ema", self.ema, minimum=0.0)
        if self.ema >= 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        _validate.finite_float("grad_clip", self.grad_clip, minimum=0.0)
        _validate.seed("seed", self.seed)
        _validate.finite_float("t_focus_prob", self.t_focus_prob, minimum=0.0)
        if self.t_focus_prob > 1:
            raise ValueError(f"t_focus_prob must be in [0, 1], got {self.t_focus_prob}")
        if self.t_focus is not None:
            lo, hi = self.t_focus
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                raise ValueError(f"t_focus must be two ints 0 <= lo <= hi, got {self.t_focus}")
            object.__setattr__(self, "t_focus", (lo, hi))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """``model``: the network to sample from (the EMA copy when EMA is on), in eval mode;
    ``raw_model``: the given module with its optimised weights; ``losses``: per-step training loss;
    ``seconds``: wall time (of an ensemble: its wall time over its size)."""
    model: nn.Module
    raw_model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0



# top-1's Gumbel noise at training step `step` of a run seeded `seed`: a prime stride keeps the
# streams of different seeds and steps apart
GUMBEL_SEED_STRIDE = 1_000_003


def gumbel_seed(seed: int, step: int) -> int:
    """The Gumbel-noise seed that top-1 attention gets at training step ``step`` of a run seeded ``seed``."""
    return (seed * GUMBEL_SEED_STRIDE + step) % 2**63


def make_lr_scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``config.lr_schedule`` over ``config.steps`` steps for ``opt``: OneCycle (peak ``config.lr``),
    cosine annealing, or None (constant)."""
    if config.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    return None


def schedule_table(config: TrainConfig) -> torch.Tensor:
    """(steps, 5) float64: per step, the scalars of AdamW, the lr schedule and the EMA:
    ``1 - lr * weight_decay``, ``1 - beta1``, ``lr / (1 - beta1**s)``, ``sqrt(1 - beta2**s)`` (s = step + 1),
    ``1 - ema decay``; lr and beta1 read from torch's own scheduler (``make_lr_scheduler``)."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=config.lr, weight_decay=config.weight_decay)
    sched = make_lr_scheduler(opt, config)
    group = opt.param_groups[0]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "scheduler.step() before optimizer.step()": intended
        for step in range(config.steps):
            lr, beta1, s = group["lr"], group["betas"][0], float(step + 1)
            ema = min(config.ema, (1 + step) / (10 + step)) if config.ema > 0 else 0.0
            rows.append((1 - lr * config.weight_decay, 1 - beta1, lr / (1 - beta1 ** s),
                         (1 - _BETA2 ** s) ** 0.5, 1 - ema))
            if sched is not None and step + 1 < config.steps:
                sched.step()
    return torch.tensor(rows, dtype=torch.float64)


class _Trainer:
    """The state of M members (stacked parameters, AdamW moments, EMA, per-member tables and data
    generators) and one training step of all of them (see the module docstring)."""

    def __init__(self, ens: Ensemble, data: torch.Tensor, configs: list[TrainConfig], schedule: Schedule,
                 device: torch.device, stream: str) -> None:
        self.ens, self.configs, self.schedule, self.device = ens.to(device).train(), configs, schedule, device
        self.params = ens.parameters_by_name()
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        tables: dict[tuple, torch.Tensor] = {}   # members usually share their hyper-parameters
        keys = [(c.lr, c.weight_decay, c.lr_schedule, c.ema, c.steps) for c in configs]
        for key, c in zip(keys, configs):
            if key not in tables:
                tables[key] = schedule_table(c)
        self.table = torch.stack([tables[k] for k in keys]).to(device, torch.float32)   # (M, steps, 5)
        self.clip = torch.tensor([c.grad_clip for c in configs], dtype=torch.float32, device=device)
        self.k = torch.zeros(1, dtype=torch.int64, device=device)   # the step counter, on the device
        self.step_host = 0
        self.steps = configs[0].steps
        self.bf16 = configs[0].precision == "bf16"
        self.losses = torch.zeros(len(configs), self.steps, dtype=torch.float32, device=device)
        self.data = data.to(device, torch.float32)
        self.ab = schedule.alpha_bar.to(device, torch.float32)
        gen_dev = device if stream == "device" else torch.device("cpu")
        self.gens = [torch.Generator(device=gen_dev).manual_seed(c.seed) for c in configs]
        # for a save on interrupt: whether the weights are mid-update (no consistent state to save), and
        # the generators' states at the start of step ``step_host`` (a step interrupted before its update
        # is saved as not yet taken)
        self.dirty = False
        self.boundary: dict[str, torch.Tensor] | None = None

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The states of every generator a step draws from: the members' and torch's global ones."""
        out = {f"gen.{m}": g.get_state() for m, g in enumerate(self.gens)}
        out["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def state(self, rng: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors that continue training from step ``step_host`` (``rng``: the generator states to
        store; default their states now)."""
        out = {f"{kind}.{n}": t for kind, d in (("param", self.params), ("buffer", self.ens.buffers_by_name()),
                                                ("ema", self.ema), ("exp_avg", self.exp_avg),
                                                ("exp_avg_sq", self.exp_avg_sq)) for n, t in d.items()}
        out["losses"] = self.losses[:, :self.step_host]
        out.update(self.rng_state() if rng is None else rng)
        return out

    def load(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Continue from ``state()``'s tensors, saved at step ``step``."""
        with torch.no_grad():
            for kind, d in (("param", self.params), ("buffer", self.ens.buffers_by_name()), ("ema", self.ema),
                            ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                for n, t in d.items():
                    t.copy_(tensors[f"{kind}.{n}"])
            self.losses[:, :step] = tensors["losses"]
            self.k.fill_(step)
        for m, g in enumerate(self.gens):
            g.set_state(tensors[f"gen.{m}"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step_host = step

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t (M, B, ...), t (M, B), eps: each member's draws, in this order, from its generator."""
        B, n, T = self.configs[0].batch_size, self.data.shape[0], self.schedule.T
        idx, ts, noise = [], [], []
        for c, g in zip(self.configs, self.gens):
            gd = g.device
            i = torch.randint(0, n, (B,), generator=g, device=gd)
            t = torch.randint(0, T, (B,), generator=g, device=gd)
            if c.t_focus is not None and c.t_focus_prob > 0:
                lo, hi = c.t_focus
                focus = torch.rand(B, generator=g, device=gd) < c.t_focus_prob
                t = torch.where(focus, torch.randint(lo, hi + 1, (B,), generator=g, device=gd), t)
            idx.append(i)
            ts.append(t)
            noise.append(torch.randn((B, *self.data.shape[1:]), generator=g, device=gd))
        i, t, eps = (torch.stack(v).to(self.device) for v in (idx, ts, noise))
        a = self.ab[t].view(*t.shape, *(1,) * (eps.dim() - 2))
        return a.sqrt() * self.data[i] + (1 - a).sqrt() * eps, t, eps

    def step(self) -> None:
        """One step of all members."""
        self.device_step()
        self.step_host += 1
        if self.boundary is not None:
            self.boundary = self.rng_state()
        self.dirty = False

    def device_step(self) -> None:
        """One step's device work (the host step counter is not advanced): no host synchronisation on
        the 'device' stream, so graph-capturable unless the members take a Gumbel seed."""
        x_t, t, eps = self._draw()
        seeds = torch.tensor([gumbel_seed(c.seed, self.step_host) for c in self.configs]) \
            if self.ens.takes_seed else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.bf16 \
                else contextlib.nullcontext():
            out = self.ens.run(x_t, t, seeds=seeds)
        per = ((out.float() - eps) ** 2).flatten(1).mean(1)      # (M,) member losses, in float32
        names = list(self.params)
        params = [self.params[n] for n in names]
        grads = torch.autograd.grad(per.sum(), params, allow_unused=True)
        M = per.shape[0]
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        self.dirty = True   # from here until ``step`` returns the weights are neither before nor after the step
        with torch.no_grad():
            row = self.table.index_select(1, self.k).squeeze(1)                           # (M, 5)
            col = [row[:, j] for j in range(5)]
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(M, -1), dim=1) for g in grads])
            coef = torch.clamp(self.clip / (torch.linalg.vector_norm(norms, dim=0) + 1e-6), max=1.0)
            coef = torch.where(self.clip > 0, coef, torch.ones_like(coef))              # grad_clip = 0: off
            for n, p, g in zip(names, params, grads):
                shape = (M,) + (1,) * (p.dim() - 1)
                decay, one_minus_b1, step_size, bc2_sqrt, ema_w = (c.view(shape) for c in col)
                g = g * coef.view(shape)
                p.mul_(decay)
                m, v = self.exp_avg[n], self.exp_avg_sq[n]
                m.lerp_(g, one_minus_b1)
                v.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
                p.sub_(step_size * m / ((v.sqrt() / bc2_sqrt).add_(_ADAM_EPS)))
                self.ema[n].lerp_(p, ema_w)
            self.losses.index_copy_(1, self.k, per.detach().unsqueeze(1))
            self.k += 1


def capture(step: Callable[[], None], device: torch.device, warmup: int,
            generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """Run ``step`` ``warmup`` times on a side stream (real steps), capture one call of it in a CUDA
    graph (``fastscore.graphs``) and return the graph's replay."""
    for _ in range(warmup):
        graphs.warm_up(step, device)
    return graphs.capture(step, device, generators=generators)


def _check(models: list[nn.Module], data: torch.Tensor, configs: list[TrainConfig], schedule: Schedule | None,
           stream: str) -> Schedule:
    """Validate the arguments before any work; returns the schedule."""
    _validate.tensor("data", data, ndim=4)
    if data.shape[0] == 0:
        raise ValueError("data must hold at least one image")
    bad = ~torch.isfinite(data.detach()).flatten(1).all(1)
    if bad.any():
        raise ValueError(f"data holds NaN or inf in {int(bad.sum())} of {data.shape[0]} images "
                         f"(first: image {int(bad.nonzero()[0])}); training on them would only produce NaN")
    shape = getattr(models[0], "image_shape", None)
    if shape is not None and tuple(data.shape[1:]) != tuple(shape):
        raise ValueError(f"data must hold images of shape {tuple(shape)}, got {tuple(data.shape[1:])}")
    for i, m in enumerate(models):
        bad_params = [n for n, p in m.named_parameters() if not torch.isfinite(p.detach()).all()]
        if bad_params:
            raise ValueError(f"model {i} has NaN or inf parameters ({', '.join(bad_params[:3])}); nothing to train from")
    if len(configs) != len(models):
        raise ValueError(f"config must give one TrainConfig per model: {len(models)} models, {len(configs)} configs")
    _validate.choice("stream", stream, STREAMS)
    if schedule is None:
        schedule = make_schedule("linear", getattr(getattr(models[0], "config", None), "T", 1000))
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise TypeError(f"config[{i}] must be a TrainConfig, got {type(c).__name__}")
        if (c.steps, c.batch_size, c.precision) != (configs[0].steps, configs[0].batch_size, configs[0].precision):
            raise ValueError(f"config[{i}] has steps/batch_size/precision ({c.steps}, {c.batch_size}, {c.precision}), "
                             f"config[0] ({configs[0].steps}, {configs[0].batch_size}, {configs[0].precision}): "
                             "members must share them")
        if c.t_focus is not None and c.t_focus_prob > 0 and c.t_focus[1] >= schedule.T:
            raise ValueError(f"t_focus must lie in [0, T={schedule.T}), got {c.t_focus}")
    return schedule


@overload
def train(model: nn.Module, data: torch.Tensor, config: TrainConfig | Sequence[TrainConfig] = ..., *,
          schedule: Schedule | None = ..., device: str | torch.device | None = ..., members: str = ...,
          stream: str = ..., cuda_graph: bool | None = ..., chunk: int | None = ..., progress: bool = ...,
          desc: str = ..., callback: Callable | None = ..., check_every: int | None = ...,
          resume: str | os.PathLike | None = ..., save_every: int | None = ...) -> TrainResult: ...


@overload
def train(model: Sequence[nn.Module], data: torch.Tensor, config: TrainConfig | Sequence[TrainConfig] = ..., *,
          schedule: Schedule | None = ..., device: str | torch.device | None = ..., members: str = ...,
          stream: str = ..., cuda_graph: bool | None = ..., chunk: int | None = ..., progress: bool = ...,
          desc: str = ..., callback: Callable | None = ..., check_every: int | None = ...,
          resume: str | os.PathLike | None = ..., save_every: int | None = ...) -> list[TrainResult]: ...


def train(model: nn.Module | Sequence[nn.Module], data: torch.Tensor,
          config: TrainConfig | Sequence[TrainConfig] = TrainConfig(), *, schedule: Schedule | None = None,
          device: str | torch.device | None = None, members: str = "auto", stream: str = "train",
          cuda_graph: bool | None = None, chunk: int | None = None, progress: bool = True, desc: str = "train",
          callback: Callable | None = None, check_every: int | None = None, resume: str | os.PathLike | None = None,
          save_every: int | None = None) -> TrainResult | list[TrainResult]:
    """Train ``model`` (``(x_t, t) -> eps_hat``), or a list of M models of one architecture together, on
    images ``data`` (N, C, H, W) in [-1, 1]; see the module docstring for what each member gets.

    Returns a ``TrainResult`` for one model, a list (in order) for a list. ``config``: one TrainConfig,
    or one per model (shared ``steps`` and ``batch_size``). ``schedule`` defaults to the linear schedule
    with ``model.config.T`` (or 1000) steps. ``members``: ``Ensemble``'s schedule (vmap, loop, auto).
    ``stream``: ``"train"`` or ``"device"``. ``cuda_graph``: replay the step from a CUDA graph (default:
    on CUDA with the device stream, unless the members take a Gumbel seed). ``chunk``: at most this many
    members per step (default all); an ensemble that runs out of memory is split in halves and rerun.
    ``callback(step, loss)`` after each step (``loss`` a float, for a list a list of floats), called in
    order at each check of the losses: every ``check_every`` steps (default 1 off CUDA, 50 on CUDA, where
    a check is a host sync; 1 there when the callback times steps). Raises ValueError before any work when ``data``
    or a model's parameters hold NaN/inf, and FloatingPointError at the first step whose loss is
    NaN/inf (naming the step).

    ``resume``: a file (safetensors) for the training state. If it holds this run's state (the same
    configs, as ``options.matches`` reads them; the models' class, config, shapes, backend and initial
    weights; the data; the noise schedule; the member schedule, stream and device type), training
    continues from its step, and the result is bit for bit the one of a run that never stopped (same
    device and thread count); the callback is called for the steps this call runs. A state of another
    run is refused (ValueError naming what differs; delete the file to start again). The state is
    written atomically every ``save_every`` steps (default ``SAVE_EVERY``), on KeyboardInterrupt or
    SystemExit (Ctrl-C, or SIGTERM made one) unless it strikes mid-update, and at the end, marked
    finished: the same call again returns the trained result without training. Not with ``chunk``
    smaller than the number of models, nor with ``cuda_graph=True`` (``None`` turns the graph off).
    """
    single = isinstance(model, nn.Module)
    if not single and not isinstance(model, (list, tuple)):
        raise TypeError(f"model must be a torch.nn.Module or a list of them, got {type(model).__name__}")
    models: list[nn.Module] = [model] if isinstance(model, nn.Module) else list(model)
    if not models:
        raise ValueError("model must hold at least one module")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model{'' if single else f'[{i}]'} must be a torch.nn.Module, got {type(m).__name__}")
    if isinstance(config, TrainConfig):
        configs = [config] * len(models)
    elif isinstance(config, (list, tuple)):
        configs = list(config)
    else:
        raise TypeError(f"config must be a TrainConfig or a list of them, got {type(config).__name__}")
    if chunk is not None:
        _validate.positive_int("chunk", chunk)
    if check_every is not None:
        _validate.positive_int("check_every", check_every)
    if save_every is not None:
        _validate.positive_int("save_every", save_every)
        if resume is None:
            raise ValueError("save_every needs resume (the file the training state is saved to)")
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume must be a path (str or os.PathLike), got {type(resume).__name__}")
    schedule = _check(models, data, configs, schedule, stream)
    Ensemble(models, members=members)   # one architecture, a known schedule: checked before any work
    dev = torch.device(device) if device is not None else next(models[0].parameters()).device
    if configs[0].precision == "bf16" and dev.type not in ("cpu", "cuda"):
        raise ValueError(f"precision 'bf16' (autocast) needs a cpu or cuda device, got {dev}")
    cfg = getattr(models[0], "config", None)   # a Gumbel seed per step is a host integer: no graph
    seed_taken = takes_seed(models[0]) and getattr(cfg, "attention", "top1") == "top1" and getattr(cfg, "gumbel", True)
    use_graph = dev.type == "cuda" and stream == "device" and not seed_taken and resume is None \
        if cuda_graph is None else bool(cuda_graph)
    if use_graph and (dev.type != "cuda" or stream != "device" or seed_taken):
        raise ValueError("cuda_graph=True needs a CUDA device, stream='device' and members without a per-step "
                         "Gumbel seed (top-1 attention)")
    M = len(models)
    size = min(chunk or M, M)
    saver = None
    if resume is not None:
        if use_graph:
            raise ValueError("resume cannot save the state of a CUDA graph's generators; pass cuda_graph=False")
        if size < M:
            raise ValueError(f"resume keeps the state of all {M} members in one file: chunk ({chunk}) must be unset "
                             f"or at least {M}")
        schedule_of_members = "vmap" if members == "vmap" or (members == "auto" and dev.type == "cuda" and M > 1) \
            else "loop"
        saver = _Saver.open(Path(resume), save_every or SAVE_EVERY, models, data, configs, schedule,
                            schedule_of_members, stream, dev)
    results: list[TrainResult | None] = [None] * M
    bar = _progress(configs[0].steps * M, desc, progress)
    start = 0
    try:
        while start < M:
            part = list(range(start, min(start + size, M)))
            try:
                out = _train_group([models[i] for i in part], data, [configs[i] for i in part], schedule, dev,
                                   members, stream, use_graph, bar,
                                   None if callback is None else _callback(callback, single), check_every, saver)
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if size == 1 or saver is not None or not _out_of_memory(e):
                    raise
                size = math.ceil(size / 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(f"ensemble of {len(part)} ran out of memory; retrying in chunks of {size}",
                              RuntimeWarning, stacklevel=2)
                continue
            for i, r in zip(part, out):
                results[i] = r
            start += len(part)
    finally:
        if bar is not None:
            bar.close()
    done = [r for r in results if r is not None]
    return done[0] if single else done


def _callback(callback: Callable, single: bool) -> Callable[[int, list[float]], None]:
    return (lambda step, losses: callback(step, losses[0])) if single else callback


def _train_group(models: list[nn.Module], data: torch.Tensor, configs: list[TrainConfig], schedule: Schedule,
                 device: torch.device, members: str, stream: str, use_graph: bool, bar,
                 callback: Callable[[int, list[float]], None] | None, check_every: int | None = None,
                 saver: _Saver | None = None) -> list[TrainResult]:
    """Train ``models`` as one ensemble (continuing ``saver``'s state, saving to it); write the trained
    weights back into them."""
    t0 = time.perf_counter()
    tr = _Trainer(Ensemble(models, members=members), data, configs, schedule, device, stream)
    before = 0.0   # wall seconds of the calls this one continues
    if saver is not None:
        before = saver.restore(tr)
        if bar is not None:
            bar.update(tr.step_host * len(models))
    replay: Callable[[], None] | None = None
    if check_every is None:
        check_every = 1 if device.type != "cuda" else 50   # a loss check is a host sync
    checked = saved = tr.step_host
    try:
        while tr.step_host < tr.steps:
            if use_graph and replay is None and tr.steps - tr.step_host > 3:
                replay = capture(tr.device_step, device, 3, tr.gens)   # three real warm-up steps, then the capture
                tr.step_host += 3
            if replay is not None:
                replay()
                tr.step_host += 1
            else:
                tr.step()
            due = saver is not None and tr.step_host % saver.every == 0 and tr.step_host < tr.steps
            if tr.step_host - checked >= check_every or tr.step_host == tr.steps or due:
                _check_losses(tr, checked, bar, callback)
                checked = tr.step_host
            if due:
                assert saver is not None
                saver.save(tr, before + time.perf_counter() - t0)
                saved = tr.step_host
    except (KeyboardInterrupt, SystemExit):
        # between two steps, or in a step before its update: the state of step ``step_host`` is whole
        if saver is not None and not tr.dirty and tr.step_host > saved and \
                bool(torch.isfinite(tr.losses[:, :tr.step_host]).all()):
            saver.save(tr, before + time.perf_counter() - t0, rng=tr.boundary)
        raise
    if saver is not None and saved < tr.steps:
        saver.save(tr, before + time.perf_counter() - t0)
    seconds = (before + time.perf_counter() - t0) / len(models)
    losses = tr.losses.cpu().tolist()
    out = []
    for m, (model, c) in enumerate(zip(models, configs)):
        with torch.no_grad():   # like a plain training loop, the given module ends trained
            model.to(device).load_state_dict(tr.ens.state(m))
        model.eval()
        ema = model
        if c.ema > 0:
            ema = copy.deepcopy(model)
            ema.load_state_dict(tr.ens.state(m, tr.ema))
        out.append(TrainResult(ema, model, losses[m], seconds))
    return out


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _jsonable(config: Any) -> Any:
    return config.to_dict() if hasattr(config, "to_dict") else None


@dataclass
class _Saver:
    """``train``'s ``resume``: the file, how often to save, the run's identity (what a stored state
    must match) and the state found there (None: start from step 0)."""
    path: Path
    every: int
    doc: dict
    found: tuple[dict[str, torch.Tensor], dict] | None = None

    @classmethod
    def open(cls, path: Path, every: int, models: list[nn.Module], data: torch.Tensor, configs: list[TrainConfig],
             schedule: Schedule, schedule_of_members: str, stream: str, device: torch.device) -> _Saver:
        """The saver of this run; reads and checks a state already at ``path`` (before any work)."""
        check_writable(path, overwrite=True)
        first = models[0]
        doc = {"configs": [c.to_dict() for c in configs],
               "model_class": f"{type(first).__module__}.{type(first).__qualname__}",
               "model_config": _jsonable(getattr(first, "config", None)),
               "backend": getattr(first, "backend", None),
               "shapes": {n: list(v.shape) for n, v in first.state_dict().items()},
               "init": _digest(v for m in models for v in m.state_dict().values()),
               "data": _digest([data.to(torch.float32)]), "noise_schedule": _digest([schedule.alpha_bar]),
               "members": schedule_of_members, "stream": stream, "device": device.type}
        saver = cls(path, every, doc)
        if path.exists():
            tensors, meta = load_tensors(path, STATE_KIND)
            differ = [k for k, v in doc.items() if k not in ("configs", "model_config") and meta.get(k) != v]
            cfg = getattr(first, "config", None)
            stored_cfg = meta.get("model_config")
            if (stored_cfg is None) != (cfg is None) or (cfg is not None and (
                    not isinstance(stored_cfg, dict) or not matches(stored_cfg, cfg))):
                differ.insert(0, "model config")
            stored = meta.get("configs")
            if not isinstance(stored, list) or len(stored) != len(configs) or \
                    not all(isinstance(d, dict) and matches(d, c) for d, c in zip(stored, configs)):
                differ.insert(0, "train config")
            step = meta.get("step")
            if not differ and not (isinstance(step, int) and 0 < step <= configs[0].steps):
                raise ValueError(f"{path} holds a training state at step {step!r}, not in [1, {configs[0].steps}]: "
                                 "corrupt; delete it to train from the start")
            if differ:
                raise ValueError(f"{path} holds the training state of another run (different "
                                 f"{', '.join(differ)}); delete it to train from the start, or pass another resume path")
            saver.found = (tensors, meta)
        return saver

    def restore(self, tr: _Trainer) -> float:
        """Load the state found (if any) into ``tr``, start tracking its generators; returns the wall
        seconds the stored state took."""
        seconds = 0.0
        if self.found is not None:
            tensors, meta = self.found
            need = {k for k in tr.state() if k != "rng.cuda"}
            if not need <= set(tensors):
                raise ValueError(f"{self.path} is missing tensors of the training state "
                                 f"({sorted(need - set(tensors))[:3]}); delete it to train from the start")
            tr.load(tensors, meta["step"])
            seconds = float(meta.get("seconds", 0.0))
            self.found = None
        tr.boundary = tr.rng_state()
        return seconds

    def save(self, tr: _Trainer, seconds: float, rng: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``tr``'s state at step ``step_host`` atomically (``rng``: the generators' states to store)."""
        save_tensors(self.path, tr.state(rng), {"kind": STATE_KIND, "step": tr.step_host,
                                                "finished": tr.step_host == tr.steps, "seconds": seconds, **self.doc},
                     overwrite=True)


def _check_losses(tr: _Trainer, start: int, bar, callback: Callable[[int, list[float]], None] | None) -> None:
    """Report steps ``start`` .. ``tr.step_host - 1`` in order; FloatingPointError at the first non-finite loss."""
    rows = tr.losses[:, start:tr.step_host].T.cpu().tolist()
    M = len(tr.configs)
    for step, losses in enumerate(rows, start):
        for m, loss in enumerate(losses):
            if not math.isfinite(loss):   # every earlier loss was finite, or we would have stopped there
                before = f"{tr.losses[m, step - 1].item():.4g} at step {step - 1}" if step else "none"
                who = "" if M == 1 else f"member {m}: "
                raise FloatingPointError(f"training diverged: {who}the loss is {loss} at step {step} of {tr.steps} "
                                         f"(the loss before: {before}); try a lower lr or a smaller grad_clip")
        if callback is not None:
            callback(step, losses)
        if bar is not None:
            bar.update(M)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses) / M:.4f}")


def _out_of_memory(e: BaseException) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; the CPU allocator a plain RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
