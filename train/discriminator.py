"""The adversarial term of Imagine Flash (Kohler et al., arXiv 2405.05224).

The paper's ablation keeps a discriminator (3 steps: FID 39.0 without it
against 35.5 with it) but does not publish its design. flashcore's choice: a
small class-conditional CNN on *noised* images (student x0_S against real
images, both noised to one random time t_d, as diffusion GANs do, so the two
distributions overlap and the gradient stays informative), with the
non-saturating loss:

    L_D = softplus(-D(real_t)) + softplus(D(fake_t))      (its own optimiser)
    L_G = softplus(-D(fake_t))                             (weight lambda_adv)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Discriminator(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.t_embed = nn.Linear(32, 4 * w)
        self.c_embed = nn.Embedding(num_classes, 4 * w)     # projection discriminator
        self.out = nn.Linear(4 * w, 1)

    @staticmethod
    def _t_features(t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(16, device=t.device) / 16)
        ang = t.float()[:, None] / 1000 * 1000 * freqs[None]
        return torch.cat([ang.sin(), ang.cos()], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(x) + self.t_embed(self._t_features(t))            # (B, 4w)
        return (self.out(F.silu(h)) + (self.c_embed(labels) * h).sum(1, keepdim=True)).squeeze(1)


def d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-d_fake).mean()
