"""Ensembles: M score networks of one architecture trained in one step and sampled in one loop.

The M members' parameters are stacked along a leading dimension (``torch.func.stack_module_state``),
and so are the optimiser state, the EMA and the per-step hyper-parameters: one update serves all.
On CUDA the network runs once for all members: the CNN, the projections and the head through
``torch.func.vmap`` over ``functional_call``, the attention op with the ensemble dimension folded into
its batch dimension (top-1's reference is an old-style ``torch.autograd.Function`` and the Triton
paths have no vmap rule; attention is independent per image, so folding is exact). Top-1 attention
with Gumbel noise in training is called once per member: the noise is keyed by each member's seed.
On a CPU (compute-bound, launches cheap) ``ScoreNet.forward`` runs once per member on views of the
stacked parameters instead (``EnsembleNet(members=...)``).

Each member gets what ``fastscore.training.train`` gives it alone with the same ``TrainConfig``:
- data stream: per member a ``torch.Generator`` seeded with ``config.seed`` draws, per step and in
  ``train``'s order, the batch indices, the timesteps (with t-focus), and the noise. With
  ``stream="train"`` the generators live on the CPU (bit-identical draws to ``train`` on every device);
  with ``stream="device"`` they live on the training device (on CPU the same as ``"train"``; on CUDA
  a different but equally seeded stream that a CUDA graph can capture);
- loss: the member's own mean squared error; the ensemble differentiates the sum of the M losses,
  so each member's gradient is that of its own loss;
- gradient clipping by the member's own global norm (``clip_grad_norm_``'s formula);
- AdamW (``torch.optim.AdamW``'s single-tensor update, decoupled weight decay, betas (0.9, 0.999),
  eps 1e-8) with per-member state; lr, beta1 (OneCycle cycles it), the bias corrections and the EMA
  decay ``min(ema, (1 + step) / (10 + step))`` come from a per-member table computed once by
  stepping torch's own scheduler, and are read on the device at a device step counter, so the same
  step runs eagerly or replayed from a CUDA graph;
- Top-1 Gumbel seed ``training.gumbel_seed(seed, step)`` per member, as ``train`` passes it.
Members may differ in every ``TrainConfig`` field except ``steps`` and ``batch_size`` (shapes).
Summation orders differ from a single network's, so results agree up to float32 rounding that
grows over training (not bitwise).
"""
from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from . import _validate, ops
from .models import ModelConfig, ScoreNet, build_model
from .sampling import SAMPLERS, initial_noise, step_coefficients, timesteps
from .schedule import Schedule, make_schedule
from .training import TrainConfig, TrainResult, _progress, gumbel_seed, make_lr_scheduler

STREAMS = ("train", "device")
MEMBER_MODES = ("auto", "vmap", "loop")
_BETA2, _ADAM_EPS = 0.999, 1e-8   # torch.optim.AdamW's defaults, which train uses


class _Call(nn.Module):
    """``fn(net, *args)`` as a module, so ``functional_call`` can run any method of ``net`` with
    swapped parameters (their names get the prefix ``net.``)."""

    def __init__(self, net: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, *args):
        return self.fn(self.net, *args)


def _qkv(net: ScoreNet, tok: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return net.qkv(net._qkv_input(tok, x))


def _head(net: ScoreNet, h: torch.Tensor) -> torch.Tensor:
    return net.head2(F.silu(net.head1(h)))   # ScoreNet.forward's head


class EnsembleNet(nn.Module):
    """M ``ScoreNet``s of one ``ModelConfig`` and backend with stacked parameters (leading dim M).

    ``forward(x (M, B, C, H, W), t (M, B) int64) -> eps_hat (M, B, C, H, W)``: member m maps
    ``x[m], t[m]`` as ``models[m]`` would. The parameters are ``nn.Parameter``s named like the
    ScoreNet's with ``.`` replaced by ``__``.

    ``members``: how the members run: ``"vmap"`` (one batched call per layer, attention folded into
    the batch: few launches, for GPUs), ``"loop"`` (``ScoreNet.forward`` once per member on views of
    the stacked parameters: on a CPU, which is compute-bound, oneDNN's grouped convolutions from vmap
    were 1.5x slower than M plain ones and the folded attention fell out of cache); ``"auto"``: vmap
    on CUDA, loop elsewhere. Both give the same function (tested); the optimiser and EMA are stacked
    either way.
    """

    def __init__(self, models: Sequence[ScoreNet], *, members: str = "auto") -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("models must hold at least one ScoreNet")
        self.members = _validate.choice("members", members, MEMBER_MODES)
        for i, m in enumerate(models):
            if not isinstance(m, ScoreNet):
                raise TypeError(f"models[{i}] must be a ScoreNet, got {type(m).__name__}")
            if m.config != models[0].config or m.backend != models[0].backend:
                raise ValueError(f"models[{i}] differs from models[0] in its ModelConfig or backend; an ensemble "
                                 "needs one architecture")
        params, _ = stack_module_state(models)
        self.names = list(params)
        self.stacked = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(p.detach().clone())
                                         for n, p in params.items()})
        base = copy.deepcopy(models[0]).to("meta")
        self.config: ModelConfig = base.config
        self.backend = base.backend
        # method templates on the meta copy; a tuple keeps them (and the meta copy) out of .modules(), so
        # .to() and .parameters() see only the stacked parameters
        self._calls = (_Call(base, ScoreNet.embed), _Call(base, _qkv), _Call(base, lambda net, a: net.proj(a)),
                       _Call(base, _head))

    @property
    def _template(self) -> ScoreNet:
        """The meta-device copy of member 0 that the method templates run (not a submodule)."""
        return cast(ScoreNet, self._calls[0].net)

    def __len__(self) -> int:
        return next(iter(self.stacked.values())).shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._template.image_shape

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """The stacked parameters keyed by the ScoreNet's parameter names."""
        return {n: self.stacked[n.replace(".", "__")] for n in self.names}

    def member(self, m: int, params: dict[str, torch.Tensor] | None = None) -> ScoreNet:
        """A new ScoreNet (eval mode, on the parameters' device) with member ``m``'s weights (or ``params``'s)."""
        params = self.parameters_by_name() if params is None else params
        net = copy.deepcopy(self._template)    # on meta: building a fresh net would consume the global RNG
        net.load_state_dict({n: p[m].detach().clone() for n, p in params.items()}, assign=True)
        return net.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, seeds: Sequence[int] | None = None,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """eps_hat (M, B, C, H, W). ``seeds``: per-member top-1 Gumbel seeds (used in training mode);
        ``params``: stacked parameters to use instead of the module's (the trainer's EMA)."""
        M = len(self)
        if x.dim() != 5 or x.shape[0] != M or tuple(x.shape[2:]) != self.image_shape:
            raise ValueError(f"x must have shape ({M}, B, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.shape != x.shape[:2] or t.is_floating_point():
            raise ValueError(f"t must be an integer tensor of shape {tuple(x.shape[:2])}")
        if not t.is_cuda and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.T):
            raise ValueError(f"t must lie in [0, T={self.config.T})")   # no check on CUDA: it would sync
        stacked = self.parameters_by_name() if params is None else params
        if self.members == "loop" or (self.members == "auto" and not x.is_cuda):
            return self._loop(stacked, x, t, seeds)
        embed, qkv, proj, head = self._calls
        p = {"net." + n: v for n, v in stacked.items()}

        def run(call, *args):
            return vmap(functional_call, in_dims=(None, 0, 0))(call, p, args)

        z = run(embed, x, t)                                                            # (M, B, w, H, W)
        cfg = self.config
        if cfg.attention != "none":
            _, B, w, H, W = z.shape
            N = H * W
            tok = z.flatten(3).transpose(2, 3)                                          # (M, B, N, w)
            if cfg.attention == "identity":
                a = ops.identity_attention(tok.reshape(M * B, N, w).contiguous(), w ** -0.5, backend=self.backend)
            else:
                q, k, v = run(qkv, tok, x).chunk(3, dim=-1)
                d = cfg.attn_dim
                if cfg.attention == "softmax":
                    a = ops.softmax_attention(q.reshape(M * B, N, d), k.reshape(M * B, N, d),
                                              v.reshape(M * B, N, d), d ** -0.5, backend=self.backend)
                else:
                    temp = cfg.temperature * d ** 0.5
                    if cfg.gumbel and self.training:   # noise keyed by each member's seed: one call each
                        seeds = [0] * M if seeds is None else list(seeds)
                        a = torch.cat([ops.top1_attention(q[m], k[m], v[m], temperature=temp, gumbel=True,
                                                          seed=seeds[m], backend=self.backend)[0]
                                       for m in range(M)])
                    else:
                        a = ops.top1_attention(q.reshape(M * B, N, d), k.reshape(M * B, N, d),
                                               v.reshape(M * B, N, d), temperature=temp, gumbel=False,
                                               backend=self.backend)[0]
                a = run(proj, a.view(M, B, N, d))
            z = z + a.reshape(M, B, N, w).transpose(2, 3).reshape(M, B, w, H, W)
        return run(head, z)


    def _loop(self, stacked: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
              seeds: Sequence[int] | None) -> torch.Tensor:
        """ScoreNet.forward itself once per member, on views of the stacked parameters (``unbind``, whose
        backward writes one stacked gradient; ``p[m]`` would write M full-size zero tensors)."""
        M = len(self)
        net = self._calls[0].net
        net.train(self.training)
        views = {n: v.unbind(0) for n, v in stacked.items()}
        xs, ts = x.unbind(0), t.unbind(0)
        seeds = [0] * M if seeds is None else list(seeds)
        return torch.stack([functional_call(net, {n: v[m] for n, v in views.items()}, (xs[m], ts[m]),
                                            {"seed": seeds[m]}) for m in range(M)])


class Interleaved(nn.Module):
    """An ``EnsembleNet`` as one ``(x_t (b, C, H, W), t (b,)) -> eps`` module for ``fastscore.sample``:
    row r belongs to member ``r % M`` (b must be a multiple of M). With ``sample(Interleaved(ens),
    M * n, seed=s, batch_size=k * M)``, member m's samples are rows ``m::M``, which equal
    ``sample(member_m, M * n, seed=s)[m::M]`` (sample keys noise by the row's global index)."""

    def __init__(self, ensemble: EnsembleNet) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.config = ensemble.config
        self.image_shape = ensemble.image_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        M = len(self.ensemble)
        if x.shape[0] % M:
            raise ValueError(f"the batch ({x.shape[0]}) must be a multiple of the ensemble size {M}")
        xs = x.view(-1, M, *x.shape[1:]).transpose(0, 1)
        ts = t.view(-1, M).transpose(0, 1)
        return self.ensemble(xs, ts).transpose(0, 1).reshape(x.shape)


def _schedule_table(config: TrainConfig) -> torch.Tensor:
    """(steps, 5) float64: per step, the scalars train's AdamW, lr schedule and EMA use:
    ``1 - lr * weight_decay``, ``1 - beta1``, ``lr / (1 - beta1**s)``, ``sqrt(1 - beta2**s)`` (s = step + 1),
    ``1 - min(ema, (1 + step) / (10 + step))``; lr and beta1 read from torch's own scheduler."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=config.lr, weight_decay=config.weight_decay)
    sched = make_lr_scheduler(opt, config)   # as train builds it
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


def _check_args(net: EnsembleNet, data: torch.Tensor, configs: Sequence[TrainConfig], schedule: Schedule | None,
                stream: str) -> Schedule:
    """Validate the training arguments (before any work); returns the schedule."""
    _validate.tensor("data", data, ndim=4)
    if data.shape[0] == 0:
        raise ValueError("data must hold at least one image")
    if tuple(data.shape[1:]) != net.image_shape:
        raise ValueError(f"data must hold images of shape {net.image_shape}, got {tuple(data.shape[1:])}")
    if len(configs) != len(net):
        raise ValueError(f"configs must give one TrainConfig per model: {len(net)} models, {len(configs)} configs")
    _validate.choice("stream", stream, STREAMS)
    schedule = schedule if schedule is not None else make_schedule("linear", net.config.T)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise TypeError(f"configs[{i}] must be a TrainConfig, got {type(c).__name__}")
        if (c.steps, c.batch_size) != (configs[0].steps, configs[0].batch_size):
            raise ValueError(f"configs[{i}] has steps/batch_size ({c.steps}, {c.batch_size}), configs[0] "
                             f"({configs[0].steps}, {configs[0].batch_size}): members must share them")
        if c.t_focus is not None and c.t_focus_prob > 0 and c.t_focus[1] >= schedule.T:
            raise ValueError(f"configs[{i}].t_focus must lie in [0, T={schedule.T}), got {c.t_focus}")
    return schedule


class EnsembleTrainer:
    """State and one training step of M members (see the module docstring). ``step()`` runs one step
    eagerly; ``run()`` runs the remaining steps, replaying a CUDA graph of the step when ``cuda_graph``."""

    def __init__(self, models: Sequence[ScoreNet], data: torch.Tensor, configs: Sequence[TrainConfig], *,
                 schedule: Schedule | None = None, device: str | torch.device | None = None,
                 stream: str = "train", cuda_graph: bool | None = None, members: str = "auto") -> None:
        models, configs = list(models), list(configs)
        self.net = EnsembleNet(models, members=members)
        self.schedule = _check_args(self.net, data, configs, schedule, stream)
        self.device = torch.device(device) if device is not None else next(models[0].parameters()).device
        self.use_graph = (self.device.type == "cuda" and stream == "device"
                          and not (self.net.config.attention == "top1" and self.net.config.gumbel)) \
            if cuda_graph is None else bool(cuda_graph)
        if self.use_graph:
            if self.device.type != "cuda":
                raise ValueError("cuda_graph=True needs a CUDA device")
            if stream != "device":
                raise ValueError("cuda_graph=True needs stream='device' (the 'train' stream draws on the CPU)")
            if self.net.config.attention == "top1" and self.net.config.gumbel:
                raise ValueError("cuda_graph=True cannot train top-1 attention with Gumbel noise (its seed "
                                 "changes every step and is a host integer)")
        self.configs, self.stream = configs, stream
        M, dev = len(models), self.device
        self.net.to(dev).train()
        self.params = self.net.parameters_by_name()
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        tables: dict[tuple, torch.Tensor] = {}   # members usually share their hyper-parameters
        for c in configs:
            key = (c.lr, c.weight_decay, c.lr_schedule, c.ema, c.steps)
            if key not in tables:
                tables[key] = _schedule_table(c)
        table = torch.stack([tables[(c.lr, c.weight_decay, c.lr_schedule, c.ema, c.steps)] for c in configs])
        self.table = table.to(dev, torch.float32)                      # (M, steps, 5)
        self.clip = torch.tensor([c.grad_clip for c in configs], dtype=torch.float32, device=dev)
        self.k = torch.zeros(1, dtype=torch.int64, device=dev)          # the step counter, on the device
        self.step_host = 0
        self.steps = configs[0].steps
        self.losses = torch.zeros(M, self.steps, dtype=torch.float32, device=dev)
        self.data = data.to(dev, torch.float32)
        self.ab = self.schedule.alpha_bar.to(dev, torch.float32)
        gen_dev = dev if stream == "device" else torch.device("cpu")
        self.gens = [torch.Generator(device=gen_dev).manual_seed(c.seed) for c in configs]
        self.graph: torch.cuda.CUDAGraph | None = None

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t (M, B, C, H, W), t (M, B), eps: each member's draws in train's order from its generator."""
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
        a = self.ab[t].view(*t.shape, 1, 1, 1)
        return a.sqrt() * self.data[i] + (1 - a).sqrt() * eps, t, eps

    def _step(self) -> None:
        """One step of all members; no host synchronisation on the 'device' stream (graph-capturable)."""
        x_t, t, eps = self._draw()
        seeds = None
        if self.net.config.attention == "top1" and self.net.config.gumbel:
            seeds = [gumbel_seed(c.seed, self.step_host) for c in self.configs]
        per = ((self.net(x_t, t, seeds=seeds) - eps) ** 2).mean(dim=(1, 2, 3, 4))       # (M,) member losses
        names = list(self.params)
        params = [self.params[n] for n in names]
        grads = torch.autograd.grad(per.sum(), params)
        M = per.shape[0]
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

    def step(self) -> None:
        """One eager step."""
        if self.step_host >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done")
        self._step()
        self.step_host += 1

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):     # warm-up steps are real steps, on a side stream as capture needs
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for g in self.gens:
            if g.device.type == "cuda" and hasattr(graph, "register_generator_state"):
                graph.register_generator_state(g)
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    def run(self, callback: Callable[[int], None] | None = None) -> None:
        """Run the remaining steps; ``callback(step)`` after each."""
        done = self.step_host
        while self.step_host < self.steps:
            if self.use_graph and self.graph is None and self.steps - self.step_host > 3:
                self._capture(3)
            if self.graph is not None and self.step_host < self.steps:
                self.graph.replay()
                self.step_host += 1
            elif self.step_host < self.steps:
                self.step()
            if callback is not None:
                for s in range(done, self.step_host):
                    callback(s)
            done = self.step_host

    def results(self) -> list[tuple[ScoreNet, ScoreNet | None, list[float]]]:
        """Per member ``(raw model, EMA model or None, losses)``; new ScoreNets in eval mode."""
        losses = self.losses[:, :self.step_host].cpu().tolist()
        out = []
        for m, c in enumerate(self.configs):
            raw = self.net.member(m)
            ema = self.net.member(m, self.ema) if c.ema > 0 else None
            out.append((raw, ema, losses[m]))
        return out


def _out_of_memory(e: BaseException) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; the CPU allocator a plain RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def _tick(step: int, members: int, callback, bar) -> None:
    if callback is not None:
        callback(step, members)
    if bar is not None:
        bar.update(members)


def train_ensemble(models: Sequence[ScoreNet], data: torch.Tensor, configs: TrainConfig | Sequence[TrainConfig], *,
                   schedule: Schedule | None = None, device: str | torch.device | None = None,
                   stream: str = "train", cuda_graph: bool | None = None, chunk: int | None = None,
                   members: str = "auto", progress: bool = True, desc: str = "ensemble",
                   callback: Callable[[int, int], None] | None = None) -> list[TrainResult]:
    """Train M ScoreNets of one architecture together; member m gets what ``train(models[m], data,
    configs[m])`` gives it (see the module docstring). Returns one ``TrainResult`` per member, like
    ``train``'s: ``model`` the EMA copy (the raw model when ``ema=0``), ``raw_model`` the given module
    with its trained weights written back, ``losses`` per step, ``seconds`` the ensemble's wall time
    divided by its size.

    ``configs``: one TrainConfig for all or one per model (shared ``steps`` and ``batch_size``).
    ``stream``: ``"train"`` (CPU generators, equal to ``train`` on any device) or ``"device"``.
    ``cuda_graph``: default on for CUDA with the device stream (not for top-1 with Gumbel noise).
    ``chunk``: at most this many members per step (default all); an ensemble that runs out of memory
    is split in halves and rerun, never a crash (the failed attempt's steps are reported again).
    ``members``: see ``EnsembleNet``. ``callback(step, members)`` after every step.
    """
    models = list(models)
    if isinstance(configs, TrainConfig):
        configs = [configs] * len(models)
    configs = list(configs)
    if chunk is not None:
        _validate.positive_int("chunk", chunk)
    if not models:
        raise ValueError("models must hold at least one ScoreNet")
    _check_args(EnsembleNet(models, members=members), data, configs, schedule, stream)   # every check first
    M = len(models)
    size = min(chunk or M, M)
    results: list[TrainResult | None] = [None] * M
    bar = _progress(configs[0].steps * M, desc, progress)
    start = 0
    tr: EnsembleTrainer | None
    try:
        while start < M:
            part = list(range(start, min(start + size, M)))
            try:
                t0 = time.perf_counter()
                tr = EnsembleTrainer([models[i] for i in part], data, [configs[i] for i in part],
                                     schedule=schedule, device=device, stream=stream, cuda_graph=cuda_graph,
                                     members=members)
                tr.run(functools.partial(_tick, members=len(part), callback=callback, bar=bar))
                outs, where = tr.results(), tr.device
                seconds = time.perf_counter() - t0
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if size == 1 or not _out_of_memory(e):
                    raise
                size = math.ceil(size / 2)
                tr = None   # free the failed group before retrying
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(f"ensemble of {len(part)} ran out of memory; retrying in chunks of {size}",
                              RuntimeWarning, stacklevel=2)
                continue
            for i, (raw, ema, losses) in zip(part, outs):
                model = models[i]
                with torch.no_grad():   # write back: like train, the given module ends trained
                    model.to(where).load_state_dict(raw.state_dict())
                model.eval()
                results[i] = TrainResult(ema if ema is not None else model, model, losses, seconds / len(part))
            start += len(part)
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class Member:
    """One network to train: its architecture, its training config and the torch seed set right before
    it is built (the study builds row ``seed`` under ``torch.manual_seed(1000 + seed)``)."""
    model: ModelConfig
    train: TrainConfig
    init_seed: int


def train_members(members: Sequence[Member], data: torch.Tensor, *, backend: str = "auto",
                  device: str | torch.device | None = None, schedule: Schedule | None = None,
                  stream: str = "train", cuda_graph: bool | None = None, chunk: int | None = None,
                  progress: bool = True, callback: Callable[[int, int], None] | None = None) -> list[TrainResult]:
    """Build and train ``members``, grouped into ensembles of one ``ModelConfig`` and one
    ``(steps, batch_size)``; results in the members' order (the engine for reproduce and sweeps)."""
    members = list(members)
    for i, mb in enumerate(members):
        if not isinstance(mb, Member):
            raise TypeError(f"members[{i}] must be a Member, got {type(mb).__name__}")
        _validate.seed(f"members[{i}].init_seed", mb.init_seed)
    groups: dict[tuple, list[int]] = {}
    for i, mb in enumerate(members):
        groups.setdefault((mb.model, mb.train.steps, mb.train.batch_size), []).append(i)
    out: list[TrainResult | None] = [None] * len(members)
    for idx in groups.values():
        models = []
        for i in idx:
            torch.manual_seed(members[i].init_seed)
            models.append(build_model(members[i].model, backend=backend))
        res = train_ensemble(models, data, [members[i].train for i in idx], schedule=schedule, device=device,
                             stream=stream, cuda_graph=cuda_graph, chunk=chunk, progress=progress,
                             callback=callback)
        for i, r in zip(idx, res):
            out[i] = r
    return [r for r in out if r is not None]


@torch.no_grad()
def sample_ensemble(ensemble: EnsembleNet | Sequence[ScoreNet], n: int, *, seeds: Sequence[int],
                    schedule: Schedule | None = None, sampler: str = "ddim", steps: int = 50, eta: float = 1.0,
                    clip_x0: bool = True, batch_size: int = 1000, device: str | torch.device | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Samples (M, n, C, H, W) float32: member m's are ``fastscore.sample(member_m, n, seed=seeds[m], ...)``
    with the same arguments (same initial noise and step noise per sample index), drawn for all members
    by one network call per step. ``batch_size`` counts samples per member."""
    ens = ensemble if isinstance(ensemble, EnsembleNet) else EnsembleNet(list(ensemble))
    M = len(ens)
    _validate.positive_int("n", n)
    _validate.positive_int("batch_size", batch_size)
    _validate.choice("sampler", sampler, SAMPLERS)
    _validate.finite_float("eta", eta, minimum=0.0)
    seeds = list(seeds)
    if len(seeds) != M:
        raise ValueError(f"seeds must give one seed per member ({M}), got {len(seeds)}")
    for i, s in enumerate(seeds):
        _validate.seed(f"seeds[{i}]", s)
    schedule = schedule if schedule is not None else make_schedule("linear", ens.config.T)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    ts = list(range(schedule.T - 1, -1, -1)) if sampler == "ddpm" else timesteps(schedule.T, steps)
    eta = 1.0 if sampler == "ddpm" else eta
    coefs = step_coefficients(schedule, ts, eta)
    dev = torch.device(device) if device is not None else next(ens.parameters()).device
    was_training = ens.training
    ens.to(dev).eval()
    shape = ens.image_shape
    out = torch.empty((M, n, *shape), device=dev, dtype=torch.float32)
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.stack([initial_noise((b, *shape), s, start, dev) for s in seeds])
            tt = torch.empty((M, b), dtype=torch.int64, device=dev)
            for i, (t, c) in enumerate(zip(ts, coefs)):
                eps = ens(x, tt.fill_(t))
                for m, s in enumerate(seeds):   # per-member noise seed: one fused update each
                    ops.reverse_step(x[m], eps[m], c, seed=s, step=i, sample_offset=start, clip_x0=clip_x0,
                                     out=x[m], backend=backend)
            out[:, start:start + b] = x
    finally:
        ens.train(was_training)
    return out
