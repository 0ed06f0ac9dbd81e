"""Tiny models and configurations shared by the tests (imported by conftest)."""
import socket

import pytest
import torch

from flashcore.models import Denoiser, ModelConfig

TINY_UNET = ModelConfig(arch="unet", sample_size=16, channels=1, num_classes=10,
                        block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=8)
TINY_DIT = ModelConfig(arch="dit", sample_size=16, channels=1, num_classes=10, patch_size=4,
                       num_layers=2, num_heads=2, head_dim=8)


@pytest.fixture
def tiny_denoiser():
    torch.manual_seed(0)
    return Denoiser(TINY_UNET).eval()


@pytest.fixture
def tiny_teacher(tmp_path):
    """A saved random TINY_UNET teacher on the digits data (CFG 2, scaled_linear): its directory."""
    from flashcore.models import save_pretrained
    torch.manual_seed(0)
    path = str(tmp_path / "teacher")
    save_pretrained(Denoiser(TINY_UNET), path, {"kind": "teacher", "guidance": 2.0, "data": "digits",
                                                "schedule": {"kind": "scaled_linear"}})
    return path


def cli_run(argv, capsys):
    """(exit code, stdout, stderr) of one in-process ``flashcore`` call."""
    from flashcore import cli
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def offline(monkeypatch):
    """No test that uses this may reach the network: the hub is offline and sockets refuse to
    connect (a module makes it autouse with ``pytestmark = pytest.mark.usefixtures("offline")``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **kw):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
