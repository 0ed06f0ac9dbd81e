"""Shipped JSON records no absolute path of the machine it was made on."""
import json
import os
import re
import subprocess
from pathlib import Path

import torch

from flashcore.checkpoint import portable_path
from flashcore.models import Denoiser, save_pretrained
from flashcore.train.distill import DistillConfig, distill

from _fixtures import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r'"(/|[A-Za-z]:\\)[^"]*"')       # a JSON string that starts like an absolute path


def test_portable_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHCORE_HOME", str(ROOT))
    assert portable_path(str(ROOT / "checkpoints" / "mnist-teacher"), str(tmp_path)) == "checkpoints/mnist-teacher"
    out = tmp_path / "runs" / "x" / "student"
    assert portable_path(str(tmp_path / "teacher"), str(out)) == "../../../teacher"
    monkeypatch.chdir(ROOT)
    assert portable_path("checkpoints/mnist-teacher", str(out)) == "checkpoints/mnist-teacher"
    assert portable_path(None, str(out)) is None and portable_path("", str(out)) == ""


def test_shipped_json_has_no_absolute_paths():
    files = subprocess.run(["git", "ls-files", "*.json"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert any(f.startswith("checkpoints/") for f in files)
    bad = [(f, m.group(0)) for f in files for m in ABSOLUTE.finditer((ROOT / f).read_text())]
    assert bad == []


def test_exported_student_records_relative_paths(tmp_path):
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher")                 # absolute, outside the repository
    save_pretrained(Denoiser(TINY_UNET), teacher, {"kind": "teacher", "guidance": 2.0, "data": "digits",
                                                   "schedule": {"kind": "scaled_linear"}})
    cfg = DistillConfig(teacher=teacher, steps=1, iters=1, batch_size=2, checkpoint_every=1, val_every=0,
                        sample_every_checkpoint=False, adversarial=False, classifier=str(tmp_path / "clf"))
    run = tmp_path / "run"
    distill(cfg, str(run), progress=False)
    text = (run / "student" / "config.json").read_text()
    assert ABSOLUTE.search(text) is None
    meta = json.loads(text)
    assert os.path.normpath(run / "student" / meta["teacher"]) == teacher
    assert meta["distill_config"]["classifier"] == "../../clf"
