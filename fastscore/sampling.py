"""Batched reverse-diffusion samplers on the fused ``reverse_step`` op.

Each sampler is one function in the k-diffusion style, ``sample_x(model, x, schedule, ...)``:
``sample_ddim`` is DDIM (Song et al. 2021) with stochasticity eta >= 0 on a timestep grid
(``timesteps``); ``sample_ddpm`` is DDPM ancestral sampling (Ho et al. 2020), i.e. DDIM with
eta = 1 (the posterior variance beta_tilde) on every timestep. ``sample``, the one driver, draws
``n`` samples in batches with the sampler named in ``SAMPLERS``, eagerly or as a captured CUDA
graph (``fastscore.graphs``). All noise, the initial x_T included, comes from the Philox stream
keyed by the seed and each element's global index, so sample i is the same whatever the batch size.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from . import _validate, graphs
from .ops import BACKENDS, StepCoefficients, ddim_coefficients, noise_like, resolve_backend, reverse_step
from .schedule import Schedule, make_schedule

ON_NONFINITE = ("raise", "warn")
GRAPH_CACHE_SIZE = 4  # captured sampling loops kept across calls (each holds its buffers and memory pool)
INIT_STREAM = 2**31 - 1  # Philox c2 of the initial noise x_T; steps use c2 = 0 .. steps-1


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` integer timesteps from T-1 down to 0, strictly decreasing: diffusers' DDIM grid
    (``timestep_spacing="linspace"``), ``round(i * (T-1) / (steps-1))`` for i = steps-1 .. 0 in
    float64, ties to even, i.e. ``np.linspace(0, T-1, steps).round()[::-1]`` (spacing >= 1: no
    repeats). ``steps=1`` gives [T-1]: every grid starts at T-1, where x_T ~ N(0, I) lives, and its
    one step goes straight to x_0 (diffusers gives [0], which treats pure noise as nearly clean)."""
    _validate.positive_int("T", T)
    _validate.positive_int("steps", steps)
    if steps > T:
        raise ValueError(f"steps must be <= T={T}, got {steps}")
    if steps == 1:
        return [T - 1]
    spacing = (T - 1) / (steps - 1)
    return [round(i * spacing) for i in range(steps - 1, -1, -1)]


def step_coefficients(schedule: Schedule, ts: Sequence[int], eta: float) -> list[StepCoefficients]:
    """DDIM(eta) coefficients for each step ``ts[i] -> ts[i+1]`` (the last step lands on alpha_bar = 1)."""
    ab = schedule.alpha_bar.tolist()
    out = []
    for i, t in enumerate(ts):
        prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out.append(ddim_coefficients(ab[t], prev, eta))
    return out


def sample_ddim(model: Callable, x: torch.Tensor, schedule: Schedule, ts: Sequence[int], *, eta: float = 0.0,
                seed: int | torch.Tensor = 0, sample_offset: int | torch.Tensor = 0, clip_x0: bool = True,
                backend: str = "auto") -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta`` over the timesteps ``ts``
    (decreasing): at each t, eps_hat = model(x, t) and one fused reverse step to the next t (after
    the last, to alpha_bar = 1). x = x_T (B, ...) is updated in place and returned.

    ``sample_offset``: index of x's first sample in the whole run (keys the noise); ``seed`` and
    ``sample_offset`` as int64 device tensors are read by the fused kernel at run time (CUDA graphs)."""
    coefs = step_coefficients(schedule, ts, eta)
    tt = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i, (t, c) in enumerate(zip(ts, coefs)):
        eps = model(x, tt.fill_(t))
        reverse_step(x, eps, c, seed=seed, step=i, sample_offset=sample_offset, clip_x0=clip_x0, out=x,
                     backend=backend)
    return x


def sample_ddpm(model: Callable, x: torch.Tensor, schedule: Schedule, *, seed: int | torch.Tensor = 0,
                sample_offset: int | torch.Tensor = 0, clip_x0: bool = True, backend: str = "auto") -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over every timestep T-1 .. 0, each step
    a draw from the posterior q(x_{t-1} | x_t, x0_hat) (variance beta_tilde): DDIM with eta = 1 on
    the full grid. Arguments as ``sample_ddim``."""
    return sample_ddim(model, x, schedule, range(schedule.T - 1, -1, -1), eta=1.0, seed=seed,
                       sample_offset=sample_offset, clip_x0=clip_x0, backend=backend)


#: ``sample``'s samplers by name. Each is ``fn(model, x, schedule, [ts], *, [eta], seed, sample_offset,
#: clip_x0, backend)`` and takes ``ts = timesteps(T, steps)`` and ``eta`` only if its signature names them.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim, "ddpm": sample_ddpm}


def _sampler_options(fn: Callable[..., torch.Tensor], schedule: Schedule, steps: int, eta: float, clip_x0: bool,
                    backend: str) -> dict[str, object]:
    """The settings of ``sample`` that sampler ``fn`` takes, by name (as diffusers passes ``eta`` only
    to a scheduler whose ``step`` has it): ``ts`` (the grid ``timesteps(T, steps)``, validated only
    for a sampler that uses it), ``eta``, ``clip_x0``, ``backend``."""
    names = inspect.signature(fn).parameters
    options: dict[str, object] = {}
    if "ts" in names:
        options["ts"] = timesteps(schedule.T, steps)
    offered = {"eta": eta, "clip_x0": clip_x0, "backend": backend}
    options.update((k, v) for k, v in offered.items() if k in names)
    return options


def initial_noise(shape: Sequence[int], seed: int, sample_offset: int = 0,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """x_T (B, ...) float32 for samples ``sample_offset .. sample_offset + B - 1`` of a run."""
    return noise_like(torch.empty(tuple(shape), device=device), seed, INIT_STREAM, sample_offset)


def sampling_backend(model: Callable, backend: str | None) -> str:
    """The one backend a sampling run uses for the network and the update: ``backend``, or the
    model's own ``backend`` attribute when ``backend`` is None (``"auto"`` for a model without one).
    A ``backend`` that differs from the model's raises ValueError: the network would run one path
    and the update another without saying so."""
    own = getattr(model, "backend", None)
    own = own if isinstance(own, str) else None
    if backend is None:
        return own or "auto"
    _validate.choice("backend", backend, BACKENDS)
    if own is not None and own != backend:
        raise ValueError(f"backend={backend!r} differs from the model's backend {own!r}: omit backend to use "
                         f"the model's, or build the model with backend={backend!r}")
    return backend


@torch.no_grad()
def sample(model: Callable, n: int, *, shape: Sequence[int] | None = None, schedule: Schedule | None = None,
           sampler: str = "ddim", steps: int = 50, eta: float = 1.0, clip_x0: bool = True, seed: int = 0,
           batch_size: int = 1000, device: str | torch.device | None = None, backend: str | None = None,
           cuda_graph: bool | None = None, progress: bool = False,
           callback: Callable[[int], None] | None = None, on_nonfinite: str = "raise") -> torch.Tensor:
    """Draw ``n`` samples (n, C, H, W) float32 on ``device`` from an eps-prediction model.

    ``model`` maps ``(x_t (B, C, H, W), t (B,) int64)`` to eps_hat; a ``ScoreNet`` brings its own
    ``shape`` and ``T``, any other module needs ``shape`` (and ``schedule`` unless T = 1000, linear).
    ``sampler`` names a function in ``SAMPLERS``: ``"ddim"`` takes ``steps`` steps of the grid
    ``timesteps(T, steps)`` with ``eta`` (eta = 1: strided DDPM); ``"ddpm"`` runs all T ancestral
    steps (``steps`` and ``eta`` unused). ``clip_x0`` clamps the predicted x_0 to [-1, 1] and
    recomputes eps from it. Reproducible: the same seed gives the same samples for any
    ``batch_size``. ``backend`` (default: the model's own ``backend``, else ``"auto"``) must agree
    with the model's (``sampling_backend``).

    ``cuda_graph`` (default: on for CUDA when the update runs the fused kernel) captures the whole
    loop once per batch shape and replays it. Captured graphs are kept across calls: the
    ``GRAPH_CACHE_SIZE`` most recent, dropped with their model or by ``clear_graph_cache()``, keyed
    by ``graph_key`` (the model's identity, the addresses of an ``nn.Module``'s parameters and
    buffers, the batch shape, dtype and device, the sampler settings; not the seed, which the graph
    reads from the device). A replay reads parameters and buffers where they are, so in-place
    updates are seen; state held outside them must not be replaced between calls (or pass
    ``cuda_graph=False``). A failed capture warns with its cause and samples without a graph.

    Samples holding NaN or inf (a diverged model, NaN weights) raise FloatingPointError when
    ``on_nonfinite="raise"``, or warn (RuntimeWarning) and are returned when ``"warn"``.
    ``callback(b)`` is called after each batch of ``b`` samples. A model with an int attribute
    ``batch_multiple`` (an ``Ensemble``: its member count) gets batches rounded down to its multiples.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (x_t, t) -> eps, got {type(model).__name__}")
    _validate.positive_int("n", n)
    _validate.positive_int("batch_size", batch_size)
    rows = getattr(model, "batch_multiple", 1)   # an Ensemble interleaves its M members row by row
    if isinstance(rows, int) and rows > 1 and batch_size % rows:
        batch_size = max(rows, batch_size - batch_size % rows)
    _validate.choice("sampler", sampler, tuple(SAMPLERS))
    _validate.finite_float("eta", eta, minimum=0.0)
    _validate.seed("seed", seed)
    _validate.choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    backend = sampling_backend(model, backend)
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
    settings = _Settings(sampler, schedule, _sampler_options(SAMPLERS[sampler], schedule, steps, float(eta),
                                                            bool(clip_x0), backend))
    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool or None, got {type(cuda_graph).__name__}")
    if cuda_graph and not graphs.possible(device):
        raise ValueError("cuda_graph=True needs a CUDA device")
    # the graph reads seed and sample offset from device tensors: only the fused update does
    fused = resolve_backend(backend, torch.empty(0, device=device), op="reverse_step") == "triton"
    if cuda_graph and not fused:
        raise ValueError(f"cuda_graph=True needs the fused reverse step (backend 'auto' or 'triton' on CUDA), "
                         f"got backend={backend!r}")
    use_graph = (graphs.possible(device) and fused) if cuda_graph is None else cuda_graph
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.to(device).eval()
    out = torch.empty((n, *shape), device=device, dtype=torch.float32)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # counted on the device: no sync per batch
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="sample", leave=False, dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = initial_noise((b, *shape), seed, start, device)
            graph = _graph_for(model, settings, x) if use_graph else None
            if graph is not None:
                x = graph(x, seed, start)
            else:
                _run_loop(model, settings, x, seed, start)
            out[start:start + b] = x
            nonfinite += (~torch.isfinite(x.view(b, -1)).all(dim=1)).sum()
            if bar is not None:
                bar.update(b)
            if callback is not None:
                callback(b)
    finally:
        if bar is not None:
            bar.close()
        if was_training and isinstance(model, nn.Module):
            model.train()
    bad = int(nonfinite)
    if bad:
        msg = (f"{bad} of {n} samples hold NaN or inf: the model's output eps_hat was not finite "
               f"(NaN or inf weights, a diverged training run?)")
        if on_nonfinite == "raise":
            raise FloatingPointError(msg + "; pass on_nonfinite='warn' to get the samples anyway")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return out


class _Settings:
    """A sampling loop's sampler, schedule and options (all but the model, seed and offset), and
    their part of the graph cache key."""

    def __init__(self, sampler: str, schedule: Schedule, options: dict[str, object]) -> None:
        self.fn, self.schedule, self.options = SAMPLERS[sampler], schedule, options
        self.key = (sampler, tuple(schedule.alpha_bar.tolist()),
                    tuple((k, tuple(v) if isinstance(v, (list, range)) else v) for k, v in sorted(options.items())))


def _run_loop(model: Callable, settings: _Settings, x: torch.Tensor, seed: int | torch.Tensor,
              sample_offset: int | torch.Tensor) -> torch.Tensor:
    """The sampling loop on x = x_T in place: the one step code of the eager and the graph paths."""
    return settings.fn(model, x, settings.schedule, seed=seed, sample_offset=sample_offset, **settings.options)


# ---------------------------------------------------------------------------------------------
# CUDA graphs of the whole loop (``fastscore.graphs``), kept across calls
# ---------------------------------------------------------------------------------------------
class _LoopGraph:
    """One captured sampling loop for one batch shape: static x, seed and sample offset on the
    device (the fused update reads seed and offset from memory, so one graph serves every batch
    and every seed). The first call warms up on a side stream, which is that batch's result, then
    captures; later calls copy x_T in and replay. Capture failure: ``replay`` stays None, ``error``
    holds the cause, and the caller samples eagerly."""

    def __init__(self, model: Callable, settings: _Settings, like: torch.Tensor) -> None:
        self.model: Callable | None = model  # dropped after capture: the cache must not keep models alive
        self.settings = settings
        self.x = torch.empty_like(like)
        self.seed = torch.zeros(1, dtype=torch.int64, device=like.device)
        self.offset = torch.zeros(1, dtype=torch.int64, device=like.device)
        self.replay: Callable[[], None] | None = None
        self.error: BaseException | None = None

    def __call__(self, x0: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
        """x_0 (B, C, H, W) from x_T = ``x0`` for samples ``offset ..``; a view of the static buffer
        that the next call overwrites (copy it out)."""
        self.x.copy_(x0)
        self.seed.fill_(seed)  # fill_ with a Python int launches a kernel: no host sync
        self.offset.fill_(offset)
        if self.replay is not None:
            self.replay()
            return self.x
        model = self.model
        assert model is not None  # set until the first call captures
        loop = functools.partial(_run_loop, model, self.settings, self.x, self.seed, self.offset)
        graphs.warm_up(loop, self.x.device)
        result = self.x.clone()
        try:
            self.replay = graphs.capture(loop, self.x.device)
        except Exception as e:  # the CUDA stack decides what can be captured; report, never swallow
            self.error = e
            warnings.warn(f"CUDA graph capture of the sampling loop failed ({type(e).__name__}: {e}); "
                          f"sampling without a graph", RuntimeWarning, stacklevel=3)
        self.model = None
        return result


_GRAPHS: OrderedDict[tuple, tuple[Callable[[], object], _LoopGraph]] = OrderedDict()


def graph_key(model: Callable, settings: _Settings, x: torch.Tensor) -> tuple:
    """The cache key of a captured loop: the model's identity and the addresses, shapes and dtypes
    of its parameters and buffers (a replay reads them where they are), its training flag, the
    batch's shape, dtype and device, and the sampler settings."""
    state: tuple = ()
    if isinstance(model, nn.Module):
        state = tuple((t.data_ptr(), tuple(t.shape), t.dtype)
                      for t in itertools.chain(model.parameters(), model.buffers()))
        state += (model.training,)
    return (id(model), state, tuple(x.shape), x.dtype, str(x.device), settings.key)


def clear_graph_cache() -> None:
    """Drop every captured sampling graph (and the memory they hold)."""
    _GRAPHS.clear()


def _graph_for(model: Callable, settings: _Settings, x: torch.Tensor) -> _LoopGraph | None:
    """The captured loop for this model, settings and batch (None: capture failed before)."""
    key = graph_key(model, settings, x)
    hit = _GRAPHS.get(key)
    if hit is not None and hit[0]() is model:  # the same live object, not a new one at a reused id
        _GRAPHS.move_to_end(key)
        graph = hit[1]
    else:
        graph = _LoopGraph(model, settings, x)

        def drop(_ref: object, key: tuple = key) -> None:
            _GRAPHS.pop(key, None)

        owner: Callable[[], object]
        try:
            owner = weakref.ref(model, drop)
        except TypeError:  # not weak-referenceable: held (so its id cannot be reused) until evicted
            owner = (lambda m: lambda: m)(model)
        _GRAPHS[key] = (owner, graph)
        while len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    return None if graph.error is not None else graph
