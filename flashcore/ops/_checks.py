"""Input checks shared by the ops: a ValueError that names the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, x, *, ndim: int | None = None, like: torch.Tensor | None = None,
           like_name: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be a floating tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)} but {like_name} has "
                             f"{tuple(like.shape)}; they must match")
        if x.dtype != like.dtype:
            raise ValueError(f"{op}: {name} has dtype {x.dtype} but {like_name} has {like.dtype}")
        if x.device != like.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {like_name} is on {like.device}")


def scalar(op: str, name: str, v, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a Python float, got a tensor")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{op}: {name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{op}: {name} must be <= {hi}, got {v}")
    return v
