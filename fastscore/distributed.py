"""Several processes, one job list: the ``torchrun`` / ``torch.distributed`` glue for sweeps.

Launched by ``torchrun --nproc-per-node N -m fastscore sweep ...``, each process reads its rank and
the world size from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), takes every ``world``-th work item (``shard``), and rank 0 merges
what all ranks return (``gather_to_root``). Without those variables the same code runs as one process
(rank 0 of 1) and never touches ``torch.distributed``. The backend is NCCL when every rank has a GPU
and gloo otherwise (gloo is also how the tests run two ranks on a CPU). Only Python objects that
pickle are exchanged: results are small JSON-like documents, never tensors.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: how long a collective waits for the other ranks. A rank that finishes its cells waits in
#: ``gather_to_root`` for the slowest rank, which on a CPU can be hours behind (one study cell is
#: hours of training); torch's default (30 min for gloo, 10 min for NCCL) would end the whole run there.
TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Rank:
    """This process's place in the run: ``rank`` of ``world``; ``local_rank`` picks its GPU."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | torch.device) -> torch.device:
        """``requested``, with a bare ``cuda`` turned into this rank's own GPU (``cuda:LOCAL_RANK``)."""
        d = torch.device(requested)
        if d.type == "cuda" and d.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return d


def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher setting ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | torch.device = "cpu") -> Rank:
    """Join the process group when launched by ``torchrun``; a single process otherwise.

    ``device``: where this rank computes; NCCL is used only when it is a CUDA device, gloo otherwise.
    Safe to call twice (an existing process group is reused)."""
    if not launched():
        return Rank()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=TIMEOUT)
    return Rank(rank, world, local)


def shard(items: Sequence[T], rank: Rank) -> list[T]:
    """This rank's items: every ``world``-th one from position ``rank``. Give ``items`` in the order
    they should start (longest first balances the ranks); every rank must pass the same sequence."""
    return list(items[rank.rank::rank.world])


def gather_to_root(obj: Any, rank: Rank) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (``None`` elsewhere); ``[obj]`` for one process."""
    if rank.world == 1:
        return [obj]
    out: list[Any] | None = [None] * rank.world if rank.is_root else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(rank: Rank) -> None:
    """Wait for every rank (no-op for one process)."""
    if rank.world > 1:
        dist.barrier()


def finish(rank: Rank) -> None:
    """Leave the process group, if this process joined one: after a barrier, so that no rank tears
    gloo down while another still has a collective in flight (seen as an abort at exit)."""
    if rank.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
