"""``flashcore compare`` on a tiny random teacher: the cells' configs, the outputs and
their consistency, skipping finished cells, a chunked cell equal to the uninterrupted
run after a crash, and the command line's errors."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flashcore import cli
from flashcore.train import compare as C
from flashcore.train.compare import CompareConfig, cell_config, run_cell
from flashcore.train.compare_report import TABLE_METRICS, cell_text
from flashcore.train.disback import disback
from flashcore.train.distill import distill

from _fixtures import tiny_teacher  # noqa: F401  (fixture)


def _classifier(path: str, seed: int) -> str:
    from flashcore.metrics import Classifier, ClassifierConfig, save_classifier
    torch.manual_seed(seed)
    save_classifier(Classifier(ClassifierConfig(size=16)).eval(), path, {"data": "digits"})
    return path


@pytest.fixture
def nets(tmp_path):
    """(validation classifier, headline feature network): two random networks, so the
    headline space is not the validation space."""
    return _classifier(str(tmp_path / "clf"), 0), _classifier(str(tmp_path / "feat"), 1)


FAST_DISTILL = {"bf16": False, "sample_every_checkpoint": False}
FAST_DISBACK = {**FAST_DISTILL, "fake_updates": 1, "path_checkpoints": 2}


def tiny(teacher, nets, **kw):
    base = CompareConfig(teacher=teacher, classifier=nets[0], features=(nets[1],), steps=(1,), seeds=(0, 1),
                         iters=2, batch_size=4, samples=20, curve_every=1, curve_samples=20, val_every=1,
                         val_samples=20, teacher_steps=2, distill=FAST_DISTILL, disback=FAST_DISBACK)
    return dataclasses.replace(base, **kw)


# ---- configs -------------------------------------------------------------------------------------

def test_each_method_gets_its_config(tiny_teacher, nets):
    cc = tiny(tiny_teacher, nets, iters=2000, disback={})
    assert cell_config(cc, "imagine-flash", 3, 1).priors() == (0.0, 0.0, 1.0)
    assert cell_config(cc, "forward", 3, 1).priors() == (1.0, 0.0, 0.0)
    ddil = cell_config(cc, "imagine-flash-ddil", 3, 1)
    assert ddil.priors() == pytest.approx((0.3, 0.2, 0.5)) and ddil.clip == 1.0
    for m in ("imagine-flash", "forward", "imagine-flash-ddil"):
        c = cell_config(cc, m, 2, 7)
        assert (c.steps, c.seed, c.iters, c.batch_size, c.teacher) == (2, 7, 2000, 4, tiny_teacher)
    db = cell_config(cc, "disback", 1, 0)
    # at 2000 updates the proportions give DisBack's own defaults back
    assert (db.path_every, db.switch_every, db.path_checkpoints) == (200, 200, 5)
    db = cell_config(tiny(tiny_teacher, nets, iters=100, disback={"path_every": 7}), "disback", 1, 0)
    assert (db.path_every, db.switch_every) == (7, 10)             # a config file's value wins


@pytest.mark.parametrize("bad, match", [
    ({"methods": ("imagine-flash", "nope")}, "unknown method 'nope'"),
    ({"methods": ("disback-ddil",)}, "disback-ddil cannot run"),
    ({"steps": (1, 1)}, "without repeats"),
    ({"steps": (5,)}, "1..4"),
    ({"curve_every": 1, "val_every": 2}, "--curve-every"),
    ({"distill": {"beta_fwd": 0.5}}, "set by compare"),
    ({"disback": {"seed": 3}}, "set by compare"),
    ({"disback": {"colour": 3}}, "not a DisBackConfig field"),
])
def test_bad_settings(tiny_teacher, nets, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(tiny_teacher, nets, **bad)


@pytest.mark.parametrize("methods, says", [("imagine-flash,nope", "unknown method 'nope'; known: imagine-flash"),
                                           ("disback-ddil", "disback-ddil cannot run: DisBack has no DDIL")])
def test_a_bad_method_name_is_one_clear_line(tiny_teacher, tmp_path, capsys, methods, says):
    out = str(tmp_path / "cmp")
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--teacher", tiny_teacher, "--out", out, "--methods", methods])
    assert e.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and says in errors[0]
    assert not os.path.exists(out)


# ---- outputs and skipping -----------------------------------------------------------------------

def _table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]       # without the header
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def _args(teacher, nets, tmp_path, out):
    d, b = tmp_path / "d.json", tmp_path / "b.json"
    d.write_text(json.dumps(FAST_DISTILL))
    b.write_text(json.dumps(FAST_DISBACK))
    return ["compare", "--teacher", teacher, "--out", out, "--methods", "imagine-flash,disback", "--steps", "1",
            "--seeds", "0,1", "--iters", "2", "--batch-size", "4", "--samples", "20", "--curve-every", "1",
            "--curve-samples", "20", "--val-every", "1", "--val-samples", "20", "--classifier", nets[0],
            "--features", nets[1], "--teacher-steps", "2", "--distill-config", str(d), "--disback-config", str(b),
            "--device", "cpu"]


@pytest.mark.slow    # 20-60 s on the loaded 2-core machine (4 tiny runs, 2 evals each, then a rerun)
def test_outputs_are_consistent_and_a_rerun_skips_finished_cells(tiny_teacher, nets, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    args = _args(tiny_teacher, nets, tmp_path, out)
    assert cli.main(args) == 0
    res = json.load(open(os.path.join(out, "compare.json")))
    md = open(os.path.join(out, "compare.md")).read()
    for f in ("compare.png", "curves-feat.png"):
        assert os.path.getsize(os.path.join(out, f)) > 1000
    assert [(c["method"], c["steps"], c["seed"]) for c in res["cells"]] == [
        ("imagine-flash", 1, 0), ("imagine-flash", 1, 1), ("disback", 1, 0), ("disback", 1, 1)]
    # the table is the JSON's rows, each row the spread of its cells' eval figures
    table = _table_rows(md)
    assert table[0][0].startswith("teacher") and len(table) == 1 + len(res["rows"]) == 3
    for row, line in zip(res["rows"], table[1:]):
        assert line[:2] == [row["method"], str(row["steps"])]
        cells = [c for c in res["cells"] if c["method"] == row["method"]]
        want = []
        for k, _, fmt in TABLE_METRICS:
            s = row["feature_spaces"]["feat"][k]
            vals = [c["eval"]["feature_spaces"]["feat"][k] for c in cells]
            assert s["values"] == vals and s["mean"] == pytest.approx(sum(vals) / 2)
            want.append(cell_text(s, fmt))
        assert line[2:5] == want
        assert row["selected_iter"] == [c["selected_iter"] for c in cells]
        for c in cells:
            assert c["command"] in md and set(c["curve"]) == {"1", "2"}
            assert c["eval"]["samples"] == 20 and c["eval"]["features_asked"] == [nets[1]]
            assert c["seconds"] > 0 and [(s["from"], s["to"]) for s in c["segments"] if s["stage"] != "path"] \
                == [(0, 1), (1, 2)]
        assert sorted(row["curve"]) == ["1", "2"]
    db = res["cells"][2]
    assert db["path_iters"] == 2 and db["path_seconds"] > 0 and "flashcore disback" in db["command"]
    assert "Not run: disback-ddil" in md
    # a rerun trains and scores nothing again, and writes the same figures
    states = [os.path.join(out, "cells", f"{m}-1step-seed{k}", "run", "state", "state.json")
              for m in ("imagine-flash", "disback") for k in (0, 1)]
    stamps = [os.path.getmtime(s) for s in states]
    evals = [os.path.getmtime(os.path.join(out, "cells", f"{m}-1step-seed{k}", "eval.json"))
             for m in ("imagine-flash", "disback") for k in (0, 1)]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert [os.path.getmtime(s) for s in states] == stamps
    assert [os.path.getmtime(os.path.join(out, "cells", f"{m}-1step-seed{k}", "eval.json"))
            for m in ("imagine-flash", "disback") for k in (0, 1)] == evals
    again = json.load(open(os.path.join(out, "compare.json")))
    assert again["rows"] == res["rows"]
    # other training settings in the same folder: one error line, exit 1
    capsys.readouterr()
    assert cli.main([a if a != "2" or args[i - 1] != "--iters" else "3" for i, a in enumerate(args)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was started with iters = 2, not 3" in err[0]


@pytest.mark.parametrize("method", ["imagine-flash-ddil", "disback"])
def test_a_chunked_cell_after_a_crash_is_the_uninterrupted_run(tiny_teacher, nets, tmp_path, monkeypatch, method):
    """The first curve evaluation fails (a crash after the first chunk): running the cell
    again continues from update 1, scores the missed point, and ends with the same
    weights, optimiser and RNG states as the one-go run, selecting the same student."""
    cc = tiny(tiny_teacher, nets)
    out = str(tmp_path / "cmp")
    real = C._curve_point

    def crash(*a, **k):
        raise RuntimeError("crash")
    monkeypatch.setattr(C, "_curve_point", crash)
    with pytest.raises(RuntimeError, match="crash"):
        run_cell(cc, out, method, 1, 0, device="cpu")
    monkeypatch.setattr(C, "_curve_point", real)
    r = run_cell(cc, out, method, 1, 0, device="cpu")
    assert sorted(r["curve"]) == ["1", "2"] and all(r["curve"].values())
    assert [(s["from"], s["to"]) for s in r["segments"] if s["stage"] != "path"] == [(0, 1), (1, 2)]
    one_go = str(tmp_path / "one-go")
    cfg = cell_config(cc, method, 1, 0)
    (disback if method == "disback" else distill)(cfg, one_go, progress=False, device="cpu")
    a = load_file(os.path.join(out, "cells", f"{method}-1step-seed0", "run", "state", "weights.safetensors"))
    b = load_file(os.path.join(one_go, "state", "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    chosen = json.load(open(os.path.join(one_go, "student", "config.json")))["validation"]["iter"]
    assert r["selected_iter"] == chosen


def test_cached_eval_is_reused_only_for_the_same_request(tmp_path, monkeypatch):
    """The ablation's and the head-to-head's eval cache answers a request again only when
    model, samples, steps, seed, feature spaces and every sampling argument match as given
    (None, the model's own setting, is not taken for an explicit value)."""
    import flashcore.evaluate as ev
    from flashcore.train.ablate import _eval_cached
    calls = []

    def fake(model, features, *, steps, samples, seed, **kw):
        calls.append(1)
        return {"model": model, "samples": samples, "steps": steps, "seed": seed, "n": len(calls)}
    monkeypatch.setattr(ev, "evaluate", fake)
    path = str(tmp_path / "eval.json")
    base = dict(seed=0, noise_correction=True, clip=0.0)
    n = 1
    assert _eval_cached(path, "m", 3, 100, None, **base)["n"] == n
    assert _eval_cached(path, "m", 3, 100, None, **base)["n"] == n                 # the same request: cached
    for change in ({"guidance": 1.0}, {"guidance": None}, {"guidance": 2.0}, {"noise_correction": False},
                   {"clip": 1.0}, {"compile": True}, {"dtype": torch.bfloat16}, {"prompts": "p.txt"}):
        n += 1
        assert _eval_cached(path, "m", 3, 100, None, **{**base, **change})["n"] == n, change
        assert _eval_cached(path, "m", 3, 100, None, **{**base, **change})["n"] == n, change
    assert _eval_cached(path, "other", 3, 100, None, **base)["n"] == n + 1
    assert _eval_cached(path, "other", 3, 100, ["f"], **base)["n"] == n + 2
    assert _eval_cached(path, "other", 3, 100, ["f"], seed=1, noise_correction=True, clip=0.0)["n"] == n + 3
