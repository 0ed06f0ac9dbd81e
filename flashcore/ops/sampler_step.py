"""The few-step sampler update with classifier-free guidance and Noise Correction.

Imagine Flash (Kohler et al., arXiv 2405.05224), section on Noise Correction;
DDIM (Song et al. 2021) deterministic update; optional x0 clamp ("reflection",
DDIL, Garrepalli et al., arXiv 2410.11971).

Notation: x_t = a_t x0 + s_t eps. One step from t to the next grid time s:

    1. eps_hat = eps_u + w (eps_c - eps_u)           (eps_hat = eps_c when eps_u is None)
    2. x0      = (x_t - s_t eps_hat) / a_t
    3. x0      = clamp(x0, -clip, clip)               (only when clip > 0)
    4. d       = x_T if noise_correction else eps_hat  (noise correction: only at t == T)
    5. x_s     = a_s x0 + s_s d

Returns ``(x_s, x0)``; the last step of a sampler uses ``x0``. The fused
kernels compute all five lines in one pass over memory.

``out=(x_s, x0)`` writes into caller-owned buffers instead (op
``flashcore::sampler_step_out``, which mutates them): a sampler loop calls the
update every step, and fresh outputs above glibc's mmap threshold are mapped
and page-faulted on every call, which costs more than the update itself. The
buffers must match ``x_t`` in shape, dtype and device, may have any strides but
no two elements at one address (an expanded view is refused), and share no
memory with the inputs or each other; out= does not record autograd. Backends with an
in-place kernel (``cpp``) write directly; the others compute and copy.

Backends (``ROWS``; ``OUT_ROWS`` for out=): ``reference`` (this file); ``cpp``
(csrc/cpu/sampler_step.cpp: CPU tensors, every dtype, any layout; inputs that do
not share one dense layout are copied once inside the kernel; out= buffers of any
strides, written in place); ``triton`` (kernels/sampler_step.py) and ``cuda``
(csrc/cuda/sampler_step.cu): CUDA tensors, float16/bfloat16/float32, non-empty and
contiguous. The op accepts float16/bfloat16/float32/float64 tensors of one shape,
dtype and device; arithmetic is done in float32 (float64 for float64 inputs). A
backend that does not take the inputs falls back to the reference (with a
one-time warning when it was asked for by name).
"""
from __future__ import annotations

import torch

from . import _checks, _cuda, _dispatch, _native, _rows, _triton
from ._rows import Row

__all__ = ["sampler_step", "sampler_step_ref"]

OP = "sampler_step"
OP_OUT = "sampler_step_out"   # rows: kernels that write into caller-owned (x_s, x0)


def sampler_step_ref(x_t, eps_c, eps_u, x_T, a_t: float, s_t: float, a_s: float, s_s: float,
                     guidance: float = 1.0, noise_correction: bool = False, clip: float = 0.0):
    """PyTorch reference (the oracle). Computes in float32 or float64."""
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    xt = x_t.to(acc)
    eps = eps_c.to(acc)
    if eps_u is not None:
        eu = eps_u.to(acc)
        eps = eu + guidance * (eps - eu)                       # 1. CFG combine
    x0 = (xt - s_t * eps) / a_t                                # 2.
    if clip > 0:
        x0 = x0.clamp(-clip, clip)                             # 3.
    d = x_T.to(acc) if noise_correction else eps               # 4.
    x_next = a_s * x0 + s_s * d                                # 5.
    return x_next.to(x_t.dtype), x0.to(x_t.dtype)


def _sampler_step_out_ref(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip,
                          x_next, x0):
    res = sampler_step_ref(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip)
    x_next.copy_(res[0])
    x0.copy_(res[1])


def _gpu_takes(x_t, eps_c, eps_u, x_T, *scalars):
    return _rows.gpu_elementwise(x_t, eps_c, eps_u, x_T)


# auto's order among them: _dispatch.AUTO_ORDER
ROWS = _dispatch.declare(OP, {
    "reference": Row(sampler_step_ref),
    "cpp": _native.row("sampler_step", _rows.anything),
    "triton": _triton.row("sampler_step", "sampler_step_fwd", _gpu_takes),
    "cuda": _cuda.row("sampler_step", _gpu_takes),
})
# the out= forms: the row of the backend ``ROWS`` resolves to, where it has one (else it
# computes and the result is copied); taking the same inputs as that backend's row
OUT_ROWS = _dispatch.declare(OP_OUT, {
    "reference": Row(_sampler_step_out_ref),
    "cpp": _native.row("sampler_step_out", _rows.anything),
})


@torch.library.custom_op("flashcore::sampler_step", mutates_args=())
def _sampler_step_op(x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor | None,
                     x_T: torch.Tensor | None, a_t: float, s_t: float, a_s: float, s_s: float,
                     guidance: float, noise_correction: bool, clip: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip)
    name = _dispatch.resolve(OP, x_t.device.type, backend or None, *args)
    return _dispatch.run(OP, name, *args)


@_sampler_step_op.register_fake
def _(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip, backend):
    return torch.empty_like(x_t), torch.empty_like(x_t)


def _setup(ctx, inputs, output):
    x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, nc, clip, _ = inputs
    ctx.save_for_backward(x_t, eps_c, eps_u)
    ctx.has_u, ctx.has_T = eps_u is not None, x_T is not None
    ctx.k = (a_t, s_t, a_s, s_s, guidance, nc, clip)


def _backward(ctx, g_next, g_x0):
    x_t, eps_c, eps_u = ctx.saved_tensors
    a_t, s_t, a_s, s_s, w, nc, clip = ctx.k
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    eps = eps_c.to(acc) if eps_u is None else eps_u.to(acc) + w * (eps_c.to(acc) - eps_u.to(acc))
    g_next = g_next.to(acc)
    g = g_x0.to(acc) + a_s * g_next                            # d/dx0 after the clamp
    if clip > 0:
        x0 = (x_t.to(acc) - s_t * eps) / a_t
        g = g * (x0.abs() <= clip)
    g_xt = g / a_t
    g_eps = -(s_t / a_t) * g
    g_xT = None
    if nc:
        g_xT = (s_s * g_next).to(x_t.dtype) if ctx.has_T else None
    else:
        g_eps = g_eps + s_s * g_next
    if eps_u is None:
        g_c, g_u = g_eps.to(x_t.dtype), None
    else:
        g_c, g_u = (w * g_eps).to(x_t.dtype), ((1 - w) * g_eps).to(x_t.dtype)
    return (g_xt.to(x_t.dtype), g_c.to(x_t.dtype), g_u, g_xT,
            None, None, None, None, None, None, None, None)


_sampler_step_op.register_autograd(_backward, setup_context=_setup)

# exported graphs (flashcore/export.py): the C++ op, or the reference for ONNX
_native.export_rule(
    "sampler_step", "sampler_step",
    native=lambda *args: torch.ops.flashcore_C.sampler_step.default(*args[:-1]),
    reference=lambda *args: sampler_step_ref(*args[:-1]),
    fake=lambda x_t, *rest: (torch.empty_like(x_t), torch.empty_like(x_t)))


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do the byte extents of ``a`` and ``b`` intersect (exact for separate storages)?"""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t):
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


# The out= op. Its schema marks x_next and x0 as mutated (what ``mutates_args`` would
# generate), so functionalization and torch.compile treat it like any in-place op. It is
# defined with torch.library.define rather than @custom_op on purpose: for a mutating op
# custom_op adds a Python ADInplaceOrView kernel that re-reads the schema for every
# argument on every call (~45 us here with 14 arguments, twice the whole update at the
# models' latents); this op bumps the version counters itself (~11 us per call in all).
# No autograd: an out= call with inputs that require grad is refused.
_LIB = torch.library.Library("flashcore", "FRAGMENT")
_LIB.define("sampler_step_out(Tensor x_t, Tensor eps_c, Tensor? eps_u, Tensor? x_T, float a_t, float s_t, "
            "float a_s, float s_s, float guidance, bool noise_correction, float clip, str backend, "
            "Tensor(a!) x_next, Tensor(b!) x0) -> ()")


def _sampler_step_out_impl(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip, backend,
                           x_next, x0):
    args = (x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip)
    ins = {"x_t": x_t, "eps_c": eps_c, "eps_u": eps_u, "x_T": x_T}
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*ins.values(), x_next, x0)):
        raise ValueError(f"{OP}: out= does not support autograd, but an input requires grad; "
                         f"call it under torch.no_grad() or without out=")
    for oname, o in (("out[0] (x_next)", x_next), ("out[1] (x0)", x0)):
        _checks.out_tensor(OP, oname, o)
        for iname, t in ins.items():
            if t is not None and _shares_memory(o, t):
                raise ValueError(f"{OP}: {oname} shares memory with {iname}; out= buffers must not alias "
                                 f"the inputs (pass separate buffers, e.g. swap two of them between steps)")
    if _shares_memory(x_next, x0):
        raise ValueError(f"{OP}: out[0] (x_next) and out[1] (x0) share memory; pass two separate buffers")
    # the backend the allocating op would use; written in place when it has an out= kernel
    name = _dispatch.resolve(OP, x_t.device.type, backend or None, *args)
    row = OUT_ROWS.get(name)
    if row is not None and row.available():
        row.impl(*args, x_next, x0)
    else:
        res = _dispatch.run(OP, name, *args)
        x_next.copy_(res[0])
        x0.copy_(res[1])
    torch.autograd.graph.increment_version((x_next, x0))     # what an in-place op does


_LIB.impl("sampler_step_out", _sampler_step_out_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("flashcore::sampler_step_out", lib=_LIB)
def _(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, noise_correction, clip, backend, x_next, x0):
    return None


_sampler_step_out_op = torch.ops.flashcore.sampler_step_out.default


def sampler_step(x_t: torch.Tensor, eps_c: torch.Tensor, *, a_t: float, s_t: float, a_s: float,
                 s_s: float, eps_u: torch.Tensor | None = None, x_T: torch.Tensor | None = None,
                 guidance: float = 1.0, noise_correction: bool = False, clip: float = 0.0,
                 backend: str | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise-corrected DDIM update; see the module docstring for the maths.

    Args:
        x_t: current state, any shape.
        eps_c: conditional noise prediction, same shape/dtype/device as ``x_t``.
        eps_u: unconditional prediction for CFG, or None (no guidance: a student).
        x_T: the initial noise, required when ``noise_correction`` is True.
        a_t, s_t, a_s, s_s: schedule values at the current and the next time
            (``a_s = 1, s_s = 0`` makes ``x_s == x0``).
        guidance: CFG scale ``w``.
        noise_correction: use ``x_T`` instead of ``eps_hat`` as the direction (t == T only).
        clip: clamp x0 to ``[-clip, clip]`` when > 0.
        backend: ``reference``/``cpp``/``cuda``/``triton``/``auto`` or None (context, env, auto).
        out: optional pair ``(x_s, x0)`` of buffers to write into (shape, dtype and device of
            ``x_t``; any strides, but no two elements at one address; no memory shared
            with the inputs or each other; no autograd).
    Returns:
        ``(x_s, x0)`` in the dtype of ``x_t``: the ``out`` tensors when given.
    """
    _checks.tensor(OP, "x_t", x_t)
    _checks.tensor(OP, "eps_c", eps_c, like=x_t, like_name="x_t")
    if eps_u is not None:
        _checks.tensor(OP, "eps_u", eps_u, like=x_t, like_name="x_t")
    if noise_correction:
        if x_T is None:
            raise ValueError(f"{OP}: x_T is required when noise_correction=True")
        _checks.tensor(OP, "x_T", x_T, like=x_t, like_name="x_t")
    else:
        x_T = None
    a_t = _checks.scalar(OP, "a_t", a_t)
    if a_t <= 0:
        raise ValueError(f"{OP}: a_t must be > 0 (clamp a_T to a floor), got {a_t}")
    s_t = _checks.scalar(OP, "s_t", s_t, lo=0.0)
    a_s = _checks.scalar(OP, "a_s", a_s, lo=0.0)
    s_s = _checks.scalar(OP, "s_s", s_s, lo=0.0)
    guidance = _checks.scalar(OP, "guidance", guidance)
    clip = _checks.scalar(OP, "clip", clip, lo=0.0)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"{OP}: out must be a pair (x_next, x0) of tensors, got {type(out).__name__}")
        x_next, x0 = out
        _checks.tensor(OP, "out[0] (x_next)", x_next, like=x_t, like_name="x_t")
        _checks.tensor(OP, "out[1] (x0)", x0, like=x_t, like_name="x_t")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x_t, eps_c, eps_u, x_T, x_next, x0)):
            # also checked in the op; here it is traced, so torch.compile reports it too
            raise ValueError(f"{OP}: out= does not support autograd, but an input requires grad; "
                             f"call it under torch.no_grad() or without out=")
        _sampler_step_out_op(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance, bool(noise_correction),
                             clip, backend or "", x_next, x0)
        return x_next, x0
    return _sampler_step_op(x_t, eps_c, eps_u, x_T, a_t, s_t, a_s, s_s, guidance,
                            bool(noise_correction), clip, backend or "")
