"""The torch reference path of the three ops: gradients in float64, contracts, bad input."""
import math

import pytest
import torch

from fastscore import ops
from fastscore.ops import StepCoefficients, ddim_coefficients, reverse_step, reverse_step_reference
from fastscore.ops.top1 import gumbel_noise
from fastscore.schedule import make_schedule


def _qkv(B, N, D, Dv=None, dtype=torch.float64):
    Dv = Dv or D
    return (torch.randn(B, N, D, dtype=dtype, requires_grad=True), torch.randn(B, N, D, dtype=dtype, requires_grad=True),
            torch.randn(B, N, Dv, dtype=dtype, requires_grad=True))


def test_softmax_attention_gradcheck(seed):
    q, k, v = _qkv(2, 5, 3, 4)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.softmax_attention(a, b, c, 0.7, backend="torch"), (q, k, v))
    z = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.identity_attention(a, backend="torch"), (z,))


def test_softmax_attention_matches_definition(seed):
    q, k, v = _qkv(3, 7, 5, dtype=torch.float32)
    out = ops.softmax_attention(q, k, v, backend="torch")
    s = torch.einsum("bid,bjd->bij", q.double(), k.double()) / math.sqrt(5)
    ref = torch.einsum("bij,bjd->bid", torch.softmax(s, -1), v.double())
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_top1_forward_and_ties():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    k = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])  # keys 0 and 1 tie for query 0
    v = torch.arange(6.0).view(1, 3, 2)
    out, idx = ops.top1_attention(q, k, v, backend="torch")
    assert idx.tolist() == [[0, 2, 2]] and idx.dtype == torch.int64
    assert torch.equal(out, v[0, idx[0]].unsqueeze(0))


def test_top1_backward_is_straight_through(seed):
    B, N, D, tau = 2, 6, 3, 0.7
    q, k, v = _qkv(B, N, D)
    for gumbel in (False, True):
        out, idx = ops.top1_attention(q, k, v, temperature=tau, gumbel=gumbel, seed=seed % 2**31, backend="torch")
        dout = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        # dv: scatter of dout to the chosen keys (gradcheck of the piecewise-linear forward in v)
        ref_dv = torch.zeros_like(v).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, D), dout)
        assert torch.allclose(dv, ref_dv)
        # dq, dk: autograd of the soft surrogate softmax((qk^T + g) / tau) v
        g = gumbel_noise(seed % 2**31, B, N, N, q.device).double() if gumbel else 0.0
        soft = torch.softmax((q @ k.transpose(1, 2) + g) / tau, -1) @ v
        sq, sk = torch.autograd.grad(soft, (q, k), dout)
        assert torch.allclose(dq, sq) and torch.allclose(dk, sk)
        assert torch.autograd.gradcheck(lambda vv: ops.top1_attention(q.detach(), k.detach(), vv, backend="torch")[0],
                                        (v,))


def test_gumbel_noise_distribution():
    g = gumbel_noise(7, 4, 128, 128, torch.device("cpu")).flatten().double()
    assert abs(g.mean() - 0.5772156649) < 0.01 and abs(g.var() - math.pi**2 / 6) < 0.03


@pytest.mark.parametrize("bad, err, match", [
    (lambda q, k, v: (q.float(), k, v), TypeError, "k has dtype torch.float64 but q has dtype torch.float32"),
    (lambda q, k, v: (q[:, :, :2], k, v), ValueError, "q and k must share the feature size D, got 2 and 3"),
    (lambda q, k, v: (q, k[:1], v), ValueError, "q, k, v must share the batch size, got 2, 1, 2"),
    (lambda q, k, v: (q, k, v[:, :2]), ValueError, "k and v must share the sequence length, got 4 and 2"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 3 dimensions, got shape \(4, 3\)"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "q must be a floating-point tensor, got dtype torch.int64"),
    (lambda q, k, v: (q[:, :0], k, v), ValueError, "q and k must have a sequence length N >= 1"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "q and v must have a feature size D >= 1"),
])
def test_attention_bad_input(bad, err, match):
    q, k, v = (t.detach() for t in _qkv(2, 4, 3))
    with pytest.raises(err, match=match):
        ops.softmax_attention(*bad(q, k, v), backend="torch")
    with pytest.raises(err, match=match):
        ops.top1_attention(*bad(q, k, v), backend="torch")


def test_top1_bad_temperature_and_backend():
    q, k, v = (t.detach() for t in _qkv(1, 4, 3))
    with pytest.raises(ValueError, match="temperature"):
        ops.top1_attention(q, k, v, temperature=-1.0)
    with pytest.raises(ValueError, match="backend"):
        ops.softmax_attention(q, k, v, backend="cuda")


def test_ddim_and_ddpm_coefficients_closed_form():
    s = make_schedule("linear", 1000)
    ab, betas = s.alpha_bar, s.betas
    t = 500
    c = ddim_coefficients(float(ab[t]), float(ab[t - 1]), 1.0)
    # DDPM posterior: mean = c1 x0 + c2 x_t, var = beta_tilde
    beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
    assert math.isclose(c.sigma ** 2, float(beta_tilde), rel_tol=1e-9)
    x0, xt = 0.3, -0.8
    eps = (xt - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
    mean_ddim = c.sqrt_alpha_bar_prev * x0 + c.dir_coef * eps
    c1 = math.sqrt(ab[t - 1]) * betas[t] / (1 - ab[t])
    c2 = math.sqrt(1 - betas[t]) * (1 - ab[t - 1]) / (1 - ab[t])
    assert math.isclose(mean_ddim, float(c1 * x0 + c2 * xt), rel_tol=1e-9)
    c0 = ddim_coefficients(float(ab[t]), float(ab[t - 20]), 0.0)
    assert c0.sigma == 0 and math.isclose(c0.dir_coef, math.sqrt(1 - ab[t - 20]), rel_tol=1e-12)


def test_noiseless_step_by_hand():
    x = torch.tensor([[0.5, -0.25]])
    e = torch.tensor([[0.1, 0.2]])
    c = StepCoefficients(0.8, 0.6, 0.9, math.sqrt(1 - 0.81), 0.0)
    y = reverse_step(x, e, c, seed=0, step=0, backend="torch")
    x0 = (x - 0.6 * e) / 0.8
    assert torch.allclose(y, 0.9 * x0 + math.sqrt(0.19) * e)
    yc = reverse_step(torch.tensor([[3.0]]), torch.tensor([[0.0]]), c, seed=0, step=0, clip_x0=True, backend="torch")
    # x0 = 3.75 clipped to 1; eps recomputed = (3 - 0.8) / 0.6
    assert torch.allclose(yc, torch.tensor([[0.9 + math.sqrt(0.19) * 2.2 / 0.6]]))


def test_reverse_step_noise_and_in_place(seed):
    x = torch.randn(4, 3, 5, 5)
    e = torch.randn_like(x)
    c = ddim_coefficients(0.5, 0.6, 1.0)
    z = torch.randn_like(x)
    y = reverse_step_reference(x, e, c, seed=0, step=3, noise=z)
    x0 = (x - math.sqrt(0.5) * e) / math.sqrt(0.5)
    assert torch.allclose(y, c.sqrt_alpha_bar_prev * x0 + c.dir_coef * e + c.sigma * z, atol=1e-6)
    a = reverse_step(x.clone(), e, c, seed=5, step=3, backend="torch")
    xx = x.clone()
    b = reverse_step(xx, e, c, seed=5, step=3, out=xx, backend="torch")
    assert b is xx and torch.equal(a, xx)
    assert not torch.equal(a, reverse_step(x, e, c, seed=6, step=3, backend="torch"))


@pytest.mark.parametrize("kw, err, match", [
    (dict(eps=torch.zeros(2, 3)), ValueError, r"eps must have the shape of x_t \(2, 4\), got \(2, 3\)"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    (dict(seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"),
    (dict(step=-1), ValueError, "step must be >= 0, got -1"),
    (dict(coefficients=(1.0, 0.5, 1.0, 0.0, float("nan"))), ValueError, "coefficients.sigma must be finite, got nan"),
    (dict(coefficients=(1.0, 0.5)), TypeError, r"coefficients must be a StepCoefficients \(or a 5-tuple"),
    (dict(eps=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "eps must be a floating-point tensor, got dtype torch.int64"),
    (dict(out=torch.zeros(3, 4)), ValueError, "out must match x_t in shape"),
])
def test_reverse_step_bad_input(kw, err, match):
    args = dict(x_t=torch.zeros(2, 4), eps=torch.zeros(2, 4), coefficients=StepCoefficients(0.8, 0.6, 0.9, 0.1, 0.1),
                seed=0, step=0) | kw
    with pytest.raises(err, match=match):
        reverse_step(**args, backend="torch")


# ------------------------------------------------------------------------------------------------
# one backend rule for every op; the auto table; the SDPA path
# ------------------------------------------------------------------------------------------------
class _OnCuda:
    """Stands in for a CUDA tensor where only the device matters (the dispatch rule)."""
    is_cuda = True


def _raise(exc):
    def check():
        raise exc
    return check


def test_auto_on_cuda_follows_the_measured_table_and_falls_back_where_kernels_cannot():
    from fastscore.ops import _dispatch
    # the decision (FINDINGS.md, H100): SDPA 4-D beats the fused attention everywhere, top-1
    # Triton slows training 4x, the reverse-step kernel is 6.5x eager
    assert ops.AUTO_ON_CUDA == {"softmax_attention": "sdpa", "identity_attention": "sdpa",
                                "top1_attention": "torch", "reverse_step": "triton",
                                "attention_block": "torch"}  # unmeasured on a GPU (issue 21)
    for op, path in ops.AUTO_ON_CUDA.items():
        assert _dispatch.resolve(op, "auto", (_OnCuda(),), lambda: None) == path
        assert _dispatch.resolve(op, "torch", (_OnCuda(),), lambda: None) == "torch"
        assert _dispatch.resolve(op, "triton", (_OnCuda(),), lambda: None) == "triton"
    # where the table says triton and the kernels cannot take the inputs: the reference
    assert _dispatch.resolve("reverse_step", "auto", (_OnCuda(),), _raise(TypeError("dtype"))) == "torch"
    # forced triton never falls back
    with pytest.raises(TypeError, match="dtype"):
        _dispatch.resolve("reverse_step", "triton", (_OnCuda(),), _raise(TypeError("dtype")))


def test_auto_off_cuda_is_the_reference_for_every_op():
    x = torch.randn(2, 4, 3)
    for op, args in (("softmax_attention", (x, x, x)), ("identity_attention", (x,)),
                     ("top1_attention", (x, x, x)), ("reverse_step", (x, x))):
        assert ops.resolve_backend("auto", *args, op=op) == "torch"
        assert ops.resolve_backend("torch", *args, op=op) == "torch"


@pytest.mark.interpret
def test_forced_triton_raises_for_inputs_the_kernels_cannot_take_in_every_op(device):
    q64 = torch.randn(1, 4, 3, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ops.softmax_attention(q64, q64, q64, backend="triton")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ops.identity_attention(q64, backend="triton")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ops.top1_attention(q64, q64, q64, backend="triton")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        reverse_step(q64, q64, StepCoefficients(0.8, 0.6, 0.9, 0.1, 0.1), seed=0, step=0, backend="triton")
    wide = torch.randn(1, 4, 300, device=device)
    with pytest.raises(ValueError, match="D"):
        ops.softmax_attention(wide, wide, wide, backend="triton")
    from fastscore.kernels import top1 as K
    w = torch.randn(1, 4, K.max_features(torch.float32) + 1, device=device)
    with pytest.raises(ValueError, match="D, Dv <="):
        ops.top1_attention(w, w, w, backend="triton")
    with pytest.raises(ValueError, match="D, Dv <="):
        ops.resolve_backend("triton", w, w, w, op="top1_attention")
    # the same inputs under auto: the reference, forward and backward
    out, idx = ops.top1_attention(q64, q64, q64)
    assert out.dtype == torch.float64 and torch.equal(idx, (q64 @ q64.transpose(1, 2)).argmax(-1))


def test_resolve_backend_bad_input():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="op must be one of"):
        ops.resolve_backend("auto", x, op="matmul")
    with pytest.raises(TypeError, match="input tensors"):
        ops.resolve_backend("auto", x, x, op="softmax_attention")
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cuda", x, op="identity_attention")


@pytest.mark.parametrize("nq, n, d, dv", [(7, 7, 5, 5), (3, 9, 4, 6)])
def test_sdpa_path_matches_the_reference_with_gradients(seed, nq, n, d, dv):
    q = torch.randn(2, nq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n, dv, dtype=torch.float64, requires_grad=True)
    a = ops.softmax_attention_sdpa(q, k, v, 0.6)
    b = ops.softmax_attention_reference(q, k, v, 0.6)
    assert a.shape == (2, nq, dv) and torch.allclose(a, b, atol=1e-12)
    do = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), do), torch.autograd.grad(b, (q, k, v), do)):
        assert torch.allclose(x, y, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: ops.softmax_attention_sdpa(z, z, z, 0.5), (q.detach().requires_grad_(),))


def test_importing_ops_does_not_patch_triton_and_the_patch_is_explicit():
    import os
    import subprocess
    import sys
    code = ("import fastscore.ops as o; from triton.runtime import interpreter as i; "
            "print(getattr(i, '_fastscore_index_patch', False)); o.patch_triton_interpreter(); "
            "print(getattr(i, '_fastscore_index_patch', False)); print(o.patch_triton_interpreter())")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second, again = out.stdout.split()
    from fastscore.ops import _dispatch
    needs = _dispatch._interpreter_needs_patch()  # NumPy >= 2.4 rejects int(array of shape (1,))
    assert first == "False" and second == str(needs) and again == "False"


def test_noise_range_is_bit_identical_to_indexed_noise():
    from fastscore.ops import philox
    for start, count in ((0, 1), (3, 10), (5, 4), (1023, 777), (2**33 + 1, 9)):
        e = torch.arange(start, start + count, dtype=torch.int64)
        assert torch.equal(philox.normal_range(7, start, count, c2=3), philox.normal(7, e, c2=3))
    assert philox.normal_range(7, 5, 0).shape == (0,)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**63 - 1])
def test_uniform_range_is_bit_identical_to_indexed_uniforms(seed):
    """The numpy path of ``uniform_range`` (CPU) against the torch words of ``uniform``: any start (also
    mid-group and past 2**32 groups), both streams, and on CUDA the device's words against the CPU's."""
    from fastscore.ops import philox
    for start, count in ((0, 1), (3, 10), (5, 4), (1023, 777), (2**33 + 1, 9), (17, 100_003)):
        e = torch.arange(start, start + count, dtype=torch.int64)
        for c2, c3 in ((0, philox.STREAM_GUMBEL), (5, philox.STREAM_NOISE)):
            got = philox.uniform_range(seed, start, count, c2=c2, c3=c3)
            assert got.dtype == torch.float32 and torch.equal(got, philox.uniform(seed, e, c2=c2, c3=c3))
            if torch.cuda.is_available():
                assert torch.equal(philox.uniform_range(seed, start, count, c2=c2, c3=c3, device="cuda").cpu(), got)
    assert philox.uniform_range(seed, 5, 0).shape == (0,)


def test_theory_asks_the_op_for_its_path():
    from fastscore import theory
    assert not hasattr(theory, "MAX_TRITON_D")
    q, keys, values = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4, 2)
    got = theory.gaussian_posterior_mean(q, keys, torch.zeros(4), values, 0.5, backend="torch")
    a = math.sqrt(0.5)
    logits = -((q[:, None, :] - a * keys[None]) ** 2).sum(-1) / (2 * 0.5)
    assert torch.allclose(got, torch.softmax(logits.double(), -1).float() @ values, atol=1e-5)
