"""Denoising score matching with eps-prediction: loss = E_{x0, t, eps} |eps_hat(x_t, t) - eps|^2.

t is uniform on [0, T); AdamW; a learning-rate schedule (OneCycle by default); optional EMA of the
weights with decay ``min(ema, (1 + step) / (10 + step))`` (the usual warm-up, so short runs do not
average in the random initial weights); the EMA copy is what sampling should use. Seeded: the same config, data and seed give
the same weights on the same device and backend.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import _validate
from .options import option
from .schedule import Schedule, make_schedule

LR_SCHEDULES = ("onecycle", "cosine", "constant")


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

    def __post_init__(self) -> None:
        _validate.positive_int("steps", self.steps)
        _validate.positive_int("batch_size", self.batch_size)
        _validate.finite_float("lr", self.lr, minimum=0.0, strict=True)
        _validate.finite_float("weight_decay", self.weight_decay, minimum=0.0)
        _validate.choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
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
    ``raw_model``: the optimised weights; ``losses``: per-step training loss; ``seconds``: wall time."""
    model: nn.Module
    raw_model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


# top-1's Gumbel noise at training step `step` of a run seeded `seed`: a prime stride keeps the
# streams of different seeds and steps apart
GUMBEL_SEED_STRIDE = 1_000_003


def gumbel_seed(seed: int, step: int) -> int:
    """The Gumbel-noise seed that top-1 attention gets at training step ``step`` (``train`` and the
    ensemble engine pass the same one, so a member sees what it would see alone)."""
    return (seed * GUMBEL_SEED_STRIDE + step) % 2**63


def make_lr_scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``config.lr_schedule`` over ``config.steps`` steps for ``opt``: OneCycle (peak ``config.lr``),
    cosine annealing, or None (constant). ``train`` and the ensemble engine build it here."""
    if config.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    return None


def train(model: nn.Module, data: torch.Tensor, config: TrainConfig = TrainConfig(), *,
          schedule: Schedule | None = None, device: str | torch.device | None = None,
          progress: bool = True, desc: str = "train", callback=None) -> TrainResult:
    """Train ``model`` (``(x_t, t) -> eps_hat``) on images ``data`` (M, C, H, W) in [-1, 1].

    ``schedule`` defaults to the linear schedule with ``model.config.T`` (or 1000) steps.
    ``callback(step, loss)`` is called after every step when given. Raises ValueError before any
    work when ``data`` or the model's parameters hold NaN/inf, and FloatingPointError at the first
    step whose loss is NaN/inf (naming the step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _validate.tensor("data", data, ndim=4)
    if data.shape[0] == 0:
        raise ValueError("data must hold at least one image")
    bad = ~torch.isfinite(data.detach()).flatten(1).all(1)
    if bad.any():
        raise ValueError(f"data holds NaN or inf in {int(bad.sum())} of {data.shape[0]} images "
                         f"(first: image {int(bad.nonzero()[0])}); training on them would only produce NaN")
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad_params:
        raise ValueError(f"model has NaN or inf parameters ({', '.join(bad_params[:3])}); nothing to train from")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if schedule is None:
        schedule = make_schedule("linear", getattr(getattr(model, "config", None), "T", 1000))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    data = data.to(device, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    ema = copy.deepcopy(model).eval() if config.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = make_lr_scheduler(opt, config)
    ab = schedule.alpha_bar.to(device, torch.float32)
    losses: list[float] = []
    bar = _progress(config.steps, desc, progress)
    start = time.perf_counter()
    for step in range(config.steps):
        i = torch.randint(0, data.shape[0], (config.batch_size,), generator=gen).to(device)
        t = torch.randint(0, schedule.T, (config.batch_size,), generator=gen)
        if config.t_focus is not None and config.t_focus_prob > 0:
            lo, hi = config.t_focus
            if hi >= schedule.T:
                raise ValueError(f"t_focus must lie in [0, T={schedule.T}), got {config.t_focus}")
            focus = torch.rand(config.batch_size, generator=gen) < config.t_focus_prob
            t = torch.where(focus, torch.randint(lo, hi + 1, (config.batch_size,), generator=gen), t)
        t = t.to(device)
        eps = torch.randn((config.batch_size, *data.shape[1:]), generator=gen).to(device)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * data[i] + (1 - a).sqrt() * eps
        kwargs = {"seed": gumbel_seed(config.seed, step)} if _accepts_seed(model) else {}
        loss = torch.mean((model(x_t, t, **kwargs) - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:  # warm-up: early on the average must not keep the random initial weights
            _ema_update(ema, model, min(config.ema, (1 + step) / (10 + step)))
        losses.append(float(loss.detach()))   # the one host sync per step; the NaN check below is free
        if not math.isfinite(losses[-1]):   # every earlier loss was finite, or we would have stopped there
            if bar is not None:
                bar.close()
            before = f"{losses[-2]:.4g} at step {step - 1}" if step else "none"
            raise FloatingPointError(f"training diverged: the loss is {losses[-1]} at step {step} of {config.steps} "
                                     f"(the loss before: {before}); try a lower lr or a smaller grad_clip")
        if callback is not None:
            callback(step, losses[-1])
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(ema if ema is not None else model, model, losses, time.perf_counter() - start)


def _accepts_seed(model: nn.Module) -> bool:
    from .models import ScoreNet
    return isinstance(model, ScoreNet)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
