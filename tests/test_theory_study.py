"""The theory study end to end (--tiny): the CLI hook, the report, resuming, and its refusals."""
import json

import pytest
import torch

from fastscore.cli import main
from fastscore.study import theory

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_tiny_theory_study_on_digits_and_kv_resumes(tmp_path, capsys):
    out = tmp_path / "th"
    assert main(["reproduce", "--study", "theory", "--dataset", "digits,kv", "--tiny", "--out", str(out),
                 "--quiet"]) == 0
    md = capsys.readouterr().out
    assert "## digits" in md and "## kv" in md and "0.94" in md
    doc = json.loads((out / "theory.json").read_text())
    for name, c in (("digits", 1), ("kv", 3)):
        d = doc["datasets"][name]
        assert set(d["networks"]) == {"none", "softmax"}
        for net in d["networks"].values():
            assert set(net["summary"]) == set(theory.MACHINES)
            for m, s in net["summary"].items():
                assert s["n"] == 6 and 0 <= s["r2"]["median"] <= 1, m
                assert s["r2"]["median_ci"][0] <= s["r2"]["median"] <= s["r2"]["median_ci"][1]
            cal = net["calibration"]["0"]
            assert set(cal) == {"els_zeros", "els_circular", "els_circular_valid", "local"}
            for v in cal.values():
                assert v["sizes"] == [3, 5, 7] and len(v["median"]) == 4 and set(v["median"]) <= {3, 5, 7}
        assert (out / d["figure"]).is_file()
        samples = theory.load_tensors(out / name / "rows" / "none-s0-samples.safetensors")[0]["samples"]
        assert samples.shape == (6, c, 8, 8)
    # the per-sample r is the correlation of the stored samples
    row = json.loads((out / "digits" / "rows" / "none-s0.json").read_text())
    ideal = theory.load_tensors(out / "digits" / "machines" / "ideal.safetensors")[0]["samples"]
    net = theory.load_tensors(out / "digits" / "rows" / "none-s0-samples.safetensors")[0]["samples"]
    assert torch.allclose(theory.sample_correlation(net, ideal), torch.tensor(row["r"]["ideal"], dtype=torch.float64))
    # a rerun trains and samples nothing: every file stays as it was
    stamps = {p: p.stat().st_mtime_ns for p in (out / "digits").rglob("*.safetensors")}
    assert main(["reproduce", "--study", "theory", "--tiny", "--out", str(out), "--quiet"]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "digits").rglob("*.safetensors")}
    assert len(json.loads((out / "digits" / "runs.json").read_text())) == 2


def test_theory_refuses_other_settings_and_foreign_options(tmp_path, capsys):
    out = tmp_path / "th"
    cfg = theory.preset("tiny", networks=("none",), machines=("ideal",))
    theory.run(cfg, out, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(width\)"):
        theory.run(theory.preset("tiny", networks=("none",), machines=("ideal",), width=4), out, progress=False)
    doc = theory.run(theory.preset("tiny", networks=("none",), machines=("ideal",), width=4), out, force=True,
                     progress=False)
    assert doc["datasets"]["digits"]["config"]["width"] == 4
    net = out / "digits" / "nets" / "none-s0.safetensors"
    stamp = net.stat().st_mtime_ns
    theory.run(theory.preset("tiny", networks=("none",), machines=("ideal",), width=4, n_samples=5), out, force=True,
               progress=False)                              # a sampling setting: the network is kept
    assert net.stat().st_mtime_ns == stamp
    assert len(json.loads((out / "digits" / "rows" / "none-s0.json").read_text())["r"]["ideal"]) == 5
    with pytest.raises(ValueError, match="n_pairs do not apply to the theory study"):
        theory.preset("tiny", n_pairs=4)
    with pytest.raises(ValueError, match="dataset must be 'digits', 'kv' or a .npy/.safetensors path, got 'mnist'"):
        theory.TheoryConfig(dataset="mnist")
    with pytest.raises(ValueError, match="machines"):
        theory.TheoryConfig(machines=("els_torus",))
    assert main(["reproduce", "--dataset", "digits", "--tiny", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "--dataset belongs to --study theory" in capsys.readouterr().err
