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


def out_tensor(op: str, name: str, t: torch.Tensor) -> None:
    """Refuse an out= tensor in which two elements share an address (an expanded view, an
    overlapping ``as_strided`` view): one of the two writes would be lost, silently.

    Contiguous tensors return at once. Otherwise, sorted by stride, a dimension whose stride
    steps past everything the smaller ones span cannot meet them (any slice passes); the
    rare layouts that fail that have their element offsets counted (exact)."""
    if t.is_contiguous() or t.numel() == 0:
        return
    span = 0
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if st <= span:
            break
        span += (n - 1) * st
    else:
        return
    off = torch.zeros(1, dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        off = (off[:, None] + torch.arange(n) * st).flatten()
    if torch.unique(off).numel() < t.numel():
        raise ValueError(f"{op}: {name} has elements that share memory (an expanded, broadcast or "
                         f"overlapping view {tuple(t.shape)} with strides {t.stride()}); pass a tensor "
                         f"whose elements are distinct")


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
