"""The halves study (reproduce --study halves): networks trained on disjoint halves of n training images,
sampled from the same noise; disjointness, the pair measures against float64 references, resumption."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from fastscore import cli
from fastscore._validate import UsageError
from fastscore.checkpoint import load_tensors
from fastscore.data import KVConfig, decode, palette_of_size, render
from fastscore.metrics import content_codes, is_consistent
from fastscore.novelty import n_consistent_contents
from fastscore.sampling import sample
from fastscore.schedule import make_schedule
from fastscore.study import halves
from fastscore.theory import IdealScore, correlation_summary

CFG4 = KVConfig(palette=palette_of_size(4))
CFG2 = KVConfig(palette=palette_of_size(2))


def _codes(cfg: KVConfig, b) -> torch.Tensor:
    return content_codes(b.keys, b.values, cfg.n_colours)


@pytest.mark.parametrize("cfg, n", [(CFG4, 500), (CFG2, 30)])
def test_halves_share_no_content_and_each_holds_n_distinct_consistent_contents(cfg, n):
    seed = int(torch.randint(0, 2**31, ()))
    print("seed", seed)
    a, b = halves.split(cfg, n, seed)
    ca, cb = _codes(cfg, a), _codes(cfg, b)
    assert ca.numel() == cb.numel() == n
    assert ca.unique().numel() == cb.unique().numel() == n
    assert not set(ca.tolist()) & set(cb.tolist())
    assert bool(is_consistent(a.keys, a.values).all()) and bool(is_consistent(b.keys, b.values).all())
    # 2 colours, n = 30: the two halves are all 60 contents of the setting
    if 2 * n == n_consistent_contents(cfg.n_pairs, cfg.n_colours):
        assert len(set(ca.tolist()) | set(cb.tolist())) == 2 * n
    # the draw order does not depend on n: a smaller n's halves are the first images of a larger n's
    a5, b5 = halves.split(cfg, 5, seed)
    assert torch.equal(a5.keys, a.keys[:5]) and torch.equal(b5.values, b.values[:5])


def test_two_n_beyond_the_settings_contents_and_n_below_one_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"^n must be <= 30: .* 2 n = 62 distinct contents .* have 60, got 31"):
        halves.split(CFG2, 31)
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0"):
        halves.split(CFG4, 0)
    with pytest.raises(ValueError, match=r"^m must be <= 60"):
        halves.distinct_contents(CFG2, 61)
    with pytest.raises(UsageError, match=r"^sizes: 31 images per half need 2 x 31 = 62 distinct contents"):
        halves.grid("tiny", sizes=(4, 31), n_colours=2)
    with pytest.raises(UsageError, match=r"^sizes must be >= 1, got 0"):
        halves.grid("tiny", sizes=(0, 4))
    with pytest.raises(UsageError, match="analytic and probe_t must be empty"):
        halves.grid("tiny", analytic=("ideal",))
    with pytest.raises(UsageError, match="n_train is the halves study's axis"):
        halves.grid("tiny", n_train=8)
    # the preset's sizes that do not fit are left out: 2 colours keep 16 of the full preset's sizes
    assert halves.grid("full", n_colours=2).axes["n_train"] == (16,)


def test_cli_refuses_n_train_naming_the_option_before_any_work(tmp_path, capsys):
    assert cli.main(["reproduce", "--study", "halves", "--tiny", "--n-train", "8", "--out", str(tmp_path / "x")]) == 2
    assert "--n-train" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _reference(cfg: KVConfig, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, np.ndarray]:
    """Pairs with the same content (both valid), pairs both valid, and r per pair (numpy, float64)."""
    da, db = decode(cfg, a), decode(cfg, b)
    same = both = 0
    for i in range(a.shape[0]):
        if bool(da.valid[i]) and bool(db.valid[i]):
            both += 1
            same += da.keys[i].tolist() == db.keys[i].tolist() and da.values[i].tolist() == db.values[i].tolist()
    r = np.array([np.corrcoef(x.double().flatten().numpy(), y.double().flatten().numpy())[0, 1]
                  for x, y in zip(a, b)])
    return same, both, r


def test_compare_counts_and_r_equal_a_float64_reference_on_fresh_random_pairs():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    print("seed", g.initial_seed())
    n = 200
    a = render(CFG4, torch.randint(0, 4, (n, 4), generator=g), torch.randint(0, 4, (n, 4), generator=g))
    b = a.clone()
    other = render(CFG4, torch.randint(0, 4, (n, 4), generator=g), torch.randint(0, 4, (n, 4), generator=g))
    swap = torch.rand(n, generator=g) < 0.5
    b[swap] = other[swap]                                   # about half the pairs get another content
    b += 0.1 * torch.randn(b.shape, generator=g)            # still valid (tolerance 0.4) ...
    bad = torch.rand(n, generator=g) < 0.2
    b[bad] *= 0.3                                           # ... except these
    got = halves.compare(CFG4, a, b)
    same, both, r = _reference(CFG4, a, b)
    assert 0 < same < both < n                              # the test covers every case
    assert (got["same_content"]["k"], got["same_content"]["n"]) == (same, n)
    assert (got["same_content_among_valid"]["k"], got["same_content_among_valid"]["n"]) == (same, both)
    np.testing.assert_allclose(np.array(got["r"]), r, rtol=0, atol=1e-12)
    assert got["r_summary"]["median"] == pytest.approx(float(np.median(r)), abs=1e-12)


def test_shuffled_pairs_a_sample_i_with_b_sample_i_plus_one_mod_n_against_a_float64_reference():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    print("seed", g.initial_seed())
    n = 100
    keys, values = torch.randint(0, 4, (n, 4), generator=g), torch.randint(0, 4, (n, 4), generator=g)
    a = render(CFG4, keys, values)
    nxt = [(i + 1) % n for i in range(n)]
    b = render(CFG4, keys, values)
    swap = torch.rand(n, generator=g) < 0.5
    b[swap] = render(CFG4, torch.randint(0, 4, (n, 4), generator=g), torch.randint(0, 4, (n, 4), generator=g))[swap]
    b = b[[(i - 1) % n for i in range(n)]]          # b[i + 1] holds a[i]'s content where not swapped
    b += 0.1 * torch.randn(b.shape, generator=g)
    got = halves.shuffled(CFG4, a, b)
    same, both, r = _reference(CFG4, a, b[nxt])
    assert 0 < same < both <= n
    assert (got["same_content"]["k"], got["same_content"]["n"]) == (same, n)
    assert (got["same_content_among_valid"]["k"], got["same_content_among_valid"]["n"]) == (same, both)
    np.testing.assert_allclose(np.array(got["r"]), r, rtol=0, atol=1e-12)
    assert halves.compare(CFG4, a, b)["same_content"]["k"] < same     # not the paired measure


def _mass_brute_force(cfg: KVConfig, train) -> float:
    """P(a draw of the data distribution is a content of ``train``), float64, over every (keys, function)
    draw of ``fastscore.data.generate`` (uniform keys, one uniform function)."""
    P, n = cfg.n_colours, cfg.n_pairs
    mine = {tuple(k) + tuple(v) for k, v in zip(train.keys.tolist(), train.values.tolist())}
    p = 1.0 / P ** (n + P)
    total = 0.0
    for keys in itertools.product(range(P), repeat=n):
        for f in itertools.product(range(P), repeat=P):
            total += p * (keys + tuple(f[k] for k in keys) in mine)
    return total


@pytest.mark.parametrize("cfg, n", [(CFG2, 30), (CFG2, 7), (CFG4, 16), (CFG4, 8000)])
def test_rule_copy_rate_equals_a_brute_force_float64_sum_over_every_draw_of_the_data_distribution(cfg, n):
    a, b = halves.split(cfg, n, 2)
    ra, rb = halves.rule_copy_rate(cfg, a), halves.rule_copy_rate(cfg, b)
    assert float(ra) == pytest.approx(_mass_brute_force(cfg, a), rel=1e-12, abs=0)
    assert float(rb) == pytest.approx(_mass_brute_force(cfg, b), rel=1e-12, abs=0)
    if 2 * n == n_consistent_contents(cfg.n_pairs, cfg.n_colours):
        assert ra + rb == 1                                 # the two halves hold every content
    assert 0 < ra < 1 and 0 < rb < 1


def _ideal(images: torch.Tensor) -> IdealScore:
    return IdealScore(images, make_schedule("linear", 1000))


def _draw(model, seed: int) -> torch.Tensor:
    return sample(model, 64, shape=(3, 8, 8), steps=20, seed=seed)


def test_the_same_network_from_the_same_noise_gives_the_same_content_every_time_and_r_one():
    a, _ = halves.split(CFG4, 16, 3)
    model = _ideal(render(CFG4, a.keys, a.values))
    x1, x2 = _draw(model, 5), _draw(model, 5)
    got = halves.compare(CFG4, x1, x2)
    assert got["same_content"]["rate"] == 1.0 and got["same_content"]["n"] == 64
    assert got["r_summary"]["median"] == pytest.approx(1.0, abs=1e-12)
    assert got["r_summary"]["q25"] == pytest.approx(1.0, abs=1e-12)
    # another noise: not the same samples (the measure can fail)
    assert halves.compare(CFG4, x1, _draw(model, 6))["same_content"]["rate"] < 1.0


def test_memorising_networks_on_disjoint_halves_copy_their_own_half_and_never_agree():
    a, b = halves.split(CFG4, 16, 4)
    xa = _draw(_ideal(render(CFG4, a.keys, a.values)), 7)
    xb = _draw(_ideal(render(CFG4, b.keys, b.values)), 7)
    assert bool(halves.copies(CFG4, xa, a).all()) and bool(halves.copies(CFG4, xb, b).all())
    assert not bool(halves.copies(CFG4, xa, b).any())
    got = halves.compare(CFG4, xa, xb)
    assert got["same_content"]["k"] == 0 and 0.0 <= got["same_content"]["rate"] <= 1.0
    assert got["same_content_among_valid"]["n"] == 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("halves") / "run"
    code = cli.main(["reproduce", "--study", "halves", "--tiny", "--colours", "4", "--networks", "none,softmax",
                     "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_tiny_run_writes_one_row_per_size_and_kind_with_numbers_recomputed_from_the_saved_samples(tiny):
    doc = json.loads((tiny / "halves.json").read_text())
    assert [c["n_train"] for c in doc["cells"]] == list(halves.SIZES["tiny"])
    assert doc["config"]["n_colours"] == 4
    md = (tiny / "halves.md").read_text()
    assert ("| same content | same content, shuffled | same content, both valid | median r [quartiles] | "
            "median r, shuffled [quartiles] | copy rate A | copy rate B | rule copy rate A, B |") in md
    assert "| same content | same content, shuffled | median r | median r, shuffled |" in md
    for cell in doc["cells"]:
        n = cell["n_train"]
        a, b = halves.split(CFG4, n, 0)
        rule = {"a": halves.rule_copy_rate(CFG4, a), "b": halves.rule_copy_rate(CFG4, b)}
        assert cell["rule_copy"]["a_exact"] == f"{rule['a'].numerator}/{rule['a'].denominator}"
        assert cell["rule_copy"]["b"] == float(rule["b"])
        assert cell["rule_copy"]["mean"] == pytest.approx(float(rule["a"] + rule["b"]) / 2, abs=1e-15)
        assert f"| {100 * float(rule['a']):.2f}%, {100 * float(rule['b']):.2f}% |" in md
        # a row keeps its shuffled control (it travels without the samples); the rule copy rates are the report's
        row = json.loads((tiny / "cells" / f"n_train={n}" / "rows" / "none-seed0.json").read_text())
        assert "shuffled" in row and "rule_copy" not in row
        for net in ("none", "softmax"):
            assert f"| {n} | {cell['networks'][net]['label']} | 1 |" in md
            root = tiny / "cells" / f"n_train={n}" / "samples"
            xa = load_tensors(root / f"{net}-a-seed0.safetensors", "halves-samples")[0]["samples"]
            xb = load_tensors(root / f"{net}-b-seed0.safetensors", "halves-samples")[0]["samples"]
            m = cell["networks"][net]
            assert m["same_content"] == halves.compare(CFG4, xa, xb)["same_content"]
            rolled = halves.compare(CFG4, xa, xb[[(i + 1) % xb.shape[0] for i in range(xb.shape[0])]])
            assert m["shuffled"]["same_content"] == rolled["same_content"]
            for k in ("k", "n"):
                assert m["shuffled"]["same_content_among_valid"][k] == rolled["same_content_among_valid"][k]
            assert m["shuffled"]["r"] == correlation_summary(torch.tensor(rolled["r"], dtype=torch.float64))
            assert m["shuffled"]["r"]["median"] != pytest.approx(m["r"]["median"], abs=1e-3)
            assert m["per_seed"][0]["shuffled_r_median"] == m["shuffled"]["r"]["median"]
            assert m["copy_a"]["k"] == int(halves.copies(CFG4, xa, a).sum())
            assert m["copy_b"]["k"] == int(halves.copies(CFG4, xb, b).sum())
            assert m["copy_of_other"]["k"] == int(halves.copies(CFG4, xa, b).sum() + halves.copies(CFG4, xb, a).sum())
            assert 0.0 <= m["same_content"]["rate"] <= 1.0 and m["same_content"]["n"] == 48


def test_resume_does_not_retrain_and_recomputes_a_lost_row_from_the_saved_networks(tiny, monkeypatch):
    def no_training(*args, **kw):
        raise AssertionError("a finished network was trained again")
    monkeypatch.setattr(halves, "train", no_training)
    cell = tiny / "cells" / "n_train=4"
    runs = json.loads((cell / "invocations.json").read_text())
    g = halves.grid("tiny", networks=("none", "softmax"))
    halves.run(g, tiny, progress=False)                      # finished: nothing runs
    assert json.loads((cell / "invocations.json").read_text()) == runs
    row = json.loads((cell / "rows" / "softmax-seed0.json").read_text())
    (cell / "rows" / "softmax-seed0.json").unlink()
    (cell / "results.json").unlink()
    halves.run(g, tiny, progress=False)                      # the row again, from the saved checkpoints
    again = json.loads((cell / "rows" / "softmax-seed0.json").read_text())
    assert again["same_content"] == row["same_content"] and again["r"] == row["r"]
    assert len(json.loads((cell / "invocations.json").read_text())) == len(runs) + 1


def test_cells_and_rows_carried_without_samples_report_the_same_and_rows_of_older_code_need_them(tiny, tmp_path):
    import shutil
    doc = json.loads((tiny / "halves.json").read_text())
    g = halves.grid("tiny", networks=("none", "softmax"))
    dst = tmp_path / "carried"
    shutil.copytree(tiny, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
    again = halves.report(g, dst)
    assert json.dumps(again["cells"]) == json.dumps(doc["cells"])
    # a row written before rows kept the control: computed from the samples, which a carried cell lacks
    cell = dst / "cells" / f"n_train={halves.SIZES['tiny'][0]}"
    row = json.loads((cell / "rows" / "softmax-seed0.json").read_text())
    del row["shuffled"]
    (cell / "rows" / "softmax-seed0.json").write_text(json.dumps(row))
    with pytest.raises(FileNotFoundError, match="softmax-a-seed0.*before rows kept their shuffled control"):
        halves.report(g, dst)
    shutil.copytree(tiny / "cells" / cell.name / "samples", cell / "samples", dirs_exist_ok=True)
    assert json.dumps(halves.report(g, dst)["cells"]) == json.dumps(doc["cells"])
    # the finished cells of a study still running, the others named
    (dst / "cells" / f"n_train={halves.SIZES['tiny'][1]}" / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        halves.report(g, dst)
    part = halves.report(g, dst, partial=True)
    assert part["unfinished"] == [f"n_train={halves.SIZES['tiny'][1]}"]
    assert json.dumps(part["cells"]) == json.dumps(doc["cells"][:1])
    assert f"Not finished yet: n_train={halves.SIZES['tiny'][1]}" in (dst / "halves.md").read_text()


def test_another_config_is_refused_without_force_and_force_keeps_the_users_files(tmp_path):
    out = tmp_path / "run"
    g = halves.grid("tiny", sizes=(4,), networks=("none",))
    halves.run(g, out, progress=False)
    mine = out / "cells" / "n_train=4" / "notes.txt"
    mine.write_text("mine")
    g2 = halves.grid("tiny", sizes=(4,), networks=("none",), train_steps=21)
    with pytest.raises(FileExistsError, match="another grid"):
        halves.run(g2, out, progress=False)
    doc = halves.run(g2, out, force=True, progress=False)
    assert mine.read_text() == "mine"
    assert json.loads((out / "cells" / "n_train=4" / "study.json").read_text())["train_steps"] == 21
    assert doc is not None and doc["config"]["train_steps"] == 21
    assert os.path.exists(out / "halves.md")


def test_a_checkpoint_of_another_half_is_refused_before_anything_trains(tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "run"
    g = halves.grid("tiny", sizes=(4,), networks=("none",), n_seeds=2)
    halves.run(g, out, progress=False)
    cell = out / "cells" / "n_train=4"
    (cell / "rows" / "none-seed1.json").unlink()                 # seed 1 unfinished: its networks load or train
    (cell / "results.json").unlink()                              # and so the cell
    (cell / "checkpoints" / "none-a-seed1.safetensors").unlink()  # A would train first
    b = cell / "checkpoints" / "none-b-seed1.safetensors"
    shutil.copy2(cell / "checkpoints" / "none-a-seed0.safetensors", b)   # another half's (and seed's) network

    def no_training(*args, **kw):
        raise AssertionError("trained before the checkpoints were checked")
    monkeypatch.setattr(halves, "train", no_training)
    with pytest.raises(UsageError, match=r"none-b-seed1.safetensors was not trained as this study's row none-b "
                                         r"seed 1: extra half \(saved 'a', here 'b'\)"):
        halves.run(g, out, progress=False)
    monkeypatch.undo()
    b.unlink()                                                    # moved away, as the message says: it resumes
    doc = halves.run(g, out, progress=False)
    assert doc is not None and [c["n_train"] for c in doc["cells"]] == [4]
