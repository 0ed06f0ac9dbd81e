"""Rows for the native (C++) backends, registered when ``flashcore._C`` is built.

The extension declares its schemas under ``torch.ops.flashcore_C``; the
Python custom ops in this package call them through the backend table, so
callers never see whether a kernel is native.
"""
from __future__ import annotations

import torch

from . import _dispatch

try:  # the extension is optional: a pure-Python install runs the references
    from .. import _C  # noqa: F401
    HAVE_CPP = hasattr(torch.ops.flashcore_C, "srl_renoise")
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    HAVE_CPP = False


def _cpu_only(*args, **kwargs):
    t = args[0]
    if t.device.type != "cpu":
        return f"tensor on {t.device.type}, the cpp backend is CPU-only"
    return None


def _renoise_cpp(x0, noise, a, s):
    return torch.ops.flashcore_C.srl_renoise(x0, noise, a, s)


_dispatch.register("srl_renoise", "cpp", _renoise_cpp, available=lambda: HAVE_CPP, supports=_cpu_only)
