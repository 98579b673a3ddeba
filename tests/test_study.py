import dataclasses
import json

import pytest
import torch

from fastscore._validate import UsageError
from fastscore.checkpoint import load_tensors
from fastscore.models import ModelConfig
from fastscore.options import option
from fastscore.study import StudyConfig, coordination_verdict, pairs_grid, reproduce, sweep
from fastscore.study.files import MANIFEST, StudyDir
from fastscore.study.sweep import cell_config
from fastscore.training import TrainConfig


@pytest.mark.slow
def test_tiny_study_resumes_and_protects_its_directory(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none", "softmax"), n_samples=16, probe_n=16, n_random=50,
                             train_steps=4, analytic=("els",))
    out = tmp_path / "study"
    doc = reproduce(cfg, out, progress=False)
    assert set(doc["summary"]["networks"]) == {"els", "none", "softmax"}
    for f in ("results.json", "results.md", "study.json", "figures/samples.png", "figures/consistency.png",
              "checkpoints/none-seed0.safetensors"):
        assert (out / f).exists(), f
    assert doc["summary"]["baseline"]["analytic_fraction"] == "15/64"   # 4 pairs, 2 colours
    assert doc["summary"]["networks"]["none"]["probe"][0]["gap"] == 0.0
    assert "none" in doc["summary"]["correlation_with_els"]
    # resume: rows are reused, nothing is retrained
    mtime = (out / "checkpoints" / "none-seed0.safetensors").stat().st_mtime
    row = (out / "rows" / "softmax-seed0.json").read_text()
    doc2 = reproduce(cfg, out, progress=False)
    assert (out / "checkpoints" / "none-seed0.safetensors").stat().st_mtime == mtime
    assert (out / "rows" / "softmax-seed0.json").read_text() == row
    assert json.loads(row)["rates"] == doc2["rows"][-1]["rates"]
    # another config in the same directory is refused, and nothing is touched
    other = StudyConfig.preset("tiny", networks=("none",), n_samples=8, probe_n=8, n_random=50, train_steps=3,
                               analytic=())
    with pytest.raises(FileExistsError):
        reproduce(other, out, progress=False)
    assert (out / "rows" / "softmax-seed0.json").read_text() == row
    # --force replaces the study's own files only: a file the user put among them survives
    (out / "checkpoints" / "mine.pt").write_bytes(b"user data")
    written = set((out / MANIFEST).read_text().split())
    partials = {w for w in written if w.endswith(".partial.safetensors")}   # removed once their row trained
    assert not any((out / w).exists() for w in partials)
    assert written - partials == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - \
        {MANIFEST, "checkpoints/mine.pt"}
    reproduce(other, out, progress=False, force=True)
    assert not (out / "rows" / "softmax-seed0.json").exists()
    assert not (out / "checkpoints" / "softmax-seed0.safetensors").exists()
    assert (out / "checkpoints" / "mine.pt").read_bytes() == b"user data"
    assert json.loads((out / "study.json").read_text()) == other.to_dict()


def test_study_config_validation():
    with pytest.raises(ValueError, match="networks"):
        StudyConfig(networks=("cnn",))
    with pytest.raises(ValueError, match="n_samples"):
        StudyConfig(n_samples=0)
    with pytest.raises(ValueError, match="too small"):
        StudyConfig(n_pairs=7, coord_channels=True)
    with pytest.raises(ValueError, match="coord_channels"):
        StudyConfig(n_pairs=6)
    with pytest.raises(ValueError, match="mode"):
        StudyConfig.preset("huge")
    with pytest.raises(ValueError, match="n_colours must be >= 2"):
        StudyConfig(n_colours=1)
    with pytest.raises(ValueError, match="n_colours must be <= 8"):
        StudyConfig(n_colours=9)


def test_force_never_replaces_a_study_json_fastscore_did_not_write(tmp_path):
    # the scenario: an empty JSON object named study.json beside the user's checkpoints/
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.pt").write_bytes(b"x")
    (tmp_path / "study.json").write_text("{}")
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    with pytest.raises(ValueError, match=r"study\.json is not a fastscore study\.json of this version \(missing"):
        reproduce(cfg, tmp_path, progress=False, force=True)
    assert (tmp_path / "checkpoints" / "mine.pt").read_bytes() == b"x"
    assert (tmp_path / "study.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "mine.pt", "study.json"]


def test_invalid_study_json_is_reported_with_its_path(tmp_path):
    (tmp_path / "study.json").write_text("")
    with pytest.raises(ValueError, match=f"{tmp_path / 'study.json'} is not valid JSON"):
        reproduce(StudyConfig.preset("tiny"), tmp_path, progress=False, force=True)
    assert (tmp_path / "study.json").read_text() == ""


def test_a_study_without_manifest_is_resumed_but_never_force_replaced(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    (tmp_path / "study.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "old.json").write_text("{}")
    other = StudyConfig.preset("tiny", networks=("softmax",), analytic=())
    with pytest.raises(FileExistsError, match="manifest"):
        reproduce(other, tmp_path, progress=False, force=True)
    assert (tmp_path / "rows" / "old.json").exists()


def test_a_study_from_before_the_manifest_adopts_its_own_files_on_resume(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    (tmp_path / "study.json").write_text(json.dumps(cfg.to_dict()))
    for rel in ("rows/none-seed0.json", "checkpoints/none-seed0.safetensors", "checkpoints/mine.pt", "notes.txt"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x")
    StudyDir(tmp_path).prepare(cfg, force=False)   # resume: the files under the study's own names are its
    assert set(StudyDir(tmp_path).written()) - {""} == \
        {"study.json", "rows/none-seed0.json", "checkpoints/none-seed0.safetensors"}
    other = StudyConfig.preset("tiny", networks=("softmax",), analytic=())
    StudyDir(tmp_path).prepare(other, force=True)   # so no stale row of the old config survives a replacement
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["checkpoints/mine.pt", MANIFEST, "notes.txt", "study.json"]
    assert json.loads((tmp_path / "study.json").read_text()) == other.to_dict()


def test_a_file_written_again_is_listed_once_in_the_manifest(tmp_path):
    sd = StudyDir(tmp_path)
    for text in ("a", "b", "c"):   # a report rewritten after every cell
        sd.write_text("results.md", text)
    sd.write_json("rows/x.json", {})
    assert (tmp_path / MANIFEST).read_text().splitlines() == ["results.md", "rows/x.json"]
    assert (tmp_path / "results.md").read_text() == "c"


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    for kw, words in ((dict(device="tpu"), "device"), (dict(workers=0), "workers"), (dict(backend="cuda"), "backend")):
        with pytest.raises(ValueError, match=words):
            reproduce(cfg, tmp_path / "new", progress=False, **kw)
        assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        reproduce(cfg, tmp_path / "file" / "study", progress=False)


def test_force_never_deletes_a_directory_that_is_not_a_study(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.safetensors").write_bytes(b"user data")
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    with pytest.raises(FileExistsError):
        reproduce(cfg, tmp_path, progress=False, force=True)
    assert (tmp_path / "checkpoints" / "mine.safetensors").read_bytes() == b"user data"


@pytest.mark.parametrize("kw", [dict(steps=0), dict(steps=5000), dict(eta=-1.0), dict(sampler="euler"),
                                dict(probe_t=(1000,)), dict(batch_size=0), dict(lr=-1.0), dict(ema=1.5),
                                dict(width=0), dict(temperature=0.0), dict(els_patch=4), dict(n_pairs=1),
                                dict(networks=("none", "none")), dict(t_focus=(400, 50)), dict(t_focus_prob=1.5),
                                dict(attn_dim=0)])
def test_study_config_rejects_bad_options_up_front(kw):
    with pytest.raises((ValueError, TypeError)):
        StudyConfig.preset("tiny", **kw)


def test_each_component_setting_is_declared_once():
    # a study field that re-declares a component's setting has that setting's help, and the component
    # config is built from it by name: change the field, and exactly that setting changes
    sources = {f.name: f.metadata["source"] for f in dataclasses.fields(StudyConfig) if "source" in f.metadata}
    assert {n for n, (cls, _) in sources.items() if cls is ModelConfig} == \
        {"width", "attn_dim", "attn_patch", "temperature", "coord_channels"}
    assert sources["train_steps"] == (TrainConfig, "steps") and sources["batch_size"] == (TrainConfig, "batch_size")
    for name, (cls, field) in sources.items():
        own = next(f for f in dataclasses.fields(cls) if f.name == field)
        mine = next(f for f in dataclasses.fields(StudyConfig) if f.name == name)
        assert mine.metadata["help"] == own.metadata["help"] or name == "attn_dim"
    base = StudyConfig()
    for name, value in (("width", 24), ("attn_dim", 8), ("temperature", 0.5), ("coord_channels", True)):
        m = StudyConfig(**{name: value}).model_config("softmax")
        assert getattr(m, name) == value
        assert {k: v for k, v in m.to_dict().items() if k != name} == \
            {k: v for k, v in base.model_config("softmax").to_dict().items() if k != name}
    tc = StudyConfig(train_steps=7, batch_size=3, lr=1e-3, ema=0.5, lr_schedule="cosine").train_config(4)
    assert (tc.steps, tc.batch_size, tc.lr, tc.ema, tc.seed, tc.lr_schedule) == (7, 3, 1e-3, 0.5, 4, "cosine")
    assert StudyConfig().train_config(0).lr_schedule == "onecycle"
    assert (StudyConfig().train_config(0).precision, StudyConfig(precision="bf16").train_config(1).precision) == \
        ("fp32", "bf16")
    with pytest.raises(UsageError, match="lr_schedule"):
        StudyConfig(lr_schedule="linear")
    # a study.json from before lr_schedule was a study setting is today's default config
    older = {k: v for k, v in StudyConfig().to_dict().items() if k != "lr_schedule"}
    assert StudyConfig().matches(older) and not StudyConfig(lr_schedule="constant").matches(older)
    assert StudyConfig(image_size=10, n_pairs=3).model_config("none").image_size == 10
    assert StudyConfig(image_size=10, n_pairs=3).data_config().n_pairs == 3


def test_study_recipe_reaches_the_networks_and_training():
    cfg = StudyConfig(t_focus=(10, 20), t_focus_prob=0.25, attn_dim=16, attn_patch=True)
    tc = cfg.train_config(2)
    assert (tc.t_focus, tc.t_focus_prob, tc.seed) == ((10, 20), 0.25, 2)
    # attn_patch needs learned projections: on for softmax and top-1, off for the others
    assert [cfg.model_config(n).attn_patch for n in ("none", "identity", "top1", "softmax")] == \
        [False, False, True, True]
    assert cfg.model_config("softmax").attn_dim == 16
    assert not StudyConfig(attn_patch=False).model_config("softmax").attn_patch


def test_the_pairs_sweep_is_a_grid_over_n_pairs_that_grows_the_image_where_pairs_do_not_fit():
    g = pairs_grid("tiny", {"networks": ("none",)}, [2, 4, 8])
    assert g.axes == {"n_pairs": (2, 4, 8)} and g.preset == "tiny"
    cfgs = {c.name: cell_config(g, c) for c in g.cells()}
    assert [(c.n_pairs, c.image_size) for c in cfgs.values()] == [(2, 8), (4, 8), (8, 12)]
    # beyond 4 pairs the border layout needs positions: every cell gets coordinate channels
    assert all(c.coord_channels for c in cfgs.values())
    assert not any(cell_config(h, c).coord_channels for h in [pairs_grid("tiny", {}, [2, 4])] for c in h.cells())
    with pytest.raises(ValueError, match="n_pairs is the pairs sweep's axis"):
        pairs_grid("tiny", {"n_pairs": 3}, [2, 4])
    with pytest.raises(ValueError, match="distinct"):
        pairs_grid("tiny", {}, [2, 2])


@pytest.mark.slow
def test_pairs_sweep_writes_the_sweep_table_with_the_image_size(tmp_path):
    g = pairs_grid("tiny", {"networks": ("none", "softmax"), "n_samples": 8, "probe_n": 8, "n_random": 50,
                            "train_steps": 2, "analytic": ()}, [2, 8])
    res = sweep.run(g, tmp_path, progress=False, workers=1)
    assert [(r["n_pairs"], r["image_size"], r["network"]) for r in res["pooled"]] == \
        [(2, 8, "none"), (2, 8, "softmax"), (8, 12, "none"), (8, 12, "softmax")]
    table = (tmp_path / "sweep.md").read_text()
    assert "| n_pairs | image_size | network | seeds | chance |" in table and "| 8 | 12 | softmax | 1 | 1.56% |" in table
    assert json.loads((tmp_path / "cells" / "n_pairs=8" / "results.json").read_text())["config"]["coord_channels"]


@pytest.mark.slow
def test_rows_in_worker_processes_match_and_resume(tmp_path):
    cfg = StudyConfig.preset("tiny", networks=("none", "identity"), n_samples=8, probe_n=8, n_random=50,
                             train_steps=2, analytic=("els",), n_seeds=2)
    doc = reproduce(cfg, tmp_path / "par", progress=True, workers=2, group_seeds=True)
    md = (tmp_path / "par" / "results.md").read_text()
    assert "## Per seed" in md and "| CNN | 1 |" in md and "invocations" not in md
    own = doc["summary"]["own_marginal_chance"]
    assert "own-marginal chance" in md
    assert own["none"]["n"] == doc["summary"]["networks"]["none"]["rates"]["valid"]["k"]  # the valid samples
    assert set(own) == {"els", "none", "identity"}
    assert set(doc["summary"]["coordination"]) == {"identity"}
    ref = reproduce(cfg, tmp_path / "seq", progress=False, workers=1, group_seeds=True)
    assert [(r["network"], r["seed"]) for r in doc["rows"]] == [(r["network"], r["seed"]) for r in ref["rows"]]
    for a, b in zip(doc["rows"], ref["rows"]):   # same config, same data and noise; threads may move last bits
        assert a["rates"]["valid"]["n"] == b["rates"]["valid"]["n"]
    assert doc["rows"][0]["rates"] == ref["rows"][0]["rates"]   # the ELS row trains nothing
    # a worker trains a network's seeds together (the members share the ensemble's wall time), but the
    # identity network's two seeds (4 of the 6 cost units) are split over both workers (parallel.balance);
    # either way the checkpoints are the one process's up to float32 rounding
    secs = {(r["network"], r["seed"]): r["train_seconds"] for r in doc["rows"]}
    assert secs[("none", 0)] == secs[("none", 1)] and secs[("identity", 0)] != secs[("identity", 1)]
    seq = {(r["network"], r["seed"]): r["train_seconds"] for r in ref["rows"]}
    assert seq[("none", 0)] == seq[("none", 1)] and seq[("identity", 0)] == seq[("identity", 1)]
    for name in ("none-seed0", "none-seed1", "identity-seed0", "identity-seed1"):
        (a, _), (b, _) = [load_tensors(tmp_path / d / "checkpoints" / f"{name}.safetensors") for d in ("par", "seq")]
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in b), name
    mtime = (tmp_path / "par" / "checkpoints" / "none-seed0.safetensors").stat().st_mtime
    doc2 = reproduce(cfg, tmp_path / "par", progress=False, workers=2)
    assert (tmp_path / "par" / "checkpoints" / "none-seed0.safetensors").stat().st_mtime == mtime
    # the study's wall time sums its invocations
    runs = json.loads((tmp_path / "par" / "invocations.json").read_text())
    assert [r["rows_run"] for r in runs] == [5, 0]
    assert doc2["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in runs))
    assert "over 2 invocations" in (tmp_path / "par" / "results.md").read_text()
    with pytest.raises(ValueError, match="workers"):
        reproduce(cfg, tmp_path / "par", progress=False, workers=0)


def test_coordination_verdict_needs_intervals_clear_of_chance_and_the_cnn():
    def rate(rate, lo, hi, n=1000):
        return {"rates": {"consistent_among_valid": {"rate": rate, "ci95": [lo, hi], "n": n}}}
    summary = {"baseline": {"analytic_consistent": 0.234},
               "networks": {"none": rate(0.27, 0.24, 0.30), "softmax": rate(0.45, 0.42, 0.48),
                            "top1": rate(0.29, 0.26, 0.32), "identity": rate(0.0, 0.0, 1.0, n=0)}}
    v = coordination_verdict(summary)
    assert v["softmax"] == {"above_chance": True, "above_cnn": True}
    assert v["top1"] == {"above_chance": True, "above_cnn": False}     # overlaps the CNN's interval
    assert v["identity"] == {"above_chance": False, "above_cnn": False}  # no valid samples
    # the intervals count samples: each seed's own rate is checked against the same bars (chance, the CNN's rate)
    for seeds, every in (([0.44, 0.46], True), ([0.60, 0.26], False), ([0.50, None], False)):
        summary["networks"]["softmax"]["rates"]["consistent_among_valid"]["per_seed"] = seeds
        assert coordination_verdict(summary)["softmax"] == {"above_chance": True, "above_cnn": True,
                                                            "every_seed_above": every}


@dataclasses.dataclass(frozen=True)
class _Newer(StudyConfig):
    """Today's StudyConfig with a setting added since (as a later version adds ``depth``)."""
    depth: int = option(2, "a setting added with a default")


def test_a_saved_config_matches_when_settings_added_since_have_their_default():
    cfg = StudyConfig.preset("tiny", networks=("none",))
    saved = cfg.to_dict()
    assert cfg.matches(saved) and not cfg.matches({**saved, "width": saved["width"] + 1})
    older = {k: v for k, v in saved.items() if k != "els_patch"}   # written before els_patch existed
    assert cfg.matches(older)
    assert not dataclasses.replace(cfg, els_patch=3).matches(older)  # missing, and not at its default now
    assert not cfg.matches({**saved, "unknown": 1})
    assert _Newer(**dataclasses.asdict(cfg)).matches(saved)
    assert not _Newer(**dataclasses.asdict(cfg), depth=3).matches(saved)


def test_a_study_written_before_a_setting_existed_resumes_without_retraining(tmp_path, monkeypatch):
    from fastscore.study import files
    # as if els_patch had been added after this study.json was written (by today's main)
    monkeypatch.setattr(files, "STUDY_JSON_KEYS", files.STUDY_JSON_KEYS - {"els_patch"})
    cfg = StudyConfig.preset("tiny", networks=("none",), analytic=())
    StudyDir(tmp_path).prepare(cfg, force=False)
    older = {k: v for k, v in cfg.to_dict().items() if k != "els_patch"}
    study = json.dumps(older, indent=2)
    (tmp_path / "study.json").write_text(study)
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "none-seed0.json").write_text("{}")
    StudyDir(tmp_path).prepare(cfg, force=False)                     # the same study: resumed
    assert (tmp_path / "study.json").read_text() == study
    assert StudyDir(tmp_path).finished_rows(cfg.jobs()) == {("none", 0): {}}
    with pytest.raises(FileExistsError, match="another config"):     # a changed setting is another study
        StudyDir(tmp_path).prepare(dataclasses.replace(cfg, els_patch=3), force=False)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs_and_one_of_this_row_is_reused(tmp_path,
                                                                                                  monkeypatch):
    import shutil

    from fastscore.study import rows
    from fastscore.study.files import load_checked_model
    cfg = StudyConfig.preset("tiny", networks=("none",), n_samples=8, probe_n=8, n_random=50, train_steps=3,
                             analytic=())
    reproduce(cfg, tmp_path / "a", progress=False)
    ckpt = tmp_path / "a" / "checkpoints" / "none-seed0.safetensors"
    load_checked_model(ckpt, cfg, "none", 0)                            # the row it was trained as
    for other, seed, what in ((dataclasses.replace(cfg, lr=cfg.lr / 2), 0, "train lr"),
                              (cfg, 1, "train seed"),
                              (dataclasses.replace(cfg, data_seed=7), 0, "extra data_seed"),
                              (dataclasses.replace(cfg, n_train=cfg.n_train + 1), 0, "extra n_train")):
        with pytest.raises(UsageError, match=f"none-seed0.safetensors was not trained as .*{what}"):
            load_checked_model(ckpt, other, "none", seed)
    with pytest.raises(UsageError, match=r"extra half \(saved None, here 'a'\)"):   # a halves row's is another row
        load_checked_model(ckpt, cfg, "none", 0, half="a")
    # copied into a study that trains that row otherwise: refused before anything trains, and left as it was
    bad = dataclasses.replace(cfg, lr=cfg.lr / 2, n_seeds=2)
    StudyDir(tmp_path / "b").prepare(bad, force=False)
    (tmp_path / "b" / "checkpoints").mkdir(exist_ok=True)
    shutil.copy2(ckpt, tmp_path / "b" / "checkpoints" / "none-seed1.safetensors")    # seed 0 would train first

    def no_training(*args, **kw):
        raise AssertionError("trained before the checkpoints were checked")
    with monkeypatch.context() as m:
        m.setattr(rows, "train", no_training)
        with pytest.raises(UsageError, match="none-seed1.safetensors was not trained as this study's row none seed 1"):
            reproduce(bad, tmp_path / "b", progress=False, workers=1)
    assert (tmp_path / "b" / "checkpoints" / "none-seed1.safetensors").read_bytes() == ckpt.read_bytes()
    # copied into a study of the same settings: loaded, not trained again
    StudyDir(tmp_path / "c").prepare(cfg, force=False)
    (tmp_path / "c" / "checkpoints").mkdir(exist_ok=True)
    shutil.copy2(ckpt, tmp_path / "c" / "checkpoints" / ckpt.name)
    monkeypatch.setattr(rows, "train", no_training)
    doc = reproduce(cfg, tmp_path / "c", progress=False)
    assert doc["rows"][0]["network"] == "none"


def test_results_put_each_network_beside_the_papers_number(tmp_path):
    from fastscore.study import PAPER
    from fastscore.study.report import fmt
    cfg = StudyConfig.preset("tiny", networks=("none",), n_samples=8, probe_n=8, n_random=50, train_steps=2,
                             analytic=("ideal",), n_colours=4)
    doc = reproduce(cfg, tmp_path / "4", progress=False)
    md = (tmp_path / "4" / "results.md").read_text()
    section = md.split("## Beside the paper")[1].split("\n## ")[0]
    r = doc["summary"]["networks"]["none"]["rates"]
    assert f"| CNN | {fmt(r['consistent'])} | {PAPER['none']:.2f}% | {fmt(r['consistent_among_valid'])} |" in section
    assert f"| {PAPER['random']:.2f}% |" in section and "ideal" not in section.lower()
    # another setting than the paper's (2 colours): no side-by-side table
    reproduce(dataclasses.replace(cfg, n_colours=2), tmp_path / "2", progress=False)
    assert "Beside the paper" not in (tmp_path / "2" / "results.md").read_text()
