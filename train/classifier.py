"""Feature networks for the metrics: one training loop for every architecture
in ``flashcore.metrics`` (cnn, bncnn, mlp), on the train split, evaluated on
the eval split.

Augmentation: ``shift`` alone moves a whole batch by one random whole-pixel
offset (how the validation classifier ``checkpoints/mnist-classifier`` was
trained, kept so it reproduces); with ``rotate`` > 0 every image gets its own
random rotation (within +-rotate degrees) and sub-pixel shift (within +-shift
pixels), bilinear, the border filled with the background value -1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from flashcore import data as fdata
from flashcore.metrics import Classifier, ClassifierConfig, save_classifier
from flashcore.validation import COUNT, LR, SEED, Range, check_fields, check_str

from . import common

DEFAULT_WIDTH = {"cnn": 32, "bncnn": 32, "mlp": 192}


@dataclass
class ClassifierTrainConfig:
    data: str = "mnist"
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    shift: int = 2
    seed: int = 0
    arch: str = "cnn"
    rotate: float = 0.0        # degrees; > 0: per-image random rotation and shift
    width: int = 0             # 0: the architecture's default (DEFAULT_WIDTH)
    features: int = 128

    def __post_init__(self):
        check_fields(self, CLASSIFIER_RANGES, "train-classifier")
        check_str("train-classifier", "data", self.data)
        check_str("train-classifier", "arch", self.arch)


# every number ClassifierTrainConfig holds and the values it may take (the CLI flags parse with these too)
CLASSIFIER_RANGES = {
    "epochs": Range(int, 1, 10 ** 6), "batch_size": COUNT, "lr": LR, "shift": Range(int, 0, 64), "seed": SEED,
    "rotate": Range(float, 0, 180), "width": Range(int, 0, 4096), "features": Range(int, 1, 4096),
}


def _shift(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    if k == 0:
        return x
    p = torch.nn.functional.pad(x, (k, k, k, k), value=-1.0)
    dx, dy = torch.randint(0, 2 * k + 1, (2,), generator=g).tolist()
    return p[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _rotate_shift(x: torch.Tensor, degrees: float, shift: float, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(degrees)
    move = (torch.rand(b, 2, generator=g) * 2 - 1) * shift * 2 / torch.tensor([w, h])   # pixels -> [-1, 1] units
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample fills with 0, mid-grey on [-1, 1]: sample x + 1 so the border becomes -1
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def augment(x: torch.Tensor, cfg: ClassifierTrainConfig, g: torch.Generator) -> torch.Tensor:
    if cfg.rotate > 0:
        return _rotate_shift(x, cfg.rotate, cfg.shift, g)
    return _shift(x, cfg.shift, g)


def train_classifier(cfg: ClassifierTrainConfig, out: str, progress: bool = True) -> dict:
    """Train the classifier and save it to ``out`` (held by this run until it is written)."""
    with common.run_folder(out, resume=None, what="train-classifier"):
        return _train_classifier(cfg, out, progress)


def _train_classifier(cfg: ClassifierTrainConfig, out: str, progress: bool) -> dict:
    ds = fdata.load(cfg.data)
    xtr, ytr = fdata.split(ds, "train")
    xev, yev = fdata.split(ds, "eval")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = Classifier(ClassifierConfig(channels=ds.shape[0], size=ds.shape[1], num_classes=ds.num_classes,
                                        width=cfg.width or DEFAULT_WIDTH.get(cfg.arch, 32), features=cfg.features,
                                        arch=cfg.arch))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n_batches = -(-len(xtr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * n_batches)
    bar = common.progress(cfg.epochs * n_batches, 0, "train-classifier", progress)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(n_batches):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(model(augment(xtr[idx], cfg, g)), ytr[idx])
            common.check_finite(loss, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        acc = float((model(xev).argmax(1) == yev).float().mean())
    n_params = sum(p.numel() for p in model.parameters())
    meta = {"data": cfg.data, "eval_accuracy": acc, "parameters": n_params, "train_config": asdict(cfg)}
    save_classifier(model, out, meta)
    return meta
