"""One backend table per op, chosen at call time.

Order of precedence: an explicit ``backend=`` argument, then the innermost
``use_backend(...)`` context, then ``FLASHCORE_BACKEND``, then ``auto``.
``auto`` picks, for a CUDA tensor, triton > cuda > reference and, for a CPU
tensor, cpp > onednn > reference, keeping only backends that are built and
accept the inputs (``onednn`` is a row of the ``linear`` op only: PyTorch's
oneDNN calls, no code of ours). A backend that was asked for but cannot take the inputs falls back to
the reference with a one-time warning. Nothing is swapped at import time: a
new backend is one ``register(...)`` row.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton", "onednn")
_NAMES = frozenset(BACKENDS + ("auto",))
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "onednn", "reference")}
_local = threading.local()
_warned: set[tuple[str, str, str]] = set()


@dataclass
class Row:
    impl: Callable
    available: Callable[[], bool]          # is it built / importable at all
    supports: Callable[..., str | None]     # None if it takes these inputs, else why not


_TABLES: dict[str, dict[str, Row]] = {}


def register(op: str, backend: str, impl: Callable, *, available: Callable[[], bool] = lambda: True,
             supports: Callable[..., str | None] = lambda *a, **k: None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _TABLES.setdefault(op, {})[backend] = Row(impl, available, supports)


def register_device_rows(backend: str, impls: dict[str, Callable], *, available: Callable[[], bool],
                         tensors: Callable[..., str | None], attention: Callable[..., str | None],
                         elementwise: Callable[..., str | None]) -> None:
    """Rows for a backend whose acceptance reduces to three checks, each returning a
    reason or None: ``tensors(*ts)`` on any tensors, ``attention(q, k, v)`` on the
    attention inputs and ``elementwise(*ts)`` on the inputs of an element-wise op.
    The per-op ``supports`` signatures are built here once for every such backend."""
    supports = {
        "attention": lambda q, k, v, scale: attention(q, k, v),
        "attention_bwd": lambda dout, q, k, v, out, lse, scale: attention(q, k, v) or tensors(dout, out),
        "sampler_step": lambda x_t, eps_c, eps_u, x_T, *scalars: elementwise(x_t, eps_c, eps_u, x_T),
        "srl_loss": lambda x_t, eps_s, x0_target, a_t, s_t: elementwise(x_t, eps_s, x0_target),
        "srl_renoise": lambda x0, noise, a, s: elementwise(x0, noise),
    }
    for op, impl in impls.items():
        register(op, backend, impl, available=available, supports=supports[op])


_LINEAR_DTYPES = (torch.float32, torch.bfloat16)


def cpu_linear_supports(backend: str) -> Callable[..., str | None]:
    """``supports`` of a CPU row of ``linear`` (``cpp``, ``onednn``): CPU tensors,
    float32 or bfloat16, a non-empty weight."""
    def supports(x, weight, bias, activation) -> str | None:
        if x.device.type != "cpu":
            return f"tensor on {x.device.type}, the {backend} backend is CPU-only"
        if x.dtype not in _LINEAR_DTYPES:
            return f"dtype {x.dtype}; the {backend} linear takes float32 and bfloat16"
        if weight.shape[0] == 0 or weight.shape[1] == 0:
            return f"empty weight {tuple(weight.shape)}"
        return None
    return supports


def table(op: str) -> dict[str, Row]:
    return _TABLES[op]


def available_backends(op: str) -> list[str]:
    return [b for b, row in _TABLES[op].items() if row.available()]


@contextlib.contextmanager
def use_backend(name: str):
    """``with flashcore.ops.use_backend("reference"): ...`` for every op inside."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend(explicit: str | None = None) -> str:
    # read on every call (a few hundred ns): the context stack and the environment may
    # change between calls, and the precedence above is the contract
    if explicit is not None:
        name = explicit
    else:
        stack = getattr(_local, "stack", None)
        name = stack[-1] if stack else (os.environ.get("FLASHCORE_BACKEND") or "auto")
    if name not in _NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


def _warn_once(op: str, backend: str, why: str) -> None:
    key = (op, backend, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"flashcore.ops.{op}: backend {backend!r} not used ({why}); "
                      f"falling back to the reference", RuntimeWarning, stacklevel=4)


def resolve(op: str, device_type: str, explicit: str | None, *args, **kwargs) -> str:
    """Name of the backend that will run ``op`` on these inputs."""
    rows = _TABLES[op]
    name = requested_backend(explicit)
    if name == "auto":
        for cand in _AUTO_ORDER.get(device_type, ("reference",)):
            row = rows.get(cand)
            if row is not None and row.available() and row.supports(*args, **kwargs) is None:
                return cand
        return "reference"
    row = rows.get(name)
    if row is None or not row.available():
        why = "not built" if row is not None else "no such kernel for this op"
        _warn_once(op, name, why)
        return "reference"
    why = row.supports(*args, **kwargs)
    if why is not None:
        _warn_once(op, name, why)
        return "reference"
    return name


def run(op: str, backend: str, *args, **kwargs):
    return _TABLES[op][backend].impl(*args, **kwargs)
