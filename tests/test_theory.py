"""Analytic scores (fastscore.theory) against brute-force float64 loops on tiny inputs."""
import math

import numpy as np
import pytest
import torch

from fastscore import KVConfig, make_dataset, make_schedule, sample, score
from fastscore.theory import (
    ELSScore,
    IdealScore,
    calibrate_patch_sizes,
    correlation_summary,
    position_classes,
    sample_correlation,
)

T = 1000
SCHED = make_schedule("linear", T)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread. On the shared 2-core CI box, two threads under load made
    these ops ~40x slower (spin-waiting); restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# brute-force references: plain loops, float64, no deduplication, no attention identity
# --------------------------------------------------------------------------------------------
def brute_ideal_x0(train: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    ab = float(SCHED.alpha_bar[t])
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        logits = torch.tensor([-((x[b] - math.sqrt(ab) * p) ** 2).sum().item() / (2 * (1 - ab)) for p in train],
                              dtype=torch.float64)
        w = torch.softmax(logits, 0)
        out[b] = (w.view(-1, 1, 1, 1) * train.double()).sum(0)
    return out


def _window(img: torch.Tensor, i: int, j: int, k: int, padding: str):
    """The k x k window around (i, j) as a flat float64 vector and its in-image mask."""
    C, H, W = img.shape
    d = k // 2
    vals, mask = [], []
    for u in range(-d, d + 1):
        for v in range(-d, d + 1):
            y, z = i + u, j + v
            if padding == "circular":
                y, z, inside = y % H, z % W, True
            else:
                inside = 0 <= y < H and 0 <= z < W
            mask.append(inside)
            vals.append(img[:, y, z].double() if inside else torch.zeros(C, dtype=torch.float64))
    return torch.cat(vals), tuple(mask)


def brute_els_x0(train: torch.Tensor, x: torch.Tensor, t: int, k: int, padding: str) -> torch.Tensor:
    """For each pixel: posterior mean of the centre over all training windows (every image, every
    position) whose padding mask equals the query window's."""
    ab = float(SCHED.alpha_bar[t])
    a, s2 = math.sqrt(ab), 1 - ab
    N, _, H, W = train.shape
    cands = [(*_window(train[n], i, j, k, padding), train[n, :, i, j].double())
             for n in range(N) for i in range(H) for j in range(W)]
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(H):
            for j in range(W):
                q, m = _window(x[b], i, j, k, padding)
                sel = [(p, c) for p, mm, c in cands if mm == m]
                logits = torch.stack([-((q - a * p) ** 2).sum() / (2 * s2) for p, _ in sel])
                w = torch.softmax(logits, 0)
                out[b, :, i, j] = (w[:, None] * torch.stack([c for _, c in sel])).sum(0)
    return out


def tiny_train(seed: int, n: int = 4, C: int = 2, H: int = 5, W: int = 6) -> torch.Tensor:
    """Discrete-valued float64 images (patches repeat) with duplicated images (multiplicities)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-1, 2, (n, C, H, W), generator=g).double()
    return torch.cat([base, base[:2], base[:1]])


def noisy(train: torch.Tensor, t: int, B: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    ab = float(SCHED.alpha_bar[t])
    idx = torch.randint(0, train.shape[0], (B,), generator=g)
    return math.sqrt(ab) * train[idx] + math.sqrt(1 - ab) * torch.randn(B, *train.shape[1:], generator=g,
                                                                        dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# ideal score
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("t", [50, 400, 999])
def test_ideal_matches_brute_force(seed, dedup, t):
    train = tiny_train(seed)
    x = noisy(train, t, 3, seed)
    m = IdealScore(train, SCHED, deduplicate=dedup)
    want = brute_ideal_x0(train, x, t)
    torch.testing.assert_close(m.denoise(x, torch.full((3,), t)), want, rtol=1e-10, atol=1e-10)
    ab = float(SCHED.alpha_bar[t])
    eps = (x - math.sqrt(ab) * want) / math.sqrt(1 - ab)
    torch.testing.assert_close(m(x, torch.full((3,), t)), eps, rtol=1e-9, atol=1e-9)


def test_ideal_dedup_identical_and_smaller(seed):
    train = tiny_train(seed)
    x = noisy(train, 300, 4, seed)
    t = torch.tensor([300, 300, 700, 20])                                   # mixed timesteps in one batch
    a, b = IdealScore(train, SCHED), IdealScore(train, SCHED, deduplicate=False)
    assert a.n_keys == 4 < b.n_keys == 7
    torch.testing.assert_close(a(x, t), b(x, t), rtol=1e-12, atol=1e-12)
    for i in range(4):                                                       # per-sample timesteps honoured
        torch.testing.assert_close(a(x[i:i + 1], t[i:i + 1]), a(x, t)[i:i + 1], rtol=1e-12, atol=1e-12)


def test_ideal_small_noise_returns_nearest_training_image(seed):
    images, _ = make_dataset(KVConfig(), 64, seed % 2**31)                  # float32 path
    m = IdealScore(images, SCHED)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1                         # arbitrary points
    ab = float(SCHED.alpha_bar[0])
    distinct = torch.unique(images.double().flatten(1), dim=0)
    d2 = torch.cdist(x.double().flatten(1), math.sqrt(ab) * distinct) ** 2  # what the posterior weighs
    best = d2.topk(2, dim=1, largest=False)
    # a near tie is a real mixture even at t=0 (weight ratio exp(-gap / (2 (1 - ab)))): keep rows whose
    # runner-up weighs under exp(-100); seed 4256671052 drew a gap of 0.0011, a 0.4 % mixture
    clear = (best.values[:, 1] - best.values[:, 0]) > 200 * (1 - ab)
    assert clear.sum() >= 8, f"only {int(clear.sum())} of 16 random points have a clear nearest image"
    nearest = distinct[best.indices[:, 0]].view_as(x).float()
    got = m.denoise(x, torch.zeros(16, dtype=torch.long))
    torch.testing.assert_close(got[clear], nearest[clear], rtol=0, atol=1e-5)
    eps = torch.randn(16, 3, 8, 8, generator=g)
    xt = math.sqrt(ab) * images[:16] + math.sqrt(1 - ab) * eps
    torch.testing.assert_close(m(xt, torch.zeros(16, dtype=torch.long)), eps, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------
# ELS machine
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dedup", [True, False])
def test_els_matches_brute_force(seed, padding, k, dedup):
    train = tiny_train(seed)
    t = [100, 500, 900][seed % 3]
    x = noisy(train, t, 2, seed)
    m = ELSScore(train, SCHED, k, padding=padding, deduplicate=dedup)
    want = brute_els_x0(train, x, t, k, padding)
    tt = torch.full((2,), t)
    torch.testing.assert_close(m.denoise(x, tt), want, rtol=1e-9, atol=1e-9)
    ab = float(SCHED.alpha_bar[t])
    torch.testing.assert_close(m(x, tt), (x - math.sqrt(ab) * want) / math.sqrt(1 - ab), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_els_dedup_identical_and_smaller(seed, padding):
    train = tiny_train(seed)
    x = noisy(train, 300, 3, seed)
    t = torch.tensor([300, 600, 30])
    a = ELSScore(train, SCHED, 3, padding=padding)
    b = ELSScore(train, SCHED, 3, padding=padding, deduplicate=False)
    assert a.n_keys(3) < b.n_keys(3) == 7 * 5 * 6
    torch.testing.assert_close(a(x, t), b(x, t), rtol=1e-11, atol=1e-11)


def test_els_float32_close_to_float64(seed):
    images, _ = make_dataset(KVConfig(), 200, seed % 2**31)
    x = noisy(images.double(), 400, 4, seed)
    m32 = ELSScore(images, SCHED, 3)
    m64 = ELSScore(images.double(), SCHED, 3)
    t = torch.full((4,), 400)
    torch.testing.assert_close(m32(x.float(), t).double(), m64(x, t), rtol=0, atol=2e-4)


def test_els_circular_translation_equivariant(seed):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(3, 2, 6, 7, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)
    t = torch.full((2,), 250)
    circ = ELSScore(train, SCHED, 3, padding="circular")
    zero = ELSScore(train, SCHED, 3, padding="zeros")
    for shift in [(1, 0), (2, 3), (-1, 5)]:
        rolled = torch.roll(x, shift, dims=(2, 3))
        torch.testing.assert_close(circ(rolled, t), torch.roll(circ(x, t), shift, dims=(2, 3)),
                                   rtol=1e-10, atol=1e-10)
        # zero padding is only equivariant away from the border: the test can tell them apart
        assert not torch.allclose(zero(rolled, t), torch.roll(zero(x, t), shift, dims=(2, 3)), atol=1e-6)


def test_els_full_patch_zero_padding_is_local_to_position(seed):
    """With zeros padding every padding class is one position when k equals the image size minus
    nothing in between: each pixel sees only same-position patches of the training set."""
    classes = position_classes(5, 5, 5, "zeros")
    assert sorted(len(c) for c in classes) == [1] * 25
    classes = position_classes(6, 8, 3, "zeros")
    assert sum(len(c) for c in classes) == 48 and len(classes) == 9
    assert len(position_classes(6, 8, 3, "circular")) == 1


def test_els_patch_size_schedule(seed):
    train = tiny_train(seed)
    x = noisy(train, 500, 2, seed)
    sizes = [3 if t < 500 else 1 for t in range(T)]
    sched = ELSScore(train, SCHED, sizes, padding="zeros")
    fn = ELSScore(train, SCHED, lambda t: 3 if t < 500 else 1, padding="zeros")
    for t, k in [(499, 3), (500, 1), (900, 1)]:
        tt = torch.full((2,), t)
        fixed = ELSScore(train, SCHED, k, padding="zeros")
        torch.testing.assert_close(sched(x, tt), fixed(x, tt), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fn(x, tt), fixed(x, tt), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ELSScore(train, SCHED, 1)(x, torch.full((2,), 499)),
                              sched(x, torch.full((2,), 499)))


def test_els_triton_interpreter_matches_reference(seed, device):
    """The attention kernel (compiled on CUDA, interpreted on CPU) gives the reference path's ELS score."""
    from conftest import TRITON_RUNS
    if not TRITON_RUNS:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 on CPU")
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(-1, 2, (3, 3, 5, 5), generator=g).float().to(device)
    x = torch.randn(1, 3, 5, 5, generator=g).to(device)
    t = torch.full((1,), 300, device=device)
    ref = ELSScore(train, SCHED, 3, backend="torch").to(device)(x, t)
    tri = ELSScore(train, SCHED, 3, backend="triton").to(device)(x, t)
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)
    ref = IdealScore(train, SCHED, backend="torch").to(device)(x, t)
    tri = IdealScore(train, SCHED, backend="triton").to(device)(x, t)
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# sampling: the ideal score memorises
# --------------------------------------------------------------------------------------------
def test_ideal_samples_are_memorised(seed):
    cfg = KVConfig()
    images, contents = make_dataset(cfg, 6, seed % 2**31)
    x = sample(IdealScore(images, SCHED), 48, steps=50, eta=1.0, seed=seed % 2**31)
    rates = score(cfg, x, contents).rates
    assert rates["valid"].k == 48 and rates["consistent"].k == 48      # consistency 100%
    assert rates["novel"].k == 0                                        # novelty 0%
    d = torch.cdist(x.flatten(1), images.flatten(1)).min(1).values
    assert float(d.max()) < 0.05


def test_els_samples_run_through_sample(seed):
    images, _ = make_dataset(KVConfig(), 50, seed % 2**31)
    m = ELSScore(images, SCHED, 3)
    x = sample(m, 8, steps=10, seed=3)
    assert x.shape == (8, 3, 8, 8) and bool(torch.isfinite(x).all())
    assert torch.equal(x, sample(m, 8, steps=10, seed=3))                # deterministic
    # rows are independent (up to float32 rounding, so split trajectories are not compared bitwise)
    xt, t = torch.randn(8, 3, 8, 8), torch.full((8,), 300)
    torch.testing.assert_close(m(xt[:3], t[:3]), m(xt, t)[:3], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# calibration and correlation
# --------------------------------------------------------------------------------------------
def test_calibration_recovers_the_els_locality(seed):
    """A 'network' that is itself an ELS machine with k = 1 at high noise and 3 at low noise."""
    images, _ = make_dataset(KVConfig(), 40, seed % 2**31)
    truth = ELSScore(images, SCHED, [3 if t < 500 else 1 for t in range(T)])
    cal = calibrate_patch_sizes(truth, images, SCHED, sizes=(1, 3, 5), t_values=(900, 600, 400, 100), n=4,
                                seed=seed % 2**31)
    assert cal.timesteps == [900, 600, 400, 100]
    assert cal.median.tolist() == [1, 1, 3, 3] and cal.mode.tolist() == [1, 1, 3, 3]
    assert cal.cosine.shape == (4, 4, 3)
    best_cos = cal.cosine.max(2).values
    assert float(best_cos.min()) > 1 - 1e-5
    ps = cal.patch_schedule(T)
    assert len(ps) == T and ps[0] == 3 and ps[999] == 1 and ps[250] == 3
    assert ps[499] == 3 and ps[500] == 3 and ps[501] == 1           # nearest of 400 / 600; tie -> 400


def test_sample_correlation(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(10, 3, 4, 4, generator=g)
    b = 0.5 * a + torch.randn(10, 3, 4, 4, generator=g)
    r = sample_correlation(a, b)
    want = [np.corrcoef(a[i].flatten().numpy(), b[i].flatten().numpy())[0, 1] for i in range(10)]
    np.testing.assert_allclose(r.numpy(), want, rtol=1e-6)
    torch.testing.assert_close(sample_correlation(a, 3 * a + 2), torch.ones(10, dtype=torch.float64))
    assert bool(torch.isnan(sample_correlation(torch.ones(1, 5), torch.randn(1, 5))).all())
    s = correlation_summary(torch.tensor([0.1, 0.2, 0.3, 0.4, float("nan")]))
    assert s["n"] == 4 and s["median"] == pytest.approx(0.25) and s["q25"] == pytest.approx(0.175)
    assert s["q75"] == pytest.approx(0.325)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_input_errors():
    good = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="4 dimensions"):
        IdealScore(torch.zeros(3, 8, 8), SCHED)
    with pytest.raises(ValueError, match="empty"):
        ELSScore(torch.zeros(0, 3, 8, 8), SCHED, 3)
    with pytest.raises(ValueError, match="empty"):
        IdealScore(torch.zeros(0, 3, 8, 8), SCHED)
    with pytest.raises(TypeError, match="torch.Tensor"):
        IdealScore(np.zeros((2, 3, 8, 8)), SCHED)
    with pytest.raises(TypeError, match="floating"):
        IdealScore(torch.zeros(2, 3, 8, 8, dtype=torch.long), SCHED)
    with pytest.raises(ValueError, match="finite"):
        IdealScore(torch.full((2, 3, 8, 8), float("nan")), SCHED)
    with pytest.raises(TypeError, match="Schedule"):
        IdealScore(good, "linear")
    with pytest.raises(ValueError, match="odd"):
        ELSScore(good, SCHED, 4)
    with pytest.raises(ValueError, match="larger than"):
        ELSScore(good, SCHED, 9)
    with pytest.raises(ValueError, match=">= 1"):
        ELSScore(good, SCHED, 0)
    with pytest.raises(ValueError, match="odd"):
        ELSScore(good, SCHED, [3] * 999 + [2])
    with pytest.raises(ValueError, match="T=1000"):
        ELSScore(good, SCHED, [3, 5])
    with pytest.raises(TypeError, match="patch_size"):
        ELSScore(good, SCHED, 3.0)
    with pytest.raises(ValueError, match="padding"):
        ELSScore(good, SCHED, 3, padding="reflect")
    with pytest.raises(ValueError, match="odd"):
        ELSScore(good, SCHED, lambda t: 2)(good, torch.zeros(2, dtype=torch.long))
    m = ELSScore(good, SCHED, 3)
    with pytest.raises(ValueError, match="shape"):
        m(torch.zeros(2, 3, 7, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="timesteps"):
        m(good, torch.full((2,), 1000))
    with pytest.raises(ValueError, match="same shape"):
        sample_correlation(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="odd"):
        calibrate_patch_sizes(m, good, SCHED, sizes=(2,))
