"""The Triton kernels (``flashcore.triton_kernels``, one module per op in kernels/):
are they usable here, and a row that calls one of them.

The kernels take CUDA tensors; with ``TRITON_INTERPRET=1`` they run on CPU tensors
instead (about 1000x slower than torch: tests only). Triton is imported on the first
call, not with ``flashcore``. Which inputs a "triton" row takes is declared by its op.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from ._rows import Row

_KERNELS = "flashcore.triton_kernels"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec(_KERNELS) is None:
        return False
    return _interpret() or torch.cuda.is_available()


def device() -> str:
    """The device type the kernels take: CPU tensors only when interpreted."""
    return "cpu" if _interpret() else "cuda"


def _mode_unchanged() -> str | None:
    loaded = sys.modules.get(_KERNELS + "._tuning")
    if loaded is not None and loaded.INTERPRET != _interpret():
        return "TRITON_INTERPRET changed after the Triton kernels were imported"
    return None


def row(module: str, fn: str, supports) -> Row:
    """The "triton" row calling ``flashcore.triton_kernels.<module>.<fn>`` (kernels/<module>.py)
    with the op's own arguments, imported on its first call."""
    loaded = []

    def impl(*args):
        if not loaded:          # lazy: importing triton takes a second
            loaded.append(getattr(importlib.import_module(f"{_KERNELS}.{module}"), fn))
        return loaded[0](*args)

    return Row(impl, available, lambda *a: _mode_unchanged() or supports(*a), device)
