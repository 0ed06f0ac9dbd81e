"""The command line's failure contract, case by case: a usage error exits 2 with
argparse's usage; a failed run exits 1 with exactly one ``flashcore: error:``
line; nothing ever prints a traceback (unless FLASHCORE_DEBUG asks for one).

Every case runs ``flashcore.cli.main`` in-process on tiny models and data sets
built here; two run the real executable to show what reaches a terminal."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flashcore import cli, cli_checks
from flashcore.models import Denoiser, save_pretrained
from flashcore.schedule import trailing_grid
from flashcore.train.classifier import ClassifierTrainConfig
from flashcore.train.distill import DistillConfig
from flashcore.train.teacher import TeacherConfig

from _fixtures import TINY_UNET, cli_run

SCHEDULE = {"kind": "scaled_linear"}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Paths of everything the cases point at, built once for the module."""
    root = tmp_path_factory.mktemp("cli")
    p = {"root": str(root)}
    torch.manual_seed(0)
    net = Denoiser(TINY_UNET)
    p["teacher"] = str(root / "teacher")
    save_pretrained(net, p["teacher"], {"kind": "teacher", "guidance": 2.0, "data": "digits", "schedule": SCHEDULE})
    p["student"] = str(root / "student")        # distilled for 2 steps without noise correction
    save_pretrained(net, p["student"], {"kind": "student", "guidance": None, "data": "digits", "steps": 2,
                                        "grid": trailing_grid(2), "noise_correction": False,
                                        "schedule": SCHEDULE})
    nan = Denoiser(TINY_UNET)
    with torch.no_grad():
        for prm in nan.parameters():
            prm.fill_(float("nan"))
    p["nan"] = str(root / "nan")
    save_pretrained(nan, p["nan"], {"kind": "teacher", "guidance": 2.0, "data": "digits", "schedule": SCHEDULE})
    from flashcore.metrics import Classifier, ClassifierConfig, save_classifier
    p["clf"] = str(root / "clf")
    save_classifier(Classifier(ClassifierConfig(size=16)), p["clf"], {"data": "digits"})
    # config.json files that are JSON but not a model's config: missing keys, wrong types, too deep
    for name, text in {"nokeys": "{}", "wrongtype": '{"kind": "teacher", "model": "unet"}',
                       "deep": "[" * 100_000 + "]" * 100_000}.items():
        p[name] = str(root / name)
        os.mkdir(p[name])
        open(J(p[name], "config.json"), "w").write(text)
    p["file"] = str(root / "a-file")
    open(p["file"], "w").close()
    p["dir"] = str(root / "a-dir")
    os.mkdir(p["dir"])
    # folder data sets: one image that is not an image; one class with a single image
    rng = np.random.default_rng(0)
    for name, counts in {"corrupt": {"a": 3, "b": 3}, "single": {"a": 1, "b": 3}}.items():
        for c, n in counts.items():
            os.makedirs(root / name / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name / c / f"{i}.png")
    (root / "corrupt" / "a" / "broken.png").write_bytes(b"not a png")
    # run folders holding a checkpoint's state (as save_state writes it) with the settings they ran with
    from flashcore.train import common
    p["drun"], p["trun"], p["badstate"] = (J(p["root"], n) for n in ("drun", "trun", "badstate"))
    common.save_state(p["drun"], 1, {}, {}, {}, DistillConfig(teacher=J(p["root"], "other-teacher"), steps=2))
    common.save_state(p["trun"], 1, {}, {}, {}, TeacherConfig(data="digits", model=TINY_UNET))
    os.makedirs(J(p["badstate"], "state"))
    with open(J(p["badstate"], "state", "state.json"), "w") as f:
        json.dump({"step": 1}, f)                      # no config, no checksum
    return p


run = cli_run          # (exit code, stdout, stderr) of one in-process CLI call


def assert_usage(code, out, err, expect):
    assert code == 2, err
    assert "usage:" in err and expect in err, err
    assert "Traceback" not in out + err


def assert_one_error(code, out, err, expect):
    assert code == 1, err
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0]          # the last word, nothing after it
    assert expect in errors[0], errors[0]
    assert "Traceback" not in out + err


def J(*parts):
    return os.path.join(*parts)


# (argv with {names} of fixture paths, the text the usage message must contain)
USAGE = [
    (["generate", "--model", "{teacher}", "--out", "{dir}"], "is a directory"),
    (["generate", "--model", "{teacher}", "--out", "{file}/x.png"], "is a file, so nothing can be created"),
    (["demo", "--out", "{dir}"], "is a directory"),
    (["eval", "--model", "{teacher}", "--steps", "1", "--json", "{dir}"], "is a directory"),
    (["eval", "--model", "{teacher}", "--steps", "1", "--json", "{file}/r.json"], "is a file"),
    (["train-teacher", "--out", "{file}"], "is a file, not a directory"),
    (["distill", "--steps", "2", "--out", "{file}/run"], "is a file, so nothing"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--jitter", "-3"], "argument --jitter"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--ema", "2"], "argument --ema: expected a number in [0, 1)"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--fwd-share", "2"], "argument --fwd-share"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--gamma", "0"], "argument --gamma"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--k", "0"], "argument --k"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--lr", "nan"], "argument --lr"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--lambda-adv", "-1"], "argument --lambda-adv"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--val-samples", "5"], "argument --val-samples"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--iters", "2.5"], "argument --iters"),
    (["distill", "--steps", "2", "--out", "{root}/r", "--seed", "-1"], "argument --seed"),
    (["train-teacher", "--out", "{root}/t", "--lr", "5"], "argument --lr"),
    (["train-teacher", "--out", "{root}/t", "--steps", "0"], "argument --steps"),
    (["train-classifier", "--out", "{root}/c", "--epochs", "0"], "argument --epochs"),
    (["eval", "--model", "{teacher}", "--steps", "1", "--samples", "1"], "argument --samples"),
    (["eval", "--model", "{teacher}", "--steps", "1", "--cfg", "inf"], "argument --cfg"),
    (["eval", "--model", "{teacher}", "--steps", "2000"], "the model's schedule has 1000 timesteps"),
    (["generate", "--model", "{teacher}", "--steps", "2000"], "the model's schedule has 1000 timesteps"),
    (["demo", "--teacher", "{teacher}", "--teacher-steps", "2000"], "argument --teacher-steps"),
    (["generate", "--steps", "2"], "the following arguments are required: --model"),
    # sizes that cannot fit in memory, refused before anything is allocated
    (["generate", "--model", "{teacher}", "--per-class", "1e8"], "more than this machine's"),
    (["train-teacher", "--out", "{root}/t", "--data", "digits", "--batch-size", "1e7"], "more than this machine's"),
    (["distill", "--teacher", "{teacher}", "--steps", "2", "--out", "{root}/d", "--batch-size", "1e8"],
     "more than this machine's"),
    (["eval", "--model", "{teacher}", "--steps", "1", "--samples", "1e9"], "more than this machine's"),
]


@pytest.mark.parametrize("argv,expect", USAGE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE])
def test_usage_errors_exit_2(fx, capsys, argv, expect):
    assert_usage(*run([a.format(**fx) for a in argv], capsys), expect.format(**fx))


# (argv, the text the one error line must contain)
FAILURES = [
    (["train-classifier", "--out", "{root}/c1", "--data", "folder:{root}/corrupt"], "broken.png"),
    (["train-classifier", "--out", "{root}/c2", "--data", "folder:{root}/single"], "has 1 image(s)"),
    (["train-teacher", "--out", "{root}/t1", "--data", "folder:{root}/corrupt"], "cannot read image"),
    (["eval", "--model", "{nan}", "--features", "{clf}", "--steps", "1", "--samples", "20"], "{nan}"),
    (["generate", "--model", "{nokeys}", "--out", "{root}/g.png", "--steps", "1"], "config.json"),
    (["generate", "--model", "{wrongtype}", "--out", "{root}/g.png", "--steps", "1"], "config.json"),
    (["generate", "--model", "{deep}", "--out", "{root}/g.png", "--steps", "1"], "config.json"),
    (["distill", "--steps", "2", "--out", "{badstate}", "--resume"], "state.json"),
    (["train-teacher", "--out", "{badstate}", "--resume"], "state.json"),
    (["distill", "--teacher", "{teacher}", "--steps", "2", "--out", "{drun}", "--resume"], "--teacher"),
    (["distill", "--steps", "2", "--out", "{drun}", "--resume", "--lr", "1e-3"], "--lr"),
    (["distill", "--steps", "3", "--out", "{drun}", "--resume"], "--steps"),
    (["train-teacher", "--out", "{trun}", "--resume", "--lr", "0.5"], "--lr"),
    (["train-teacher", "--out", "{trun}", "--resume", "--arch", "dit"], "--arch"),
    (["train-teacher", "--out", "{root}/t2", "--data", "imagenet"], "unknown data set"),
]


@pytest.mark.parametrize("argv,expect", FAILURES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FAILURES])
def test_failed_runs_print_one_line_and_exit_1(fx, capsys, argv, expect):
    assert_one_error(*run([a.format(**fx) for a in argv], capsys), expect.format(**fx))


@pytest.mark.parametrize("exc,code,expect", [
    (RuntimeError("boom\n  second line"), 1, "flashcore: error: RuntimeError: boom second line"),
    (KeyError("grid"), 1, "flashcore: error: KeyError: 'grid'"),
    (MemoryError(), 1, "flashcore: error: MemoryError (out of memory"),
    (RecursionError("maximum recursion depth exceeded"), 1, "RecursionError: maximum recursion"),
    (torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge"), 1, "Frechet distance cannot"),
    (KeyboardInterrupt(), 130, "flashcore: interrupted"),
])
def test_anything_unexpected_is_one_line(fx, capsys, monkeypatch, exc, code, expect):
    import flashcore.evaluate

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(flashcore.evaluate, "evaluate", fail)
    got, out, err = run(["eval", "--model", fx["teacher"], "--steps", "1"], capsys)
    assert got == code and err.strip().splitlines() == [err.strip()] and expect in err, err
    assert "Traceback" not in out + err


def test_debug_env_shows_the_traceback(fx, capsys, monkeypatch):
    import flashcore.evaluate
    monkeypatch.setattr(flashcore.evaluate, "evaluate", lambda *a, **k: {}["missing"])
    monkeypatch.setenv("FLASHCORE_DEBUG", "1")
    code, _, err = run(["eval", "--model", fx["teacher"], "--steps", "1"], capsys)
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("flashcore: error: KeyError: 'missing'")


def test_memory_bound_uses_the_machine_limit(fx, capsys, monkeypatch):
    monkeypatch.setattr(cli_checks, "memory_limit", lambda: 10 ** 6)
    assert_usage(*run(["generate", "--model", fx["teacher"], "--per-class", "100"], capsys),
                 "argument --per-class: 100 gives 1000 images")


def test_eval_json_falls_back_when_the_write_fails(fx, capsys, monkeypatch, tmp_path):
    """The result is printed and kept in a fallback file, and the one error line says where."""
    import flashcore.checkpoint
    import flashcore.evaluate
    result = {"fd": 1.5, "steps": 1}
    monkeypatch.setattr(flashcore.evaluate, "evaluate", lambda *a, **k: dict(result))
    monkeypatch.setattr(flashcore.evaluate, "summary", lambda r: f"FD {r['fd']}")

    def full(path, obj):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(flashcore.checkpoint, "write_json", full)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, out, err = run(["eval", "--model", fx["teacher"], "--steps", "1", "--json", str(tmp_path / "r.json")],
                         capsys)
    assert_one_error(code, out, err, "No space left on device")
    assert out.strip() == "FD 1.5"
    fallback = err.split("saved to ")[1].split(" instead")[0]
    assert os.path.dirname(fallback) == str(tmp_path) and json.load(open(fallback)) == result


def test_student_settings_come_from_its_checkpoint(fx, capsys, monkeypatch):
    """generate/eval sample a student as it was distilled (steps, noise correction);
    a flag overrides, and another step count is a one-line warning."""
    import flashcore.evaluate
    seen = []
    monkeypatch.setattr(flashcore.evaluate, "generate",
                        lambda model, meta, labels, **k: (seen.append(k), (torch.zeros(len(labels), 1, 16, 16), 0.1))[1])
    monkeypatch.setattr(flashcore.evaluate, "evaluate", lambda *a, **k: (seen.append(k), {})[1])
    monkeypatch.setattr(flashcore.evaluate, "summary", lambda r: "")
    out = J(fx["root"], "s.png")
    assert run(["generate", "--model", fx["student"], "--out", out], capsys)[0] == 0
    assert seen[-1]["steps"] == 2 and seen[-1]["noise_correction"] is False
    code, _, err = run(["generate", "--model", fx["student"], "--out", out, "--steps", "3", "--noise-correction"],
                       capsys)
    assert code == 0 and seen[-1]["steps"] == 3 and seen[-1]["noise_correction"] is True
    assert err.count("flashcore: warning:") == 1 and "distilled for 2 steps" in err
    assert run(["eval", "--model", fx["student"], "--steps", "2"], capsys)[0] == 0
    assert seen[-1]["noise_correction"] is False
    assert run(["eval", "--model", fx["teacher"], "--steps", "2"], capsys)[0] == 0
    assert seen[-1]["noise_correction"] is True                  # a teacher has no saved setting: on


def test_every_flag_has_help_and_shows_its_default(capsys):
    ap = cli.build_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["--help"])
    top = capsys.readouterr().out
    sub = ap._subparsers._group_actions[0]
    for name, p in sub.choices.items():
        assert name in top
        if name == "bench":          # its flags belong to the benchmarking module's owner
            continue
        text = p.format_help()
        for act in p._actions:
            if act.option_strings and act.dest != "help":
                assert act.help, f"{name} {act.option_strings[0]} has no help"
                if act.default is not None and act.default is not False or hasattr(act, "config_default"):
                    opts = text.split("options:")[1]
                    entry = opts[opts.index("\n  " + act.option_strings[0]):].split("\n  -")[1]
                    assert "default" in entry, f"{name} {act.option_strings[0]} does not show its default"


@pytest.mark.parametrize("argv", [["eval", "--model", "{root}/none", "--steps", "1"],
                                  ["generate", "--model", "{deep}", "--out", "{root}/g.png", "--steps", "1"]])
def test_the_executable_prints_one_line_and_no_traceback(fx, argv):
    env = {k: v for k, v in os.environ.items() if k != "FLASHCORE_DEBUG"}
    p = subprocess.run([sys.executable, "-m", "flashcore"] + [a.format(**fx) for a in argv], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("flashcore: error:"), p.stderr


def test_a_failure_while_parsing_is_one_line_too(capsys, monkeypatch):
    def broken():
        raise ImportError("cannot import name 'x'")
    monkeypatch.setattr(cli, "build_parser", broken)
    code, out, err = run(["eval"], capsys)
    assert code == 1 and err == "flashcore: error: ImportError: cannot import name 'x'\n"


@pytest.mark.parametrize("make,kw,names", [
    (DistillConfig, {"ema_decay": 2}, "ema_decay"),
    (DistillConfig, {"gamma_jitter": -3}, "gamma_jitter"),
    (DistillConfig, {"lr": "1e-3"}, "lr"),                   # a string where JSON should hold a number
    (DistillConfig, {"adversarial": "no"}, "adversarial"),
    (DistillConfig, {"step_weights": (1, -1, 1)}, "step_weights"),
    (TeacherConfig.from_dict, {"p_uncond": 1.0}, "p_uncond"),
    (TeacherConfig.from_dict, {"steps": 2.5}, "steps"),
    (ClassifierTrainConfig, {"epochs": 0}, "epochs"),
])
def test_configs_from_files_get_the_same_ranges(make, kw, names):
    """The ranges live in the config dataclasses, so a config read from a run's state.json is checked too."""
    with pytest.raises(ValueError, match=names):
        make(kw) if make is TeacherConfig.from_dict else make(**kw)
