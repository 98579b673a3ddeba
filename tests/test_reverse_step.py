"""The fused reverse-step kernel against the torch reference and the closed forms of DDPM/DDIM."""
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, requires_cuda

from fastscore.kernels import reverse_step as kernel_mod
from fastscore.ops import StepCoefficients, ddim_coefficients, noise_like, reverse_step, reverse_step_reference
from fastscore.schedule import make_schedule

SCHED = make_schedule("linear", T=1000)
AB = SCHED.alpha_bar.tolist()


def coefficients(kind: str) -> StepCoefficients:
    t, prev = 600, 580
    return {
        "ddim_eta0": ddim_coefficients(AB[t], AB[prev], 0.0),
        "ddim_eta05": ddim_coefficients(AB[t], AB[prev], 0.5),
        "ddpm": ddim_coefficients(AB[t], AB[t - 1], 1.0),
        "last": ddim_coefficients(AB[5], 1.0, 1.0),
    }[kind]


def inputs(shape, seed, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(shape, generator=g)).to(dtype=dtype, device=device)
    e = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    return x, e


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (5, 3, 7, 5), (2, 1, 33, 37), (1, 1)])
@pytest.mark.parametrize("kind", ["ddim_eta0", "ddim_eta05", "ddpm", "last"])
@pytest.mark.parametrize("clip", [False, True])
def test_kernel_matches_reference(seed, shape, kind, clip):
    x, e = inputs(shape, seed)
    coef = coefficients(kind)
    offset = seed % 5
    out = torch.full_like(x, float("nan"))  # poisoned: an unwritten element fails
    got = reverse_step(x, e, coef, seed=seed, step=seed % 50, sample_offset=offset, clip_x0=clip, out=out,
                       backend="triton")
    assert got is out
    ref = reverse_step_reference(x, e, coef, seed=seed, step=seed % 50, sample_offset=offset, clip_x0=clip)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 2, 5, 5)])
def test_in_place(seed, shape):
    x, e = inputs(shape, seed)
    coef = coefficients("ddpm")
    ref = reverse_step_reference(x, e, coef, seed=seed, step=2, sample_offset=1, clip_x0=True)
    got = reverse_step(x, e, coef, seed=seed, step=2, sample_offset=1, clip_x0=True, out=x, backend="triton")
    assert got is x
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_non_contiguous_inputs_and_out(seed):
    x, e = inputs((6, 5, 4), seed)
    xt, et = x.transpose(1, 2), e.transpose(1, 2)  # (6, 4, 5), not contiguous
    coef = coefficients("ddim_eta05")
    ref = reverse_step_reference(xt, et, coef, seed=seed, step=1)
    got = reverse_step(xt, et, coef, seed=seed, step=1, out=xt, backend="triton")
    assert got is xt
    torch.testing.assert_close(xt, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("per_shape", [(3, 8, 8), (3, 5, 5)])  # 192 (aligned groups) and 75 elements
def test_batch_size_invariance(seed, backend, per_shape):
    x, e = inputs((10, *per_shape), seed)
    coef = coefficients("ddpm")
    full = reverse_step(x, e, coef, seed=seed, step=4, sample_offset=0, backend=backend)
    part = reverse_step(x[6:9], e[6:9], coef, seed=seed, step=4, sample_offset=6, backend=backend)
    torch.testing.assert_close(part, full[6:9], rtol=0, atol=0)
    shifted = reverse_step(x[6:9], e[6:9], coef, seed=seed, step=4, sample_offset=5, backend=backend)
    assert not torch.allclose(shifted, full[6:9])


@pytest.mark.interpret
def test_seed_and_offset_from_device_tensors(seed):
    """The launcher reads seed and sample_offset from 1-element int64 tensors (CUDA graph replay)."""
    x, e = inputs((5, 3, 5, 5), seed)
    coef = tuple(coefficients("ddpm"))
    s = seed * 1_000_003 % 2**63
    expected = kernel_mod.reverse_step(x, e, coef, s, 3, 2)
    for seed_arg, off_arg in [(torch.tensor([s], device=DEVICE), 2), (s, torch.tensor([2], device=DEVICE)),
                              (torch.tensor([s], device=DEVICE), torch.tensor([2], device=DEVICE))]:
        got = kernel_mod.reverse_step(x, e, coef, seed_arg, 3, off_arg)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    ref = reverse_step_reference(x, e, coefficients("ddpm"), seed=s, step=3, sample_offset=2)
    torch.testing.assert_close(expected, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_zero_sigma_draws_no_noise(seed):
    x, e = inputs((3, 3, 8, 8), seed)
    coef = coefficients("ddim_eta0")
    assert coef.sigma == 0
    a = reverse_step(x, e, coef, seed=seed, step=1, backend="triton")
    b = reverse_step(x, e, coef, seed=seed + 1, step=2, sample_offset=3, backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = coef.sqrt_alpha_bar_prev * (x - coef.sqrt_one_minus_alpha_bar * e) / coef.sqrt_alpha_bar \
        + coef.dir_coef * e
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)


# ----- closed forms, in float64, with the noise given -----

def ddpm_closed_form(x, e, z, t):
    """Ho et al. (2020), Alg. 2: mu = (x - beta/sqrt(1 - ab) eps) / sqrt(alpha), var = beta_tilde."""
    beta = SCHED.betas[t].item()
    ab, ab_prev = AB[t], AB[t - 1]
    mean = (x - beta / math.sqrt(1 - ab) * e) / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_prev) / (1 - ab) * beta) * z


def ddim_closed_form(x, e, z, ab, ab_prev, eta, clip=False):
    """Song et al. (2021), eq. 12."""
    x0 = (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
    if clip:
        x0 = x0.clamp(-1, 1)
        e = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * e + sigma * z


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_ddpm_update_closed_form(seed, t):
    x, e = inputs((4, 3, 8, 8), seed, device="cpu")
    z = torch.randn_like(x)
    got = reverse_step_reference(x, e, ddim_coefficients(AB[t], AB[t - 1], 1.0), seed=0, step=0, noise=z)
    expected = ddpm_closed_form(x.double(), e.double(), z.double(), t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_update_closed_form(seed, eta, clip):
    x, e = inputs((4, 3, 8, 8), seed, device="cpu")
    z = torch.randn_like(x)
    ab, ab_prev = AB[700], AB[650]
    got = reverse_step_reference(x, e, ddim_coefficients(ab, ab_prev, eta), seed=0, step=0, clip_x0=clip, noise=z)
    expected = ddim_closed_form(x.double(), e.double(), z.double(), ab, ab_prev, eta, clip)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_kernel_update_closed_form(seed, eta):
    """The kernel with its own noise equals the closed form with the documented stream as ``z``."""
    x, e = inputs((3, 3, 5, 5), seed)
    ab, ab_prev = AB[300], AB[299]
    got = reverse_step(x, e, ddim_coefficients(ab, ab_prev, eta), seed=seed, step=9, sample_offset=2,
                       clip_x0=True, backend="triton")
    z = noise_like(x, seed, 9, 2)
    expected = ddim_closed_form(x.double(), e.double(), z.double(), ab, ab_prev, eta, clip=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    if eta == 1.0:
        plain = reverse_step(x, e, ddim_coefficients(ab, ab_prev, eta), seed=seed, step=9, sample_offset=2,
                             backend="triton")
        torch.testing.assert_close(plain.double(), ddpm_closed_form(x.double(), e.double(), z.double(), 300),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 100, 500, 998, 999])
def test_ddim_eta1_is_ddpm_posterior(t):
    c = ddim_coefficients(AB[t], AB[t - 1], 1.0)
    beta = SCHED.betas[t].item()
    alpha = 1 - beta
    # x_{t-1} = (a_prev / a) x_t + (d - a_prev b / a) eps + sigma z
    assert c.sqrt_alpha_bar_prev / c.sqrt_alpha_bar == pytest.approx(1 / math.sqrt(alpha), rel=1e-12)
    assert c.dir_coef - c.sqrt_alpha_bar_prev * c.sqrt_one_minus_alpha_bar / c.sqrt_alpha_bar == pytest.approx(
        -beta / (math.sqrt(alpha) * math.sqrt(1 - AB[t])), rel=1e-7)
    assert c.sigma**2 == pytest.approx((1 - AB[t - 1]) / (1 - AB[t]) * beta, rel=1e-10)


def test_last_step_is_deterministic():
    c = ddim_coefficients(AB[0], 1.0, 1.0)
    assert c.sigma == 0 and c.dir_coef == 0 and c.sqrt_alpha_bar_prev == 1


# ----- bad input: errors before any launch -----

@pytest.fixture
def no_launch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel was launched")
    monkeypatch.setattr(kernel_mod, "reverse_step", boom)


GOOD = StepCoefficients(0.8, 0.6, 0.9, 0.3, 0.1)


@pytest.mark.parametrize("case, err, match", [
    ("shape", ValueError, r"eps must have the shape of x_t \(2, 3, 4\), got \(2, 3, 5\)"),
    ("dtype", TypeError, "eps has dtype torch.float64 but x_t has dtype torch.float32"),
    ("step_negative", ValueError, "step must be >= 0, got -1"),
    ("step_large", ValueError, r"step must be < 2\*\*31, got 2147483648"),
    ("seed_negative", ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    ("seed_large", ValueError, r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"),
    ("seed_float", TypeError, "seed must be an int, got float"),
    ("coef_nan", ValueError, "coefficients.dir_coef must be finite, got nan"),
    ("coef_inf", ValueError, "coefficients.sigma must be finite, got inf"),
    ("coef_sigma_negative", ValueError, r"coefficients.sigma must be >= 0, got -"),
    ("coef_a_zero", ValueError, r"coefficients.sqrt_alpha_bar must be > 0, got 0"),
    ("coef_len", TypeError, r"coefficients must be a StepCoefficients \(or a 5-tuple"),
    ("out_shape", ValueError, "out must match x_t in shape"),
    ("out_dtype", ValueError, "out must match x_t in shape, dtype"),
    ("empty_batch", ValueError, r"x_t must have a non-empty batch dimension, got shape \(0, 3\)"),
])
def test_bad_input_raises_before_launch(no_launch, case, err, match):
    x = torch.zeros(2, 3, 4, device=DEVICE)
    kw = dict(x_t=x, eps=torch.zeros_like(x), coefficients=GOOD, seed=1, step=0, out=None)
    if case == "shape":
        kw["eps"] = torch.zeros(2, 3, 5, device=DEVICE)
    elif case == "dtype":
        kw["eps"] = torch.zeros(2, 3, 4, device=DEVICE, dtype=torch.float64)
    elif case == "step_negative":
        kw["step"] = -1
    elif case == "step_large":
        kw["step"] = 2**31
    elif case == "seed_negative":
        kw["seed"] = -1
    elif case == "seed_large":
        kw["seed"] = 2**63
    elif case == "seed_float":
        kw["seed"] = 1.0
    elif case == "coef_nan":
        kw["coefficients"] = GOOD._replace(dir_coef=float("nan"))
    elif case == "coef_inf":
        kw["coefficients"] = GOOD._replace(sigma=float("inf"))
    elif case == "coef_sigma_negative":
        kw["coefficients"] = GOOD._replace(sigma=-0.1)
    elif case == "coef_a_zero":
        kw["coefficients"] = GOOD._replace(sqrt_alpha_bar=0.0)
    elif case == "coef_len":
        kw["coefficients"] = (0.8, 0.6, 0.9, 0.3)
    elif case == "out_shape":
        kw["out"] = torch.zeros(2, 3, 5, device=DEVICE)
    elif case == "out_dtype":
        kw["out"] = torch.zeros(2, 3, 4, device=DEVICE, dtype=torch.float64)
    elif case == "empty_batch":
        kw["x_t"] = torch.zeros(0, 3, device=DEVICE)
        kw["eps"] = torch.zeros(0, 3, device=DEVICE)
    x_t, eps, coef = kw.pop("x_t"), kw.pop("eps"), kw.pop("coefficients")
    with pytest.raises(err, match=match):
        reverse_step(x_t, eps, coef, backend="triton", **kw)


def test_no_launch_fixture_can_fail(no_launch):
    x = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(AssertionError, match="launched"):
        reverse_step(x, x.clone(), GOOD, seed=1, step=0, backend="triton")


NEED_ORDER = r"need 0 < alpha_bar_t < 1 and alpha_bar_t <= alpha_bar_prev <= 1, got "


@pytest.mark.parametrize("args, match", [
    ((0.5, 0.6, -0.1), "eta must be >= 0.0, got -0.1"), ((0.5, 0.6, float("nan")), "eta must be finite, got nan"),
    ((0.7, 0.6, 1.0), NEED_ORDER + "0.7, 0.6"), ((0.0, 0.6, 1.0), "alpha_bar_t must be > 0.0, got 0.0"),
    ((1.0, 1.0, 0.0), NEED_ORDER + "1.0, 1.0"), ((0.5, 1.5, 0.0), NEED_ORDER + "0.5, 1.5"),
])
def test_ddim_coefficients_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ddim_coefficients(*args)


# ----- GPU only: half precision and the real compiler -----

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 3, 8, 8), (7, 3, 5, 5)])
def test_gpu_dtypes_match_reference(seed, dtype, shape):
    x, e = inputs(shape, seed, dtype=dtype, device="cuda")
    coef = coefficients("ddpm")
    got = reverse_step(x, e, coef, seed=seed, step=3, sample_offset=1, clip_x0=True, backend="triton")
    ref = reverse_step_reference(x, e, coef, seed=seed, step=3, sample_offset=1, clip_x0=True)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.slow
def test_every_config_compiles_without_spills():
    """AOT-compile every launchable configuration for sm_80 and sm_90a (no GPU needed: the compile
    report's workers, outside the interpreter) and check that ptxas reports no spills and at most 128
    registers (a memory-bound kernel: occupancy matters more than anything else here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile_report
    rows = compile_report.run_report(modules=("fastscore.kernels.reverse_step",), write=False, jobs=2)
    assert len(rows) == 2 * len(kernel_mod.compile_configs())
    for r in rows:
        assert not compile_report.problems(r), r
        assert r["registers"] <= 128, r
