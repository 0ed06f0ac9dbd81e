"""What a backend row is, and the small checks an op builds its rows' ``supports`` from.

A row is one backend of one op: the function that runs it, whether it is built here,
the device type its kernels take, and ``supports(*args)``, the op's own arguments in,
``None`` out when the kernel takes them (else a short reason, shown in the fallback
warning). Each op declares its rows in its own module (``ops/<op>.py``); the checks
below are shared so that two rows with the same limits say so in the same words.

The checks take tensors (``None`` skipped) and return a reason or ``None``; they
combine with ``or``, which stops at the first reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# what the GPU kernels (Triton, CUDA C++) compute in; float64 stays on the reference there
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _built() -> bool:
    return True


def anything(*args, **kwargs) -> str | None:
    return None


@dataclass
class Row:
    impl: Callable                                          # the op's arguments -> its outputs
    available: Callable[[], bool] = _built                  # built / importable here at all
    supports: Callable[..., str | None] = anything          # None if it takes these inputs, else why not
    # device type the kernels take ("cpu", "cuda"), a function giving it, or None for any;
    # checked by the dispatcher on the op's first argument, before ``supports``
    device: str | Callable[[], str] | None = None

    def device_type(self) -> str | None:
        return self.device() if callable(self.device) else self.device


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtypes(allowed: tuple, *tensors) -> str | None:
    for t in tensors:
        if t is not None and t.dtype not in allowed:
            return f"dtype {t.dtype} (takes {'/'.join(_short(d) for d in allowed)})"
    return None


def gpu_elementwise(*tensors) -> str | None:
    """What the GPU kernels of an element-wise op take: their dtypes, no empty tensor,
    dense memory (they walk it flat)."""
    return dtypes(GPU_DTYPES, *tensors) or nonempty(*tensors) or dense(*tensors)


def dense(*tensors) -> str | None:
    """The kernel reads flat memory: a copy would hide a cost the caller can avoid."""
    for t in tensors:
        if t is not None and not t.is_contiguous():
            return "non-contiguous input (the kernel reads dense memory)"
    return None


def nonempty(*tensors) -> str | None:
    for t in tensors:
        if t is not None and t.numel() == 0:
            return f"empty tensor {tuple(t.shape)}"
    return None


def head_dims(limit: int, *tensors) -> str | None:
    """The last dimension of each tensor is at most ``limit``."""
    for t in tensors:
        if t.shape[-1] > limit:
            return f"head dim {t.shape[-1]} > {limit}"
    return None


def same_last_dim(a: torch.Tensor, b: torch.Tensor, what: str) -> str | None:
    if a.shape[-1] != b.shape[-1]:
        return f"{what} {b.shape[-1]} differs from {a.shape[-1]}"
    return None
