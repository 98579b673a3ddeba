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


@pytest.mark.parametrize("bad, err", [
    (lambda q, k, v: (q.float(), k, v), TypeError),
    (lambda q, k, v: (q[:, :, :2], k, v), ValueError),
    (lambda q, k, v: (q, k[:1], v), ValueError),
    (lambda q, k, v: (q, k, v[:, :2]), ValueError),
    (lambda q, k, v: (q[0], k, v), ValueError),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError),
    (lambda q, k, v: (q[:, :0], k, v), ValueError),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError),
])
def test_attention_bad_input(bad, err):
    q, k, v = (t.detach() for t in _qkv(2, 4, 3))
    with pytest.raises(err):
        ops.softmax_attention(*bad(q, k, v), backend="torch")
    with pytest.raises(err):
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


@pytest.mark.parametrize("kw, err", [
    (dict(eps=torch.zeros(2, 3)), ValueError), (dict(seed=-1), ValueError), (dict(seed=2**63), ValueError),
    (dict(step=-1), ValueError), (dict(coefficients=(1.0, 0.5, 1.0, 0.0, float("nan"))), ValueError),
    (dict(coefficients=(1.0, 0.5)), TypeError), (dict(eps=torch.zeros(2, 4, dtype=torch.int64)), TypeError),
    (dict(out=torch.zeros(3, 4)), ValueError),
])
def test_reverse_step_bad_input(kw, err):
    args = dict(x_t=torch.zeros(2, 4), eps=torch.zeros(2, 4), coefficients=StepCoefficients(0.8, 0.6, 0.9, 0.1, 0.1),
                seed=0, step=0) | kw
    with pytest.raises(err):
        reverse_step(**args, backend="torch")
