"""Real-image loaders (fastscore.images) on the shipped digits and on user arrays."""
import numpy as np
import pytest
import torch

from fastscore.images import digits, from_array, load_file, load_images

pytest.importorskip("sklearn")


def test_digits_are_the_shipped_images_scaled_to_minus_one_one():
    from sklearn.datasets import load_digits
    raw = load_digits().images                       # (1797, 8, 8), 0..16
    x = digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    torch.testing.assert_close(x[:, 0].double(), torch.from_numpy(raw) / 8 - 1, rtol=0, atol=1e-7)
    # 17 grey levels, each an exact multiple of 1/8
    assert torch.equal(torch.unique(x * 8), torch.arange(-8, 9, dtype=torch.float32))
    assert torch.equal(digits(10), x[:10]) and torch.equal(load_images("digits", 5), x[:5])


@pytest.mark.parametrize("seed", [0, 1])
def test_from_array_maps_the_range_linearly(seed):
    g = np.random.default_rng(seed)
    u8 = g.integers(0, 256, size=(5, 3, 6, 6), dtype=np.uint8)
    print("seed", seed)
    torch.testing.assert_close(from_array(u8).double(), torch.from_numpy(u8).double() / 127.5 - 1, rtol=0, atol=1e-6)
    f = g.random((4, 7, 7))                                     # (N, H, W) in [0, 1): one channel added
    torch.testing.assert_close(from_array(f).double(), torch.from_numpy(f)[:, None] * 2 - 1, rtol=0, atol=1e-6)
    s = g.uniform(-1, 1, (3, 2, 4, 4)).astype(np.float32)
    assert torch.equal(from_array(s), torch.from_numpy(s))
    r = g.uniform(10, 20, (2, 1, 4, 4))
    torch.testing.assert_close(from_array(r, value_range=(10, 20)).double(),
                               torch.from_numpy(r) / 5 - 3, rtol=0, atol=1e-6)


def test_files_round_trip(tmp_path):
    from safetensors.torch import save_file
    x = torch.rand(6, 1, 5, 5)
    np.save(tmp_path / "a.npy", x.numpy())
    save_file({"images": x}, str(tmp_path / "a.safetensors"))
    save_file({"a": x.clone(), "b": x.clone()}, str(tmp_path / "two.safetensors"))
    assert torch.allclose(load_file(tmp_path / "a.npy"), x * 2 - 1)
    assert torch.allclose(load_images(str(tmp_path / "a.safetensors"), 3), x[:3] * 2 - 1)
    assert torch.allclose(load_file(tmp_path / "two.safetensors", key="b"), x * 2 - 1)
    with pytest.raises(ValueError, match="holds 2 tensors.*key="):
        load_file(tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="key 'c' is not in"):
        load_file(tmp_path / "two.safetensors", key="c")


def test_bad_arrays_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\) or \(N, H, W\)"):
        from_array(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="empty"):
        from_array(np.zeros((0, 1, 4, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        from_array(np.full((1, 1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="pass value_range"):
        from_array(np.full((1, 1, 2, 2), 3.0))
    with pytest.raises(ValueError, match="outside value_range"):
        from_array(np.full((1, 1, 2, 2), 3.0), value_range=(0, 2))
    with pytest.raises(ValueError, match="value_range must be two finite numbers"):
        from_array(np.zeros((1, 1, 2, 2)), value_range=(1, 0))
    with pytest.raises(ValueError, match="int64 needs value_range"):
        from_array(np.zeros((1, 1, 2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="real numbers"):
        from_array(np.array([["a"]]))
    with pytest.raises(ValueError, match="n=2000 is more than the 1797"):
        digits(2000)
    with pytest.raises(ValueError, match="dataset must be one of digits"):
        load_images("mnist")
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_file(tmp_path / "missing.npy")
