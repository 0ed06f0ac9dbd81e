"""Shifted Reconstruction Loss with its gradient, and the re-noising, in Triton.

Notation as in ``flashcore.ops.srl_loss`` (N = numel, g = -(s_t / a_t) 2 / N):
    1. x0_S = (x_t - s_t eps_S) / a_t
    2. r    = x0_S - x0_T
    3. grad = g r                       (stored, input dtype)
    4. part[c] = sum of r^2 over chunk c of CHUNK elements     (float32)
    loss = sum(part) / N
Lines 1-4 are one pass over memory. Partial sums are per fixed-size chunk,
whatever tile the autotuner picks, so every slot is written on every call and
the reduction afterwards runs in a fixed order: deterministic, no atomics.

``srl_renoise``: chi = a x0 + s eps', one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import autotune, cfg
from .sampler_step import EW_AMPERE, EW_HOPPER, EW_INTERP


@autotune(ampere=EW_AMPERE, hopper=EW_HOPPER, interp=EW_INTERP, key=["n"])
@triton.jit
def _srl_loss(XT, ES, TGT, GRAD, PART, n, n_parts, a_t, s_t, g, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xt = tl.load(XT + offs, mask=mask, other=0.0).to(tl.float32)
    es = tl.load(ES + offs, mask=mask, other=0.0).to(tl.float32)
    tgt = tl.load(TGT + offs, mask=mask, other=0.0).to(tl.float32)
    r = (xt - s_t * es) / a_t - tgt                                     # 1. 2.
    r = tl.where(mask, r, 0.0)
    tl.store(GRAD + offs, (g * r).to(GRAD.dtype.element_ty), mask=mask)  # 3.
    sq = tl.reshape(r * r, [BLOCK // _CHUNK, _CHUNK])
    slot = pid.to(tl.int64) * (BLOCK // _CHUNK) + tl.arange(0, BLOCK // _CHUNK)
    tl.store(PART + slot, tl.sum(sq, 1), mask=slot < n_parts)            # 4.


@autotune(ampere=EW_AMPERE, hopper=EW_HOPPER, interp=EW_INTERP, key=["n"])
@triton.jit
def _srl_renoise(X0, NOISE, OUT, n, a, s, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x0 = tl.load(X0 + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(NOISE + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (a * x0 + s * e).to(OUT.dtype.element_ty), mask=mask)


CHUNK = 512
_CHUNK = tl.constexpr(CHUNK)
assert all(c.kwargs["BLOCK"] % CHUNK == 0 for c in EW_AMPERE + EW_HOPPER + [EW_INTERP])


def srl_loss_fwd(x_t, eps_s, x0_target, a_t: float, s_t: float):
    """Returns ``(loss, grad_eps)`` like ``flashcore.ops.srl_loss_ref``; inputs contiguous."""
    n = x_t.numel()
    grad = torch.empty_like(x_t)
    n_parts = triton.cdiv(max(n, 1), CHUNK)
    part = torch.zeros(n_parts, device=x_t.device, dtype=torch.float32)
    if n > 0:
        g = -(s_t / a_t) * 2.0 / n
        _srl_loss[lambda m: (triton.cdiv(n, m["BLOCK"]),)](
            x_t, eps_s, x0_target, grad, part, n, n_parts, float(a_t), float(s_t), g)
    loss = part.sum() / n if n > 0 else part.new_tensor(float("nan"))
    return loss, grad


def srl_renoise_fwd(x0, noise, a: float, s: float):
    """``chi = a x0 + s noise`` like ``flashcore.ops.srl_renoise_ref``; inputs contiguous."""
    out = torch.empty_like(x0)
    n = x0.numel()
    if n > 0:
        _srl_renoise[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x0, noise, out, n, float(a), float(s))
    return out
