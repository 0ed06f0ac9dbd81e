"""Device plumbing without a GPU: the device rules, the distributed backend
chosen from the device the ranks use, and a distillation iteration whose every
tensor must follow the models' device (checked on ``meta``, where a tensor made
on the CPU and mixed in raises)."""
import dataclasses

import pytest
import torch

from flashcore import devices
from flashcore.engine import Engine
from flashcore.models import Denoiser
from flashcore.schedule import NoiseSchedule
from flashcore.train import distill as distill_mod
from flashcore.train.distill import DistillConfig, Distiller

from _fixtures import TINY_UNET, tiny_teacher  # noqa: F401  (fixture)


def test_resolve_device_rules(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        devices.resolve_device("gpu0")


def test_backend_follows_the_device_not_the_machine(monkeypatch):
    """The old rule took NCCL whenever CUDA existed, while the tensors stayed on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.dist_backend(torch.device("cpu")) == "gloo"
    assert devices.dist_backend(torch.device("cuda", 1)) == "nccl"
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distill_mod.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(distill_mod.tdist, "init_process_group", lambda backend: seen.append(backend))
    monkeypatch.setattr(distill_mod.tdist, "get_rank", lambda: 0)
    monkeypatch.setattr(distill_mod.tdist, "get_world_size", lambda: 2)
    assert distill_mod.init_distributed(torch.device("cpu")) == (0, 2)
    assert seen == ["gloo"]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_distillation_iteration_follows_the_device(tiny_teacher, device):
    cfg = DistillConfig(teacher=tiny_teacher, steps=2, iters=1, batch_size=2, val_every=0,
                        sample_every_checkpoint=False, bf16=False)
    d = Distiller(dataclasses.replace(cfg, adversarial=True), device=device)
    for m in (d.teacher, d.student, d.ema, d.disc):
        assert {p.device.type for p in m.parameters()} == {device}
    out = d.losses()
    assert out["loss"].device.type == device
    assert all(x.device.type == device for x in out["d_inputs"] if isinstance(x, torch.Tensor))


def test_engine_tensors_follow_the_model(tiny_teacher):
    model = Denoiser(TINY_UNET).to("meta")
    eng = Engine(model, NoiseSchedule(), steps=2, compile=False)
    assert eng.device.type == "meta"
    assert all(t.device.type == "meta" for t in eng._ts(3))
    x = eng._state(torch.zeros(1, 1, 16, 16), 1, "x")
    assert x.device.type == "meta"
