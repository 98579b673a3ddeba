
import pytest
import torch

from fastscore.checkpoint import load_model, load_tensors, save_model, save_tensors
from fastscore.data import KVConfig
from fastscore.models import ScoreNet


def test_round_trip(tmp_path):
    m = ScoreNet("top1", 12, attn_dim=6, temperature=0.3).eval()
    p = save_model(tmp_path / "m.safetensors", m, data_config=KVConfig(n_pairs=3))
    m2, meta = load_model(p)
    assert m2.config == m.config and KVConfig.from_dict(meta["data"]) == KVConfig(n_pairs=3)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 900])
    assert torch.equal(m(x, t), m2(x, t))


def test_never_overwrites_silently(tmp_path):
    m = ScoreNet("none", 4)
    p = save_model(tmp_path / "m.safetensors", m)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match=r"m\.safetensors exists; pass overwrite=True \(--force"):
        save_model(p, ScoreNet("none", 4))
    assert p.read_bytes() == before
    save_model(p, ScoreNet("none", 8), overwrite=True)
    assert load_model(p)[0].config.width == 8
    assert [f.name for f in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary files left


def test_corrupt_and_mismatched_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable"):
        load_model(bad)
    p = save_model(tmp_path / "m.safetensors", ScoreNet("softmax", 8))
    data = bytearray(p.read_bytes())
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"trunc\.safetensors is not a readable safetensors file"):
        load_model(trunc)
    # weights of one architecture with the config of another
    tensors, meta = load_tensors(p)
    meta["model"]["attention"] = "none"
    meta.pop("format")
    save_tensors(tmp_path / "mix.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "mix.safetensors")
    save_tensors(tmp_path / "s.safetensors", {"samples": torch.zeros(2)}, {"kind": "samples"})
    with pytest.raises(ValueError, match="expected a 'model'"):
        load_model(tmp_path / "s.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no such file: .*nope\.safetensors"):
        load_model(tmp_path / "nope.safetensors")


def test_loading_never_unpickles(tmp_path):
    import pickle
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match=r"evil\.safetensors is not a readable safetensors file"):
        load_model(evil)


def test_saved_files_get_the_usual_mode(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        p = save_model(tmp_path / "m.safetensors", ScoreNet("none", 4))
    finally:
        os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o644
