"""Sweep grids: settings checked by name and type, cells in a stable order with stable names."""
import pytest

from fastscore.study import StudyConfig, grid


def test_cli_grid_crosses_axes_in_order_with_the_last_varying_fastest():
    g = grid.from_cli(StudyConfig, ["networks=none,softmax", "n_seeds=2"], ["n_train=8,64", "lr=1e-3,2e-3"], "quick")
    cells = g.cells()
    assert [c.name for c in cells] == ["n_train=8,lr=0.001", "n_train=8,lr=0.002", "n_train=64,lr=0.001",
                                       "n_train=64,lr=0.002"]
    assert all(c.settings["networks"] == ("none", "softmax") and c.settings["n_seeds"] == 2 for c in cells)
    assert isinstance(cells[0].settings["lr"], float) and isinstance(cells[0].settings["n_train"], int)
    assert len({c.dirname for c in cells}) == 4 and all("/" not in c.dirname for c in cells)


def test_toml_and_cli_give_the_same_cells(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('preset = "tiny"\n[base]\nnetworks = ["none", "softmax"]\n[grid]\n'
                    'n_train = [8, 64]\nt_focus = [[50, 400], "none"]\n')
    a = grid.from_toml(StudyConfig, path)
    b = grid.from_cli(StudyConfig, ["networks=none,softmax"], ["n_train=8,64", "t_focus=50+400,none"], "tiny")
    assert a == b
    assert [dict(c.settings) for c in a.cells()] == [dict(c.settings) for c in b.cells()]
    assert a.cells()[1].settings["t_focus"] is None


@pytest.mark.parametrize("sets, grids, match", [
    ([], ["n_trian=8,64"], "unknown study setting 'n_trian'"),
    ([], ["n_train=8,lots"], "n_train must be an integer"),
    ([], ["attn_patch=yes,maybe"], "attn_patch must be true or false"),
    (["lr=fast"], [], "lr must be a number"),
    (["n_train=8"], ["n_train=8,64"], "both fixed and swept"),
    ([], ["n_train"], "--grid expects NAME=VALUE"),
    ([], ["n_train=8", "n_train=64"], "given twice"),
])
def test_bad_grids_are_refused_before_any_work(sets, grids, match):
    with pytest.raises((ValueError, TypeError), match=match):
        grid.from_cli(StudyConfig, sets, grids)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[grid\nn_train = [8]\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        grid.from_toml(StudyConfig, path)
    path.write_text("[grid]\nn_train = 8\n")
    with pytest.raises(ValueError, match="grid.n_train must be a non-empty list"):
        grid.from_toml(StudyConfig, path)


def test_cell_rules_set_settings_of_the_matching_cells_and_read_from_toml(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('preset = "tiny"\n[grid]\nn_pairs = [2, 4, 6]\n[[cell]]\nwhere = {n_pairs = 6}\n'
                    'set = {image_size = 10, coord_channels = true}\n')
    g = grid.from_toml(StudyConfig, path)
    assert [dict(c.settings) for c in g.cells()] == [
        {"n_pairs": 2}, {"n_pairs": 4}, {"n_pairs": 6, "image_size": 10, "coord_channels": True}]
    assert [c.name for c in g.cells()] == ["n_pairs=2", "n_pairs=4", "n_pairs=6"]
    assert g.columns == ["n_pairs", "image_size", "coord_channels"]
    assert g.to_dict()["cell"] == [{"where": {"n_pairs": 6}, "set": {"image_size": 10, "coord_channels": True}}]
    # a grid without rules saves as it always did, so a sweep.json written before rules reads back the same
    assert "cell" not in grid.from_cli(StudyConfig, [], ["n_pairs=2,4"]).to_dict()


@pytest.mark.parametrize("rule, match", [
    ("where = {n_train = 8}\nset = {image_size = 10}", "not swept: \\['n_train'\\]"),
    ("where = {n_pairs = 2}\nset = {n_pairs = 3}", "sets swept settings: \\['n_pairs'\\]"),
    ("where = [2]\nset = {width = 3}", "s.toml: a rule's where must be a table of settings"),
    ("where = {n_pairs = 2}", "exactly where"),
    ("where = {n_pairs = 2}\nset = {widht = 3}", "unknown study setting 'widht'"),
])
def test_bad_cell_rules_are_refused(tmp_path, rule, match):
    path = tmp_path / "s.toml"
    path.write_text(f"[grid]\nn_pairs = [2, 4]\n[[cell]]\n{rule}\n")
    with pytest.raises(ValueError, match=match):
        grid.from_toml(StudyConfig, path)


def test_a_rule_overrides_a_base_setting_and_errors_name_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[base]\nn_samples = 100\n[grid]\nn_pairs = [2, 4]\n[[cell]]\nwhere = {n_pairs = 4}\n"
                    "set = {n_samples = 20}\n")
    assert [c.settings["n_samples"] for c in grid.from_toml(StudyConfig, path).cells()] == [100, 20]
    for doc, words in (({"base": {"width": "wide"}}, "g.json: width must be an integer"),
                       ({"base": 3}, "g.json: base must be a table of settings"),
                       ({"grid": None}, "g.json: grid must be a table of settings"),
                       ({"cell": {"where": {}}}, "g.json: cell must be a list")):
        with pytest.raises(ValueError, match=words):
            grid.from_doc(StudyConfig, doc, "g.json")
