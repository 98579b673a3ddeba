import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastscore.cli import main


def test_help_of_every_command(capsys):
    for cmd in ("train", "sample", "score", "probe", "reproduce", "sweep", "status"):
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


@pytest.mark.slow
def test_reproduce_options_reach_the_study(tmp_path):
    out = tmp_path / "study"
    assert main(["reproduce", "--tiny", "--out", str(out), "--networks", "softmax", "--n-samples", "4",
                 "--train-steps", "2", "--t-focus", "10,30", "--t-focus-prob", "0.75", "--no-attn-patch",
                 "--attn-dim", "8", "--colours", "3", "--pairs", "3", "--train-batch", "16", "--lr-schedule", "cosine",
                 "--precision", "bf16", "--quiet"]) == 0
    cfg = json.loads((out / "study.json").read_text())
    assert cfg["t_focus"] == [10, 30] and cfg["t_focus_prob"] == 0.75 and cfg["attn_patch"] is False
    assert (cfg["attn_dim"], cfg["n_colours"], cfg["n_pairs"], cfg["batch_size"]) == (8, 3, 3, 16)
    assert cfg["train_steps"] == 2 and cfg["n_samples"] == 4 and cfg["networks"] == ["softmax"]
    assert cfg["lr_schedule"] == "cosine" and cfg["precision"] == "bf16"


def test_t_focus_must_be_two_integers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--t-focus", "50", "--out", "x.safetensors"])
    assert e.value.code == 2
    assert "argument --t-focus: expected LO,HI (two integers), got '50'" in capsys.readouterr().err


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastscore", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastscore" in r.stdout


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastscore "), err
    for w in words:
        assert w in err, err
    return err


def test_a_bad_study_option_is_named_as_on_the_command_line(tmp_path, capsys):
    assert main(["reproduce", "--tiny", "--colours", "1", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    _one_line_error(capsys, "--colours must be >= 2")
    assert main(["train", "--colours", "9", "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 2
    _one_line_error(capsys, "--colours must be <= 8")
    assert not (tmp_path / "s").exists()


def test_reproduce_help_shows_every_default_and_no_measured_time(capsys):
    from fastscore.ops import AUTO_ON_CUDA
    from fastscore.study.config import PRESETS
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\d+ (min|s)\b", out), "a measured time in --help goes stale: it belongs in docs/"
    quick = ", ".join(f"--{k.replace('_', '-')} {v}" if k != "probe_n" else f"{k} {v}"
                      for k, v in PRESETS["quick"].items() if k in ("train_steps", "n_samples", "n_seeds", "probe_n"))
    assert "--quick the few-minute version: " + quick in out   # option names where the setting has one
    assert all(f"{op}: {path}" in out for op, path in AUTO_ON_CUDA.items())
    for text in ("--networks A,B,... comma list of the trained networks: none,identity,top1,softmax (default "
                 "none,top1,identity,softmax)", "--n-samples N_SAMPLES samples per network and seed (default 10000; "
                 "--quick: 1000; --tiny: 48)", "--n-seeds N_SEEDS training seeds per network (default 3;",
                 "--device DEVICE where to compute", "--backend {auto,triton,torch} the ops' path"):
        assert text in out
    from fastscore.study.config import StudyConfig
    for f in dataclasses.fields(StudyConfig):   # every generated option states its default
        if f.metadata.get("cli"):
            assert re.search(re.escape(f.metadata["cli"]) + r"[ ,].*?\(default ", out), f.name


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a command gets as far as building its dataset or loading a checkpoint."""
    import fastscore.checkpoint
    import fastscore.data

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")
    monkeypatch.setattr(fastscore.data, "make_dataset", boom)
    monkeypatch.setattr(fastscore.checkpoint, "load_model", boom)


def test_train_and_sample_check_the_output_before_any_work(tmp_path, capsys, no_work):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [(str(tmp_path / "adir"), ["--force"], "is a directory"),
             (str(tmp_path / "afile"), [], "exists"),
             (str(tmp_path / "afile" / "m.safetensors"), [], "not a directory")]
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        cases.append(("/sys/m.safetensors", [], "not writable"))
    for out, extra, words in cases:
        assert main(["train", "--out", out, "--quiet", *extra]) == 2
        _one_line_error(capsys, "fastscore train: error:", words)
        assert main(["sample", str(tmp_path / "m.safetensors"), "--out", out, "--quiet", *extra]) == 2
        _one_line_error(capsys, "fastscore sample: error:", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


@pytest.mark.parametrize("device, words", [("tpu", "--device must be a torch device"),
                                           ("cuda", "--device 'cuda' is not available"),
                                           ("cuda:7", "--device 'cuda:7' is not available")])
def test_an_unusable_device_is_one_line_and_leaves_nothing(tmp_path, capsys, device, words, no_work):
    import torch
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    out = tmp_path / "study"
    assert main(["reproduce", "--tiny", "--device", device, "--out", str(out), "--quiet"]) == 2
    _one_line_error(capsys, words)
    assert not out.exists()
    assert main(["train", "--device", device, "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 2
    _one_line_error(capsys, words)
    assert list(tmp_path.iterdir()) == []


def test_reproduce_refuses_an_output_it_cannot_use(tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("x")
    assert main(["reproduce", "--tiny", "--out", str(tmp_path / "afile"), "--quiet"]) == 2
    _one_line_error(capsys, "is a file, not a directory")
    # the scenario: a study.json fastscore did not write, the user's file beside it
    proj = tmp_path / "proj"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "study.json").write_text("{}")
    (proj / "checkpoints" / "mine.pt").write_text("x")
    assert main(["reproduce", "--tiny", "--out", str(proj), "--force", "--quiet"]) == 2
    _one_line_error(capsys, f"{proj / 'study.json'} is not a fastscore study.json")
    assert (proj / "checkpoints" / "mine.pt").read_text() == "x" and (proj / "study.json").read_text() == "{}"


def _default_sigint() -> None:
    """In a child that is to receive SIGINT: the default handling, even when pytest was started from a
    shell that ignores SIGINT (``trap '' INT``; an ignored signal is inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _session_processes(sid: int) -> list[int]:
    """Processes of session ``sid`` still alive (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if d.name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
@pytest.mark.cpu_only   # a signal test: the CLI's behaviour, not the device's
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads sessions from /proc")
def test_reproduce_stops_on_sigint_and_sigterm_and_resumes(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "fastscore", "reproduce", "--tiny", "--out", str(out), "--workers", "2"]
    stops = [(signal.SIGINT, False, 130), (signal.SIGTERM, True, 143)]   # the main process alone; the group
    for sig, group, code in stops:
        rows_before = len(list((out / "rows").glob("*.json"))) if (out / "rows").exists() else 0
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=_default_sigint)
        deadline = time.monotonic() + 120
        while len(list((out / "rows").glob("*.json"))) <= rows_before and p.poll() is None:  # mid-run
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert p.poll() is None, "the study ended before it could be interrupted"
        os.killpg(p.pid, sig) if group else p.send_signal(sig)
        _, err = p.communicate(timeout=120)   # a hang guard, not a speed requirement
        assert p.returncode == code
        last = [l for l in err.splitlines() if l.startswith("fastscore reproduce")]
        assert len(last) == 1 and "kept" in last[0] and "resume" in last[0] and "Traceback" not in err, err
        deadline = time.monotonic() + 60   # workers exit on their own (SIGTERM from the parent): poll
        while _session_processes(p.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session_processes(p.pid) == []   # no worker left behind
        assert not list(out.rglob("*.tmp"))
    r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    runs = json.loads((out / "invocations.json").read_text())
    assert [bool(x.get("interrupted")) for x in runs] == [True, True, False]
    doc = json.loads((out / "results.json").read_text())
    assert doc["wall_seconds"] == pytest.approx(sum(x["seconds"] for x in runs))
    assert len(doc["rows"]) == 6 and sum(x["rows_run"] for x in runs) == 6


SCRIPTS = Path(__file__).parent.parent / "fastscore" / "scripts"


@pytest.mark.parametrize("script", sorted(p.stem for p in SCRIPTS.glob("*.py") if p.stem != "__init__"))
def test_scripts_do_nothing_on_import_and_explain_themselves(script, capsys):
    import importlib
    ns = vars(importlib.import_module(f"fastscore.scripts.{script}"))
    assert callable(ns["main"]) and capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as e:
        ns["main"](["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_docs_hold_no_code():
    docs = Path(__file__).parent.parent / "docs"
    assert not list(docs.glob("*.py"))


# where the SIGINT arrives: ``-X importtime`` prints a line as each module finishes importing, so a line
# names a moment of the start-up exactly (the CLI's handler is installed before torch starts importing)
INTERRUPT_POINTS = (
    "torch.version",              # one of torch's first submodules: torch starts importing
    "torch._C",                   # the extension module: torch's C++ init done, the rest of torch to come
    "fastscore.ops._dispatch",    # torch imported, the parser still building
)


@pytest.mark.slow
@pytest.mark.cpu_only   # a signal test: the CLI's behaviour, not the device's
@pytest.mark.parametrize("module", INTERRUPT_POINTS)
def test_an_interrupt_while_torch_imports_is_one_line_too(tmp_path, module):
    """Ctrl-C in the first seconds (torch still importing, where an interrupt inside its C++ init would
    abort the process) gives the same one line and exit code 130. The signal is sent when the child
    reports (``-X importtime``) that it has imported ``module``, never after a fixed delay."""
    out = tmp_path / "study"
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "fastscore", "reproduce", "--tiny", "--out",
                          str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_sigint)
    assert p.stderr is not None
    seen: list[str] = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == module:
            break
    else:
        pytest.fail(f"the child never imported {module}: {''.join(seen[-5:])}")
    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=300)
    err = "\n".join(l for l in rest.splitlines() if not l.startswith("import time:"))
    assert p.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "SIGINT" in err and "Traceback" not in err, err


@pytest.mark.parametrize("args, words", [
    (["reproduce", "--tiny", "--train-steps", "-5"], "fastscore reproduce: error: --train-steps must be >= 1, got -5"),
    (["reproduce", "--tiny", "--steps", "0"], "fastscore reproduce: error: --steps must be >= 1, got 0"),
    (["reproduce", "--tiny", "--train-batch", "0"], "fastscore reproduce: error: --train-batch must be >= 1"),
    (["reproduce", "--tiny", "--pairs", "6"], "fastscore reproduce: error: --pairs=6 > 4 uses the border layout"),
    (["reproduce", "--tiny", "--steps", "2000"], "fastscore reproduce: error: --steps must be <= T=1000, got 2000"),
    (["sample", "m.safetensors", "--steps", "2000"], "fastscore sample: error: --steps must be <= T=1000"),
    (["reproduce", "--tiny", "--pairs-sweep", "2,four"], "--pairs-sweep expects numbers of pairs"),
    (["reproduce", "--tiny", "--pairs-sweep", "2,4", "--pairs", "3"], "--pairs and --pairs-sweep: give one"),
    (["sweep", "--preset", "tiny", "--grid", "train_steps=4,-5"],
     "fastscore sweep: error: cell train_steps=-5: train_steps must be >= 1"),   # as typed in --grid
])
def test_a_validation_error_names_the_option_the_user_typed(tmp_path, capsys, no_work, args, words):
    assert main([*args, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = _one_line_error(capsys, words)
    assert "error: --steps" not in err or "--steps" in args
    assert not (tmp_path / "o").exists()


def test_a_bug_inside_a_command_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import fastscore.study

    def bug(*a, **k):
        raise ValueError("a library bug, not the user's input")
    monkeypatch.setattr(fastscore.study, "reproduce", bug)
    with pytest.raises(ValueError, match="a library bug"):
        main(["reproduce", "--tiny", "--out", str(tmp_path / "o"), "--quiet"])
    assert capsys.readouterr().err == ""


def test_the_probe_defaults_to_the_study_s_timesteps():
    from fastscore.cli import build_parser
    from fastscore.study.config import StudyConfig
    assert build_parser().parse_args(["probe", "m.safetensors"]).t == list(StudyConfig().probe_t)


def test_pairs_sweep_runs_the_sweep_grid_over_n_pairs(tmp_path, monkeypatch):
    import fastscore.study
    seen = {}
    monkeypatch.setattr(fastscore.study, "run_sweep", lambda g, out, **kw: seen.update(grid=g, out=out, **kw))
    assert main(["reproduce", "--tiny", "--networks", "none", "--pairs-sweep", "2,8", "--no-group-seeds",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    g = seen["grid"]
    assert (g.preset, dict(g.axes), dict(g.base)) == ("tiny", {"n_pairs": (2, 8)},
                                                      {"networks": ("none",), "coord_channels": True})
    assert g.to_dict()["cell"] == [{"where": {"n_pairs": 8}, "set": {"image_size": 12}}]
    assert seen["group_seeds"] is False and seen["out"] == tmp_path / "o"


def test_an_old_pairs_sweep_directory_is_explained_not_overwritten(tmp_path, capsys, no_work):
    (tmp_path / "pairs-2").mkdir()
    (tmp_path / "pairs-2" / "study.json").write_text("{}")
    assert main(["reproduce", "--tiny", "--pairs-sweep", "2,4", "--out", str(tmp_path), "--quiet"]) == 2
    _one_line_error(capsys, "a pairs sweep of an earlier fastscore", "--pairs K --out OUT/pairs-K")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["pairs-2", "study.json"]


# the command line's SIGTERM arriving inside a weakref callback: Python cannot propagate the handler's
# KeyboardInterrupt from there; it must still stop the command, quietly, with its one-line message
_CALLBACK_STOP = """
import argparse, os, signal, sys, time, weakref
from fastscore import cli
def job(args):
    class A:
        pass
    def cb(ref):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))   # the handler runs here, inside the callback
    a = A()
    r = weakref.ref(a, cb)
    del a
    deadline = time.monotonic() + 30   # a hang guard
    while time.monotonic() < deadline:
        sum(range(10))
    print("carried on")
    return 0
def build_parser():
    p = argparse.ArgumentParser()
    p.set_defaults(fn=job, command="job")
    return p
cli.build_parser = build_parser
sys.exit(cli.main([]))
"""


def test_a_stop_inside_a_callback_still_stops_the_command():
    p = subprocess.run([sys.executable, "-c", _CALLBACK_STOP], capture_output=True, text=True, timeout=60)
    assert p.returncode == 143, (p.stdout, p.stderr)
    assert "carried on" not in p.stdout and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("fastscore job: SIGTERM"), p.stderr
