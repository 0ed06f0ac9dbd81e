"""Image grids as PNG files (no plotting library needed)."""
from __future__ import annotations

import numpy as np
import torch

from .checkpoint import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(x: torch.Tensor, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """A padded grid of ``x`` (B, C, H, W) in [-1, 1] as uint8 (rows of ``nrow``).

    Why not ``diffusers.utils.make_image_grid``: it takes a list of PIL images,
    has no padding between them and needs rows * cols == len(images); here the
    pixels must come from ``to_uint8`` (the exact 8-bit image ``eval`` scores) and
    a last row may be short."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    ncol = -(-b // nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    return out


def save_png(arr: np.ndarray, path: str, scale: int = 1) -> None:
    """Write atomically under a unique temporary name: concurrent writers of one path
    never share a file, and readers see a whole PNG."""
    from PIL import Image
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def labelled_rows(rows: list[tuple[str, torch.Tensor]], path: str, title: str | None = None) -> None:
    """One figure: a row of images per (label, (B, C, H, W) batch), the label on its left.
    Used by ``flashcore demo`` and ``flashcore ablate`` to put models side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    strips = [grid(x, nrow=len(x), pad=1) for _, x in rows]
    h, w = strips[0].shape[:2]
    label_in = 0.09 * max(len(line) for label, _ in rows for line in label.splitlines()) + 0.3
    img_w, img_h = w / 28, h / 28                       # inches: a 28-pixel digit is an inch wide
    top_in = 0.45 if title else 0.15
    row_in = img_h + 0.15
    fig_w, fig_h = label_in + img_w + 0.15, top_in + len(rows) * row_in
    fig = plt.figure(figsize=(fig_w, fig_h))
    for k, ((label, _), s) in enumerate(zip(rows, strips)):
        bottom = fig_h - top_in - (k + 1) * row_in + 0.075
        ax = fig.add_axes((label_in / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
        ax.imshow(s[..., 0] if s.shape[-1] == 1 else s, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.text((label_in - 0.1) / fig_w, (bottom + img_h / 2) / fig_h, label, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig_h, va="top")
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
