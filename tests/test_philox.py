"""The torch Philox stream against Triton's ``tl.philox``, and the noise's statistics."""
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from fastscore.kernels import _common
from fastscore.kernels._common import philox_words
from fastscore.ops import philox
from fastscore.ops.reverse_step import StepCoefficients, reverse_step

NOISE_ONLY = StepCoefficients(1.0, 1.0, 0.0, 0.0, 1.0)  # x = eps = 0  ->  out = z


@triton.jit
def _philox_words_kernel(out_ptr, c0_ptr, c1_ptr, seed, c2, c3, n, BLOCK: tl.constexpr):
    """Dump ``philox_words(seed, c0, c1, c2, c3)``: out (4, n) int64 words; c0, c1 (n,) int64 in [0, 2**32).

    ``seed``, ``c2``, ``c3`` and ``n`` are left to the JIT's specialisation on purpose (a 1 arrives as a
    Python int): ``kernels._common.philox_words`` must take both forms, and the GPU-compile guard
    (tests/test_gpu_compile_guard.py) compiles this kernel with such values."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = tl.load(c0_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c1_ptr + offs, mask=mask, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox_words(seed, c0, c1, c2, c3)
    tl.store(out_ptr + offs, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=mask)


def triton_words(seed, c0, c1, c2, c3):
    n = c0.numel()
    out = torch.full((4, n), -1, dtype=torch.int64, device=c0.device)
    _philox_words_kernel[(triton.cdiv(n, 256),)](out, c0, c1, seed, c2, c3, n, BLOCK=256)
    return out


def kernel_noise(shape, seed, step, sample_offset=0):
    zeros = torch.zeros(shape, device=DEVICE)
    return reverse_step(zeros, zeros.clone(), NOISE_ONLY, seed=seed, step=step, sample_offset=sample_offset,
                        backend="triton")


def ks_statistic(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``z`` and the standard normal's."""
    z, _ = torch.sort(z.double().flatten())
    n = z.numel()
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


@pytest.mark.interpret
@pytest.mark.parametrize("seed_kind", ["small", "high_bits", "max"])
def test_torch_philox_bit_exact_with_triton(seed, seed_kind):
    key = {"small": seed % 1000, "high_bits": (seed << 31) | 12345, "max": 2**63 - 1}[seed_kind]
    g = torch.Generator().manual_seed(seed)
    n = 1000
    c0 = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    c1 = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    c0[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    c1[:4] = torch.tensor([0, 0, 2**31 - 1, 2**32 - 1])
    for c2, c3 in [(0, 0), (999, philox.STREAM_NOISE), (2**31 - 1, philox.STREAM_GUMBEL)]:
        expected = torch.stack(philox.philox4x32(key, c0, c1, c2, c3))
        got = triton_words(key, c0.to(DEVICE), c1.to(DEVICE), c2, c3).cpu()
        assert torch.equal(got, expected), f"seed={key} c2={c2} c3={c3}"


@pytest.mark.interpret
@pytest.mark.parametrize("sample_offset", [0, 1, 7])
def test_kernel_normals_match_torch_stream(seed, sample_offset):
    shape = (4, 3, 5, 5)  # 75 elements per sample: groups straddle samples
    z = kernel_noise(shape, seed, step=3, sample_offset=sample_offset).cpu()
    per = 75
    e = torch.arange(z.numel(), dtype=torch.int64) + sample_offset * per
    ref = philox.normal(seed, e, c2=3).view(shape)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_noise_moments_and_ks(seed):
    z = kernel_noise((128, 1024), seed % 2**40, step=11).cpu().flatten()  # 131072 draws
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert ks_statistic(z) < 2.69 / math.sqrt(n)  # alpha = 2 exp(-2 * 2.69^2) = 1e-6 per check (1.95, alpha 0.001, failed ~0.5% of CI runs)
    # each Philox word position alone is normal too (a layout bug would mix them up)
    for w in range(4):
        assert ks_statistic(z.view(-1, 4)[:, w]) < 2.69 / math.sqrt(n // 4)


def test_kernel_and_torch_streams_share_their_constants():
    """The kernels cannot import ``fastscore`` (layering), so the stream tags live in both places."""
    assert (_common.STREAM_NOISE.value, _common.STREAM_GUMBEL.value) == (philox.STREAM_NOISE, philox.STREAM_GUMBEL)
    assert philox.STREAM_NOISE != philox.STREAM_GUMBEL


def test_ks_statistic_can_fail():
    assert ks_statistic(torch.rand(100_000)) > 0.1       # uniform is not normal
    assert ks_statistic(1.1 * torch.randn(100_000)) > 0.01


def test_torch_noise_statistics(seed):
    z = philox.normal(seed, torch.arange(200_000), c2=5)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert ks_statistic(z) < 2.69 / math.sqrt(n)  # alpha 1e-6 (seed 1422762592 failed at 1.95)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert ks_statistic(z) == pytest.approx(scipy_stats.kstest(z.double().numpy(), "norm").statistic, abs=1e-9)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.interpret
def test_streams_of_different_seeds_and_steps_are_uncorrelated(seed):
    shape = (32, 1024)
    n = 32 * 1024
    base = kernel_noise(shape, seed, step=0)
    others = {
        "seed+1": kernel_noise(shape, seed + 1, step=0),
        "seed+2**32": kernel_noise(shape, seed + 2**32, step=0),
        "step+1": kernel_noise(shape, seed, step=1),
        "offset+1": kernel_noise(shape, seed, step=0, sample_offset=1),
    }
    for name, z in others.items():
        assert not torch.equal(z, base), name
        assert abs(_corr(base, z)) < 5 / math.sqrt(n), name
    # neighbouring elements within a group (same Philox call) are uncorrelated too
    g = base.cpu().view(-1, 4)
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]:
        assert abs(_corr(g[:, i], g[:, j])) < 5 / math.sqrt(n // 4)


def test_uncorrelated_check_can_fail(seed):
    z = philox.normal(seed, torch.arange(32 * 1024))
    assert abs(_corr(z, 0.5 * z + 0.1 * torch.randn_like(z))) > 0.5
