import pytest
import torch
import torch.nn as nn

from fastscore.models import ATTENTIONS, ModelConfig, ScoreNet, build_model


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_shapes_and_gradients(attention, seed):
    m = ScoreNet(attention, 16, image_size=8)
    x = torch.randn(3, 3, 8, 8)
    t = torch.randint(0, 1000, (3,))
    y = m(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_locality(attention, seed):
    """A pixel far from x changes the CNN's output at x not at all, and attention models' measurably."""
    torch.manual_seed(seed)
    m = ScoreNet(attention, 16, image_size=8).eval()
    with torch.no_grad():
        for p in m.parameters():  # make the attention non-trivial
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([500, 500])
    y = x.clone()
    y[:, :, 7, 7] += 3.0  # Chebyshev distance 7 from (0, 0), beyond the 5x5 receptive field
    with torch.no_grad():
        a, b = m(x, t), m(y, t)
    diff = (a - b)[:, :, :3, :3].abs().max().item()
    near = (a - b)[:, :, 5:, 5:].abs().max().item()
    assert near > 1e-4  # the change is seen nearby
    if attention == "none":
        assert diff == 0.0
    elif attention == "top1":
        # the hard argmax may or may not change; the surrogate's gradient path must reach the far pixel
        x2 = x.clone().requires_grad_(True)
        m.train()
        out = m(x2, t)
        out[:, :, 0, 0].sum().backward()
        assert x2.grad[:, :, 7, 7].abs().max() > 0
    else:
        assert diff > 1e-6


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cnn_has_no_layer_that_pools_over_positions(attention):
    m = ScoreNet(attention)
    banned = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d,
              nn.InstanceNorm2d)
    assert not any(isinstance(mod, banned) for mod in m.modules())


def test_coord_channels_break_translation_equivariance_only_through_position():
    m = ScoreNet("none", 8, coord_channels=True)
    x = torch.randn(1, 3, 8, 8)
    assert m(x, torch.tensor([10])).shape == x.shape


def test_config_round_trip():
    m = ScoreNet("softmax", 24, attn_dim=8, temperature=0.5)
    m2 = build_model(ModelConfig(**m.config.to_dict()))
    assert m2.config == m.config
    assert sum(p.numel() for p in m2.parameters()) == sum(p.numel() for p in m.parameters())


def test_attention_weights_are_distributions():
    for a in ("identity", "softmax", "top1"):
        m = ScoreNet(a, 8)
        w = m.attention_weights(torch.randn(2, 3, 8, 8), torch.tensor(100))
        assert w.shape == (2, 64, 64)
        assert torch.allclose(w.sum(-1), torch.ones(2, 64))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(attention="linear"), ValueError, r"attention must be one of \['none', 'identity', 'top1', 'softmax'\], got 'linear'"),
    (dict(width=0), ValueError, "width must be >= 1, got 0"), (dict(width=2.0), TypeError, "width must be an int, got float"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0.0, got 0.0"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \['auto', 'triton', 'torch'\], got 'cuda'"),
])
def test_bad_model_args(kwargs, err, match):
    kw = dict(attention="none") | kwargs
    with pytest.raises(err, match=match):
        ScoreNet(**kw)


def test_bad_forward_shape():
    with pytest.raises(ValueError, match="x must have shape"):
        ScoreNet("none", 8)(torch.randn(2, 3, 9, 9), torch.tensor([1, 2]))


def test_bad_timesteps():
    m = ScoreNet("none", 4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="t must lie"):
        m(x, torch.tensor([0, 1000]))
    with pytest.raises(TypeError, match="integer"):
        m(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        m(x, torch.tensor([1, 2, 3]))
    assert m(x, 5).shape == x.shape


@pytest.mark.parametrize("attention", ["softmax", "top1"])
def test_attn_patch_feeds_the_raw_neighbourhood_to_the_projections(attention, seed):
    m = ScoreNet(attention, 16, attn_dim=8, image_size=8, attn_patch=True)
    assert m.qkv.in_features == 16 + 9 * 3          # token + raw 3x3 x 3 channels
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,))
    y = m(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert m.qkv.weight.grad[:, 16:].abs().sum() > 0   # the patch columns are used and trained
    w = m.attention_weights(x, t)
    assert w.shape == (2, 64, 64) and torch.allclose(w.sum(-1), torch.ones(2, 64), atol=1e-5)
    with pytest.raises(ValueError, match="attn_patch"):
        m.attend(torch.randn(2, 16, 8, 8))
    with pytest.raises(ValueError, match="attn_patch"):
        ModelConfig("identity", attn_patch=True)


def test_every_setting_is_declared_once_with_its_help():
    import dataclasses

    from fastscore.data import KVConfig
    from fastscore.training import TrainConfig
    for cls in (ModelConfig, TrainConfig, KVConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    # ScoreNet takes the config's fields by name: nothing is re-declared in its signature
    m = ScoreNet("softmax", 16, attn_dim=8, image_size=12, coord_channels=True, temperature=0.5)
    assert m.config == ModelConfig("softmax", 16, attn_dim=8, image_size=12, coord_channels=True, temperature=0.5)
    assert ScoreNet("softmax", 16).config.attn_dim == 16          # attn_dim defaults to the width
    assert build_model(m.config).config == m.config
    with pytest.raises(TypeError, match="attn_dims"):
        ScoreNet("softmax", 16, attn_dims=8)


@pytest.mark.parametrize("attention, scale_of", [("identity", "width"), ("softmax", "attn_dim"), ("top1", "attn_dim")])
def test_the_attention_scale_rule_is_the_one_the_layer_and_the_figures_use(attention, scale_of, seed):
    """``attention_scale``: width**-0.5 for identity (q = k = z), attn_dim**-0.5 for the projections; the
    layer's output and ``attention_weights`` both follow it, and top-1's surrogate temperature is
    ``temperature / scale``."""
    from unittest import mock

    from fastscore import ops
    m = ScoreNet(attention, 12, attn_dim=6, temperature=0.7, backend="torch").train()
    want = {"width": 12, "attn_dim": 6}[scale_of] ** -0.5
    assert m.attention_scale() == want
    seen = []
    real = ops.attention_block

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    with mock.patch.object(ops, "attention_block", spy):
        m(x, t)
    kw, = seen
    assert kw["kind"] == attention and kw["scale"] == want
    if attention == "top1":
        assert kw["temperature"] == pytest.approx(0.7 / want, rel=1e-15)
    if attention != "top1":
        z = m.embed(x, t).flatten(2).transpose(1, 2).double()
        q = z if attention == "identity" else m.qkv(z.float()).chunk(3, -1)[0].double()
        k = z if attention == "identity" else m.qkv(z.float()).chunk(3, -1)[1].double()
        ref = torch.softmax(q @ k.transpose(1, 2) * want, -1)
        assert torch.allclose(m.attention_weights(x, t).double(), ref, atol=1e-5)
