"""Test set-up. Without CUDA, Triton kernels run in the interpreter: the flag must be set
before any kernel module is imported, so it is set here, at collection time.

Device-agnostic tests take the ``device`` fixture: CUDA when present (the Triton path runs the
compiled kernels), else CPU (the Triton path runs in the interpreter). Tests that only make sense
on one device say so with a marker, enforced here: ``gpu`` (skipped without CUDA) and ``cpu_only``
(skipped when CUDA is present: e.g. CPU-tensor behaviour of ``backend="auto"``).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastscore.ops import patch_triton_interpreter  # noqa: E402

# the ops apply the interpreter's NumPy >= 2.4 fix at their first launch; tests that call the kernels'
# launchers directly (fastscore.kernels.*) bypass the ops, so it is applied here too (a no-op elsewhere)
patch_triton_interpreter()

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
#: the Triton path runs (compiled on CUDA, interpreted on CPU)
TRITON_RUNS = HAS_CUDA or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device")
    skip_cpu = pytest.mark.skip(reason="cpu_only: meaningful on a machine without CUDA only")
    for item in items:
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("cpu_only") and HAS_CUDA:
            item.add_marker(skip_cpu)


@pytest.fixture
def device() -> torch.device:
    """Where the Triton path runs: CUDA when present, else CPU under the interpreter."""
    return DEVICE


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed so a failure can be replayed (FASTSCORE_TEST_SEED overrides)."""
    s = int(os.environ.get("FASTSCORE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] {request.node.nodeid}: FASTSCORE_TEST_SEED={s}")
    torch.manual_seed(s)
    return s


@pytest.fixture
def free_port() -> int:
    """A TCP port free on localhost right now (for a torch.distributed rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
