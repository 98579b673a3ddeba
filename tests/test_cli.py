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


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastscore", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastscore" in r.stdout
