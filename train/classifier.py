"""The metric classifier (SPEC section 9): a small CNN trained on the train
split with random shifts, evaluated on the eval split."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from flashcore import data as fdata
from flashcore.metrics import Classifier, ClassifierConfig, save_classifier
from flashcore.validation import COUNT, LR, SEED, Range, check_fields, check_str

from . import common


@dataclass
class ClassifierTrainConfig:
    data: str = "mnist"
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    shift: int = 2
    seed: int = 0

    def __post_init__(self):
        check_fields(self, CLASSIFIER_RANGES, "train-classifier")
        check_str("train-classifier", "data", self.data)


# every number ClassifierTrainConfig holds and the values it may take (the CLI flags parse with these too)
CLASSIFIER_RANGES = {
    "epochs": Range(int, 1, 10 ** 6), "batch_size": COUNT, "lr": LR, "shift": Range(int, 0, 64), "seed": SEED,
}


def _shift(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    if k == 0:
        return x
    p = torch.nn.functional.pad(x, (k, k, k, k), value=-1.0)
    dx, dy = torch.randint(0, 2 * k + 1, (2,), generator=g).tolist()
    return p[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


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
    model = Classifier(ClassifierConfig(channels=ds.shape[0], size=ds.shape[1], num_classes=ds.num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n_batches = -(-len(xtr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * n_batches)
    bar = common.progress(cfg.epochs * n_batches, 0, "train-classifier", progress)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(n_batches):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(model(_shift(xtr[idx], cfg.shift, g)), ytr[idx])
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
    meta = {"data": cfg.data, "eval_accuracy": acc, "train_config": asdict(cfg)}
    save_classifier(model, out, meta)
    return meta
