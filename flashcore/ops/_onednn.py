"""PyTorch's own oneDNN (``torch.ops.mkldnn``), the "onednn" backend: no code of ours,
so only the question whether this torch build has it. The rows that call it are
declared by their ops (today ``linear``)."""
from __future__ import annotations

import functools

import torch


@functools.cache          # a property of the torch build, asked on every call otherwise
def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
