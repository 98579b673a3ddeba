"""Softmax-attention Triton kernels against a float64 reference (interpreter on CPU, float32).

Tolerance (flash-attention's rule): the kernel's error against the float64 reference is at most
twice the error of the same computation done by torch in float32, plus a small absolute floor.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, requires_cuda

from fastscore.kernels import attention as K
from fastscore.ops import attention as T  # noqa: F401  (registers the custom ops)
from fastscore.ops.attention import identity_attention, softmax_attention, softmax_attention_reference

DEV = DEVICE
interpret = pytest.mark.interpret


def _nan_like(x: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return torch.full(shape or x.shape, float("nan"), device=x.device, dtype=dtype or x.dtype)


def _reference(q, k, v, do, scale):
    """float64 and float32 torch results: (out, lse, dq, dk, dv) each."""
    res = {}
    for dt in (torch.float64, torch.float32):
        qq, kk, vv = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
        o = softmax_attention_reference(qq, kk, vv, scale)
        lse = torch.logsumexp(scale * qq @ kk.transpose(1, 2), -1)
        dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), do.to(dt))
        res[dt] = (o.detach(), lse.detach(), dq, dk, dv)
    return res[torch.float64], res[torch.float32]


def _check(name: str, got: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, floor: float = 2e-6,
           magnitude: float = 0.0):
    """flash-attention's rule: error vs float64 <= ratio x torch-fp32's error (+ a small floor). ratio = 2,
    except for the identity gradient dz = dq + dk + dv, which sums three paths in another order (the
    fused kernel shares one matmul between dq and dk): ratio 4 and a floor of 1e-5 relative to the largest
    reference value there (hypothesis found 1.3e-5 absolute, ~3e-6 relative, where torch's error was 1e-6).
    Plus 1e-6 (~8 fp32 ulps) times ``magnitude``, the size of the terms that cancel in the result: dq = scale
    P (dP - Delta) k is exactly 0 for one key in torch's softmax backward, while the kernel's dP and Delta round
    apart by an ulp of do.v (hypothesis found 2.1e-6 at magnitude ~8, i.e. 2.6e-7 relative)."""
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output (unwritten element?)"
    err = (got.double() - ref64).abs().max().item()
    err_torch = (ref32.double() - ref64).abs().max().item()
    ratio, floor = (4.0, max(floor, 1e-5)) if name.endswith("dz") else (2.0, floor)
    bound = ratio * err_torch + floor * max(1.0, ref64.abs().max().item()) + 1e-6 * magnitude
    assert err <= bound, f"{name}: kernel error {err:.3e} > bound {bound:.3e} (torch fp32 error {err_torch:.3e})"


def _inputs(B, N, D, DV=None, dtype=torch.float32, NK=None):
    DV = D if DV is None else DV
    NK = N if NK is None else NK
    q = torch.randn(B, N, D, device=DEV, dtype=dtype)
    k = torch.randn(B, NK, D, device=DEV, dtype=dtype)
    v = torch.randn(B, NK, DV, device=DEV, dtype=dtype)
    do = torch.randn(B, N, DV, device=DEV, dtype=dtype)
    return q, k, v, do


# The full grid N in {1, 7, 64, 100, 256} x D in {3, 8, 16, 24, 64} x B in {1, 3}, plus Dv != D.
SHAPES = [(B, N, D, D) for B in (1, 3) for N in (1, 7, 64, 100, 256) for D in (3, 8, 16, 24, 64)]
SHAPES += [(1, 100, 8, 3), (3, 7, 24, 40)]
# N = 256 in the interpreter takes 5-50 s a shape: the slow tier (``pytest -m slow``)
SHAPES = [pytest.param(*s, marks=pytest.mark.slow) if s[1] == 256 else s for s in SHAPES]


@interpret
@pytest.mark.parametrize("B,N,D,DV", SHAPES)
def test_forward_backward_vs_fp64(seed, B, N, D, DV):
    q, k, v, do = _inputs(B, N, D, DV)
    scale = D ** -0.5
    (o64, lse64, dq64, dk64, dv64), (o32, lse32, dq32, dk32, dv32) = _reference(q, k, v, do, scale)
    out, lse = K.attention_forward(q, k, v, scale, out=_nan_like(v, (B, N, DV)),
                                   lse=_nan_like(q, (B, N), torch.float32))
    _check("out", out, o64, o32)
    _check("lse", lse, lse64, lse32)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, scale,
                                      dq=_nan_like(q), dk=_nan_like(k), dv=_nan_like(v))
    dpv = scale * do.abs().amax().item() * v.abs().amax().item()   # the size of scale * dP (as the property test)
    _check("dq", dq, dq64, dq32, magnitude=dpv * k.abs().amax().item())
    _check("dk", dk, dk64, dk32, magnitude=dpv * q.abs().amax().item())
    _check("dv", dv, dv64, dv32)


@interpret
def test_different_query_and_key_lengths(seed):
    q, k, v, do = _inputs(2, 20, 8, 5, NK=37)
    (o64, _, dq64, dk64, dv64), (o32, _, dq32, dk32, dv32) = _reference(q, k, v, do, 0.4)
    out, lse = K.attention_forward(q, k, v, 0.4)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, 0.4)
    for name, a, r64, r32 in (("out", out, o64, o32), ("dq", dq, dq64, dq32), ("dk", dk, dk64, dk32),
                              ("dv", dv, dv64, dv32)):
        _check(name, a, r64, r32)


@interpret
@pytest.mark.parametrize("B,N,D", [(1, 1, 3), (3, 7, 8), (1, 64, 16), (3, 100, 24), (1, 256, 64), (2, 20, 100)])
def test_identity_vs_fp64(seed, B, N, D):
    z = torch.randn(B, N, D, device=DEV)
    do = torch.randn(B, N, D, device=DEV)
    scale = D ** -0.5
    ref = {}
    for dt in (torch.float64, torch.float32):
        zz = z.to(dt).requires_grad_()
        o = softmax_attention_reference(zz, zz, zz, scale)
        (dz,) = torch.autograd.grad(o, (zz,), do.to(dt))
        ref[dt] = (o.detach(), dz)
    out, lse = K.identity_forward(z, scale, out=_nan_like(z), lse=_nan_like(z, (B, N), torch.float32))
    _check("identity out", out, ref[torch.float64][0], ref[torch.float32][0])
    dz = K.identity_backward(z, out, lse, do, scale, dz=_nan_like(z))
    _check("identity dz", dz, ref[torch.float64][1], ref[torch.float32][1])


@interpret
@pytest.mark.parametrize("spp", [2, 3])
def test_several_sequences_per_program(seed, monkeypatch, spp):
    """Force the multi-sequence path (and a ragged last group: B = 5) on a small batch."""
    monkeypatch.setattr(K, "_seqs_per_program", lambda b, *a: spp)
    q, k, v, do = _inputs(5, 7, 8)
    (o64, _, dq64, dk64, dv64), (o32, _, dq32, dk32, dv32) = _reference(q, k, v, do, 0.5)
    out, lse = K.attention_forward(q, k, v, 0.5, out=_nan_like(q))
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, 0.5)
    _check("out", out, o64, o32)
    _check("dq", dq, dq64, dq32)
    _check("dk", dk, dk64, dk32)
    _check("dv", dv, dv64, dv32)
    dz = K.identity_backward(q, *K.identity_forward(q, 0.5), do, 0.5, dz=_nan_like(q))
    assert not torch.isnan(dz).any()


def _strided(x: torch.Tensor, kind: str) -> torch.Tensor:
    B, N, D = x.shape
    if kind == "slice":  # (B, N, 3D)[..., D:2D]: a fused qkv projection
        big = torch.randn(B, N, 3 * D, device=x.device, dtype=x.dtype)
        big[..., D:2 * D] = x
        return big[..., D:2 * D]
    if kind == "seq_major":  # stored (N, B, D)
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "feature_stride":  # stride 2 along D: copied by the launcher
        big = torch.randn(B, N, 2 * D, device=x.device, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(kind)


@interpret
@pytest.mark.parametrize("kind", ["slice", "seq_major", "feature_stride"])
def test_strided_inputs(seed, kind):
    q, k, v, do = _inputs(3, 37, 12)
    qs, ks, vs, dos = (_strided(x, kind) for x in (q, k, v, do))
    assert not qs.is_contiguous()
    (o64, _, dq64, dk64, dv64), (o32, _, dq32, dk32, dv32) = _reference(q, k, v, do, 0.3)
    out, lse = K.attention_forward(qs, ks, vs, 0.3)
    dq, dk, dv = K.attention_backward(qs, ks, vs, out, lse, dos, 0.3)
    _check("out", out, o64, o32)
    _check("dq", dq, dq64, dq32)
    _check("dk", dk, dk64, dk32)
    _check("dv", dv, dv64, dv32)
    zs = _strided(q, kind)
    oz, lz = K.identity_forward(zs, 0.3)
    ref = softmax_attention_reference(q.double(), q.double(), q.double(), 0.3)
    ref32 = softmax_attention_reference(q, q, q, 0.3)
    _check("identity out", oz, ref, ref32)


@interpret
def test_public_api_autograd(seed):
    """Through fastscore.ops with backend='triton': autograd graph, gradients for q, k, v and z."""
    q, k, v, do = _inputs(2, 30, 16)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    softmax_attention(q64, k64, v64, backend="torch").backward(do.double())
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = softmax_attention(qt, kt, vt, backend="triton")
    out.backward(do)
    (o64, _, dq64, dk64, dv64), (o32, _, dq32, dk32, dv32) = _reference(q, k, v, do, 16 ** -0.5)
    _check("out", out.detach(), o64, o32)
    _check("dq", qt.grad, dq64, dq32)
    _check("dk", kt.grad, dk64, dk32)
    _check("dv", vt.grad, dv64, dv32)
    z = q.clone().requires_grad_()
    identity_attention(z, backend="triton").backward(do)
    z64 = q.double().requires_grad_()
    identity_attention(z64, backend="torch").backward(do.double())
    z32 = q.clone().requires_grad_()
    identity_attention(z32, backend="torch").backward(do)
    _check("identity dz", z.grad, z64.grad, z32.grad)


@interpret
def test_nan_input_gives_nan_rows(seed):
    q, k, v, _ = _inputs(2, 20, 8)
    q[0, 3] = float("nan")
    out, lse = K.attention_forward(q, k, v, 0.5)
    assert torch.isnan(out[0, 3]).all() and torch.isnan(lse[0, 3])
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEV)
    mask[0, 3] = False
    assert torch.isfinite(out[mask]).all()
    k[1, 5] = float("nan")  # a NaN key touches every query row of its sequence
    out, _ = K.attention_forward(q, k, v, 0.5)
    assert torch.isnan(out[1]).all()
    z = torch.randn(1, 9, 4, device=DEV)
    z[0, 2, 1] = float("nan")
    oz, _ = K.identity_forward(z, 0.5)
    assert torch.isnan(oz).all()


@pytest.mark.parametrize("bad,exc,word", [
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "batch"),
    (lambda q, k, v: (q, k[:, :, :3], v), ValueError, "D"),
    (lambda q, k, v: (q, k, v[:, :5]), ValueError, "sequence"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "k"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "q"),
    (lambda q, k, v: (q[:, :0], k, v), ValueError, "N"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "D"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float32"),  # triton path only
    (lambda q, k, v: (torch.randn(1, 4, 300, device=v.device), torch.randn(1, 4, 300, device=v.device), v[:1, :4]),
     ValueError, "D"),
])
def test_bad_input_raises_before_launch(monkeypatch, bad, exc, word):
    def boom(*a, **kw):
        raise AssertionError("kernel launched")
    monkeypatch.setattr(K, "attention_forward", boom)
    monkeypatch.setattr(K, "identity_forward", boom)
    q, k, v, _ = _inputs(2, 8, 4)
    args = bad(q, k, v)
    with pytest.raises(exc, match=word):
        softmax_attention(*args, backend="triton")


def test_bad_scale_and_identity_input():
    with pytest.raises(ValueError, match="scale"):
        softmax_attention(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4), math.inf,
                          backend="triton")
    with pytest.raises(TypeError, match="z|q"):
        identity_attention(torch.ones(1, 3, 4, dtype=torch.int32), backend="triton")


@interpret
def test_opcheck():
    args = [torch.randn(2, 9, 8, device=DEV, requires_grad=True), torch.randn(2, 9, 8, device=DEV, requires_grad=True),
            torch.randn(2, 9, 5, device=DEV, requires_grad=True), 0.3]
    torch.library.opcheck(torch.ops.fastscore.attention_fwd.default, args)
    torch.library.opcheck(torch.ops.fastscore.identity_attention_fwd.default,
                          [torch.randn(2, 9, 8, device=DEV, requires_grad=True), 0.3])


@interpret
def test_torch_compile_fullgraph(seed):
    """A small module using both ops traces without graph breaks (aot_eager: no C++ compiler)."""
    lin = torch.nn.Linear(8, 24).to(DEV)
    x = torch.randn(2, 10, 8, device=DEV)

    def f(x):
        q, k, v = lin(x).chunk(3, dim=-1)
        return (softmax_attention(q, k, v, backend="triton") + identity_attention(x, backend="triton")).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(lin.parameters()))
    ref = f(x)
    ref_grads = torch.autograd.grad(ref, list(lin.parameters()))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@interpret
def test_lse_and_no_quadratic_buffer(seed, monkeypatch):
    """Every tensor the launchers allocate is O(B N D): none has N*N elements."""
    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t
    monkeypatch.setattr(torch, "empty", spy)
    B, N, D = 1, 100, 4
    q, k, v, do = _inputs(B, N, D)
    out, lse = K.attention_forward(q, k, v, 0.5)
    K.attention_backward(q, k, v, out, lse, do, 0.5)
    K.identity_backward(q, *K.identity_forward(q, 0.5), do, 0.5)
    assert sizes and max(sizes) <= B * N * K._round_up(D, K.ALIGN)  # ragged D is padded to ALIGN


try:
    from hypothesis import example, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @interpret
    @pytest.mark.slow   # 8 random shapes through forward and backward in the interpreter: minutes
    @settings(max_examples=8, deadline=None)
    @given(B=st.integers(1, 3), N=st.integers(1, 40), NK=st.integers(1, 40), D=st.integers(1, 20),
           DV=st.integers(1, 20), scale=st.floats(0.05, 2.0), identity=st.booleans(),
           s=st.integers(0, 2**31 - 1))
    @example(B=1, N=1, NK=1, D=2, DV=12, scale=2.0, identity=False, s=0)  # one key: torch's dq is exactly 0
    def test_property_random_shapes(B, N, NK, D, DV, scale, identity, s):
        torch.manual_seed(s)
        if identity:
            z = torch.randn(B, N, D, device=DEV)
            do = torch.randn(B, N, D, device=DEV)
            out, lse = K.identity_forward(z, scale, out=_nan_like(z))
            dz = K.identity_backward(z, out, lse, do, scale, dz=_nan_like(z))
            z64 = z.double().requires_grad_()
            o64 = softmax_attention_reference(z64, z64, z64, scale)
            (g64,) = torch.autograd.grad(o64, (z64,), do.double())
            z32 = z.clone().requires_grad_()
            o32 = softmax_attention_reference(z32, z32, z32, scale)
            (g32,) = torch.autograd.grad(o32, (z32,), do)
            _check("identity out", out, o64.detach(), o32.detach())
            _check("identity dz", dz, g64, g32)
            return
        q, k, v, do = _inputs(B, N, D, DV, NK=NK)
        (o64, lse64, dq64, dk64, dv64), (o32, lse32, dq32, dk32, dv32) = _reference(q, k, v, do, scale)
        out, lse = K.attention_forward(q, k, v, scale, out=_nan_like(v, (B, N, DV)))
        dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, scale,
                                          dq=_nan_like(q), dk=_nan_like(k), dv=_nan_like(v))
        dpv = scale * do.abs().amax().item() * v.abs().amax().item()   # the size of scale * dP
        mags = {"dq": dpv * k.abs().amax().item(), "dk": dpv * q.abs().amax().item()}
        for name, a, r64, r32 in (("out", out, o64, o32), ("lse", lse, lse64, lse32), ("dq", dq, dq64, dq32),
                                  ("dk", dk, dk64, dk32), ("dv", dv, dv64, dv32)):
            _check(name, a, r64, r32, magnitude=mags.get(name, 0.0))


# ------------------------------------------------------------------------------------------------
# launch configurations: the launchers only pick what compile_configs() lists (and the report compiles)
# ------------------------------------------------------------------------------------------------
_KERNEL_ATTRS = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel", "_identity_bwd_kernel")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kw)`` records the launch instead of running."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append((self.fn, grid, args, kw))
        return launch


def _launch_key(fn, args, kw) -> tuple:
    dt = next(K._DTYPES[a.dtype] for a in args if isinstance(a, torch.Tensor) and a.dtype != torch.float32
              or isinstance(a, torch.Tensor) and a.dim() == 3)
    consts = tuple(sorted((k_, v_) for k_, v_ in kw.items() if k_ not in ("num_warps", "num_stages", "maxnreg")))
    return (fn.__name__, dt, consts, kw["num_warps"], kw["num_stages"], kw.get("maxnreg"))


def test_launchers_only_launch_listed_configs(monkeypatch):
    """Every launch over a sweep of shapes, dtypes and layouts is one of ``compile_configs()``, with
    16-byte aligned pointers, int32 integer arguments and 8-aligned rows (what the configs assume)."""
    listed = {K.config_key(c) for c in K.compile_configs()}
    assert len(listed) == len(K.compile_configs())
    log: list = []
    for name in _KERNEL_ATTRS:
        monkeypatch.setattr(K, name, _Recorder(getattr(K, name), log))
    shapes = [(B, N, NK, D, DV) for B in (1, 3) for N, NK in ((7, 7), (64, 64), (100, 37))
              for D, DV in ((3, 3), (8, 5), (16, 16), (24, 24), (40, 64), (64, 64), (100, 128), (128, 128),
                            (200, 256), (256, 256))]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for i, (B, N, NK, D, DV) in enumerate(shapes):
            q, k, v, do = (torch.zeros(B, n, d, dtype=dtype) for n, d in ((N, D), (NK, D), (NK, DV), (N, DV)))
            if i % 3 == 1:  # strided views: a slice of a wider buffer, and a misaligned one
                q = torch.zeros(B, N, D + 5, dtype=dtype)[..., 1:D + 1]
                k = torch.zeros(B, NK, 2 * D, dtype=dtype)[..., D:]
            out, lse = K.attention_forward(q, k, v, 0.5)
            K.attention_backward(q, k, v, out, lse, do, 0.5)
            if D == DV and N == NK:
                out, lse = K.identity_forward(q, 0.5)
                K.identity_backward(q, out, lse, do, 0.5)
    kernels = set()
    for fn, grid, args, kw in log:
        key = _launch_key(fn, args, kw)
        assert key in listed, f"launch not in compile_configs(): {key}"
        kernels.add(key[0])
        assert all(g <= 2**31 - 1 for g in grid[:1]) and grid[1] <= 65535
        for a in args:
            if isinstance(a, torch.Tensor):
                assert a.data_ptr() % 16 == 0, f"{fn.__name__}: unaligned pointer"
                if a.dim() == 3:
                    assert K._fits(a), f"{fn.__name__}: tensor {tuple(a.shape)} {a.stride()} not 8-aligned"
            elif isinstance(a, int) and not isinstance(a, bool):
                assert 0 <= a <= 2**31 - 1, f"{fn.__name__}: integer argument {a} is not int32"
    assert kernels == {getattr(K, n).fn.__name__ for n in _KERNEL_ATTRS}, kernels


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_dots_follow_torch_matmul_precision(monkeypatch, request, precision):
    """The fp32 policy (``_common``): every float32 launch passes the DOT_PRECISION of torch's float32
    matmul precision, read at launch; a listed configuration; 16-bit launches one fixed value."""
    from fastscore.kernels._common import FP32_DOT_PRECISION, HALF_DOT_PRECISION
    before = torch.get_float32_matmul_precision()
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(before))
    listed = {K.config_key(c) for c in K.compile_configs()}
    log: list = []
    for name in _KERNEL_ATTRS:
        monkeypatch.setattr(K, name, _Recorder(getattr(K, name), log))
    torch.set_float32_matmul_precision(precision)
    for dtype, want in ((torch.float32, FP32_DOT_PRECISION[precision]), (torch.float16, HALF_DOT_PRECISION)):
        log.clear()
        q = torch.zeros(2, 9, 16, dtype=dtype)
        out, lse = K.attention_forward(q, q.clone(), q.clone(), 0.5)
        K.attention_backward(q, q.clone(), q.clone(), out, lse, q.clone(), 0.5)
        K.identity_backward(q, out, lse, q.clone(), 0.5)
        dots = [kw["DOT_PRECISION"] for _, _, _, kw in log if "DOT_PRECISION" in kw]
        assert len(dots) >= 3 and set(dots) == {want}
        assert all(_launch_key(fn, args, kw) in listed for fn, _, args, kw in log)


def test_compile_configs_count():
    """One (BLOCK, num_warps, num_stages) per (kernel, BLOCK_D, dtype); EVEN_N / EVEN_D (and IDENTITY
    in the forward) and, for float32, the 2 DOT_PRECISIONs of the fp32 policy are the only other axes:
    per feature block, dtype and precision 8 forward + 4 dk/dv + 4 dq + 4 fused identity backward
    (where it is launched) configurations, and 1 preprocess (no dot) per feature block and dtype."""
    fused = sum(K.launch_config("identity_bwd", bd, dt) is not None
                for bd in K._BLOCK_DS for dt in (torch.float32, torch.float16, torch.bfloat16))
    assert fused == 5 * 3 - 2  # float32 at BLOCK_D 128 and 256 takes the unfused backward
    fused32 = sum(K.launch_config("identity_bwd", bd, torch.float32) is not None for bd in K._BLOCK_DS)
    precisions = 2 * 5 + 2 * 5   # (dtype, feature block) pairs weighted by their DOT_PRECISIONs
    assert len(K.compile_configs()) == precisions * (8 + 2 * 4) + 5 * 3 + 4 * (fused + fused32)
    assert {c["constexprs"]["DOT_PRECISION"] for c in K.compile_configs() if c["dtype"] == "fp32"
            and "DOT_PRECISION" in c["constexprs"]} == {"ieee", "tf32"}


# ------------------------------------------------------------------------------------------------
# GPU-only: 16-bit inputs (the interpreter cannot run bf16 tl.dot) and the compiled kernels
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(3, 100, 24), (64, 256, 64), (1024, 64, 16), (2, 1000, 128)])
def test_16bit_on_gpu(seed, dtype, B, N, D):
    q, k, v, do = _inputs(B, N, D, dtype=dtype)
    scale = D ** -0.5
    ref64 = _reference(q, k, v, do, scale)[0]
    ref = {}
    for dt_name, _ in (("low", dtype),):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, scale=scale)
        ref[dt_name] = (o.detach(), *torch.autograd.grad(o, (qq, kk, vv), do))
    out, lse = K.attention_forward(q, k, v, scale, out=_nan_like(q))
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, scale)
    for name, got, r64, rlow in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                                    (ref64[0], *ref64[2:]), ref["low"]):
        _check(f"{dtype} {name}", got, r64, rlow, floor=1e-3)
    dz = K.identity_backward(q, *K.identity_forward(q, scale), do, scale)
    assert torch.isfinite(dz).all()
