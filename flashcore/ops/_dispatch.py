"""Which backend runs an op: policy only. The rows themselves live with each op.

Each ``ops/<op>.py`` declares its table (backend name -> ``Row``, see ``_rows``) with
``declare``. On every call the op asks ``resolve`` which row to run. Precedence:
an explicit ``backend=`` argument, then the innermost ``use_backend(...)`` context,
then ``FLASHCORE_BACKEND``, then ``auto``. ``auto`` tries, by the inputs' device,
``AUTO_ORDER`` (CUDA tensors: triton, cuda; CPU tensors: cpp, onednn) and keeps the
first row that is built, takes that device and ``supports`` the inputs; else the
reference. A backend asked for by name that cannot take the inputs falls back to the
reference with a one-time warning. Nothing is swapped at import time.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Callable

import torch

from ._rows import Row

BACKENDS = ("reference", "cpp", "cuda", "triton", "onednn")
_NAMES = frozenset(BACKENDS + ("auto",))
# the reference comes after these; a row not listed for a device (Triton interpreted on
# CPU tensors, a test mode) runs only when asked for by name
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpp", "onednn")}
_local = threading.local()
_warned: set[tuple[str, str, str]] = set()
_TABLES: dict[str, dict[str, Row]] = {}

__all__ = ["BACKENDS", "Row", "backends_for", "declare", "register", "resolve", "run", "table", "use_backend"]


def declare(op: str, rows: dict[str, Row]) -> dict[str, Row]:
    """Make ``rows`` the backend table of ``op`` (held, not copied); returns it."""
    if "reference" not in rows:
        raise ValueError(f"{op}: a table needs a 'reference' row (the fallback)")
    for backend in rows:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    _TABLES[op] = rows
    return rows


def register(op: str, backend: str, impl: Callable, *, available: Callable[[], bool] = lambda: True,
             supports: Callable[..., str | None] = lambda *a, **k: None,
             device: str | Callable[[], str] | None = None) -> None:
    """Add or replace one row of a declared op (a backend kept outside flashcore)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if op not in _TABLES:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_TABLES)}")
    _TABLES[op][backend] = Row(impl, available, supports, device)


def table(op: str) -> dict[str, Row]:
    return _TABLES[op]


def _device_of(args) -> str | None:
    t = args[0] if args else None
    return t.device.type if isinstance(t, torch.Tensor) else None


def why_not(row: Row, device_type: str | None, *args, **kwargs) -> str | None:
    """Why ``row`` cannot run these inputs (on ``device_type``), or None."""
    if not row.available():
        return "not built"
    dev = row.device                                    # (Row.device_type, inlined: a per-call cost)
    if dev is not None and device_type is not None:
        if callable(dev):
            dev = dev()
        if device_type != dev:
            return f"tensor on {device_type}; this backend takes {dev} tensors here"
    return row.supports(*args, **kwargs)


def backends_for(op: str, *args, **kwargs) -> list[str]:
    """The backends that would take these inputs of ``op`` (its arguments as its
    reference takes them), in priority order: ``auto``'s order for the inputs' device,
    the rows it leaves out, the reference last. With no inputs, every backend built
    here (the rows of both devices first, in ``AUTO_ORDER``'s order)."""
    rows = _TABLES[op]
    dev = _device_of(args)
    first = AUTO_ORDER.get(dev, ()) if dev is not None else tuple(b for o in AUTO_ORDER.values() for b in o)
    order = [*first, *(b for b in rows if b not in first and b != "reference"), "reference"]
    if not args and not kwargs:
        return [b for b in order if b in rows and rows[b].available()]
    return [b for b in order if b in rows and why_not(rows[b], dev, *args, **kwargs) is None]


@contextlib.contextmanager
def use_backend(name: str):
    """``with flashcore.ops.use_backend("reference"): ...`` for every op inside."""
    if name not in _NAMES:
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
    """Name of the backend that will run ``op`` on these inputs (on ``device_type``)."""
    rows = _TABLES[op]
    name = requested_backend(explicit)
    if name == "auto":
        for cand in AUTO_ORDER.get(device_type, ()):
            row = rows.get(cand)
            if row is not None and why_not(row, device_type, *args, **kwargs) is None:
                return cand
        return "reference"
    row = rows.get(name)
    why = "no such kernel for this op" if row is None else why_not(row, device_type, *args, **kwargs)
    if why is not None:
        _warn_once(op, name, why)
        return "reference"
    return name


def run(op: str, backend: str, *args, **kwargs):
    return _TABLES[op][backend].impl(*args, **kwargs)
