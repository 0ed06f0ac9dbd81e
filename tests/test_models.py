import os

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from flashcore.checkpoint import CheckpointError
from flashcore.models import Denoiser, load_pretrained, save_pretrained

from _fixtures import TINY_DIT, TINY_UNET


def _with_default_processors(model):
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    return model


@pytest.mark.parametrize("cfg", [TINY_UNET, TINY_DIT], ids=["unet", "dit"])
def test_flashcore_attention_processor_matches_diffusers(cfg):
    torch.manual_seed(0)
    model = Denoiser(cfg).eval()
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    assert n_attn > 0
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        ours = model(x, t, y)
        ref = _with_default_processors(model)(x, t, y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cfg_batch_equals_two_calls():
    torch.manual_seed(0)
    model = Denoiser(TINY_UNET).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([999, 10]), torch.tensor([3, 4])
    with torch.no_grad():
        c, u = model.eps_cfg(x, t, y)
        torch.testing.assert_close(c, model(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u, model(x, t, torch.full_like(y, 10)), rtol=1e-5, atol=1e-5)


def test_label_dropout_is_once_per_sample_and_dit_blocks_do_not_drop():
    torch.manual_seed(0)
    model = Denoiser(TINY_DIT).train()
    y = torch.zeros(10000, dtype=torch.long)
    dropped = (model.drop_labels(y, 0.1, torch.Generator().manual_seed(0)) == 10).float().mean().item()
    assert 0.09 < dropped < 0.11
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    with torch.no_grad():                       # training mode, yet deterministic: no per-block dropout
        torch.testing.assert_close(model(x, t, torch.tensor([1, 2])), model(x, t, torch.tensor([1, 2])))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.float16, 2e-3)])
def test_save_load_round_trip(tmp_path, dtype, tol):
    torch.manual_seed(0)
    model = Denoiser(TINY_UNET).eval()
    save_pretrained(model, str(tmp_path / "m"), {"kind": "teacher", "guidance": 2.0, "data": "digits",
                                                 "schedule": {}}, dtype=dtype)
    loaded, meta = load_pretrained(str(tmp_path / "m"))
    assert meta["guidance"] == 2.0 and loaded.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-2, msg=k)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(str(tmp_path / "missing"))
    torch.manual_seed(0)
    save_pretrained(Denoiser(TINY_UNET), str(tmp_path / "m"), {"kind": "teacher", "schedule": {}})
    with pytest.raises(CheckpointError, match="expected one of"):
        load_pretrained(str(tmp_path / "m"), kinds=("student",))
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load"):
        load_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(str(tmp_path / "m"))
