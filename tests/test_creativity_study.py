"""The creativity study (reproduce --study creativity): a sweep over the number of training images whose
report is novelty() of the saved samples; the ideal score memorises; a rerun trains nothing."""
import json
import os
import re
from fractions import Fraction

import pytest
import torch

from fastscore import cli
from fastscore.checkpoint import load_tensors
from fastscore.data import make_dataset
from fastscore.novelty import novelty
from fastscore.study import creativity, halves
from fastscore.study.config import LABELS
from fastscore.theory import Agreement

SIZES = creativity.SIZES["tiny"]
MODELS = ("ideal", "els", "none", "softmax")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("creat") / "run"
    doc = creativity.run(creativity.grid("tiny"), out, progress=False, workers=1)
    return out, doc


def _table(md: str) -> list[dict[str, str]]:
    """The rows of creativity.md's first table, by column header."""
    lines = ("| training images" + md.split("\n\n| training images")[1].split("\n\n")[0]).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


@pytest.mark.slow
def test_tiny_creativity_run_writes_the_table_and_figures_with_one_row_per_size_and_model(study):
    out, doc = study
    rows = _table((out / "creativity.md").read_text())
    assert sorted((int(r["training images"]), r["model"]) for r in rows) == sorted((n, LABELS[m]) for n in SIZES for m in MODELS)
    assert [c["n_train"] for c in doc["cells"]] == list(SIZES)
    assert json.loads((out / "creativity.json").read_text())["cells"] == json.loads(json.dumps(doc["cells"]))
    for name in ["creativity-curve.png"] + [f"creativity-novel-{m}.png" for m in ("els", "none", "softmax")]:
        assert (out / name).stat().st_size > 1000, name
    assert doc["figure_n_train"] == SIZES[len(SIZES) // 2]


@pytest.mark.slow
def test_report_numbers_equal_novelty_recomputed_from_the_saved_samples(study):
    out, doc = study
    for cell in doc["cells"]:
        cfg_doc = json.loads((out / "cells" / f"n_train={cell['n_train']}" / "study.json").read_text())
        for name in MODELS:
            x, meta = load_tensors(out / "cells" / f"n_train={cell['n_train']}" / "samples" / f"{name}-seed0.safetensors",
                                   "samples")
            from fastscore.data import KVConfig
            cfg = KVConfig.from_dict(meta["data"])
            _, train = make_dataset(cfg, cfg_doc["n_train"], cfg_doc["data_seed"])
            nv = novelty(cfg, x["samples"], train)
            m = cell["models"][name]
            for key, rate in nv.rates.items():
                if key in m["rates"]:
                    assert (m["rates"][key]["k"], m["rates"][key]["n"]) == (rate.k, rate.n), (cell["n_train"], name, key)
            assert m["rates"]["valid"]["k"] == int(nv.valid.sum())
            assert m["rates"]["consistent_among_valid"]["k"] == int(nv.consistent.sum())
            assert Fraction(cell["chance_exact"]) == nv.chance and cell["mosaic_chance"] == float(nv.mosaic)
            assert m["own_mosaic_chance"] == (None if nv.own_mosaic is None else float(nv.own_mosaic))
            assert m["nearest_distance"]["novel"]["n"] == int(nv.novel.sum())


@pytest.mark.slow
def test_the_ideal_score_row_has_novelty_0_and_copies_all_valid_samples(study):
    _, doc = study
    for cell in doc["cells"]:
        r = cell["models"]["ideal"]["rates"]
        assert r["valid"]["k"] > 0
        assert r["novel_among_valid"]["k"] == 0
        assert r["copy_among_valid"]["k"] == r["copy_among_valid"]["n"] == r["valid"]["k"]
        assert cell["verdicts"]["ideal"]["verdict"] == "memorises"


@pytest.mark.slow
def test_a_rerun_of_a_finished_creativity_study_trains_nothing(study):
    out, doc = study
    ckpts = sorted(out.rglob("checkpoints/*.safetensors"))
    assert len(ckpts) == len(SIZES) * 2
    before = {p: os.stat(p).st_mtime_ns for p in ckpts}
    again = creativity.run(creativity.grid("tiny"), out, progress=False, workers=1)
    assert {p: os.stat(p).st_mtime_ns for p in ckpts} == before
    assert json.dumps(again["cells"]) == json.dumps(doc["cells"])


def _carried(src, dst, **kw):
    """The study at ``src`` as carried to another machine (``scripts.carry``): no samples or checkpoints."""
    from fastscore.scripts.carry import carry
    assert carry(src, dst, **kw)
    assert not list(dst.rglob("*.safetensors")) and not list(dst.rglob("*.png"))
    return dst


@pytest.mark.slow
def test_cells_carried_without_samples_report_the_same_numbers_and_train_nothing(study, tmp_path):
    out, doc = study
    for n in SIZES:
        saved = json.loads((out / "cells" / f"n_train={n}" / creativity.CELL_FILE).read_text())
        assert saved["config"]["n_train"] == n
    # written when the cell finishes, not only by the report (a study stopped before its report keeps them)
    import shutil
    cell = tmp_path / "cell"
    shutil.copytree(out / "cells" / f"n_train={SIZES[0]}", cell)
    (cell / creativity.CELL_FILE).unlink()
    config = creativity.cell_config(creativity.grid("tiny"), creativity.grid("tiny").cells()[0])
    creativity.run_cell(config, cell, progress=False, workers=1)
    assert json.loads((cell / creativity.CELL_FILE).read_text()) == json.loads(
        (out / "cells" / f"n_train={SIZES[0]}" / creativity.CELL_FILE).read_text())
    dst = _carried(out, tmp_path / "carried")
    again = creativity.run(creativity.grid("tiny"), dst, progress=False, workers=1)
    assert not list(dst.rglob("*.safetensors"))          # nothing trained or sampled again
    assert json.dumps(again["cells"]) == json.dumps(doc["cells"])
    assert _table((dst / "creativity.md").read_text()) == _table((out / "creativity.md").read_text())


@pytest.mark.slow
def test_a_cell_file_of_another_config_is_refused_when_the_samples_are_gone(study, tmp_path):
    out, _ = study
    dst = _carried(out, tmp_path / "carried")
    f = dst / "cells" / f"n_train={SIZES[0]}" / creativity.CELL_FILE
    saved = json.loads(f.read_text())
    saved["config"]["n_samples"] += 1
    f.write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match="another config"):
        creativity.report(creativity.grid("tiny"), dst)
    saved["config"]["n_samples"] -= 1
    saved["rows"][0]["valid"]["k"] += 1                    # the rows were rerun after it was measured
    f.write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match="other rows than results.json's"):
        creativity.report(creativity.grid("tiny"), dst)
    saved["rows"][0]["valid"]["k"] -= 1
    saved["format"] = creativity.CELL_FORMAT + 1
    f.write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match="another version of the report"):
        creativity.report(creativity.grid("tiny"), dst)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="samples of .* are missing .*remove its rows/ files"):
        creativity.report(creativity.grid("tiny"), dst)


@pytest.mark.slow
def test_carry_leaves_an_unfinished_cell_behind_and_a_carried_unfinished_cell_is_refused(study, tmp_path):
    from fastscore._validate import UsageError
    from fastscore.scripts.carry import carry
    out, _ = study
    src = tmp_path / "src"
    import shutil
    shutil.copytree(out, src)
    unfinished = src / "cells" / f"n_train={SIZES[1]}"
    (unfinished / "results.json").unlink()
    dst = _carried(src, tmp_path / "dst")
    assert (dst / "cells" / f"n_train={SIZES[0]}" / "results.json").exists()
    assert not (dst / "cells" / unfinished.name).exists()
    # its finished rows carried without their samples: the creativity study refuses them before any work
    rows = _carried(src, tmp_path / "rows", rows=True)
    assert (rows / "cells" / unfinished.name / "rows" / "softmax-seed0.json").exists()
    with pytest.raises(UsageError, match="finished but their samples are missing"):
        creativity.run(creativity.grid("tiny"), rows, progress=False, workers=1)
    assert not list(rows.rglob("*.safetensors"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sweep.json").write_text(json.dumps({"grid": "another"}))
    with pytest.raises(UsageError, match="dst: .* holds another sweep"):
        carry(src, tmp_path / "other")
    with pytest.raises(UsageError, match="src: .* holds no sweep.json"):
        carry(tmp_path / "other" / "nothing", tmp_path / "x")


@pytest.mark.slow
def test_a_partial_report_has_the_finished_cells_and_names_the_others(study, tmp_path):
    out, doc = study
    dst = _carried(out, tmp_path / "carried")
    (dst / "cells" / f"n_train={SIZES[1]}" / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        creativity.report(creativity.grid("tiny"), dst)
    part = creativity.report(creativity.grid("tiny"), dst, partial=True)
    assert part["unfinished"] == [f"n_train={SIZES[1]}"]
    assert json.dumps(part["cells"]) == json.dumps(doc["cells"][:1])
    md = (dst / "creativity.md").read_text()
    assert f"Not finished yet: n_train={SIZES[1]}" in md
    assert sorted({int(r["training images"]) for r in _table(md)}) == [SIZES[0]]
    (dst / "cells" / f"n_train={SIZES[0]}" / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="no cell .* is finished"):
        creativity.report(creativity.grid("tiny"), dst, partial=True)


def test_verdicts_follow_the_stated_rules():
    def model(novel_k, valid_n, consistent_k, own, lo, hi):
        return {"rates": {"novel_among_valid": {"k": novel_k, "n": valid_n, "rate": novel_k / valid_n, "ci95": [lo, hi]},
                          "novel_among_consistent": {"k": novel_k, "n": consistent_k,
                                                     "rate": novel_k / consistent_k if consistent_k else float("nan"),
                                                     "ci95": [novel_k / max(consistent_k, 1) / 2,
                                                              min(1.0, 0.01 + novel_k / max(consistent_k, 1))]}},
                "own_mosaic_chance": own}
    models = {"ideal": model(0, 100, 50, 0.1, 0.0, 0.04), "none": model(10, 100, 40, 0.04, 0.05, 0.17),
              "softmax": model(30, 100, 40, 0.1, 0.22, 0.39), "top1": model(12, 100, 40, 0.05, 0.06, 0.19),
              "identity": model(0, 100, 0, None, 0.0, 0.04)}
    v = creativity.verdicts(models, chance=0.03, rule_novel=0.3)
    assert v["ideal"]["verdict"] == "memorises"
    assert v["none"]["verdict"] == "creative" and v["none"]["above_cnn"] is None
    assert v["softmax"]["verdict"] == "creative" and v["softmax"]["above_cnn"] is True
    assert v["top1"]["verdict"] == "neither: not above the CNN"
    assert v["identity"]["verdict"] == "no consistent samples"
    assert creativity.verdicts(models, chance=0.3, rule_novel=0.3)["softmax"]["verdict"] == \
        "neither: not above uniform chance"
    assert v["softmax"]["every_seed_above"] is None                 # one pooled rate, no seeds given
    # the intervals count samples: a pooled "creative" that one seed does not carry is said so
    seeds = lambda *rates: [{"rates": {"novel_among_valid": {"rate": x}}} for x in rates]   # noqa: E731
    cnn_rate = models["none"]["rates"]["novel_among_valid"]["rate"]
    for rates, every in (((0.35, 0.25), True), ((0.35, cnn_rate - 0.01), False), ((0.5, 0.02), False)):
        v2 = creativity.verdicts({**models, "softmax": {**models["softmax"], "per_seed": seeds(*rates)}},
                                 chance=0.03, rule_novel=0.3)["softmax"]
        assert v2["verdict"] == "creative" and v2["every_seed_above"] is every
        assert creativity._verdict(v2) == "creative" + ("" if every else " (not in every seed)")
    # copies of nearly everything, but a rule sampler would draw hardly any new content either: not memorising
    few = creativity.verdicts(models, chance=0.03, rule_novel=0.003)["ideal"]
    assert few["mostly_copies"] and not few["below_rule_novel"] and few["verdict"].startswith("neither: not above")


def test_the_grid_sweeps_n_train_and_refuses_it_as_a_setting():
    g = creativity.grid("quick", networks=("none",), n_colours=None)
    assert g.axes == {"n_train": creativity.SIZES["quick"]} and g.base["networks"] == ("none",)
    assert g.base["probe_t"] == () and g.preset == "quick"
    with pytest.raises(ValueError, match="n_train is the creativity study's axis"):
        creativity.grid("tiny", n_train=8)
    with pytest.raises(ValueError, match="distinct"):
        creativity.grid("tiny", sizes=(8, 8))
    with pytest.raises(ValueError, match="n_colours"):
        creativity.grid("tiny", n_colours=99)


@pytest.mark.parametrize("args, match", [(["--n-train", "64"], "--n-train: the creativity study sweeps"),
                                         (["--pairs-sweep", "2,4"], "--pairs-sweep belongs to --study coordination")])
def test_cli_refuses_options_that_the_creativity_study_sets_itself_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "c"
    assert cli.main(["reproduce", "--study", "creativity", "--tiny", "--out", str(out), *args]) == 2
    assert re.search(match, capsys.readouterr().err) and not out.exists()


@pytest.mark.parametrize("study, mod", [("creativity", creativity), ("halves", halves)])
def test_cli_sizes_choose_the_studys_numbers_of_training_images(tmp_path, monkeypatch, study, mod):
    seen = []
    monkeypatch.setattr(mod, "run", lambda g, out, **kw: seen.append(g))     # the grid the study would run
    assert cli.main(["reproduce", "--study", study, "--tiny", "--colours", "4", "--sizes", "40,8",
                     "--out", str(tmp_path / "c")]) == 0
    assert seen[0].axes == {"n_train": (8, 40)} and seen[0].base["n_colours"] == 4


@pytest.mark.parametrize("args, match", [
    (["--study", "creativity", "--sizes", "8,x"], r"--sizes expects numbers of training images .*'8,x'"),
    (["--study", "creativity", "--sizes", "8,8"], r"--sizes must be distinct numbers of training images"),
    (["--study", "halves", "--sizes", "0,8"], r"--sizes must be >= 1, got 0"),
    (["--sizes", "8"], r"--sizes belongs to --study creativity or halves"),
    (["--study", "theory", "--sizes", "8"], r"--sizes belongs to --study creativity or halves")])
def test_cli_refuses_bad_sizes_naming_the_option_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "c"
    assert cli.main(["reproduce", "--tiny", "--out", str(out), *args]) == 2
    assert re.search(match, capsys.readouterr().err) and not out.exists()


def test_cell_chance_counts_a_cell_without_colour_as_its_own_category():
    s = torch.tensor([[[0], [-1]], [[1], [-1]]])         # (N=2, key/value, 1 pair)
    r = torch.tensor([[[0], [-1]], [[0], [1]]])
    a = Agreement(torch.zeros(2), s, r)
    # keys: p_s = (1/2, 1/2), p_r = (1, 0) -> 1/2; values: p_s(none) = 1, p_r(none) = 1/2 -> 1/2
    assert a.cell_chance() == pytest.approx(0.5)
    assert a.cells.tolist() == [[[True], [True]], [[False], [False]]]
