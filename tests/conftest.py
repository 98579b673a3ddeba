"""Test set-up. Without CUDA, Triton kernels run in the interpreter: the flag must be set
before any kernel module is imported, so it is set here, at collection time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastscore.ops import patch_triton_interpreter  # noqa: E402

patch_triton_interpreter()   # the interpreter's NumPy >= 2.4 workaround (a no-op elsewhere)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed so a failure can be replayed (FASTSCORE_TEST_SEED overrides)."""
    s = int(os.environ.get("FASTSCORE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] {request.node.nodeid}: FASTSCORE_TEST_SEED={s}")
    torch.manual_seed(s)
    return s
