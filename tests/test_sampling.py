import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastscore.models import ScoreNet
from fastscore.sampling import initial_noise, sample, sample_ddim, sample_ddpm, step_coefficients, timesteps
from fastscore.schedule import make_schedule


class Oracle(nn.Module):
    """eps-prediction of a point mass at x0 = c: eps = (x_t - sqrt(ab) c) / sqrt(1 - ab)."""

    def __init__(self, c: float, schedule):
        super().__init__()
        self.c, self.ab = c, schedule.alpha_bar.float()

    def forward(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0)])
def test_samplers_recover_a_point_mass(sampler, eta):
    s = make_schedule("linear", 200)
    x = sample(Oracle(0.3, s), 7, shape=(1, 2, 2), schedule=s, sampler=sampler, steps=20, eta=eta, clip_x0=False)
    assert torch.allclose(x, torch.full_like(x, 0.3), atol=1e-4)


def test_ddim_eta0_matches_a_float64_reference_on_a_random_linear_model(seed):
    """Deterministic DDIM, eq. 12 of Song et al. in float64: x0 = (x - sqrt(1-ab) eps) / sqrt(ab),
    x_prev = sqrt(ab_prev) x0 + sqrt(1-ab_prev) eps, ab_prev = 1 after the last step."""
    g = torch.Generator().manual_seed(seed)
    s = make_schedule("cosine", 100)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64) / 2
    ab64 = s.alpha_bar

    def model(x, t):   # eps = W x + t / T, mixing channels
        return (torch.einsum("oc,bchw->bohw", w.to(x.dtype), x) + (t / 100).to(x.dtype).view(-1, 1, 1, 1))

    x_T = torch.randn(3, 2, 3, 3, generator=g)
    ts = timesteps(100, 7)
    got = sample_ddim(model, x_T.clone(), s, ts, eta=0.0, clip_x0=False, backend="torch")
    x = x_T.double()
    for i, t in enumerate(ts):
        ab, prev = ab64[t], (ab64[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        eps = model(x, torch.full((3,), t))
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    # the first step divides by sqrt(ab[99]) (tiny on the cosine schedule): the path grows to ~1e4, and an
    # element near 0 is a cancellation of terms that size, so the bound scales with max|x| (seed 1492: an
    # element -0.48 off by 1.9e-3 among elements ~1e4 failed rtol=atol=1e-4); a wrong coefficient is off by ~|x|
    torch.testing.assert_close(got.double(), x, rtol=0, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_calls_the_sampler_function_of_the_table(sampler):
    """``sample`` is the table's function on x_T: same noise, same steps, bit for bit."""
    s = make_schedule("linear", 30)
    m = ScoreNet("none", 4, T=30, backend="torch").eval()
    got = sample(m, 5, schedule=s, sampler=sampler, steps=6, eta=0.5, seed=4, batch_size=5)
    x = initial_noise((5, 3, 8, 8), 4)
    if sampler == "ddim":
        expected = sample_ddim(m, x, s, timesteps(30, 6), eta=0.5, seed=4, backend="torch")
    else:
        expected = sample_ddpm(m, x, s, seed=4, backend="torch")
    assert torch.equal(got, expected)


def test_sample_dispatches_by_name_and_passes_a_sampler_only_what_it_takes(monkeypatch):
    from fastscore import sampling
    seen = []

    def sample_zero(model, x, schedule, *, seed, sample_offset, clip_x0, backend):
        """A stand-in sampler that takes no grid and no eta."""
        seen.append(dict(seed=seed, sample_offset=sample_offset, clip_x0=clip_x0, backend=backend))
        return x.zero_()

    monkeypatch.setitem(sampling.SAMPLERS, "zero", sample_zero)
    x = sample(lambda x, t: x, 5, shape=(1, 2, 2), sampler="zero", steps=10_000, seed=7, batch_size=3)
    assert torch.equal(x, torch.zeros(5, 1, 2, 2))   # steps=10_000 > T: unused, so not validated
    assert seen == [dict(seed=7, sample_offset=0, clip_x0=True, backend="auto"),
                    dict(seed=7, sample_offset=3, clip_x0=True, backend="auto")]
    with pytest.raises(ValueError, match=r"sampler must be one of \['ddim', 'ddpm', 'zero'\], got 'euler'"):
        sample(lambda x, t: x, 5, shape=(1, 2, 2), sampler="euler")


def test_batch_size_invariance_and_reproducibility(seed):
    m = ScoreNet("softmax", 8, backend="torch").eval()
    a = sample(m, 10, seed=seed % 2**31, steps=5, batch_size=10)
    b = sample(m, 10, seed=seed % 2**31, steps=5, batch_size=3)
    c = sample(m, 10, seed=seed % 2**31 + 1, steps=5, batch_size=10)
    assert torch.allclose(a, b, atol=1e-5)  # same noise per sample; conv rounding may differ by batch size
    assert not torch.allclose(a, c)
    assert torch.equal(a, sample(m, 10, seed=seed % 2**31, steps=5, batch_size=10, backend="torch"))


def test_initial_noise_is_standard_normal_and_offset_keyed():
    x = initial_noise((4000, 3, 8, 8), seed=1)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert torch.equal(initial_noise((5, 3, 8, 8), 1, sample_offset=10), x[10:15])


def test_timesteps_and_coefficients():
    ts = timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and all(a > b for a, b in zip(ts, ts[1:]))
    s = make_schedule("cosine", 1000)
    cs = step_coefficients(s, ts, 0.0)
    assert cs[-1].sqrt_alpha_bar_prev == 1.0 and cs[-1].sigma == 0 and cs[-1].dir_coef == 0
    for c in cs:
        assert math.isclose(c.sqrt_alpha_bar_prev ** 2 + c.dir_coef ** 2 + c.sigma ** 2, 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("kw, err, match", [
    (dict(n=0), ValueError, "n must be >= 1, got 0"), (dict(n=2.0), TypeError, "n must be an int, got float"),
    (dict(sampler="euler"), ValueError, r"sampler must be one of \['ddim', 'ddpm'\], got 'euler'"),
    (dict(eta=-0.1), ValueError, "eta must be >= 0.0, got -0.1"), (dict(steps=2000), ValueError, "steps must be <= T=1000, got 2000"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(seed=-3), ValueError, r"seed must be in \[0, 2\*\*63\), got -3"),
    (dict(shape=(3, 8)), ValueError, r"shape must be three positive ints \(C, H, W\), got \(3, 8\)"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs a CUDA device"),
])
def test_sample_bad_input(kw, err, match):
    args = dict(n=4) | kw
    with pytest.raises(err, match=match):
        sample(ScoreNet("none", 4), **args)


def test_sample_needs_shape_for_plain_callables():
    with pytest.raises(ValueError, match="shape"):
        sample(lambda x, t: x, 3)
    x = sample(lambda x, t: torch.zeros_like(x), 3, shape=(1, 2, 2), steps=4)
    assert x.shape == (3, 1, 2, 2)


@pytest.mark.interpret
def test_triton_backend_is_batch_size_invariant_and_matches_torch(seed, device):
    m = ScoreNet("none", 8, backend="triton").to(device).eval()
    s = seed % 2**31
    a = sample(m, 10, seed=s, steps=3, batch_size=10, device=device)
    b = sample(m, 10, seed=s, steps=3, batch_size=3, device=device)
    m.backend = "torch"
    c = sample(m, 10, seed=s, steps=3, batch_size=4, device=device)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, c, atol=1e-4)


def test_device_tensor_seed_and_offset_match_ints(seed, device):
    from fastscore.ops import ddim_coefficients, reverse_step
    x, e = torch.randn(3, 3, 5, 5, device=device), torch.randn(3, 3, 5, 5, device=device)
    c = ddim_coefficients(0.4, 0.5, 1.0)
    for backend in ("torch", "triton"):
        a = reverse_step(x, e, c, seed=11, step=2, sample_offset=7, backend=backend)
        b = reverse_step(x, e, c, seed=torch.tensor([11], device=device), step=2,
                         sample_offset=torch.tensor([7], device=device), backend=backend)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sample_offset"):
        reverse_step(x, e, c, seed=1, step=0, sample_offset=torch.tensor([1.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager_and_is_captured_once_across_calls(monkeypatch):
    from fastscore import graphs, sampling
    sampling.clear_graph_cache()
    captures = []
    real = graphs.capture
    monkeypatch.setattr(graphs, "capture", lambda fn, device: captures.append(device) or real(fn, device))
    m = ScoreNet("softmax", 16).cuda().eval()
    a = sample(m, 300, seed=3, steps=10, batch_size=100, cuda_graph=False)
    b = sample(m, 300, seed=3, steps=10, batch_size=100, cuda_graph=True)
    c = sample(m, 300, seed=3, steps=10, batch_size=100, cuda_graph=True)
    assert torch.allclose(a, b, atol=1e-4) and torch.equal(b, c)
    assert len(captures) == 1
    sampling.clear_graph_cache()


def test_one_step_starts_from_pure_noise_and_small_T_schedules_end_in_noise():
    assert timesteps(1000, 1) == [999] and timesteps(2, 1) == [1]   # every grid starts at T-1
    for T in (50, 100, 1000):
        assert make_schedule("linear", T).alpha_bar[-1] < 1e-3


@pytest.mark.parametrize("T", [1000, 2, 37, 100, 4000])
def test_timesteps_are_the_float64_linspace_grid_for_every_step_count(T):
    """np.linspace(0, T-1, steps) in float64, rounded half to even, reversed: for T = 1000 the old
    float32 grid differed in 137 of the step counts 2..1000 (15 steps: 499 instead of 500)."""
    for steps in range(2, T + 1, 1 if T <= 1000 else 7):
        ts = timesteps(T, steps)
        expected = np.linspace(0, T - 1, steps, dtype=np.float64).round()[::-1].astype(np.int64).tolist()
        assert ts == expected, steps
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    if T == 1000:
        assert 500 in timesteps(1000, 15) and 499 not in timesteps(1000, 15)
        assert timesteps(1000, 3) == [999, 500, 0]   # 499.5: a tie, to even


def test_timesteps_match_diffusers_ddim_linspace_grid():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    for steps in range(2, 1001):
        sched.set_timesteps(steps)
        assert timesteps(1000, steps) == sched.timesteps.tolist(), steps


@pytest.mark.parametrize("T, steps, err, match", [
    (1000, 0, ValueError, "steps must be >= 1, got 0"), (1000, 1001, ValueError, "steps must be <= T=1000, got 1001"),
    (1000, 2.0, TypeError, "steps must be an int, got float"), (0, 1, ValueError, "T must be >= 1, got 0"),
])
def test_timesteps_bad_input(T, steps, err, match):
    with pytest.raises(err, match=match):
        timesteps(T, steps)


# ------------------------------------------------------------------------------------------------
# one backend per sampling run
# ------------------------------------------------------------------------------------------------
def test_sample_backend_defaults_to_the_models_and_refuses_to_disagree():
    from fastscore.sampling import sampling_backend
    m = ScoreNet("none", 4, backend="torch")
    assert sampling_backend(m, None) == "torch" and sampling_backend(m, "torch") == "torch"
    assert sampling_backend(lambda x, t: x, None) == "auto"
    assert sampling_backend(lambda x, t: x, "torch") == "torch"
    with pytest.raises(ValueError, match="differs from the model's backend 'torch'"):
        sample(m, 2, steps=2, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        sample(lambda x, t: x, 2, shape=(1, 2, 2), steps=2, backend="cuda")
    assert sample(m, 2, steps=2).shape == (2, 3, 8, 8)


# ------------------------------------------------------------------------------------------------
# non-finite outputs are reported
# ------------------------------------------------------------------------------------------------
def test_nan_weights_raise_instead_of_returning_nan_samples():
    m = ScoreNet("softmax", 8, backend="torch")
    with torch.no_grad():
        m.head2.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="6 of 6 samples hold NaN or inf"):
        sample(m, 6, steps=2, batch_size=4)
    with pytest.warns(RuntimeWarning, match="6 of 6 samples hold NaN or inf"):
        x = sample(m, 6, steps=2, batch_size=4, on_nonfinite="warn")
    assert torch.isnan(x).all()
    with pytest.raises(ValueError, match="on_nonfinite"):
        sample(m, 6, steps=2, on_nonfinite="ignore")


def test_finite_samples_do_not_warn(recwarn):
    sample(ScoreNet("none", 4, backend="torch"), 3, steps=2)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# ------------------------------------------------------------------------------------------------
# CUDA-graph path, on CPU: capture and replay stand-ins that run the captured function, so the
# cache, its keys and the shared step code are checked without a GPU
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_graphs(monkeypatch):
    """Graphs 'possible' on CPU; warm-up runs the loop; capture records it and replay re-runs it."""
    from fastscore import graphs, sampling
    calls = {"capture": 0, "replay": 0, "loop": 0}
    real_loop = sampling._run_loop

    def loop(*a, **kw):
        calls["loop"] += 1
        return real_loop(*a, **kw)

    def capture(fn, device):
        calls["capture"] += 1

        def replay():
            calls["replay"] += 1
            fn()
        return replay

    monkeypatch.setattr(graphs, "possible", lambda device: True)
    monkeypatch.setattr(graphs, "warm_up", lambda fn, device: fn())
    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(sampling, "_run_loop", loop)
    sampling.clear_graph_cache()
    yield calls
    sampling.clear_graph_cache()


@pytest.mark.interpret
@pytest.mark.cpu_only   # CPU stand-ins for capture and replay; on CUDA the real graphs are tested below
def test_graph_path_is_captured_once_and_replayed_across_calls(fake_graphs, seed):
    from fastscore import sampling
    m = ScoreNet("none", 8, backend="triton").eval()
    s = seed % 2**31
    eager = sample(m, 10, seed=s, steps=3, batch_size=4, cuda_graph=False)
    assert fake_graphs == {"capture": 0, "replay": 0, "loop": 3}   # the eager path runs the same loop
    a = sample(m, 10, seed=s, steps=3, batch_size=4, cuda_graph=True)
    # batches of 4, 4, 2: two shapes, each warmed up (its first batch) and captured once
    assert fake_graphs["capture"] == 2 and fake_graphs["replay"] == 1 and len(sampling._GRAPHS) == 2
    assert fake_graphs["loop"] == 3 + 2 + 1  # warm-ups and the captured function: the same loop code
    b = sample(m, 10, seed=s + 1, steps=3, batch_size=4, cuda_graph=True)  # another seed: same graphs
    assert fake_graphs["capture"] == 2 and fake_graphs["replay"] == 4
    assert torch.equal(a, eager)
    assert torch.equal(b, sample(m, 10, seed=s + 1, steps=3, batch_size=4, cuda_graph=False))
    sample(m, 4, seed=s, steps=4, batch_size=4, cuda_graph=True)  # other sampler settings: a new graph
    assert fake_graphs["capture"] == 3


def test_graph_key_follows_parameters_shape_and_settings():
    from fastscore.sampling import _Settings, graph_key
    sched = make_schedule("linear", 100)
    m = ScoreNet("none", 4)

    def ddim(ts=(99, 50, 0), eta=1.0, schedule=sched):
        return _Settings("ddim", schedule, dict(ts=list(ts), eta=eta, clip_x0=True, backend="auto"))

    st = ddim()
    x = torch.zeros(4, 3, 8, 8)
    k = graph_key(m, st, x)
    assert k == graph_key(m, ddim(), x.clone())
    assert k != graph_key(m, ddim(eta=0.0), x)
    assert k != graph_key(m, ddim(ts=(99, 0)), x)
    assert k != graph_key(m, ddim(schedule=make_schedule("cosine", 100)), x)
    assert k != graph_key(m, _Settings("ddpm", sched, dict(clip_x0=True, backend="auto")), x)
    assert k != graph_key(m, st, torch.zeros(5, 3, 8, 8))
    assert k != graph_key(m, st, x.double())
    assert k != graph_key(ScoreNet("none", 4), st, x)
    with torch.no_grad():
        m.conv1.weight.add_(1.0)                       # in place: a replay reads the new values
    assert k == graph_key(m, st, x)
    m.conv1.weight = torch.nn.Parameter(m.conv1.weight.detach().clone())  # replaced: new memory
    assert k != graph_key(m, st, x)


def test_graph_cache_is_bounded_and_drops_dead_models(fake_graphs, monkeypatch):
    import gc

    from fastscore import graphs, sampling
    monkeypatch.setattr(graphs, "capture", lambda fn, device: (lambda: None))  # a real graph holds no Python objects
    m = ScoreNet("none", 4, backend="torch")
    st = sampling._Settings("ddim", make_schedule("linear", 100), dict(ts=[99, 0], eta=1.0, clip_x0=True,
                                                                      backend="torch"))
    for b in range(1, sampling.GRAPH_CACHE_SIZE + 3):
        g = sampling._graph_for(m, st, torch.zeros(b, 3, 8, 8))
        g(torch.zeros(b, 3, 8, 8), 0, 0)
        assert g.model is None                         # the cache does not keep the model alive
    assert len(sampling._GRAPHS) == sampling.GRAPH_CACHE_SIZE
    assert sampling._graph_for(m, st, torch.zeros(sampling.GRAPH_CACHE_SIZE + 2, 3, 8, 8)) is g
    del m, g
    gc.collect()
    assert len(sampling._GRAPHS) == 0


def test_failed_capture_warns_with_its_cause_and_samples_eagerly(fake_graphs, monkeypatch):
    from fastscore import graphs, sampling

    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "capture", broken)
    m = ScoreNet("none", 4, backend="torch")
    st = sampling._Settings("ddim", make_schedule("linear", 100), dict(ts=[99, 0], eta=1.0, clip_x0=True,
                                                                      backend="torch"))
    x0 = initial_noise((3, 3, 8, 8), 1)
    g = sampling._graph_for(m, st, x0)
    with pytest.warns(RuntimeWarning, match="capture of the sampling loop failed .*RuntimeError: operation not"):
        y = g(x0, 1, 0).clone()
    assert torch.equal(y, sampling._run_loop(m, st, x0.clone(), 1, 0))   # the warm-up's result is kept
    assert sampling._graph_for(m, st, x0) is None      # that shape samples eagerly from now on


def test_cuda_graph_needs_the_fused_update(monkeypatch):
    from fastscore import graphs
    monkeypatch.setattr(graphs, "possible", lambda device: True)
    with pytest.raises(ValueError, match="needs the fused reverse step"):
        sample(ScoreNet("none", 4, backend="torch"), 2, steps=2, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph"):
        sample(ScoreNet("none", 4, backend="torch"), 2, steps=2, cuda_graph="yes")
