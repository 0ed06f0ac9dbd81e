"""Scaled dot-product attention (no mask, non-causal), FlashAttention style.

Notation: q (B, H, Nq, D), k and v (B, H, Nk, D), scale c (default D^-1/2).

    1. S   = c q k^T                       (B, H, Nq, Nk)
    2. lse = logsumexp_j S                 (B, H, Nq), float32 (float64 for float64)
    3. P   = exp(S - lse)
    4. O   = P v                           (B, H, Nq, D)

Backward (Dao 2023, FlashAttention-2), recomputing P from lse:

    dV = P^T dO;  dP = dO v^T;  Delta = rowsum(dO * O);
    dS = P * (dP - Delta);  dq = c dS k;  dk = c dS^T q

Kernels tile over K/V with an online softmax and never store S or P. The op
returns O; ``attention_fwd`` also returns lse for the backward.

Dtypes float16/bfloat16/float32/float64; any head dim. Backends (``ROWS``,
``BWD_ROWS``): ``reference`` (this file; the only one for float64 on a GPU);
``cpp`` (csrc/cpu/attention.cpp: CPU tensors, float32/bfloat16/float64, any head
dim, any strides, at least one key and non-empty head dims); ``triton``
(kernels/attention.py: CUDA tensors, float16/bfloat16/float32, head dims up to
256, any strides, non-empty) and ``cuda`` (csrc/cuda/attention_*.cu:
float16/bfloat16/float32, head dims up to 128, v's head dim equal to q's,
non-empty contiguous inputs). Inputs a backend does not take fall back to the
reference (with a one-time warning when it was asked for by name).
"""
from __future__ import annotations

import torch

from . import _checks, _cuda, _dispatch, _native, _rows, _triton
from ._rows import GPU_DTYPES, Row

__all__ = ["attention", "attention_ref", "attention_bwd_ref"]

OP = "attention"
OP_BWD = "attention_bwd"
CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
TRITON_MAX_HEAD_DIM = 256     # kernels/attention.py pads up to a power of two, at most 256
CUDA_MAX_HEAD_DIM = 128       # FC_ATTN_MAX_HEAD_DIM in csrc/cuda/flashcore_cuda.h


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_ref(q, k, v, scale: float):
    """Reference forward: matmul-softmax-matmul in the input dtype; returns (O, lse)."""
    acc = _lse_dtype(q.dtype)
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).to(acc)          # 1. (B,H,Nq,Nk)
    lse = torch.logsumexp(s, dim=-1)                                     # 2. (B,H,Nq)
    p = torch.exp(s - lse.unsqueeze(-1)).to(q.dtype)                     # 3.
    return torch.matmul(p, v), lse                                       # 4. (B,H,Nq,D)


def attention_bwd_ref(dout, q, k, v, out, lse, scale: float):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, of, dof = (t.to(acc) for t in (q, k, v, out, dout))
    p = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse.to(acc).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), dof)                          # (B,H,Nk,D)
    dp = torch.matmul(dof, vf.transpose(-1, -2))                         # (B,H,Nq,Nk)
    delta = (dof * of).sum(-1, keepdim=True)                             # (B,H,Nq,1)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _cpp_takes(q, k, v, *rest):
    why = _rows.dtypes(CPP_DTYPES, q)
    if why is None and (k.shape[2] == 0 or q.shape[3] == 0 or v.shape[3] == 0):
        why = "no keys or an empty head dim"
    return why


def _triton_takes(q, k, v, *rest):
    return (_rows.dtypes(GPU_DTYPES, q, k, v) or _rows.nonempty(q, k, v)
            or _rows.head_dims(TRITON_MAX_HEAD_DIM, q, v))


def _cuda_takes(q, k, v, *rest):
    return (_rows.dtypes(GPU_DTYPES, q, k, v) or _rows.nonempty(q, k, v) or _rows.dense(q, k, v)
            or _rows.same_last_dim(q, v, "v head dim") or _rows.head_dims(CUDA_MAX_HEAD_DIM, q))


# the backward's rows take what the forward's take, and dO and O as the GPU kernels do
def _cpp_takes_bwd(dout, q, k, v, out, lse, scale):
    return _cpp_takes(q, k, v)


def _triton_takes_bwd(dout, q, k, v, out, lse, scale):
    return _triton_takes(q, k, v) or _rows.dtypes(GPU_DTYPES, dout, out) or _rows.nonempty(dout, out)


def _cuda_takes_bwd(dout, q, k, v, out, lse, scale):
    return (_cuda_takes(q, k, v) or _rows.dtypes(GPU_DTYPES, dout, out) or _rows.nonempty(dout, out)
            or _rows.dense(dout, out))


# auto's order among them: _dispatch.AUTO_ORDER
ROWS = _dispatch.declare(OP, {
    "reference": Row(attention_ref),
    "cpp": _native.row("attention_fwd", _cpp_takes),
    "triton": _triton.row("attention", "attention_fwd", _triton_takes),
    "cuda": _cuda.row("attention_fwd", _cuda_takes),
})
BWD_ROWS = _dispatch.declare(OP_BWD, {
    "reference": Row(attention_bwd_ref),
    "cpp": _native.row("attention_bwd", _cpp_takes_bwd),
    "triton": _triton.row("attention", "attention_bwd", _triton_takes_bwd),
    "cuda": _cuda.row("attention_bwd", _cuda_takes_bwd),
})


@torch.library.custom_op("flashcore::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    name = _dispatch.resolve(OP, q.device.type, backend or None, q, k, v, scale)
    return _dispatch.run(OP, name, q, k, v, scale)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, backend):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
            q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("flashcore::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dout, q, k, v, out, lse, scale)
    name = _dispatch.resolve(OP_BWD, q.device.type, backend or None, *args)
    return _dispatch.run(OP_BWD, name, *args)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout.contiguous(), q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup)

# exported graphs (flashcore/export.py): the C++ op, or the reference for ONNX
_native.export_rule(
    "attention_fwd", "attention_fwd",
    native=lambda q, k, v, scale, backend: torch.ops.flashcore_C.attention_fwd.default(q, k, v, scale),
    reference=lambda q, k, v, scale, backend: attention_ref(q, k, v, scale),
    fake=lambda q, k, v, scale: _attention_fwd_fake(q, k, v, scale, ""))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(scale q k^T) v over the last two dimensions.

    Args:
        q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv), one dtype and device.
        scale: defaults to D ** -0.5.
        backend: see ``flashcore.ops``.
    Returns:
        (B, H, Nq, Dv) in the input dtype.
    """
    _checks.tensor(OP, "q", q, ndim=4)
    _checks.tensor(OP, "k", k, ndim=4)
    _checks.tensor(OP, "v", v, ndim=4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{OP}: {name} must match q in dtype and device "
                             f"({t.dtype}/{t.device} vs {q.dtype}/{q.device})")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{OP}: {name} batch/heads {tuple(t.shape[:2])} differ from q's {tuple(q.shape[:2])}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{OP}: k head dim {k.shape[-1]} differs from q head dim {q.shape[-1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{OP}: v has {v.shape[2]} keys but k has {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.scalar(OP, "scale", scale)
    return _attention_fwd(q, k, v, scale, backend or "")[0]
