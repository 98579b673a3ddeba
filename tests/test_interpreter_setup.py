"""Kernels run on a CPU without ceremony: under ``TRITON_INTERPRET=1`` the ops apply the interpreter's
fix themselves at their first launch (never on import), also when the variable was set after
fastscore was imported. Triton reads it when ``@triton.jit`` runs (its own library's functions at
``import triton``), not at launch: set after triton was imported, the first launch says so.

Each case runs in a fresh interpreter, so nothing this process set up (conftest) helps it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastscore.ops import _dispatch

pytestmark = [pytest.mark.interpret, pytest.mark.cpu_only,
              pytest.mark.skipif(not _dispatch.triton_available(), reason="needs the triton package")]

# with argv[1] == "late": imports fastscore (the models, sampling, ops) first and sets TRITON_INTERPRET=1
# only then; checks forward and backward of every op against the reference; prints what it found
_CODE = r"""
import os, sys
import torch
import fastscore.ops as o
import fastscore.models, fastscore.sampling, fastscore.training
if sys.argv[1] == "late":
    assert "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
from triton.runtime import interpreter as interp
print("patched_on_import", getattr(interp, "_fastscore_index_patch", False))
g = torch.Generator().manual_seed(int(sys.argv[2]))
q, k, v = (torch.randn(2, 19, 5, generator=g, requires_grad=True) for _ in range(3))
out = o.softmax_attention(q, k, v, 0.7, backend="triton")
ref = o.softmax_attention_reference(*(t.double() for t in (q, k, v)), 0.7)
do = torch.randn(out.shape, generator=g)
grads = torch.autograd.grad(out, (q, k, v), do)
ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
err = max((a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))
print("softmax_err", err)
o1, i1 = o.top1_attention(q.detach(), k.detach(), v.detach(), backend="triton")
o2, i2 = o.top1_attention_reference(q.detach().double(), k.detach().double(), v.detach().double())
print("top1_same_index", bool(torch.equal(i1, i2)))
x, e = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
c = o.ddim_coefficients(0.5, 0.7, 0.0)
a = o.reverse_step(x, e, c, seed=5, step=2, backend="triton")
b = o.reverse_step_reference(x, e, c, seed=5, step=2)
print("reverse_err", (a.double() - b).abs().max().item())
print("patched_after_launch", getattr(interp, "_fastscore_index_patch", False))
"""


def _run(code: str, *args: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("when", ["before", "late"])
def test_the_ops_set_up_the_interpreter_at_their_first_launch(seed, when):
    """``before``: TRITON_INTERPRET=1 set before Python starts; ``late``: set after fastscore's modules
    were imported (none of them imports triton)."""
    r = _run(_CODE, when, str(seed), interpret=when == "before")
    assert r.returncode == 0, r.stderr
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert got["patched_on_import"] == "False"   # importing changes nothing in Triton
    assert got["patched_after_launch"] == str(_dispatch._interpreter_needs_patch())
    assert float(got["softmax_err"]) < 1e-4 and float(got["reverse_err"]) < 1e-5
    assert got["top1_same_index"] == "True"


def test_setting_the_variable_after_triton_was_imported_is_a_clear_error():
    code = ("import os, torch, triton, fastscore.ops as o; os.environ['TRITON_INTERPRET'] = '1'; "
            "x = torch.randn(1, 4, 4); o.softmax_attention(x, x, x, backend='triton')")
    r = _run(code, interpret=False)
    assert r.returncode == 1 and "RuntimeError: TRITON_INTERPRET=1 was set after triton was imported" in r.stderr
