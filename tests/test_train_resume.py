"""Resumable training: a run stopped at step k and continued gives the bits of the run that never
stopped; a stored state of another run is refused; the study's rows resume the same way."""
import json

import pytest
import torch
import torch.nn as nn

from fastscore.checkpoint import load_tensors, save_model
from fastscore.models import ModelConfig, build_model
from fastscore.study import StudyConfig, reproduce, status
from fastscore.study import rows as rows_mod
from fastscore.study.files import MANIFEST
from fastscore.study.run import Interrupted
from fastscore.training import STATE_KIND, TrainConfig, train

STEPS = 9
TC = TrainConfig(steps=STEPS, batch_size=4, ema=0.9, t_focus=(10, 300), t_focus_prob=0.5)


def _data(seed: int = 0, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1


def _net(seed: int = 0, attention: str = "softmax", width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(attention=attention, width=width, attn_dim=8), backend="torch")


def _stop_at(step: int, exc: BaseException | None = None):
    """A callback that raises ``exc`` (default: KeyboardInterrupt, a Ctrl-C) after step ``step``."""
    def callback(s, loss):
        if s == step:
            raise KeyboardInterrupt() if exc is None else exc
    return callback


def _assert_same(a, b) -> None:
    """Bit-identical EMA and raw weights and loss history."""
    assert a.losses == b.losses
    for m in ("model", "raw_model"):
        sa, sb = getattr(a, m).state_dict(), getattr(b, m).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (m, k)


@pytest.mark.parametrize("stop", ["interrupt", "crash"])
def test_a_stopped_and_resumed_run_gives_the_bits_of_one_run(tmp_path, stop):
    """'interrupt': Ctrl-C after step 5 saves there; 'crash': an error the trainer cannot save at (a
    killed process) leaves the save of step 4 (save_every=4), and the rerun redoes steps 4..."""
    data = _data()
    whole = train(_net(), data, TC, progress=False)
    path = tmp_path / "state.safetensors"
    exc = KeyboardInterrupt() if stop == "interrupt" else RuntimeError("killed")
    with pytest.raises(type(exc)):
        train(_net(), data, TC, progress=False, resume=path, save_every=4, callback=_stop_at(5, exc))
    meta = load_tensors(path, STATE_KIND)[1]
    assert (meta["step"], meta["finished"]) == ((6, False) if stop == "interrupt" else (4, False))
    seen = []
    resumed = train(_net(), data, TC, progress=False, resume=path, save_every=4,
                    callback=lambda s, loss: seen.append(s))
    assert seen == list(range(meta["step"], STEPS))   # only the steps this call ran
    _assert_same(whole, resumed)
    init = _net().state_dict()
    assert not all(torch.equal(v, init[k]) for k, v in whole.raw_model.state_dict().items())   # it trained


def test_a_bf16_run_resumes_to_its_bits_and_refuses_a_float32_state(tmp_path):
    """precision='bf16' (autocast) resumes bit for bit too; the precision is part of the run, so a state
    saved in float32 is not continued in bf16."""
    data, cfg = _data(), TrainConfig(steps=STEPS, batch_size=4, ema=0.9, precision="bf16")
    whole = train(_net(), data, cfg, progress=False)
    path = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(_net(), data, cfg, progress=False, resume=path, callback=_stop_at(4))
    _assert_same(whole, train(_net(), data, cfg, progress=False, resume=path))
    other = tmp_path / "fp32.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(_net(), data, TrainConfig(steps=STEPS, batch_size=4, ema=0.9), progress=False, resume=other,
              callback=_stop_at(4))
    with pytest.raises(ValueError, match="another run .different train config."):
        train(_net(), data, cfg, progress=False, resume=other)


@pytest.mark.parametrize("members", ["loop", "vmap"])
def test_an_ensemble_resumes_to_the_bits_of_one_run(tmp_path, members):
    """Two top-1 members (a Gumbel seed per step) with their own seeds and lr."""
    data = _data(1)
    configs = [TC, TrainConfig(steps=STEPS, batch_size=4, seed=7, lr=1e-3)]
    whole = train([_net(0, "top1"), _net(1, "top1")], data, configs, members=members, progress=False)
    path = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train([_net(0, "top1"), _net(1, "top1")], data, configs, members=members, progress=False, resume=path,
              callback=_stop_at(3))
    resumed = train([_net(0, "top1"), _net(1, "top1")], data, configs, members=members, progress=False, resume=path)
    for a, b in zip(whole, resumed):
        _assert_same(a, b)


class _Dropping(nn.Module):
    """A network that draws from torch's global generator (dropout) and can be stopped inside its
    forward (a SIGTERM turned SystemExit mid-step): class attributes, so the ensemble's copy shares them."""
    calls = 0
    stop_at = -1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        type(self).calls += 1
        if type(self).calls == type(self).stop_at:
            raise SystemExit(143)
        return self.drop(self.conv(x)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def test_a_run_stopped_inside_a_step_resumes_from_that_step_with_the_global_generator(tmp_path, monkeypatch):
    data = _data(2)
    torch.manual_seed(3)
    whole = train(_Dropping(), data, TC, progress=False)
    path = tmp_path / "state.safetensors"
    monkeypatch.setattr(_Dropping, "calls", 0)
    monkeypatch.setattr(_Dropping, "stop_at", 6)   # inside step 5 (0-based), before its update
    torch.manual_seed(3)
    with pytest.raises(SystemExit):
        train(_Dropping(), data, TC, progress=False, resume=path)
    assert load_tensors(path, STATE_KIND)[1]["step"] == 5
    monkeypatch.setattr(_Dropping, "stop_at", -1)
    torch.manual_seed(3)   # the global generator now differs from its state at step 5: resume restores it
    _assert_same(whole, train(_Dropping(), data, TC, progress=False, resume=path))


def test_a_stop_during_the_weight_update_saves_nothing_and_resumes_from_the_last_save(tmp_path, monkeypatch):
    """Half the parameters updated is no state to save: the file keeps step 4 (save_every=4)."""
    data = _data()
    whole = train(_net(), data, TC, progress=False)
    path = tmp_path / "state.safetensors"
    lerp, armed = torch.Tensor.lerp_, []

    def trapped(self, *args, **kwargs):
        if armed:
            armed.append(1)
            if len(armed) == 4:   # the third lerp_ of step 6: some moments and EMA updated, others not
                raise KeyboardInterrupt
        return lerp(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "lerp_", trapped)
    with pytest.raises(KeyboardInterrupt):
        train(_net(), data, TC, progress=False, resume=path, save_every=4,
              callback=lambda s, loss: armed.append(0) if s == 5 else None)
    monkeypatch.undo()
    assert load_tensors(path, STATE_KIND)[1]["step"] == 4
    _assert_same(whole, train(_net(), data, TC, progress=False, resume=path, save_every=4))


def test_a_finished_state_returns_the_result_without_training(tmp_path):
    data = _data()
    path = tmp_path / "state.safetensors"
    first = train(_net(), data, TC, progress=False, resume=path)
    meta = load_tensors(path, STATE_KIND)[1]
    assert (meta["step"], meta["finished"]) == (STEPS, True)
    seen = []
    again = train(_net(), data, TC, progress=False, resume=path, callback=lambda s, loss: seen.append(s))
    assert seen == []
    _assert_same(first, again)


@pytest.mark.parametrize("change, says", [
    (dict(config=TrainConfig(steps=STEPS, batch_size=4, lr=1e-3)), "train config"),
    (dict(config=TrainConfig(steps=STEPS + 1, batch_size=4, ema=0.9, t_focus=(10, 300), t_focus_prob=0.5)),
     "train config"),
    (dict(seed=1), "init"),
    (dict(data=1), "data"),
    (dict(width=16), "model config"),
])
def test_a_state_of_another_run_is_refused_and_kept(tmp_path, change, says):
    path = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(_net(), _data(), TC, progress=False, resume=path, callback=_stop_at(2))
    before = path.read_bytes()
    model = _net(change.get("seed", 0), width=change.get("width", 8))
    with pytest.raises(ValueError, match=f"another run.*{says}"):
        train(model, _data(change.get("data", 0)), change.get("config", TC), progress=False, resume=path)
    assert path.read_bytes() == before


def test_resume_arguments_are_checked(tmp_path):
    data, path = _data(), tmp_path / "state.safetensors"
    with pytest.raises(ValueError, match="save_every needs resume"):
        train(_net(), data, TC, progress=False, save_every=5)
    with pytest.raises(ValueError, match="save_every"):
        train(_net(), data, TC, progress=False, resume=path, save_every=0)
    with pytest.raises(TypeError, match="resume"):
        train(_net(), data, TC, progress=False, resume=3)
    with pytest.raises(ValueError, match="chunk"):
        train([_net(0), _net(1)], data, TC, progress=False, resume=path, chunk=1)
    save_model(path, _net())
    with pytest.raises(ValueError, match="expected a 'train_state'"):
        train(_net(), data, TC, progress=False, resume=path)


@pytest.mark.parametrize("group_seeds", [False, True])
def test_an_interrupted_study_row_resumes_to_the_checkpoint_of_one_run(tmp_path, monkeypatch, group_seeds):
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=(), n_seeds=2 if group_seeds else 1,
                             train_steps=8, n_samples=8, probe_n=8, n_random=20)
    kw = dict(progress=False, workers=1, group_seeds=group_seeds)
    reproduce(cfg, tmp_path / "whole", **kw)
    monkeypatch.setattr(rows_mod, "SAVE_EVERY", 3)
    out = tmp_path / "stopped"
    stop = _stop_at(4)
    monkeypatch.setattr(rows_mod.RunContext, "on_train_step", lambda self: stop)
    monkeypatch.setattr(rows_mod.RunContext, "on_ensemble_step", lambda self: stop)
    with pytest.raises(Interrupted):
        reproduce(cfg, out, **kw)
    name = "none-seeds0-1" if group_seeds else "none-seed0"
    partial = out / "checkpoints" / f"{name}.partial.safetensors"
    assert load_tensors(partial, STATE_KIND)[1]["step"] == 5
    assert f"checkpoints/{name}.partial.safetensors" in (out / MANIFEST).read_text().split("\n")
    assert not (out / "checkpoints" / "none-seed0.safetensors").exists()
    rows = status.status(out)["rows"]      # what fastscore status says of the stopped run
    assert [(r["state"], r["partials"][0]["file"], r["partials"][0]["step"]) for r in rows] == \
        [("training", name, 5)] * cfg.n_seeds
    monkeypatch.undo()
    seen: list[int] = []
    monkeypatch.setattr(rows_mod.RunContext, "on_train_step", lambda self: lambda s, loss: seen.append(s))
    monkeypatch.setattr(rows_mod.RunContext, "on_ensemble_step", lambda self: lambda s, losses: seen.append(s))
    reproduce(cfg, out, **kw)
    assert seen == [5, 6, 7]   # continued from the partial state, not retrained
    assert not partial.exists()   # removed once the checkpoints are saved: never stale
    after = status.status(out)
    assert after["results"] and {r["state"] for r in after["rows"]} == {"finished"}
    for s in range(cfg.n_seeds):
        (a, ma), (b, mb) = (load_tensors(d / "checkpoints" / f"none-seed{s}.safetensors", "model")
                            for d in (tmp_path / "whole", out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert ma["extra"]["losses"] == mb["extra"]["losses"]
        rows = [json.loads((d / "rows" / f"none-seed{s}.json").read_text()) for d in (tmp_path / "whole", out)]
        assert rows[0]["rates"] == rows[1]["rates"]
