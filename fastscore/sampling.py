"""Batched reverse-diffusion samplers on the fused ``reverse_step`` op.

``sample_ddim`` implements DDIM (Song et al. 2021) with stochasticity eta >= 0 on a strided
timestep grid; ``sample_ddpm`` is DDPM ancestral sampling (Ho et al. 2020), i.e. DDIM with
eta = 1 (the posterior variance beta_tilde) on every timestep. ``sample`` draws ``n`` samples in
batches. All noise, the initial x_T included, comes from the Philox stream keyed by the seed and
each element's global index, so sample i is the same whatever the batch size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import _validate
from .ops import ddim_coefficients, noise_like, reverse_step
from .ops.reverse_step import StepCoefficients
from .schedule import Schedule, make_schedule

SAMPLERS = ("ddim", "ddpm")
INIT_STREAM = 2**31 - 1  # Philox c2 of the initial noise x_T; steps use c2 = 0 .. steps-1


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps from T-1 down to 0, evenly spaced (integers, strictly decreasing)."""
    _validate.positive_int("steps", steps)
    if steps > T:
        raise ValueError(f"steps must be <= T={T}, got {steps}")
    ts = sorted({round(x) for x in torch.linspace(T - 1, 0, steps).tolist()}, reverse=True)
    return ts


def step_coefficients(schedule: Schedule, ts: Sequence[int], eta: float) -> list[StepCoefficients]:
    """DDIM(eta) coefficients for each step ``ts[i] -> ts[i+1]`` (the last step lands on alpha_bar = 1)."""
    ab = schedule.alpha_bar.tolist()
    out = []
    for i, t in enumerate(ts):
        prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out.append(ddim_coefficients(ab[t], prev, eta))
    return out


def sample_ddim(model: Callable, x: torch.Tensor, schedule: Schedule, ts: Sequence[int], *, eta: float = 0.0,
                seed: int = 0, sample_offset: int | torch.Tensor = 0, clip_x0: bool = True,
                backend: str = "auto") -> torch.Tensor:
    """DDIM(eta) from x = x_T (B, ...) over timesteps ``ts`` (decreasing); updates x in place.

    ``sample_offset``: index of x's first sample in the whole run (keys the noise); an int64 device
    tensor is read by the fused kernel at run time (CUDA graphs)."""
    coefs = step_coefficients(schedule, ts, eta)
    tt = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i, (t, c) in enumerate(zip(ts, coefs)):
        eps = model(x, tt.fill_(t))
        reverse_step(x, eps, c, seed=seed, step=i, sample_offset=sample_offset, clip_x0=clip_x0, out=x,
                     backend=backend)
    return x


def sample_ddpm(model: Callable, x: torch.Tensor, schedule: Schedule, *, seed: int = 0, sample_offset: int = 0,
                clip_x0: bool = True, backend: str = "auto") -> torch.Tensor:
    """DDPM ancestral sampling over every timestep T-1 .. 0 (DDIM with eta = 1)."""
    return sample_ddim(model, x, schedule, list(range(schedule.T - 1, -1, -1)), eta=1.0, seed=seed,
                       sample_offset=sample_offset, clip_x0=clip_x0, backend=backend)


def initial_noise(shape: Sequence[int], seed: int, sample_offset: int = 0,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """x_T (B, ...) float32 for samples ``sample_offset .. sample_offset + B - 1`` of a run."""
    return noise_like(torch.empty(tuple(shape), device=device), seed, INIT_STREAM, sample_offset)


@torch.no_grad()
def sample(model: Callable, n: int, *, shape: Sequence[int] | None = None, schedule: Schedule | None = None,
           sampler: str = "ddim", steps: int = 50, eta: float = 1.0, clip_x0: bool = True, seed: int = 0,
           batch_size: int = 1000, device: str | torch.device | None = None, backend: str = "auto",
           cuda_graph: bool | None = None, progress: bool = False,
           callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Draw ``n`` samples (n, C, H, W) float32 on ``device`` from an eps-prediction model.

    ``model`` maps ``(x_t (B, C, H, W), t (B,) int64)`` to eps_hat; a ``ScoreNet`` brings its own
    ``shape`` and ``T``, any other module needs ``shape`` (and ``schedule`` unless T = 1000, linear).
    ``sampler="ddim"`` uses ``steps`` strided steps with ``eta`` (eta = 1: strided DDPM);
    ``"ddpm"`` runs all T ancestral steps. ``clip_x0`` clamps the predicted x_0 to [-1, 1] and
    recomputes eps from it. Reproducible: the same seed gives the same samples for any
    ``batch_size``. ``cuda_graph`` (default: on for CUDA) captures the whole loop once per batch
    shape and replays it. ``callback(b)`` is called after each batch of ``b`` samples.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (x_t, t) -> eps, got {type(model).__name__}")
    _validate.positive_int("n", n)
    _validate.positive_int("batch_size", batch_size)
    _validate.choice("sampler", sampler, SAMPLERS)
    _validate.finite_float("eta", eta, minimum=0.0)
    _validate.seed("seed", seed)
    cfg = getattr(model, "config", None)
    if shape is None:
        shape = getattr(model, "image_shape", None)
        if shape is None:
            raise ValueError("shape (C, H, W) is required for a model without an image_shape attribute")
    shape = tuple(shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be three positive ints (C, H, W), got {shape}")
    if schedule is None:
        schedule = make_schedule("linear", getattr(cfg, "T", 1000))
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    ts = list(range(schedule.T - 1, -1, -1)) if sampler == "ddpm" else timesteps(schedule.T, steps)
    eta = 1.0 if sampler == "ddpm" else eta
    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.to(device).eval()
    use_graph = (device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    out = torch.empty((n, *shape), device=device, dtype=torch.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="sample", leave=False, dynamic_ncols=True)
    runner = _GraphRunner(model, schedule, ts, eta, seed, clip_x0, backend) if use_graph else None
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = initial_noise((b, *shape), seed, start, device)
            if runner is not None and runner.ok:
                x = runner(x, start)
            else:
                sample_ddim(model, x, schedule, ts, eta=eta, seed=seed, sample_offset=start, clip_x0=clip_x0,
                            backend=backend)
            out[start:start + b] = x
            if bar is not None:
                bar.update(b)
            if callback is not None:
                callback(b)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return out


class _GraphRunner:
    """Captures the whole sampling loop (network and update, all steps) in one CUDA graph per batch
    shape and replays it. The batch's first sample index lives in a device tensor that the fused
    update reads, so one graph serves every batch. The first batch of a shape runs eagerly (it
    compiles every kernel variant and is the warm-up capture needs); if capture fails, the runner
    turns itself off and ``sample`` falls back to the eager loop.
    """

    def __init__(self, model, schedule, ts, eta, seed, clip_x0, backend):
        self.args = (model, schedule, ts, eta, seed, clip_x0, backend)
        self.ok = True
        self.graphs: dict = {}

    def __call__(self, x0: torch.Tensor, offset: int) -> torch.Tensor:
        model, schedule, ts, eta, seed, clip_x0, backend = self.args
        key = tuple(x0.shape)
        if key in self.graphs:
            g, static, off = self.graphs[key]
            static.copy_(x0)
            off.fill_(offset)
            g.replay()
            return static.clone()
        x = sample_ddim(model, x0.clone(), schedule, ts, eta=eta, seed=seed, sample_offset=offset, clip_x0=clip_x0,
                        backend=backend)
        try:
            static = x0.clone()
            off = torch.full((1,), offset, dtype=torch.int64, device=x0.device)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                sample_ddim(model, static, schedule, ts, eta=eta, seed=seed, sample_offset=off, clip_x0=clip_x0,
                            backend=backend)
            self.graphs[key] = (g, static, off)
        except Exception:  # pragma: no cover - depends on the CUDA stack
            self.ok = False
        return x
