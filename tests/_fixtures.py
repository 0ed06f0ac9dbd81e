"""Tiny models and configurations shared by the tests (imported by conftest)."""
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
