"""Top-1 attention kernels (``fastscore.kernels.top1``) against the float64 torch reference.

Kernels run in Triton's interpreter on CPU (conftest sets ``TRITON_INTERPRET=1``); every random
input is drawn after the printed ``seed`` fixture. Hard argmax decisions are compared on rows
whose top-2 score gap is safely above float32 rounding; every row must pick a (near-)maximal key.
The interpreter's NumPy >= 2.4 fix: these tests call the launchers directly, so conftest applies it.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from conftest import DEVICE, TRITON_RUNS, requires_cuda
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastscore.kernels import top1 as K
from fastscore.kernels._common import FP32_DOT_PRECISION, HALF_DOT_PRECISION
from fastscore.ops.top1 import _Top1Reference, gumbel_noise, top1_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _inputs(b, n, d, dv=None, dtype=torch.float32):
    dv = d if dv is None else dv
    q = torch.randn(b, n, d, device=DEVICE).to(dtype)
    k = torch.randn(b, n, d, device=DEVICE).to(dtype)
    v = torch.randn(b, n, dv, device=DEVICE).to(dtype)
    do = torch.randn(b, n, dv, device=DEVICE).to(dtype)
    return q, k, v, do


def _reference(q, k, v, do, temperature, gumbel, seed, acc=torch.float64):
    """Reference (out, idx, dq, dk, dv) computed in ``acc`` from the given inputs."""
    qr, kr, vr = (x.detach().to(acc).requires_grad_() for x in (q, k, v))
    out, idx, _ = _Top1Reference.apply(qr, kr, vr, temperature, gumbel, seed)
    out.backward(do.to(acc))
    return out.detach(), idx, qr.grad, kr.grad, vr.grad


def _scores64(q, k, gumbel, seed):
    s = q.double() @ k.double().transpose(-1, -2)
    if gumbel:
        s = s + gumbel_noise(seed, q.shape[0], q.shape[1], k.shape[1], q.device).double()
    return s


def _check_argmax(idx, q, k, v, out, gumbel, seed, tol=1e-4):
    """idx is exact on rows with a safe top-2 gap, near-maximal everywhere; out = v[idx]."""
    s = _scores64(q, k, gumbel, seed)
    ref_idx = s.argmax(-1)
    top = s.topk(min(2, s.shape[-1]), dim=-1).values
    scale = 1.0 + s.abs().amax(-1)
    safe = (top[..., 0] - top[..., -1] > tol * scale) if s.shape[-1] > 1 else torch.ones_like(ref_idx, dtype=torch.bool)
    assert idx.dtype == torch.int64 and ((idx >= 0) & (idx < k.shape[1])).all()
    assert torch.equal(idx[safe], ref_idx[safe]), "argmax differs on rows with a safe top-2 gap"
    picked = s.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert (top[..., 0] - picked <= tol * scale).all(), "picked key is not (near-)maximal"
    assert torch.equal(out, torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1])))
    return safe


def _assert_close_rule(name, got, ref64, ref32, mag, rel=1e-6):
    """flash-attention's rule, |kernel - fp64| <= 2 max|torch fp32 - fp64|, plus a slack of ``rel``
    times ``mag``: the same sum over absolute values of its terms (fp32 rounding of cancelling
    terms, e.g. dP - Delta at N = 1, is relative to them, not to the result)."""
    err = (got.double() - ref64).abs()
    base = (ref32.double() - ref64).abs().max().item()
    bad = err > 2 * base + rel * mag
    assert not bad.any(), (f"{name}: kernel err {err.max().item():.3e} vs 2 * torch-fp32 err {base:.3e} + "
                           f"{rel:.0e} * magnitude {mag.max().item():.3e} at {bad.nonzero()[:3].tolist()}")
    return err.max().item()


def _magnitudes(q, k, v, do, temperature, gumbel, seed, idx):
    """Sums of absolute terms of dq, dk, dv (float64), for the rounding slack. Each probability carries
    the relative rounding of its exponent (exp of an fp32 argument x is off by |x| eps relative), and that
    argument's own rounding is relative to the magnitudes it is computed from, not to their difference:
    the score's |q|.|k| (plus the Gumbel noise's |g|) over T, and the shift lse. So the terms are weighted
    by 1 + (|q|.|k| + |g|) / T + |lse| (the kernels scale the scores by log2(e) / T before exp2, a rounding
    relative to |s| / T that a reference dividing by T = 0.25 exactly does not make: seen as a 16-eps dk
    error at T = 0.25, d = 18)."""
    s = _scores64(q, k, gumbel, seed)
    p = torch.softmax(s / temperature, dim=-1)
    qk = q.double() @ k.double().transpose(-1, -2)
    size = q.double().abs() @ k.double().abs().transpose(-1, -2) + (s - qk).abs()
    lse = torch.logsumexp(s / temperature, dim=-1, keepdim=True)
    expo = 1 + size / temperature + lse.abs()
    dp = do.double().abs() @ v.double().abs().transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)
    a = p * expo * (dp + delta) / temperature
    mag_dv = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
    mag_dv.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]), do.double().abs())
    return a @ k.double().abs(), a.transpose(-1, -2) @ q.double().abs(), mag_dv


def _run_kernels_poisoned(q, k, v, do, temperature, gumbel, seed):
    b, n, _ = q.shape
    out = torch.full_like(v, float("nan"))
    idx = torch.full((b, n), -1, dtype=torch.int64, device=q.device)
    K.top1_forward(q, k, v, gumbel, seed, out=out, idx=idx)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    K.top1_backward(do, q, k, v, idx, temperature, gumbel, seed, dq=dq, dk=dk, dv=dv)
    return out, idx, dq, dk, dv


def _check_all(q, k, v, do, temperature, gumbel, seed):
    out, idx, dq, dk, dv = _run_kernels_poisoned(q, k, v, do, temperature, gumbel, seed)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not x.isnan().any(), f"{name} has unwritten (NaN) elements"
    _check_argmax(idx, q, k, v, out, gumbel, seed)
    _, _, dq64, dk64, _ = _reference(q, k, v, do, temperature, gumbel, seed)
    _, _, dq32, dk32, _ = _reference(q, k, v, do, temperature, gumbel, seed, acc=torch.float32)
    # hard dv against the kernel's own index map (a near-tie flip moves a row, not an error)
    dv64 = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
    dv64.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]), do.double())
    dv32 = torch.zeros_like(v).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]), do)
    mq, mk, mv = _magnitudes(q, k, v, do, temperature, gumbel, seed, idx)
    return {"dq": _assert_close_rule("dq", dq, dq64, dq32, mq), "dk": _assert_close_rule("dk", dk, dk64, dk32, mk),
            "dv": _assert_close_rule("dv", dv, dv64, dv32, mv)}


@pytest.mark.parametrize("temperature", [0.25, 1.0])
def test_the_closeness_rule_rejects_a_gradient_missing_one_term(temperature, seed):
    """The slack of ``_assert_close_rule`` (with ``_magnitudes``) is rounding-sized: dq or dk with the
    largest term of the sum left out fails it, at the study's shape (fresh inputs per run)."""
    torch.manual_seed(seed)
    q, k, v, do = _inputs(2, 64, 16)
    out, idx, dq64, dk64, dv64 = _reference(q, k, v, do, temperature, True, seed)
    _, _, dq32, dk32, dv32 = _reference(q, k, v, do, temperature, True, seed, acc=torch.float32)
    mq, mk, mv = _magnitudes(q, k, v, do, temperature, True, seed, idx)
    _assert_close_rule("dk", dk32, dk64, dk32, mk)      # the fp32 reference itself passes
    s = _scores64(q, k, True, seed)
    p = torch.softmax(s / temperature, dim=-1)
    dp = do.double() @ v.double().transpose(-1, -2)
    ds = (p * (dp - (p * dp).sum(-1, keepdim=True)) / temperature)[0]   # the surrogate's dS of image 0
    i, j = divmod(int(ds.abs().argmax()), ds.shape[1])                     # its largest term
    wrong_dk = dk64.clone()
    wrong_dk[0, j] -= ds[i, j] * q.double()[0, i]          # key j without query i's term
    with pytest.raises(AssertionError, match="dk: kernel err"):
        _assert_close_rule("dk", wrong_dk, dk64, dk32, mk)
    wrong_dq = dq64.clone()
    wrong_dq[0, i] -= ds[i, j] * k.double()[0, j]          # query i without key j's term
    with pytest.raises(AssertionError, match="dq: kernel err"):
        _assert_close_rule("dq", wrong_dq, dq64, dq32, mq)


# ------------------------------------------------------------------------------------------------
# forward + backward against the reference
# ------------------------------------------------------------------------------------------------
_NS, _DS = (1, 7, 64, 100, 256), (3, 8, 16, 24, 64)
# every N x D pair once, B and Gumbel alternating; N = 256 (the interpreter's slowest, Gumbel noise
# above all) runs at B = 1 with Gumbel on one D only, B = 3 and Gumbel being covered at smaller N
_CASES = [(n, d, 1 if n == 256 else (1, 3)[(i + j) % 2], (j == 0) if n == 256 else bool((i + j // 2) % 2))
          for i, n in enumerate(_NS) for j, d in enumerate(_DS)]


@pytest.mark.interpret
@pytest.mark.parametrize("n,d,b,gumbel", _CASES, ids=[f"N{n}-D{d}-B{b}-{'gumbel' if g else 'plain'}"
                                                      for n, d, b, g in _CASES])
def test_matches_reference(n, d, b, gumbel, seed):
    q, k, v, do = _inputs(b, n, d)
    temperature = 0.5 + (seed % 7) / 4
    _check_all(q, k, v, do, temperature, gumbel, seed)


def test_case_grid_covers_batch_and_gumbel():
    assert {(b, g) for _, _, b, g in _CASES} == {(1, False), (1, True), (3, False), (3, True)}


@pytest.mark.interpret
def test_gumbel_noise_bit_exact_argmax(seed):
    """q = k = 0: scores are the noise alone, so the argmax is the reference noise's argmax."""
    b, n, d = 2, 100, 4
    q = torch.zeros(b, n, d, device=DEVICE)
    v = torch.randn(b, n, d, device=DEVICE)
    out, idx = K.top1_forward(q, q.clone(), v, True, seed)
    g = gumbel_noise(seed, b, n, n, q.device)
    top2 = g.topk(2, dim=-1).values
    safe = top2[..., 0] - top2[..., 1] > 1e-5
    assert safe.float().mean() > 0.9
    assert torch.equal(idx[safe], g.argmax(-1)[safe])
    # and the noise changes with the seed and is off without gumbel
    _, idx2 = K.top1_forward(q, q.clone(), v, True, seed + 1)
    assert not torch.equal(idx, idx2)
    _, idx0 = K.top1_forward(q, q.clone(), v, False, seed)
    assert (idx0 == 0).all()  # all scores tie at 0: lowest j


@pytest.mark.interpret
def test_unequal_value_width(seed):
    q, k, _, _ = _inputs(2, 33, 5)
    v = torch.randn(2, 33, 19, device=DEVICE)
    do = torch.randn(2, 33, 19, device=DEVICE)
    _check_all(q, k, v, do, 1.3, True, seed)


@pytest.mark.interpret
def test_strided_inputs(seed):
    b, n, d = 3, 70, 12
    q = torch.randn(n, b, d, device=DEVICE).transpose(0, 1)            # batch stride d, token stride b*d
    k = torch.randn(b, n, 2 * d, device=DEVICE)[..., ::2]              # feature stride 2
    v = torch.randn(b, 2 * n, d, device=DEVICE)[:, 1::2]               # token stride 2d
    do = torch.randn(b, d, n, device=DEVICE).transpose(1, 2)           # feature stride n
    assert not any(x.is_contiguous() for x in (q, k, v, do))
    got = _run_kernels_poisoned(q, k, v, do, 0.8, True, seed)
    want = _run_kernels_poisoned(*(x.contiguous() for x in (q, k, v, do)), 0.8, True, seed)
    for name, g, w in zip(("out", "idx", "dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), f"{name} depends on the input strides"
    _check_all(q, k, v, do, 0.8, True, seed)
    # strided outputs are written in place
    out = torch.full((b, d, n), float("nan"), device=DEVICE).transpose(1, 2)
    K.top1_forward(q, k, v, True, seed, out=out)
    assert torch.equal(out, want[0])


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``x`` (B, N, D) in other memory layouts."""
    b, n, d = x.shape
    off = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(b, n, d)  # data 4 bytes off 16
    wide = torch.empty(b, n, 2 * d, dtype=x.dtype, device=x.device)[..., ::2]
    return {"contiguous": x, "token-major": x.transpose(0, 1).contiguous().transpose(0, 1),
            "feature-major": x.transpose(1, 2).contiguous().transpose(1, 2),
            "feature stride 2": wide.copy_(x), "misaligned": off.copy_(x)}


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32])
def test_results_do_not_depend_on_the_layout(seed, dtype):
    """out, idx, dq, dk, dv are bitwise equal for contiguous, permuted, feature-strided and misaligned
    inputs and outputs. Under the interpreter this catches stride dependence in what the launchers do
    (the interpreter runs one code path for every layout); the GPU cause (a compiled variant per layout,
    with its own reduction order) is excluded by ``test_kernels_see_one_layout_per_shape``, and on a GPU
    this test checks it directly."""
    q, k, v, do = _inputs(2, 37, 12, 9, dtype=dtype)
    k[:, :2] *= 3.0  # collisions in dv
    want = _run_kernels_poisoned(q, k, v, do, 0.8, True, seed)
    for name in _layouts(q):
        xs = [_layouts(x)[name] for x in (q, k, v, do)]
        got = _run_kernels_poisoned(*xs, 0.8, True, seed)
        for what, g, w in zip(("out", "idx", "dq", "dk", "dv"), got, want):
            assert torch.equal(g, w), f"{what} differs for {name} inputs"
        outs = [_layouts(torch.full_like(x, float("nan")))[name] for x in (v, q, k, v)]
        idx = torch.full((2, 37), -1, dtype=torch.int64, device=q.device)
        K.top1_forward(*xs[:3], True, seed, out=outs[0], idx=idx)
        K.top1_backward(xs[3], *xs[:3], idx, 0.8, True, seed, dq=outs[1], dk=outs[2], dv=outs[3])
        for what, g, w in zip(("out", "dq", "dk", "dv"), outs, (want[0], *want[2:])):
            assert torch.equal(g, w), f"{what} differs when written to a {name} output"


def test_kernels_see_one_layout_per_shape(monkeypatch):
    """Whatever the caller's layout, every tensor reaches the kernels contiguous with 16-byte aligned
    data, and every integer argument equals that of the contiguous call: on a GPU each shape runs one
    compiled variant (integers are not specialised, see kernels/_common.py), so one reduction order.
    This is the CPU-side check of the stride dependence seen on an H100 (FINDINGS.md cause 3)."""
    log: list = []

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kw):
                log.append((self.name, grid, tuple(
                    ("tensor", tuple(a.shape), a.stride(), a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor)
                    else a for a in args), tuple(sorted(kw.items()))))
            return launch

    for attr in ("_top1_fwd_kernel", "_top1_bwd_preprocess_kernel", "_top1_bwd_dq_kernel", "_top1_bwd_dk_kernel",
                 "_top1_bwd_dv_kernel"):
        monkeypatch.setattr(K, attr, Spy(attr))
    q, k, v, do = (torch.randn(2, 19, d) for d in (12, 12, 9, 9))
    runs = {}
    for name in _layouts(q):
        log.clear()
        xs = [_layouts(x)[name] for x in (q, k, v, do)]
        outs = [_layouts(torch.empty_like(x))[name] for x in (v, q, k, v)]
        K.top1_forward(*xs[:3], True, 3, out=outs[0])
        K.top1_backward(xs[3], *xs[:3], torch.zeros(2, 19, dtype=torch.int64), 0.8, True, 3,
                        dq=outs[1], dk=outs[2], dv=outs[3])
        runs[name] = list(log)
        for kernel, _, args, _ in log:
            for a in args:
                if isinstance(a, tuple) and a[0] == "tensor":
                    assert a[4] == 0, f"{kernel}: unaligned tensor argument with {name} inputs"
    for name, run in runs.items():
        assert run == runs["contiguous"], f"{name} inputs launch other kernel arguments than contiguous ones"


@pytest.mark.interpret
def test_ties_take_lowest_index(seed):
    """Integer-valued inputs give exact float32 scores with many ties, across key blocks too."""
    b, n, d = 3, 150, 3
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (b, n, d), generator=gen).float().to(DEVICE)
    k = torch.randint(-1, 2, (b, n, d), generator=gen).float().to(DEVICE)
    k[:, 130] = k[:, 3] = torch.tensor([5.0, 5.0, 5.0])  # duplicated best key in two blocks
    q[:, :10] = 1.0
    v = torch.randn(b, n, 4, device=DEVICE)
    out, idx = K.top1_forward(q, k, v)
    s = q.double() @ k.double().transpose(-1, -2)
    ref = torch.tensor([[next(j for j in range(n) if s[bb, i, j] == s[bb, i].max()) for i in range(n)]
                        for bb in range(b)], device=DEVICE)
    assert torch.equal(idx, ref)
    assert torch.equal(idx, s.argmax(-1))
    assert (idx[:, :10] == 3).all()
    assert torch.equal(out, torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, 4)))


@pytest.mark.interpret
def test_backward_is_deterministic(seed):
    """Many queries pick the same keys (integer inputs): dv sums collide; two runs are bit-identical."""
    b, n, d = 2, 96, 16
    q = torch.randint(-1, 2, (b, n, d), device=DEVICE).float()
    k = torch.randint(-1, 2, (b, n, d), device=DEVICE).float()
    k[:, :4] *= 3.0  # a few dominant keys
    v, do = torch.randn(b, n, d, device=DEVICE), torch.randn(b, n, d, device=DEVICE)
    out, idx = K.top1_forward(q, k, v, True, seed)
    assert torch.bincount(idx.flatten(), minlength=n).max() > 10
    r1 = K.top1_backward(do, q, k, v, idx, 0.9, True, seed)
    r2 = K.top1_backward(do, q, k, v, idx, 0.9, True, seed)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)
    dv64 = torch.zeros(v.shape, dtype=torch.float64, device=DEVICE)
    dv64.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), do.double())
    assert (r1[2].double() - dv64).abs().max() < 1e-5


@pytest.mark.interpret
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 2), n=st.integers(1, 40), d=st.integers(1, 20), dv=st.integers(1, 20),
       gumbel=st.booleans(), temperature=st.floats(0.2, 3.0), data_seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(b, n, d, dv, gumbel, temperature, data_seed, seed):
    torch.manual_seed(data_seed ^ seed)
    q, k, _, _ = _inputs(b, n, d)
    v, do = torch.randn(b, n, dv, device=DEVICE), torch.randn(b, n, dv, device=DEVICE)
    _check_all(q, k, v, do, temperature, gumbel, data_seed)


# ------------------------------------------------------------------------------------------------
# the op: dispatch, autograd, torch.library, bad input, NaN
# ------------------------------------------------------------------------------------------------
@pytest.mark.interpret
def test_op_autograd_matches_reference(seed):
    q, k, v, do = _inputs(2, 50, 8)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    out, idx = top1_attention(qs, ks, vs, temperature=0.7, gumbel=True, seed=seed, backend="triton")
    out.backward(do)
    assert not idx.requires_grad
    _check_argmax(idx, q, k, v, out.detach(), True, seed)
    _, _, dq64, dk64, _ = _reference(q, k, v, do, 0.7, True, seed)
    assert torch.allclose(qs.grad.double(), dq64, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ks.grad.double(), dk64, atol=1e-4, rtol=1e-4)
    dv64 = torch.zeros(v.shape, dtype=torch.float64, device=DEVICE).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, 8),
                                                                               do.double())
    assert torch.allclose(vs.grad.double(), dv64, atol=1e-5)


@pytest.mark.interpret
def test_opcheck(seed):
    from fastscore.ops import top1 as _top1_triton
    q, k, v, do = _inputs(2, 9, 5)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.7, True, seed)
    torch.library.opcheck(_top1_triton._top1_fwd_op, args)
    out, idx = _top1_triton._top1_fwd_op(*args)
    torch.library.opcheck(_top1_triton._top1_bwd_op, (do, q.detach(), k.detach(), v.detach(), idx, 0.7, True, seed))


@pytest.mark.interpret
def test_torch_compile_traces_without_graph_breaks(seed):
    q, k, v, do = _inputs(1, 20, 6)

    def f(q, k, v):
        out, idx = top1_attention(q, k, v, temperature=0.5, gumbel=True, seed=seed, backend="triton")
        return (out * 2.0).sum(), idx

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    loss, idx = compiled(qs, ks, vs)
    loss.backward()
    qe, ke, ve = (x.clone().requires_grad_() for x in (q, k, v))
    loss_e, idx_e = f(qe, ke, ve)
    loss_e.backward()
    assert torch.equal(idx, idx_e) and torch.equal(loss, loss_e)
    for a, c in ((qs, qe), (ks, ke), (vs, ve)):
        assert torch.equal(a.grad, c.grad)


def test_bad_inputs():
    q = torch.randn(2, 5, 4)
    ok = dict(backend="triton") if INTERPRET else {}
    with pytest.raises(ValueError, match="batch"):
        top1_attention(q, torch.randn(3, 5, 4), torch.randn(2, 5, 4), **ok)
    with pytest.raises(ValueError, match="sequence"):
        top1_attention(q, torch.randn(2, 6, 4), torch.randn(2, 5, 4), **ok)
    with pytest.raises(ValueError, match="feature"):
        top1_attention(q, torch.randn(2, 5, 3), torch.randn(2, 5, 4), **ok)
    with pytest.raises(TypeError, match="dtype"):
        top1_attention(q, q.double(), q, **ok)
    with pytest.raises(TypeError, match="floating"):
        top1_attention(q.long(), q.long(), q.long(), **ok)
    with pytest.raises(ValueError, match="N >= 1"):
        top1_attention(q[:, :0], q[:, :0], q[:, :0], **ok)
    with pytest.raises(ValueError, match="D >= 1"):
        top1_attention(q[..., :0], q[..., :0], q, **ok)
    with pytest.raises(ValueError, match="temperature"):
        top1_attention(q, q, q, temperature=-1.0, **ok)
    with pytest.raises(ValueError, match="temperature"):
        top1_attention(q, q, q, temperature=0.0, **ok)
    with pytest.raises(TypeError, match="gumbel"):
        top1_attention(q, q, q, gumbel=1, **ok)
    with pytest.raises(ValueError, match="seed"):
        top1_attention(q, q, q, seed=-1, **ok)
    # the launchers check too
    with pytest.raises(TypeError, match="dtype"):
        K.top1_forward(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="D, Dv <="):
        K.top1_forward(torch.randn(1, 2, K.MAX_D + 1), torch.randn(1, 2, K.MAX_D + 1), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="temperature"):
        K.top1_backward(q, q, q, q, torch.zeros(2, 5, dtype=torch.int64), 0.0)


@pytest.mark.interpret
def test_float64_and_wide_features_raise_under_triton_and_run_the_reference_under_auto(seed):
    q, k, v, _ = (x.double() for x in _inputs(1, 6, 3))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        top1_attention(q, k, v, backend="triton")
    out, idx = top1_attention(q, k, v)  # auto: the reference
    assert out.dtype == torch.float64 and torch.equal(idx, _scores64(q, k, False, 0).argmax(-1))
    # D or Dv above max_features (64 for float32): raise, never a silent fallback
    assert K.max_features(torch.float32) == K.MAX_D_FP32 == 64 and K.max_features(torch.float16) == K.MAX_D == 128
    for d, dv in ((K.MAX_D_FP32 + 1, 8), (8, K.MAX_D + 5), (200, 200)):
        q, k, v, _ = _inputs(2, 9, d, dv)
        with pytest.raises(ValueError, match="D, Dv <="):
            top1_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="D, Dv <="):
        K.feature_block(8, K.MAX_D + 1)
    with pytest.raises(ValueError, match="D, Dv <="):
        K.top1_forward(*_inputs(1, 3, K.MAX_D_FP32 + 1)[:3])


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records the constexprs and launch options of each launch."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append((self.name, kw))
        return launch


def test_launchers_pick_only_listed_configs(monkeypatch, request):
    """Every launch the launchers make (all dtypes, every D up to MAX_D, Dv != D, Gumbel on and off)
    is a configuration of ``compile_configs()``, so the compile report covers all of them; and
    ``launch_config`` only returns listed ones."""
    kernel_names = {"_top1_fwd_kernel": "fwd", "_top1_bwd_preprocess_kernel": "bwd_preprocess",
                    "_top1_bwd_dq_kernel": "bwd_dq", "_top1_bwd_dk_kernel": "bwd_dk", "_top1_bwd_dv_kernel": "bwd_dv"}
    listed = set()
    for c in K.compile_configs():
        fn = next(k for attr, k in kernel_names.items() if c["fn"] is getattr(K, attr))
        dtype = c["signature"]["Q" if fn != "bwd_dv" else "DO"]
        listed.add((fn, dtype, tuple(sorted(c["constexprs"].items())), c["num_warps"], c["num_stages"]))
    assert len(listed) == len(K.compile_configs()), "duplicate compile configurations"
    log = []
    for attr, name in kernel_names.items():
        monkeypatch.setattr(K, attr, _Recorder(name, log))
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    seen = set()
    before = torch.get_float32_matmul_precision()
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(before))
    for precision, dtype in itertools.product(("highest", "high", "medium"), ptr):   # the fp32 policy
        torch.set_float32_matmul_precision(precision)
        top = K.max_features(dtype)
        for d, dv in [(d, d) for d in range(1, top + 1)] + [(3, 40), (top - 10, 7), (top, 1)]:
            q = torch.zeros(2, 5, d, dtype=dtype)
            v = torch.zeros(2, 5, dv, dtype=dtype)
            for gumbel in (False, True):
                log.clear()
                K.top1_forward(q, q, v, gumbel)
                K.top1_backward(v, q, q, v, torch.zeros(2, 5, dtype=torch.int64), 1.0, gumbel)
                assert [n for n, _ in log] == list(kernel_names.values())
                for name, kw in log:
                    kw = dict(kw)
                    warps, stages = kw.pop("num_warps"), kw.pop("num_stages")
                    row = (name, ptr[dtype], tuple(sorted(kw.items())), warps, stages)
                    assert row in listed, f"launch not in compile_configs(): {row}"
                    seen.add(row)
                    bm, bn, w, st = K.launch_config(name, kw["BLOCK_D"], dtype, gumbel)
                    assert (w, st) == (warps, stages)
                    assert kw["DOT_PRECISION"] == (FP32_DOT_PRECISION[precision] if dtype == torch.float32
                                                   else HALF_DOT_PRECISION)
    assert seen == listed, f"compile_configs() lists configurations no launch uses: {listed - seen}"


@pytest.mark.interpret
def test_nan_input_gives_nan_rows(seed):
    b, n, d = 2, 40, 6
    q, k, v, do = _inputs(b, n, d)
    q[0, 5, 2] = float("nan")
    out, idx = K.top1_forward(q, k, v)
    assert out[0, 5].isnan().all() and ((idx >= 0) & (idx < n)).all()
    assert not out[0, :5].isnan().any() and not out[1].isnan().any()
    assert idx[0, 5] == 0  # torch.argmax semantics: first NaN column
    dq, dk, dv = K.top1_backward(do, q, k, v, idx, 1.0)
    assert dq[0, 5].isnan().all() and not dq[1].isnan().any()
    k[1, 17, 0] = float("nan")  # a NaN key touches every query row of its batch
    out, idx = K.top1_forward(q, k, v)
    assert out[1].isnan().all() and (idx[1] == 17).all() and not out[0, 6:].isnan().any()


# ------------------------------------------------------------------------------------------------
# GPU only (the interpreter cannot run bf16 tl.dot)
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d", [(64, 16), (100, 24), (256, 64), (1024, 128), (33, 100)])
def test_gpu_dtypes(dtype, n, d, seed):
    if d > K.max_features(dtype):
        pytest.skip("wider than the kernels take for this dtype (ops route it to the reference)")
    b = 3
    q, k, v, do = _inputs(b, n, d, dtype=dtype)
    out, idx, dq, dk, dv = _run_kernels_poisoned(q, k, v, do, 0.8, True, seed)
    assert out.dtype == dtype and not out.isnan().any()
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    _check_argmax(idx, q, k, v, out, True, seed, tol=tol)
    _, _, dq64, dk64, _ = _reference(q, k, v, do, 0.8, True, seed)
    _, _, dq32, dk32, _ = _reference(q, k, v, do, 0.8, True, seed, acc=torch.float32)
    for name, g, r64, r32 in (("dq", dq, dq64, dq32), ("dk", dk, dk64, dk32)):
        err = (g.double() - r64).abs().max().item()
        base = (r32.to(dtype).double() - r64).abs().max().item()
        assert err <= 2 * base + tol * (1 + r64.abs().max().item()), name
    dv64 = torch.zeros(v.shape, dtype=torch.float64, device=DEVICE)
    dv64.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), do.double())
    assert (dv.double() - dv64).abs().max() <= tol * (1 + dv64.abs().max())


@requires_cuda
@pytest.mark.gpu
def test_gpu_backward_deterministic(seed):
    q, k, v, do = _inputs(8, 1024, 32)
    k[:, :3] *= 4
    _, idx = K.top1_forward(q, k, v)
    r1 = K.top1_backward(do, q, k, v, idx, 1.0)
    r2 = K.top1_backward(do, q, k, v, idx, 1.0)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2))
