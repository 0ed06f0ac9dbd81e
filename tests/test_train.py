"""Teacher/classifier training: exact resume, NaN guard, CLI contract."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flashcore import cli
from flashcore.train import common
from flashcore.train.teacher import TeacherConfig, train_teacher

from _fixtures import TINY_UNET


def tiny_cfg(**kw):
    return dataclasses.replace(TeacherConfig(data="digits", steps=4, batch_size=8, warmup=2,
                                             checkpoint_every=2, sample_steps=2,
                                             model=dataclasses.replace(TINY_UNET)), **kw)


def weights(run):
    return load_file(os.path.join(run, "state", "weights.safetensors"))


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_teacher(tiny_cfg(), a, progress=False)
    train_teacher(tiny_cfg(), b, progress=False, max_steps_this_call=2)   # "crash" after step 2
    assert json.load(open(os.path.join(b, "state", "state.json")))["step"] == 2
    train_teacher(tiny_cfg(), b, resume=True, progress=False)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert open(os.path.join(a, "loss.csv")).read().count("\n") == open(os.path.join(b, "loss.csv")).read().count("\n")
    assert os.path.exists(os.path.join(b, "samples", "step_000004.png"))
    assert os.path.exists(os.path.join(b, "teacher", "unet", "diffusion_pytorch_model.safetensors"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "r")
    train_teacher(tiny_cfg(steps=2), run, progress=False)
    before = weights(run)
    from flashcore import data as fdata
    real_split = fdata.split
    monkeypatch.setattr(fdata, "split", lambda ds, part: (real_split(ds, part)[0] * float("nan"),
                                                          real_split(ds, part)[1]))
    with pytest.raises(common.NonFiniteLoss, match="step 2"):
        train_teacher(tiny_cfg(steps=4), run, resume=True, progress=False)
    after = weights(run)
    assert json.load(open(os.path.join(run, "state", "state.json")))["step"] == 2
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    run = str(tmp_path / "r")
    with pytest.raises(ValueError, match="nothing to resume"):
        train_teacher(tiny_cfg(), run, resume=True, progress=False)
    train_teacher(tiny_cfg(steps=1), run, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train_teacher(tiny_cfg(), run, progress=False)


def test_corrupt_state_is_detected(tmp_path):
    run = str(tmp_path / "r")
    train_teacher(tiny_cfg(steps=1), run, progress=False)
    p = os.path.join(run, "state", "weights.safetensors")
    data = bytearray(open(p, "rb").read())
    data[-1] ^= 0xFF
    open(p, "wb").write(bytes(data))
    from flashcore.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="corrupt"):
        train_teacher(tiny_cfg(steps=2), run, resume=True, progress=False)


@pytest.mark.parametrize("argv", [[], ["nope"], ["eval", "--steps", "0", "--model", "x"],
                                  ["eval", "--model", "x"], ["train-teacher"],
                                  ["generate", "--steps", "abc"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_run_errors_exit_1(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "none"), "--steps", "1"]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["train-teacher", "--out", str(tmp_path / "r"), "--data", "imagenet"]) == 1
    assert "unknown data set" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()             # the failed run removed the folder it created


@pytest.mark.parametrize("flags", [[], ["--bf16"]])
def test_cli_generate_writes_a_grid(tmp_path, flags, capsys):
    from flashcore.models import Denoiser, save_pretrained
    torch.manual_seed(0)
    save_pretrained(Denoiser(TINY_UNET), str(tmp_path / "t"), {"kind": "teacher", "guidance": 2.0,
                                                              "data": "digits", "schedule": {}})
    out = tmp_path / "g.png"
    assert cli.main(["generate", "--model", str(tmp_path / "t"), "--steps", "2", "--per-class", "1",
                     "--out", str(out)] + flags) == 0
    assert out.exists() and "10 images, 2 steps, cfg 2.0" in capsys.readouterr().out
