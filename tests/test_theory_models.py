"""The CNN's depth (ModelConfig.depth): the receptive field it sets, and checkpoints of before."""
import pytest
import torch

from fastscore.models import ModelConfig, ScoreNet


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_depth_sets_the_receptive_field(depth, seed):
    """The CNN's output at (0, 0) sees exactly the pixels within Chebyshev distance ``depth``."""
    torch.manual_seed(seed)
    m = ScoreNet("none", 8, image_channels=1, image_size=12, depth=depth).eval()
    x = torch.randn(1, 1, 12, 12, requires_grad=True)
    m(x, torch.tensor([300]))[0, 0, 0, 0].backward()
    seen = x.grad[0, 0].abs() > 0
    ys, xs = seen.nonzero().unbind(1)
    assert int(ys.max()) == depth and int(xs.max()) == depth     # nothing beyond, everything up to it
    assert bool(seen[: depth + 1, : depth + 1].all())


def test_default_depth_keeps_the_parameters_of_before():
    m = ScoreNet("softmax", 16)
    names = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert names == {"time_mlp", "conv1", "conv2", "qkv", "proj", "head1", "head2"}
    assert m.time_mlp[2].out_features == 32
    old = {k: v for k, v in m.config.to_dict().items() if k != "depth"}     # a config written before depth
    assert ModelConfig(**old) == m.config
    deep = ScoreNet("none", 16, depth=4)
    assert hasattr(deep, "conv4") and deep.time_mlp[2].out_features == 64


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=0)


@pytest.mark.parametrize("members", ["vmap", "loop"])
@pytest.mark.parametrize("attention", ["none", "softmax"])
def test_a_deep_ensemble_equals_each_member(seed, attention, members):
    """The one trainer's ensemble engine runs deeper CNNs unchanged (it calls ScoreNet.embed)."""
    from fastscore.ensemble import Ensemble
    torch.manual_seed(seed)
    models = [ScoreNet(attention, 8, image_channels=1, image_size=8, depth=4) for _ in range(2)]
    ens = Ensemble(models, members=members).eval()
    x = torch.randn(2, 3, 1, 8, 8)
    t = torch.randint(0, 1000, (2, 3))
    out = ens.run(x, t)
    for m, net in enumerate(models):
        ref = net.eval()(x[m], t[m])
        assert torch.allclose(out[m], ref, rtol=1e-5, atol=1e-6), (m, (out[m] - ref).abs().max())
