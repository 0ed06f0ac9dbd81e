"""Rows for the Triton backend (kernels in ``flashcore.triton_kernels``).

The kernels take CUDA tensors; with ``TRITON_INTERPRET=1`` they run on CPU
tensors instead (about 1000x slower than torch: tests only). Triton is imported
on the first call, not with ``flashcore``. What a row does not take falls back
to the reference with a one-time warning: float64, head dims above 256,
empty tensors, non-contiguous tensors for the element-wise ops (attention
reads any strides).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from . import _dispatch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256        # kernels/attention.py pads up to a power of two, at most 256
_KERNELS = "flashcore.triton_kernels"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _available() -> bool:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec(_KERNELS) is None:
        return False
    return _interpret() or torch.cuda.is_available()


def _kernels():
    import flashcore.triton_kernels as k  # noqa: PLC0415 - lazy: importing triton takes a second
    return k


def _where(t: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on this tensor's device, or None."""
    loaded = sys.modules.get(_KERNELS + "._tuning")
    if loaded is not None and loaded.INTERPRET != _interpret():
        return "TRITON_INTERPRET changed after the Triton kernels were imported"
    if _interpret():
        return None if t.device.type == "cpu" else f"TRITON_INTERPRET=1 runs CPU tensors, got {t.device.type}"
    return None if t.device.type == "cuda" else f"the Triton kernels need CUDA tensors, got {t.device.type}"


def _dtype(t: torch.Tensor) -> str | None:
    return None if t.dtype in DTYPES else f"dtype {t.dtype} (triton takes float16/bfloat16/float32)"


def _common(*tensors) -> str | None:
    for t in tensors:
        if t is None:
            continue
        why = _where(t) or _dtype(t)
        if why:
            return why
        if t.numel() == 0:
            return "empty tensor"
    return None


def _elementwise(*tensors) -> str | None:
    why = _common(*tensors)
    if why is None and any(t is not None and not t.is_contiguous() for t in tensors):
        why = "non-contiguous input (the element-wise kernels read flat memory)"
    return why


def _attention_ok(q, k, v) -> str | None:
    why = _common(q, k, v)
    if why is None and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        why = f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    return why


def _attention(q, k, v, scale):
    return _kernels().attention_fwd(q, k, v, scale)


def _attention_bwd(dout, q, k, v, out, lse, scale):
    return _kernels().attention_bwd(dout, q, k, v, out, lse, scale)


def _sampler_step(*args):
    return _kernels().sampler_step_fwd(*args)


def _srl_loss(*args):
    return _kernels().srl_loss_fwd(*args)


def _srl_renoise(*args):
    return _kernels().srl_renoise_fwd(*args)


_dispatch.register_device_rows(
    "triton", {"attention": _attention, "attention_bwd": _attention_bwd, "sampler_step": _sampler_step,
              "srl_loss": _srl_loss, "srl_renoise": _srl_renoise},
    available=_available, tensors=_common, attention=_attention_ok, elementwise=_elementwise)
