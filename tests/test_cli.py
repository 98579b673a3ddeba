import json
import subprocess
import sys

import pytest

from fastscore.cli import main


def test_help_of_every_command(capsys):
    for cmd in ("train", "sample", "score", "probe", "reproduce"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: fastscore " + cmd in capsys.readouterr().out


@pytest.mark.slow
def test_train_sample_score_probe(tmp_path, capsys):
    ck, sm = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    assert main(["train", "--attention", "softmax", "--width", "8", "--train-steps", "5", "--n-train", "50",
                 "--out", str(ck), "--quiet"]) == 0
    assert main(["sample", str(ck), "--n", "12", "--steps", "3", "--out", str(sm), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["score", str(sm), "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)
    assert rates["valid"]["n"] == 12
    assert main(["probe", str(ck), "--t", "100", "--n", "20", "--quiet"]) == 0
    assert "key shared" in capsys.readouterr().out
    # refuses to overwrite, says why, exits 2
    assert main(["sample", str(ck), "--n", "2", "--steps", "2", "--out", str(sm), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


def test_bad_input_exits_cleanly(tmp_path, capsys):
    assert main(["train", "--pairs", "9", "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.safetensors")]) == 2


def test_reproduce_options_reach_the_study(tmp_path):
    out = tmp_path / "study"
    assert main(["reproduce", "--tiny", "--out", str(out), "--networks", "softmax", "--n-samples", "4",
                 "--train-steps", "2", "--t-focus", "10,30", "--t-focus-prob", "0.75", "--no-attn-patch",
                 "--attn-dim", "8", "--colours", "3", "--pairs", "3", "--train-batch", "16", "--quiet"]) == 0
    cfg = json.loads((out / "study.json").read_text())
    assert cfg["t_focus"] == [10, 30] and cfg["t_focus_prob"] == 0.75 and cfg["attn_patch"] is False
    assert (cfg["attn_dim"], cfg["n_colours"], cfg["n_pairs"], cfg["batch_size"]) == (8, 3, 3, 16)
    assert cfg["train_steps"] == 2 and cfg["n_samples"] == 4 and cfg["networks"] == ["softmax"]


def test_t_focus_must_be_two_integers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--t-focus", "50", "--out", "x.safetensors"])
    assert e.value.code == 2 and "LO,HI" in capsys.readouterr().err


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastscore", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastscore" in r.stdout
