"""The class-conditional epsilon-prediction denoiser: a diffusers model behind
one adapter, so teacher, student and sampler see ``eps(x_t, t, labels)``.

Labels ``0..K-1`` are classes; label ``K`` is the null condition of
classifier-free guidance. Label dropout for CFG is done once per sample by
the trainer (``drop_labels``); diffusers' DiT would otherwise drop labels
independently in every block, so its embedders' dropout is set to zero.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..checkpoint import CheckpointError, read_json, write_json
from .attention_processor import FlashcoreAttnProcessor

ARCHS = ("unet", "dit")


@dataclass
class ModelConfig:
    arch: str = "unet"
    sample_size: int = 28
    channels: int = 1
    num_classes: int = 10
    # UNet2DModel
    block_out_channels: tuple = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    # DiTTransformer2DModel
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"model: unknown arch {self.arch!r}; expected one of {ARCHS}")
        self.block_out_channels = tuple(self.block_out_channels)


def build_net(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "unet":
        from diffusers import UNet2DModel
        n = len(cfg.block_out_channels)
        # attention only at the lowest resolution (and the mid block): the hot path at small cost
        down = ("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",)
        up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
        return UNet2DModel(sample_size=cfg.sample_size, in_channels=cfg.channels,
                           out_channels=cfg.channels, block_out_channels=cfg.block_out_channels,
                           layers_per_block=cfg.layers_per_block, down_block_types=down,
                           up_block_types=up, attention_head_dim=cfg.attention_head_dim,
                           norm_num_groups=min(32, cfg.block_out_channels[0]),
                           num_class_embeds=cfg.num_classes + 1)
    from diffusers import DiTTransformer2DModel
    net = DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                in_channels=cfg.channels, out_channels=cfg.channels,
                                num_layers=cfg.num_layers, sample_size=cfg.sample_size,
                                patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes + 1)
    for m in net.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return net


def use_flashcore_attention(net: nn.Module, backend: str | None = None) -> int:
    """Route every diffusers ``Attention`` in ``net`` through flashcore.ops.attention."""
    from diffusers.models.attention_processor import Attention
    n = 0
    for m in net.modules():
        if isinstance(m, Attention):
            m.set_processor(FlashcoreAttnProcessor(backend))
            n += 1
    return n


class Denoiser(nn.Module):
    def __init__(self, cfg: ModelConfig, net: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.net = net if net is not None else build_net(cfg)
        self.null_label = cfg.num_classes
        use_flashcore_attention(self.net)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps prediction; x (B, C, H, W), t (B,) int64, labels (B,) int64 -> (B, C, H, W)."""
        if self.cfg.arch == "unet":
            return self.net(x, t, class_labels=labels).sample
        return self.net(x, timestep=t, class_labels=labels).sample

    def eps_cfg(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        """(eps_c, eps_u) in one batched evaluation of 2B samples (2 NFE per step)."""
        b = x.shape[0]
        null = torch.full_like(labels, self.null_label)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        return out[:b], out[b:]

    def drop_labels(self, labels: torch.Tensor, p: float, generator=None) -> torch.Tensor:
        keep = torch.rand(labels.shape, generator=generator, device=labels.device) >= p
        return torch.where(keep, labels, torch.full_like(labels, self.null_label))


def save_pretrained(model: Denoiser, path: str, meta: dict, dtype: torch.dtype = torch.float32) -> None:
    """``path/model`` (diffusers, safetensors) plus ``path/config.json`` (flashcore)."""
    os.makedirs(path, exist_ok=True)
    net = model.net
    if dtype != torch.float32:
        import copy
        net = copy.deepcopy(net).to(dtype)
    net.save_pretrained(os.path.join(path, "model"), safe_serialization=True)
    write_json(os.path.join(path, "config.json"), {**meta, "model": asdict(model.cfg)})


def load_pretrained(path: str, *, kinds: tuple[str, ...] = ("teacher", "student")) -> tuple[Denoiser, dict]:
    """Load a denoiser saved by ``save_pretrained``; float32 weights, eval mode."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path!r} is not a directory")
    meta = read_json(os.path.join(path, "config.json"))
    if meta.get("kind") not in kinds:
        raise CheckpointError(f"checkpoint: {path!r} is a {meta.get('kind')!r} checkpoint; "
                              f"expected one of {kinds}")
    cfg = ModelConfig(**meta["model"])
    from diffusers import DiTTransformer2DModel, UNet2DModel
    cls = UNet2DModel if cfg.arch == "unet" else DiTTransformer2DModel
    try:
        net = cls.from_pretrained(os.path.join(path, "model"), use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint: cannot load weights from {path!r} ({e})") from None
    model = Denoiser(cfg, net.float()).eval()
    if cfg.arch == "dit":
        for m in model.modules():
            if hasattr(m, "dropout_prob"):
                m.dropout_prob = 0.0
    return model, meta
