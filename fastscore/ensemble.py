"""Ensembles: M networks of one architecture as one module, the ``torch.func`` way.

``Ensemble(models)`` stacks the members' parameters and buffers along a leading dimension
(``torch.func.stack_module_state``) and runs the members' own ``forward`` on them with
``functional_call``; nothing re-implements the network. Two schedules of the same function:
``"vmap"`` (``torch.func.vmap`` over the members: one batched call per layer, the fused ops fold the
member dimension into their batch through their vmap rules; few launches, for GPUs) and ``"loop"``
(``forward`` once per member on views of the stacked tensors: on a CPU, which is compute-bound,
oneDNN's grouped convolutions from vmap were 1.5x slower than M plain ones). ``"auto"``: vmap on
CUDA, loop elsewhere and for M = 1 (where the loop is the plain call).

``fastscore.training.train`` trains a list of modules through ``Ensemble.run`` (M = 1 included);
``fastscore.sample`` samples an ``Ensemble`` as one ``(x_t, t) -> eps`` module: row r of a batch
belongs to member ``r % M``, so with ``sample(Ensemble(models), M * n, seed=s)`` member m's samples
are rows ``m::M``, equal to ``sample(models[m], M * n, seed=s)[m::M]`` (``sample`` keys its noise by a
row's global index).
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap

from . import _validate

MEMBER_MODES = ("auto", "vmap", "loop")


def takes_seed(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes a ``seed`` keyword (``ScoreNet``'s top-1 Gumbel seed)."""
    return "seed" in inspect.signature(model.forward).parameters


class Ensemble(nn.Module):
    """M modules of one architecture (same class, parameter and buffer shapes, ``config`` and
    ``backend`` where they have them) with stacked parameters and buffers (leading dim M).

    ``run(x (M, B, ...), t (M, B))`` gives member m's output for ``x[m], t[m]``; ``forward(x (b, ...),
    t (b,))`` interleaves: row r goes to member ``r % M`` (b a multiple of M). ``members``: the
    schedule, ``"vmap"``, ``"loop"`` or ``"auto"`` (see the module docstring). The stacked tensors are
    ``nn.Parameter``s / buffers named like the members' with ``.`` replaced by ``__``.
    """

    def __init__(self, models: Sequence[nn.Module], *, members: str = "auto") -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("models must hold at least one module")
        self.members = _validate.choice("members", members, MEMBER_MODES)
        first = models[0]
        shapes = {n: v.shape for n, v in first.state_dict().items()}
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(m).__name__}")
            if type(m) is not type(first) or {n: v.shape for n, v in m.state_dict().items()} != shapes or \
                    getattr(m, "config", None) != getattr(first, "config", None) or \
                    getattr(m, "backend", None) != getattr(first, "backend", None):
                raise ValueError(f"models[{i}] differs from models[0] in its class, shapes, config or backend; "
                                 "an ensemble needs one architecture")
        params, buffers = stack_module_state(models)
        self.names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(p.detach().clone())
                                         for n, p in params.items()})
        for n, b in buffers.items():
            self.register_buffer("buffer__" + n.replace(".", "__"), b.detach().clone())
        # member 0 on the meta device runs every member's forward; a tuple keeps it out of .modules(),
        # so .to() and .parameters() see only the stacked tensors
        self._template = (copy.deepcopy(first).to("meta"),)
        self.config = getattr(first, "config", None)
        self.takes_seed = takes_seed(first)
        shape = getattr(first, "image_shape", None)
        if shape is not None:
            self.image_shape = shape

    @property
    def template(self) -> nn.Module:
        """The meta-device copy of member 0 whose ``forward`` every member runs (not a submodule)."""
        return self._template[0]

    @property
    def batch_multiple(self) -> int:
        """``fastscore.sample`` draws batches of a multiple of this (M): row r is member ``r % M``'s."""
        return len(self)

    def __len__(self) -> int:
        return next(iter(self.stacked.values())).shape[0]

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """The stacked parameters keyed by the members' parameter names."""
        return {n: self.stacked[n.replace(".", "__")] for n in self.names}

    def buffers_by_name(self) -> dict[str, torch.Tensor]:
        """The stacked buffers keyed by the members' buffer names."""
        return {n: getattr(self, "buffer__" + n.replace(".", "__")) for n in self.buffer_names}

    def state(self, m: int, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Member ``m``'s state dict (detached copies), with ``params`` (stacked) for the parameters if given."""
        params = self.parameters_by_name() if params is None else params
        state = {n: p[m].detach().clone() for n, p in params.items()}
        state.update({n: b[m].detach().clone() for n, b in self.buffers_by_name().items()})
        return state

    def member(self, m: int, params: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A new module (eval mode, on the stacked tensors' device) with member ``m``'s weights."""
        net = copy.deepcopy(self.template)    # on meta: building a fresh net would consume the global RNG
        net.load_state_dict(self.state(m, params), assign=True)
        return net.eval()

    def run(self, x: torch.Tensor, t: torch.Tensor, *, seeds: torch.Tensor | None = None,
            params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Member m's ``forward(x[m], t[m], seed=seeds[m])`` stacked: (M, B, ...). ``seeds``: (M,) int64,
        passed when the members' forward takes ``seed``; ``params``: stacked parameters to use instead
        of the module's (the trainer's EMA)."""
        M = len(self)
        if x.dim() < 2 or x.shape[0] != M:
            raise ValueError(f"x must have shape ({M}, B, ...), got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.shape != x.shape[:2]:
            raise ValueError(f"t must be a tensor of shape {tuple(x.shape[:2])}")
        params = self.parameters_by_name() if params is None else params
        buffers = self.buffers_by_name()
        net = self.template
        net.train(self.training)
        if seeds is None or not self.takes_seed:
            seeds = None
        elif seeds.shape != (M,) or seeds.dtype != torch.int64:
            raise ValueError(f"seeds must be an int64 tensor of shape ({M},), got {seeds.dtype} {tuple(seeds.shape)}")
        if self.members == "vmap" or (self.members == "auto" and x.is_cuda and M > 1):
            def one(p, b, x, t, s):
                return functional_call(net, (p, b), (x, t), {} if s is None else {"seed": s})
            return vmap(one, in_dims=(0, 0, 0, 0, None if seeds is None else 0),
                        randomness="different")(params, buffers, x, t, seeds)
        # unbind: its backward writes one stacked gradient (p[m] would write M full-size zero tensors)
        pv = {n: v.unbind(0) for n, v in params.items()}
        bv = {n: v.unbind(0) for n, v in buffers.items()}
        xs, ts = x.unbind(0), t.unbind(0)
        seed_list = None if seeds is None else seeds.tolist()
        return torch.stack([functional_call(net, ({n: v[m] for n, v in pv.items()}, {n: v[m] for n, v in bv.items()}),
                                            (xs[m], ts[m]), {} if seed_list is None else {"seed": seed_list[m]})
                            for m in range(M)])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Interleaved: row r of ``x`` (b, ...) and ``t`` (b,) goes to member ``r % M``."""
        M = len(self)
        if x.shape[0] % M:
            raise ValueError(f"the batch ({x.shape[0]}) must be a multiple of the ensemble size {M}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a tensor of shape ({x.shape[0]},), got {type(t).__name__}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        xs = x.reshape(-1, M, *x.shape[1:]).transpose(0, 1)
        ts = t.reshape(-1, M).transpose(0, 1)
        out = self.run(xs, ts)
        return out.transpose(0, 1).reshape(x.shape[0], *out.shape[2:])
