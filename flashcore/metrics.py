"""Quality without the internet (no Inception or CLIP weights here): feature
spaces of small networks that flashcore trains itself on the same data, and
pixel statistics. docs/evaluation.md gives the protocol around them.

Feature networks (``Classifier``, one class, three architectures):
- ``cnn``: 4 conv layers (GELU), 4x4 pooled, a 128-d feature layer. The
  *validation* space: distillation picks its exported student with it.
- ``bncnn``: a wider conv net with batch norm, ReLU and global average
  pooling (32-64-64-128 channels), 128-d features.
- ``mlp``: a pixel-space MLP (784-192-128, ReLU, dropout 0.2).

Metrics on feature sets (N, D), all in float64:
- FD: Frechet distance between Gaussians fitted to two feature sets
  (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2).
- precision / recall: k-NN manifolds (Kynkaanniemi et al. 2019). Each point
  of a set gets the ball reaching its k-th nearest neighbour in that set;
  precision is the share of generated points inside some real ball, recall
  the share of real points inside some generated ball.
- density / coverage (Naeem et al. 2020): density counts how many real
  balls hold each generated point, over k (1 for two samples of one
  distribution); coverage is the share of real balls holding a generated point.
- diversity: per class, the mean pairwise feature distance of the generated
  samples over the same figure on real images of that class (1.0: as diverse).

Pixel statistics on images in [-1, 1] (``pixel_stats``); ``user_images``
gives every metric exactly the 8-bit pixels that ``flashcore generate``
writes to its PNG.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import checkpoint as ck
from .images import to_uint8

ARCHS = ("cnn", "bncnn", "mlp")
BACKGROUND = -0.8      # pixels at or below this are background (8-bit value 25 of 255)


@dataclass
class ClassifierConfig:
    channels: int = 1
    size: int = 28
    num_classes: int = 10
    width: int = 32        # cnn, bncnn: channels of the first conv; mlp: hidden units
    features: int = 128
    arch: str = "cnn"


def _body(cfg: ClassifierConfig) -> nn.Sequential:
    w = cfg.width
    if cfg.arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, cfg.features), nn.GELU())
    if cfg.arch == "bncnn":
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return nn.Sequential(
            *block(cfg.channels, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, cfg.features), nn.ReLU())
    if cfg.arch == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(cfg.channels * cfg.size * cfg.size, w), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(w, cfg.features), nn.ReLU())
    raise ValueError(f"classifier: unknown architecture {cfg.arch!r}; expected one of {', '.join(ARCHS)}")


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.body = _body(cfg)
        self.head = nn.Linear(cfg.features, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def save_classifier(model: Classifier, path: str, meta: dict) -> None:
    ck.write_tensors(os.path.join(path, "model.safetensors"), model.state_dict())
    ck.write_json(os.path.join(path, "config.json"), {**meta, "kind": "classifier", "model": asdict(model.cfg)})


def load_classifier(path: str) -> tuple[Classifier, dict]:
    meta = ck.read_json(os.path.join(path, "config.json"))
    if meta.get("kind") != "classifier":
        raise ck.CheckpointError(f"checkpoint: {path!r} is a {meta.get('kind')!r} checkpoint, not a classifier")
    model = Classifier(ClassifierConfig(**meta["model"]))
    try:
        model.load_state_dict(ck.read_tensors(os.path.join(path, "model.safetensors")))
    except RuntimeError as e:
        raise ck.CheckpointError(f"checkpoint: {path!r} weights do not fit its config ({e})") from None
    return model.eval(), meta


@torch.no_grad()
def features_and_logits(clf: Classifier, x: torch.Tensor, batch: int = 500):
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = clf.features(x[i:i + batch].float())
        feats.append(f.double())
        logits.append(clf.head(f))
    return torch.cat(feats), torch.cat(logits)


# -- the pixels a user gets ------------------------------------------------------------------

def from_uint8(u: torch.Tensor) -> torch.Tensor:
    """8-bit pixels (any layout) -> float32 in [-1, 1], the arithmetic ``data`` loads MNIST with."""
    return u.float() / 127.5 - 1


def user_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) sampler output -> the images ``flashcore generate`` saves: clamped
    to [-1, 1] and rounded to 8 bits by ``images.to_uint8`` (the PNG's own function),
    back on the [-1, 1] scale. Real MNIST images pass through unchanged."""
    return from_uint8(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous())


def out_of_range_share(x: torch.Tensor) -> float:
    """Share of raw sampler values outside [-1, 1] (what the clamp changes)."""
    return float((x.detach().abs() > 1).double().mean())


# -- feature-space metrics ----------------------------------------------------------------------

def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FD between Gaussians fitted to two feature sets (N, D), in float64."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


_CHUNK = 1024     # rows of a distance block: 1024 x 4000 float64 is 33 MB


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # computed from the differences, never |a|^2 + |b|^2 - 2ab: the same pair gets the same
    # distance in every call, so a k-th neighbour lies exactly on its ball's edge (inside)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = f.double()
    if not 1 <= k < len(f):
        raise ValueError(f"metrics: k = {k} needs 1 <= k < the set size ({len(f)})")
    # the point's own zero distance is the smallest, so the k-th other neighbour is the (k+1)-th
    return torch.cat([_dist(f[i:i + _CHUNK], f).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(f), _CHUNK)])


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Precision, recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020)."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    counts = torch.empty(len(fake), dtype=torch.float64)
    covered = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(fake), _CHUNK):
        inside = _dist(fake[i:i + _CHUNK], real) <= r_real           # (chunk, R): g_j in B(r_i)
        counts[i:i + _CHUNK] = inside.sum(1)
        covered |= inside.any(0)
    recalled = torch.cat([(_dist(real[i:i + _CHUNK], fake) <= r_fake).any(1)
                          for i in range(0, len(real), _CHUNK)])
    return {"precision": float((counts > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": float(counts.sum() / (k * len(fake))), "coverage": float(covered.double().mean())}


def mean_pairwise_distance(f: torch.Tensor) -> float:
    """Mean Euclidean distance over the n (n - 1) ordered pairs of distinct rows."""
    f = f.double()
    n = len(f)
    if n < 2:
        return math.nan
    return float(sum(_dist(f[i:i + _CHUNK], f).sum() for i in range(0, n, _CHUNK)) / (n * (n - 1)))


def class_diversity(f: torch.Tensor, labels: torch.Tensor, f_real: torch.Tensor, labels_real: torch.Tensor,
                    num_classes: int) -> list[float | None]:
    """Per class: mean pairwise distance of ``f`` over that of ``f_real`` (None: too few samples)."""
    out = []
    for c in range(num_classes):
        ratio = mean_pairwise_distance(f[labels == c]) / mean_pairwise_distance(f_real[labels_real == c])
        out.append(None if math.isnan(ratio) else ratio)
    return out


# -- pixel statistics -------------------------------------------------------------------------

def pixel_stats(x: torch.Tensor) -> dict:
    """Pixel statistics of images in [-1, 1] (MNIST's values in brackets):
    - background: mean over images of the mean of each image's darkest 50% of pixels (-1.0);
    - midtone_share: share of pixels strictly between -0.8 and 0.8 (0.09);
    - stroke: mean of all non-background pixels, those above -0.8 (0.48)."""
    flat = x.detach().flatten(1).double()
    dark = flat.sort(1).values[:, :flat.shape[1] // 2]
    ink = flat[flat > BACKGROUND]
    return {"background": float(dark.mean()),
            "midtone_share": float(((flat > BACKGROUND) & (flat < -BACKGROUND)).double().mean()),
            "stroke": float(ink.mean()) if ink.numel() else None}


def blank_and_washed(x: torch.Tensor) -> tuple[float, float]:
    """blank: share of images with under 1% of pixels above 0 (no ink);
    washed: share of images whose median pixel is above -0.8 (a grey background)."""
    flat = x.flatten(1).float()
    ink = (flat > 0).float().mean(1)
    blank = float((ink < 0.01).float().mean())
    washed = float((flat.median(1).values > BACKGROUND).float().mean())
    return blank, washed
