"""distill's flags come from DistillConfig: --config FILE (YAML or JSON), flags
over the file, the resolved config printed and saved beside the checkpoints."""
import dataclasses
import json
import os

import pytest
import torch

from flashcore import cli
from flashcore.models import Denoiser, save_pretrained
from flashcore.train.distill import DistillConfig

from _fixtures import TINY_UNET, tiny_teacher  # noqa: F401  (fixture)


def test_every_option_field_has_a_flag_and_help():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices["distill"]
    flags = {s for a in sub._actions for s in a.option_strings}
    for f in dataclasses.fields(DistillConfig):
        md = f.metadata
        if md.get("flag") or md.get("switch"):
            assert (md.get("flag") or md.get("switch")) in flags and md["help"]


def test_config_file_then_flags_then_saved(tiny_teacher, tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"teacher: {tiny_teacher}\nsteps: 2\niters: 2\nbatch_size: 4\nlr: 0.001\n"
                        "val_every: 0\nadversarial: false\ngamma_ratio: 0.5\n")
    run = str(tmp_path / "run")
    assert cli.main(["distill", "--config", str(cfg_file), "--out", run, "--lr", "0.0005",
                     "--checkpoint-every", "2"]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("config: "))
    shown = json.loads(line[len("config: "):])
    saved = json.load(open(os.path.join(run, "config.json")))
    assert shown == saved
    assert (saved["steps"], saved["iters"], saved["gamma_ratio"], saved["adversarial"]) == (2, 2, 0.5, False)
    assert saved["lr"] == 0.0005                                  # the flag beats the file
    # the saved config reruns the same run
    run2 = str(tmp_path / "run2")
    assert cli.main(["distill", "--config", os.path.join(run, "config.json"), "--out", run2]) == 0
    assert json.load(open(os.path.join(run2, "config.json"))) == saved


@pytest.mark.parametrize("text, expect", [
    ("steps: 2\nbogus_knob: 1\n", "'bogus_knob' is not a DistillConfig field"),
    ("steps: [oops\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("steps: 9\n", "--steps must be 1..4"),
    ("ema_decay: 2\n", "ema_decay"),
])
def test_bad_config_files_are_usage_errors(tmp_path, capsys, text, expect):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--config", str(f), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


@pytest.mark.parametrize("flag, expect", [([], 1.0), (["--clip", "0"], 0.0), (["--clip", "0.5"], 0.5)])
def test_generate_samples_a_student_with_its_saved_clip(tmp_path, monkeypatch, flag, expect):
    """A DDIL student distilled with reflection carries clip in config.json; generate
    uses it unless --clip says otherwise."""
    import flashcore.evaluate as ev
    torch.manual_seed(0)
    student = str(tmp_path / "student")
    save_pretrained(Denoiser(TINY_UNET), student, {"kind": "student", "guidance": None, "data": "digits",
                                                   "steps": 2, "grid": [999, 499], "noise_correction": True,
                                                   "clip": 1.0, "schedule": {"kind": "scaled_linear"}})
    seen = {}
    real = ev.generate

    def spy(*args, **kw):
        seen["clip"] = kw["clip"]
        return real(*args, **kw)
    monkeypatch.setattr(ev, "generate", spy)
    assert cli.main(["generate", "--model", student, "--per-class", "1", "--out", str(tmp_path / "g.png"),
                     "--device", "cpu"] + flag) == 0
    assert seen["clip"] == expect
