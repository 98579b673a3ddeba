"""A diffusers UNet2DModel through fastscore.unet: the adapter, training, sampling, ensembles, and the
theory study's unet rows."""
import json
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastscore.sampling import sample  # noqa: E402
from fastscore.training import TrainConfig, train  # noqa: E402
from fastscore.unet import DiffusersUNet, UNetConfig, norm_groups_for  # noqa: E402

TINY = dict(width=8, image_size=8, channels=1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("attention", [False, True])
def test_adapter_is_the_unet_called_directly(attention):
    seed = int(torch.randint(0, 2**31, ()))
    print("seed", seed)
    torch.manual_seed(seed)
    net = DiffusersUNet(UNetConfig(**TINY, attention=attention)).double().eval()
    blocks = net.unet.config.down_block_types + net.unet.config.up_block_types
    assert any("Attn" in b for b in blocks) == attention
    # without attention: none anywhere, the middle block included (diffusers adds one there by default)
    has_attn = any(isinstance(m, diffusers.models.attention_processor.Attention) for m in net.modules())
    assert has_attn == attention
    assert net.unet.config.block_out_channels == (8, 16) and net.unet.config.norm_num_groups == 8
    x, t = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (5,))
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert torch.equal(out, net.unet(x, t).sample)
    # an existing UNet2DModel wrapped as is: the same function, its shape read from its config
    wrapped = DiffusersUNet(unet=net.unet)
    assert wrapped.image_shape == (1, 8, 8) and wrapped.config.attention == attention
    assert torch.equal(wrapped(x, t), out)


def test_config_checks_name_the_argument():
    assert norm_groups_for(24) == 8 and norm_groups_for(64) == 32 and norm_groups_for(3) == 1
    assert UNetConfig(width=24).norm_groups == 8
    with pytest.raises(ValueError, match="image_size must be divisible"):
        UNetConfig(image_size=9)
    with pytest.raises(ValueError, match="norm_groups must divide width"):
        UNetConfig(width=12, norm_groups=8)
    with pytest.raises(TypeError, match="attention must be a bool"):
        UNetConfig(attention="softmax")
    with pytest.raises(TypeError, match="width must be an int"):
        UNetConfig(width=8.0)
    with pytest.raises(ValueError, match="exactly one of config"):
        DiffusersUNet()
    with pytest.raises(TypeError, match="unet must be a diffusers.UNet2DModel"):
        DiffusersUNet(unet=torch.nn.Conv2d(1, 1, 3))


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)   # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"fastscore\[unet\]"):
        DiffusersUNet(UNetConfig(**TINY))


@pytest.mark.parametrize("attention", [False, True])
def test_trains_with_the_one_trainer_and_samples(attention):
    torch.manual_seed(0)
    net = DiffusersUNet(UNetConfig(**TINY, attention=attention))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    data = torch.rand(32, 1, 8, 8) * 2 - 1
    res = train(net, data, TrainConfig(steps=4, batch_size=8, ema=0.0), progress=False)
    assert len(res.losses) == 4 and all(torch.isfinite(torch.tensor(res.losses)))
    assert any(not torch.equal(before[n], p) for n, p in res.model.named_parameters())
    x = sample(res.model, 5, steps=3, seed=7)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, sample(res.model, 5, steps=3, seed=7))
    # other batches: the same noise, the network's float32 arithmetic may round otherwise
    torch.testing.assert_close(sample(res.model, 5, steps=3, seed=7, batch_size=2), x, rtol=1e-4, atol=1e-4)


def test_an_ensemble_of_unets_trains_as_a_loop():
    data = torch.rand(32, 1, 8, 8) * 2 - 1
    cfgs = [TrainConfig(steps=3, batch_size=8, seed=s) for s in (0, 1)]

    def nets():
        torch.manual_seed(3)
        return [DiffusersUNet(UNetConfig(**TINY)) for _ in range(2)]
    together = train(nets(), data, cfgs, members="loop", progress=False)
    alone = train(nets()[1], data, cfgs[1], progress=False)
    assert together[0].losses != together[1].losses
    torch.testing.assert_close(torch.tensor(together[1].losses), torch.tensor(alone.losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", [
    False,
    pytest.param(True, marks=pytest.mark.xfail(
        raises=RuntimeError, strict=False, reason="diffusers' attention block under vmap: torch raises 'NYI: querying "
        "is_contiguous inside of vmap for memory_format other than torch.contiguous_format' (torch 2.13)"))])
def test_an_ensemble_of_unets_trains_under_vmap_as_in_a_loop(attention):
    data = torch.rand(32, 1, 8, 8) * 2 - 1
    cfgs = [TrainConfig(steps=3, batch_size=8, seed=s) for s in (0, 1)]

    def nets():
        torch.manual_seed(3)
        return [DiffusersUNet(UNetConfig(**TINY, attention=attention)) for _ in range(2)]
    vm = train(nets(), data, cfgs, members="vmap", progress=False)
    loop = train(nets(), data, cfgs, members="loop", progress=False)
    for a, b in zip(vm, loop):
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-4, atol=1e-5)


def test_theory_study_rows_for_unets_resume_and_reload(tmp_path):
    pytest.importorskip("sklearn")
    from fastscore.study import theory
    out = tmp_path / "th"
    cfg = theory.preset("tiny", networks=("unet", "unet_attn"), machines=("els_zeros", "ideal"))
    doc = theory.run(cfg, out, progress=False)
    nets = doc["datasets"]["digits"]["networks"]
    assert set(nets) == {"unet", "unet_attn"}
    for nd in nets.values():
        assert nd["summary"]["ideal"]["n"] == 6 and 0 <= nd["summary"]["els_zeros"]["r2"]["median"] <= 1
    assert set(doc["datasets"]["digits"]["verdict"]) == {"unet", "unet_attn"}
    assert "UNet2DModel + attention (diffusers)" in (out / "theory.md").read_text()
    # another networks list alone needs no force and keeps the finished rows
    stamps = {p: p.stat().st_mtime_ns for p in (out / "digits").rglob("*.safetensors")}
    theory.run(theory.preset("tiny", networks=("unet",), machines=("els_zeros", "ideal")), out, progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "digits").rglob("*.safetensors")}
    # a saved UNet reloads to the same network: without its row, its samples are recomputed identically
    rows = out / "digits" / "rows"
    first = theory.load_tensors(rows / "unet-s0-samples.safetensors")[0]["samples"]
    r = json.loads((rows / "unet-s0.json").read_text())["r"]
    (rows / "unet-s0.json").unlink()
    theory.run(theory.preset("tiny", networks=("unet",), machines=("els_zeros", "ideal")), out, progress=False)
    assert torch.equal(theory.load_tensors(rows / "unet-s0-samples.safetensors")[0]["samples"], first)
    assert json.loads((rows / "unet-s0.json").read_text())["r"] == r
