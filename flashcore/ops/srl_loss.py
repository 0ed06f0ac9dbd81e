"""Shifted Reconstruction Loss (Imagine Flash, Kohler et al., arXiv 2405.05224).

Notation: x_t = a_t x0 + s_t eps; the student predicts eps_S at (x_t, t).

    1. x0_S     = (x_t - s_t eps_S) / a_t                       (student's x0)
    2. loss     = mean((x0_T - x0_S)^2)                          (x0_T: teacher target)
    3. dL/deps_S = -(s_t / a_t) * 2 (x0_S - x0_T) / N            (N = numel)

``srl_loss`` returns the scalar loss (float32, float64 for float64 inputs);
its fused kernels compute lines 1-3 in one pass and keep the gradient for
backward, which only scales it by the incoming gradient (and returns it
untouched when that is exactly 1, as in ``loss.backward()``). The gradient also
flows to ``x_t`` (``dL/dx_t = -dL/deps_S / s_t``) and the target
(``dL/dx0_T = (a_t / s_t) dL/deps_S``) if they require it; in distillation
they do not, so only the student is trained.

``srl_renoise`` is the re-noising of the student's x0 to the teacher time
tau: ``chi = a_tau x0_S + s_tau eps'`` (one pass, output in the input dtype).

Dtypes: float16/bfloat16/float32/float64; accumulation in float32 (float64).
Backends (``ROWS``, ``RENOISE_ROWS``): ``reference`` (this file); ``cpp``
(csrc/cpu/srl_loss.cpp, srl_renoise.cpp: CPU tensors, every dtype, any layout);
``triton`` (kernels/srl_loss.py) and ``cuda`` (csrc/cuda/srl_loss.cu): CUDA
tensors, float16/bfloat16/float32, non-empty and contiguous. Inputs a backend
does not take fall back to the reference (with a one-time warning when that
backend was asked for by name).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _checks, _cuda, _dispatch, _native, _rows, _triton
from ._rows import Row

__all__ = ["srl_loss", "srl_loss_ref", "srl_renoise", "srl_renoise_ref"]

OP = "srl_loss"
OP_RENOISE = "srl_renoise"


def srl_loss_ref(x_t, eps_s, x0_target, a_t: float, s_t: float):
    """Reference: returns ``(loss, grad_eps)``; ``grad_eps`` in the input dtype."""
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    x0_s = (x_t.to(acc) - s_t * eps_s.to(acc)) / a_t           # 1.
    diff = x0_s - x0_target.to(acc)
    loss = diff.square().mean()                                # 2.
    grad = (-(s_t / a_t) * 2.0 / diff.numel()) * diff          # 3.
    return loss, grad.to(x_t.dtype)


def srl_renoise_ref(x0, noise, a: float, s: float):
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    return (a * x0.to(acc) + s * noise.to(acc)).to(x0.dtype)


def _gpu_takes(x_t, eps_s, x0_target, a_t, s_t):
    return _rows.gpu_elementwise(x_t, eps_s, x0_target)


def _gpu_takes_renoise(x0, noise, a, s):
    return _rows.gpu_elementwise(x0, noise)


# auto's order among them: _dispatch.AUTO_ORDER
ROWS = _dispatch.declare(OP, {
    "reference": Row(srl_loss_ref),
    "cpp": _native.row("srl_loss", _rows.anything),
    "triton": _triton.row("srl_loss", "srl_loss_fwd", _gpu_takes),
    "cuda": _cuda.row("srl_loss", _gpu_takes),
})
RENOISE_ROWS = _dispatch.declare(OP_RENOISE, {
    "reference": Row(srl_renoise_ref),
    "cpp": _native.row("srl_renoise", _rows.anything),
    "triton": _triton.row("srl_loss", "srl_renoise_fwd", _gpu_takes_renoise),
    "cuda": _cuda.row("srl_renoise", _gpu_takes_renoise),
})


@torch.library.custom_op("flashcore::srl_loss", mutates_args=())
def _srl_loss_op(x_t: torch.Tensor, eps_s: torch.Tensor, x0_target: torch.Tensor, a_t: float,
                 s_t: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    name = _dispatch.resolve(OP, x_t.device.type, backend or None, x_t, eps_s, x0_target, a_t, s_t)
    return _dispatch.run(OP, name, x_t, eps_s, x0_target, a_t, s_t)


@_srl_loss_op.register_fake
def _(x_t, eps_s, x0_target, a_t, s_t, backend):
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    return x_t.new_empty((), dtype=acc), torch.empty_like(x_t)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.k = (inputs[3], inputs[4])
    # The gradient output is internal (srl_loss returns the loss only): no zero-filled
    # full-size tensor for its incoming gradient, which nothing ever reads.
    ctx.set_materialize_grads(False)


def _is_exactly_one(g: torch.Tensor) -> bool:
    """Is the incoming gradient the literal 1 of ``loss.backward()``? Asked only of real
    CPU scalars: under tracing the value is unknown, and on a GPU .item() would wait."""
    if g.device.type != "cpu" or g.numel() != 1 or torch.compiler.is_compiling():
        return False
    if is_fake(g) or torch._C._functorch.is_functorch_wrapped_tensor(g):
        return False
    return g.item() == 1.0


def _backward(ctx, g_loss, _g_grad):
    """d loss/d eps_S was computed in the forward: scale it by the incoming gradient.

    With ``g == 1`` (``loss.backward()``) the saved buffer is the gradient itself and is
    returned as is: no pass over memory, no allocation. Otherwise one scaled copy per
    input that needs it, the scalar factors folded first (one pass each)."""
    if g_loss is None:
        return None, None, None, None, None, None
    (grad_eps,) = ctx.saved_tensors
    a_t, s_t = ctx.k
    one = _is_exactly_one(g_loss)
    g = g_loss      # fp32 (fp64) 0-dim: the products stay in grad_eps's dtype, computed in fp32
    g_eps = g_xt = g_tgt = None
    if ctx.needs_input_grad[1]:
        g_eps = grad_eps if one else grad_eps * g
    if ctx.needs_input_grad[0]:
        g_xt = grad_eps * (g * (-1.0 / s_t))                  # dL/dx_t = -dL/deps_S / s_t
    if ctx.needs_input_grad[2]:
        g_tgt = grad_eps * (g * (a_t / s_t))                  # dL/dx0_T = (a_t / s_t) dL/deps_S
    return g_xt, g_eps, g_tgt, None, None, None


_srl_loss_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("flashcore::srl_renoise", mutates_args=())
def _srl_renoise_op(x0: torch.Tensor, noise: torch.Tensor, a: float, s: float,
                    backend: str) -> torch.Tensor:
    name = _dispatch.resolve(OP_RENOISE, x0.device.type, backend or None, x0, noise, a, s)
    return _dispatch.run(OP_RENOISE, name, x0, noise, a, s)


@_srl_renoise_op.register_fake
def _(x0, noise, a, s, backend):
    return torch.empty_like(x0)


def _setup_r(ctx, inputs, output):
    ctx.k = (inputs[2], inputs[3])


def _backward_r(ctx, g):
    a, s = ctx.k
    return g * a, g * s, None, None, None


_srl_renoise_op.register_autograd(_backward_r, setup_context=_setup_r)


def _check_ts(a_t, s_t):
    a_t = _checks.scalar(OP, "a_t", a_t)
    s_t = _checks.scalar(OP, "s_t", s_t)
    if a_t <= 0 or s_t <= 0:
        raise ValueError(f"{OP}: a_t and s_t must be > 0, got a_t={a_t}, s_t={s_t}")
    return a_t, s_t


def srl_loss(x_t: torch.Tensor, eps_s: torch.Tensor, x0_target: torch.Tensor, *, a_t: float,
             s_t: float, backend: str | None = None) -> torch.Tensor:
    """Shifted Reconstruction Loss ``mean((x0_target - x0_hat(x_t, eps_s, t))^2)``.

    Args:
        x_t: the student's input state (B, ...), no gradient needed.
        eps_s: the student's noise prediction, same shape/dtype/device; gets the gradient.
        x0_target: the teacher's x0 from the re-noised state, same shape/dtype/device.
        a_t, s_t: schedule values at the student's time t (both > 0).
        backend: see ``flashcore.ops``.
    Returns:
        scalar loss, float32 (float64 for float64 inputs).
    """
    _checks.tensor(OP, "x_t", x_t)
    _checks.tensor(OP, "eps_s", eps_s, like=x_t, like_name="x_t")
    _checks.tensor(OP, "x0_target", x0_target, like=x_t, like_name="x_t")
    a_t, s_t = _check_ts(a_t, s_t)
    return _srl_loss_op(x_t, eps_s, x0_target, a_t, s_t, backend or "")[0]


def srl_renoise(x0: torch.Tensor, noise: torch.Tensor, *, a: float, s: float,
                backend: str | None = None) -> torch.Tensor:
    """``chi = a * x0 + s * noise``: the student's x0 re-noised to the teacher time."""
    _checks.tensor(OP_RENOISE, "x0", x0)
    _checks.tensor(OP_RENOISE, "noise", noise, like=x0, like_name="x0")
    a = _checks.scalar(OP_RENOISE, "a", a, lo=0.0)
    s = _checks.scalar(OP_RENOISE, "s", s, lo=0.0)
    return _srl_renoise_op(x0, noise, a, s, backend or "")
