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
