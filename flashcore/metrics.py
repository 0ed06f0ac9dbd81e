"""Quality without the internet (no Inception or CLIP weights here): the
feature space of a small classifier that flashcore trains on the same data.

- FD: Frechet distance between Gaussians fitted to classifier features of
  generated samples and of the held-out eval split (Heusel et al. 2017):
  ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2).
- accuracy: the share of samples the classifier assigns to the class they
  were conditioned on (the stand-in for a CLIP score: condition fidelity).
- fd_floor: FD of a real train subset of the same size against the eval
  split (what a perfect generator would score at this sample size).
- blank_share: samples with less than 1% "ink" (pixels above the middle
  grey); washed_share: samples whose median pixel is above -0.8 (a grey
  background where the data has a black one).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import checkpoint as ck


@dataclass
class ClassifierConfig:
    channels: int = 1
    size: int = 28
    num_classes: int = 10
    width: int = 32
    features: int = 128


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, cfg.features), nn.GELU())
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


def blank_and_washed(x: torch.Tensor) -> tuple[float, float]:
    flat = x.flatten(1).float()
    ink = (flat > 0).float().mean(1)
    blank = float((ink < 0.01).float().mean())
    washed = float((flat.median(1).values > -0.8).float().mean())
    return blank, washed
