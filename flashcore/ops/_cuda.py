"""Rows for the CUDA C++ backend (csrc/cuda, built only with a CUDA torch).

The kernels register under ``torch.ops.flashcore_C`` for the CUDA dispatch key
when ``flashcore._C_cuda`` is imported (after ``flashcore._C``, which declares
the schemas). The rows are available only when that extension imports and a
GPU is present. What they do not take falls back to the reference with a
one-time warning: float64, head dims above 128 or a v head dim that differs
from q's, empty tensors, and non-contiguous inputs (the kernels read dense
memory; copying silently would hide a cost the caller can avoid).
"""
from __future__ import annotations

import torch

from . import _dispatch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128      # FC_ATTN_MAX_HEAD_DIM in csrc/cuda/flashcore_cuda.h

try:  # built only where setup.py found a CUDA torch and toolkit
    from .. import _C  # noqa: F401  - declares the schemas
    from .. import _C_cuda  # noqa: F401
    HAVE_CUDA_EXT = hasattr(torch.ops.flashcore_C, "attention_fwd")
except ImportError:
    HAVE_CUDA_EXT = False


def _available() -> bool:
    return HAVE_CUDA_EXT and torch.cuda.is_available()


def _check(*tensors) -> str | None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"tensor on {t.device.type}, the cuda backend takes CUDA tensors"
        if t.dtype not in DTYPES:
            return f"dtype {t.dtype} (cuda takes float16/bfloat16/float32)"
        if t.numel() == 0:
            return "empty tensor"
        if not t.is_contiguous():
            return "non-contiguous input"
    return None


def _attention_ok(q, k, v) -> str | None:
    why = _check(q, k, v)
    if why is None and v.shape[-1] != q.shape[-1]:
        why = f"v head dim {v.shape[-1]} differs from q's {q.shape[-1]}"
    if why is None and q.shape[-1] > MAX_HEAD_DIM:
        why = f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return why


def _attention(q, k, v, scale):
    return torch.ops.flashcore_C.attention_fwd(q, k, v, scale)


def _attention_bwd(dout, q, k, v, out, lse, scale):
    return torch.ops.flashcore_C.attention_bwd(dout, q, k, v, out, lse, scale)


def _sampler_step(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance=1.0, noise_correction=False, clip=0.0):
    return torch.ops.flashcore_C.sampler_step(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance,
                                              bool(noise_correction), clip)


def _srl_loss(x_t, eps_s, x0_target, a_t, s_t):
    return torch.ops.flashcore_C.srl_loss(x_t, eps_s, x0_target, a_t, s_t)


def _srl_renoise(x0, noise, a, s):
    return torch.ops.flashcore_C.srl_renoise(x0, noise, a, s)


_dispatch.register_device_rows(
    "cuda", {"attention": _attention, "attention_bwd": _attention_bwd, "sampler_step": _sampler_step,
              "srl_loss": _srl_loss, "srl_renoise": _srl_renoise},
    available=_available, tensors=_check, attention=_attention_ok, elementwise=_check)
