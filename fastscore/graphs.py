"""CUDA-graph warm-up and capture, the one place training and sampling get them from.

Follows PyTorch's "CUDA Graphs" notes (whole-loop capture): run the work once on a side stream
(``warm_up``: kernels compiled, workspaces allocated, lazy initialisation done), then capture it
(``capture``) and replay it. A replay reads and writes the same memory as the captured run, so
its inputs live in static buffers that the caller fills in place; randomness must be drawn on the
device (fastscore's Philox ops read seed and offset from device tensors, or a registered CUDA
generator advances with each replay). The eager path is the reference: these functions add no
arithmetic of their own.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def possible(device: torch.device) -> bool:
    """Whether CUDA graphs can run on ``device`` (a CUDA device)."""
    return torch.device(device).type == "cuda"


def warm_up(fn: Callable[[], object], device: torch.device) -> None:
    """Run ``fn`` once on a side stream of ``device``, ordered after the current stream's queued
    work and before its later work (capture needs a warmed-up side-stream run first)."""
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        fn()
    main.wait_stream(side)


def capture(fn: Callable[[], object], device: torch.device, *,
            generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """Capture one call of ``fn`` on ``device`` in a CUDA graph; returns its replay, which reruns
    the captured kernels on the same memory. ``generators``: CUDA generators that ``fn`` draws
    from, registered so that each replay advances them (else every replay repeats the same draws)."""
    g = torch.cuda.CUDAGraph()
    for gen in generators:
        if gen.device.type == "cuda":
            g.register_generator_state(gen)
    with torch.cuda.device(device), torch.cuda.graph(g):
        fn()
    return g.replay
