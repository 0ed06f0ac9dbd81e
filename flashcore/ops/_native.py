"""Rows for the native (C++) CPU backend, registered when ``flashcore._C`` is built.

The extension declares its schemas under ``torch.ops.flashcore_C`` (csrc/registration.cpp)
and implements them in csrc/cpu/<op>.cpp; the Python custom ops in this package call them
through the backend table, so callers never see whether a kernel is native.

What the "cpp" rows take (anything else falls back to the reference with a one-time
warning, through ``supports``):

- every op: CPU tensors only.
- sampler_step (and sampler_step_out, its out= form), srl_loss, srl_renoise:
  float16/bfloat16/float32/float64, any layout.
  Inputs that share a dense layout (contiguous, channels-last, a transposed view) are
  walked flat with no copy; other strides are copied once into the output's layout
  inside the kernel (a correct, slower path rather than a fallback). out= buffers may
  have any strides (gaps or two layouts: computed densely, then copied) but not two
  elements at one address (a broadcast view): the kernel refuses those.
- attention, attention_bwd: float32/bfloat16/float64 (float16 falls back), any head
  dim, any strides (a (B, N, H, D) tensor viewed as (B, H, N, D) is read in place);
  at least one key and non-empty head dims.
- linear: float32/bfloat16, K > 0 and N > 0, any strides: the kernel copies an x, W or b
  that is not contiguous once (x flattened to (M, K)) and then reads dense arrays.
"""
from __future__ import annotations

import torch

from . import _dispatch

try:  # the extension is optional: a pure-Python install runs the references
    from .. import _C  # noqa: F401
    _LOADED = True
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _LOADED = False

# op name in the backend table -> native op that implements it
_KERNELS = {
    "sampler_step": "flashcore_C::sampler_step",
    "sampler_step_out": "flashcore_C::sampler_step_out",
    "srl_loss": "flashcore_C::srl_loss",
    "srl_renoise": "flashcore_C::srl_renoise",
    "attention": "flashcore_C::attention_fwd",
    "attention_bwd": "flashcore_C::attention_bwd",
    "linear": "flashcore_C::linear",
}


def has_kernel(op: str) -> bool:
    """Is the CPU implementation of this table op compiled into the extension?"""
    if not _LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_KERNELS[op], "CPU")
    except RuntimeError:  # schema not declared in this build
        return False


HAVE_CPP = has_kernel("srl_renoise")  # kept for callers that check the extension as a whole


def _not_cpu(t: torch.Tensor) -> str | None:
    if t.device.type != "cpu":
        return f"tensor on {t.device.type}, the cpp backend is CPU-only"
    return None


def _elementwise_supports(x, *args, **kwargs) -> str | None:
    return _not_cpu(x)


_ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _attention_supports(q, k, v, *rest) -> str | None:
    why = _not_cpu(q)
    if why is not None:
        return why
    if q.dtype not in _ATTN_DTYPES:
        return f"dtype {q.dtype}; the cpp attention kernel takes float32, bfloat16 and float64"
    if k.shape[2] == 0 or q.shape[3] == 0 or v.shape[3] == 0:
        return "no keys or an empty head dim"
    return None


def _attention_bwd_supports(dout, q, k, v, *rest) -> str | None:
    return _attention_supports(q, k, v)


linear_supports = _dispatch.cpu_linear_supports("cpp")


def _linear(x, weight, bias, activation):
    return torch.ops.flashcore_C.linear(x, weight, bias, activation)


def _sampler_step(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip):
    return torch.ops.flashcore_C.sampler_step(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance,
                                              noise_correction, clip)


def _sampler_step_out(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip, x_next, x0):
    torch.ops.flashcore_C.sampler_step_out(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance,
                                           noise_correction, clip, x_next, x0)


def _srl_loss(x_t, eps_s, x0_target, a_t, s_t):
    return torch.ops.flashcore_C.srl_loss(x_t, eps_s, x0_target, a_t, s_t)


def _srl_renoise(x0, noise, a, s):
    return torch.ops.flashcore_C.srl_renoise(x0, noise, a, s)


def _attention(q, k, v, scale):
    return torch.ops.flashcore_C.attention_fwd(q, k, v, scale)


def _attention_bwd(dout, q, k, v, out, lse, scale):
    return torch.ops.flashcore_C.attention_bwd(dout, q, k, v, out, lse, scale)


_ROWS = {
    "sampler_step": (_sampler_step, _elementwise_supports),
    "sampler_step_out": (_sampler_step_out, _elementwise_supports),
    "srl_loss": (_srl_loss, _elementwise_supports),
    "srl_renoise": (_srl_renoise, _elementwise_supports),
    "attention": (_attention, _attention_supports),
    "attention_bwd": (_attention_bwd, _attention_bwd_supports),
    "linear": (_linear, linear_supports),
}

for _op, (_impl, _supports) in _ROWS.items():
    if has_kernel(_op):
        _dispatch.register(_op, "cpp", _impl, available=lambda: True, supports=_supports)
