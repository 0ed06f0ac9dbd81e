"""A linear layer with an optional GELU after it, as in a transformer's feed-forward.

Notation: x (..., K), W (N, K), b (N,) or None, act one of ``ACTIVATIONS``.

    1. z = x W^T + b                      (..., N)
    2. y = act(z)                         none: z;  gelu: z Phi(z);  gelu_tanh: tanh approximation

Backward (z recomputed from x when act is not none; the reference maths):

    g_z = g * act'(z);  g_x = g_z W;  g_W = g_z^T x;  g_b = sum g_z       (sums over all leading dims)

Why an op for a GEMM: PyTorch's float32 ``F.linear`` on the CPU goes to MKL,
which reaches about 205 GFLOP/s on this AMD EPYC (docs/cpu_performance.md), while oneDNN's
inner product on the same inputs is much faster (DiT-S/2 forward at batch 1:
90 -> 52 ms eager). Inductor cannot lower ``mkldnn._linear_pointwise`` with
weights that are graph inputs (it asserts the weight is a constant), so the
oneDNN call lives behind this custom op, which the compiler keeps as an opaque
extern call (``fullgraph=True`` works). oneDNN also applies the GELU as a
post-op, saving a pass over the (..., N) output.

Dtypes: x, W and b share one floating dtype and device. Under CPU/CUDA
autocast the public function casts them to the autocast dtype first, as
autocast does for ``F.linear``. Backends (``ROWS``): ``reference`` (``linear_ref``,
every dtype and device), ``cpp`` (``csrc/cpu/linear.cpp``: CPU tensors, float32 and
bfloat16, K and N > 0, any strides (a non-contiguous x, W or b is copied once); a
GEMV of its own for M <= 4 rows (2 in bf16), where oneDNN's fixed cost per call
dominates, oneDNN's inner product above) and ``onednn`` (``_onednn_linear`` below:
the same tensors, oneDNN at every M, torch built with oneDNN). Both take
bfloat16 only where oneDNN computes it (a CPU with AVX-512 or AVX-NE-CONVERT;
``_onednn.bf16_native``). Other inputs
(float64, float16, a GPU tensor) fall back to the reference, with a one-time
warning if a backend was asked for by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, _dispatch, _native, _onednn, _rows
from ._rows import Row

__all__ = ["linear", "linear_ref"]

OP = "linear"
ACTIVATIONS = ("none", "gelu", "gelu_tanh")
# activation -> F.gelu's ``approximate`` argument (None: no activation)
_GELU_APPROX = {"none": None, "gelu": "none", "gelu_tanh": "tanh"}


def linear_ref(x, weight, bias=None, activation: str = "none"):
    """Reference (the oracle): ``F.linear`` then the activation, in the input dtype."""
    z = F.linear(x, weight, bias)                                       # 1. (..., N)
    approx = _GELU_APPROX[activation]
    return z if approx is None else F.gelu(z, approximate=approx)       # 2.


# flashcore activation -> (oneDNN post-op attr, algorithm)
_POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _onednn_linear(x, weight, bias, activation):
    """The ``onednn`` row: ``mkldnn._linear_pointwise(x, W, b, attr, scalars, algorithm)``,
    the call inductor emits for linear layers with frozen weights, here on ordinary
    (non-constant) weights, which inductor itself refuses to lower.

    Any strides: x is flattened to (M, K) (a copy only when the view cannot be made) and
    ``_linear_pointwise`` makes it contiguous itself; a weight or bias that is not
    contiguous is copied first, because the call hands the bias's storage to oneDNN as
    if it were dense (an expanded bias was read past its end, a stepped one gave wrong
    sums) and its strided weight path is not a documented contract."""
    attr, algorithm = _POST_OPS[activation]
    if not weight.is_mkldnn and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if x.dim() == 2:                                                     # the reshapes cost ~1 us a call
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    x2 = x.reshape(-1, x.shape[-1])                                      # (M, K)
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, attr, [], algorithm)   # (M, N)
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


_CPU_DTYPES = (torch.float32, torch.bfloat16)        # oneDNN's inner product refuses float64/float16 here


def _cpu_takes(x, weight, bias, activation):
    return _rows.dtypes(_CPU_DTYPES, x) or _onednn.bf16_reason(x) or _rows.nonempty(weight)


# auto's order among them: _dispatch.AUTO_ORDER
ROWS = _dispatch.declare(OP, {
    "reference": Row(linear_ref),
    "cpp": _native.row("linear", _cpu_takes),
    "onednn": Row(_onednn_linear, _onednn.available, _cpu_takes, "cpu"),
})


# The op. Defined with torch.library.define + impl rather than @custom_op on purpose:
# custom_op wraps the kernel in two more Python layers (an output-aliasing check and a
# dynamo-disabled wrapper). A DiT-S/2 step makes 112 linear calls; at a tiny shape the
# op cost ~29 us a call around a 13 us oneDNN call, ~22 us defined this way (torch
# 2.13, one thread). What remains is the dispatcher, register_autograd's Autograd
# kernel and this CompositeExplicitAutograd kernel (one kernel for every device: the
# backend table, not the dispatcher, picks the row). pt2_compliant_tag is what
# custom_op would add; opcheck checks the claim.
_LIB = torch.library.Library("flashcore", "FRAGMENT")
_LIB.define("linear(Tensor x, Tensor weight, Tensor? bias, str activation, str backend) -> Tensor",
            tags=(torch.Tag.pt2_compliant_tag,))


def _linear_impl(x, weight, bias, activation, backend):
    name = _dispatch.resolve(OP, x.device.type, backend or None, x, weight, bias, activation)
    return _dispatch.run(OP, name, x, weight, bias, activation)


_LIB.impl("linear", _linear_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("flashcore::linear", lib=_LIB)
def _(x, weight, bias, activation, backend):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def _setup(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation


def _backward(ctx, g):
    x, weight, bias = ctx.saved_tensors
    approx = _GELU_APPROX[ctx.activation]
    if approx is not None:
        z = F.linear(x, weight, bias)                                    # recomputed pre-activation
        g = torch.ops.aten.gelu_backward(g, z, approximate=approx)      # g_z (..., N)
    g2 = g.reshape(-1, weight.shape[0])                                  # (M, N)
    g_x = g_w = g_b = None
    if ctx.needs_input_grad[0]:
        g_x = torch.matmul(g, weight)                                    # (..., K)
    if ctx.needs_input_grad[1]:
        g_w = g2.t() @ x.reshape(-1, weight.shape[1])                    # (N, K)
    if bias is not None and ctx.needs_input_grad[2]:
        g_b = g2.sum(0)                                                  # (N,)
    return g_x, g_w, g_b, None, None


torch.library.register_autograd("flashcore::linear", _backward, setup_context=_setup, lib=_LIB)

_linear_op = torch.ops.flashcore.linear.default

# The row ``linear`` calls straight, without the op's Python layers (~17 us a call, the
# price of a small GEMM; a DiT-S/2 step makes 112 calls), when it is asked for by name
# and no autograd is needed. Its availability is asked once: a build does not change.
_DIRECT_BACKEND = "cpp"
_DIRECT = ROWS[_DIRECT_BACKEND] if ROWS[_DIRECT_BACKEND].available() else None
_DIRECT_DEVICE = _DIRECT.device_type() if _DIRECT is not None else None
if _DIRECT is not None:
    # the direct call is traced under torch.compile: the native op needs a fake
    @torch.library.register_fake("flashcore_C::linear")
    def _(x, weight, bias, activation):
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

# exported graphs (flashcore/export.py): the C++ op, or the reference for ONNX
_native.export_rule(
    "linear", "linear",
    native=lambda x, weight, bias, activation, backend: torch.ops.flashcore_C.linear.default(x, weight, bias,
                                                                                             activation),
    reference=lambda x, weight, bias, activation, backend: linear_ref(x, weight, bias, activation))


def _autocast(x, weight, bias):
    """Autocast's rule for ``F.linear``: cast float inputs to the autocast dtype.

    A custom op has no autocast kernel, so without this a bf16 activation would
    meet a float32 weight inside an autocast region (the engine's bf16 mode)."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if t is not None and t.dtype in (torch.float32, torch.float16,  # noqa: E731
                                                                torch.bfloat16) else t
    return cast(x), cast(weight), cast(bias)


# Rows up to which the cpp kernel runs its own GEMV (csrc/cpu/linear.cpp, kGemvRows):
# a prepacked weight would send those to oneDNN, which is slower there.
GEMV_ROWS = {torch.float32: 4, torch.bfloat16: 2}


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A copy of ``weight`` (N, K) in oneDNN's blocked layout for inputs of about
    ``rows`` rows (M), for ``linear(..., packed=)``; None where the native kernel or
    oneDNN is not built, for float64/float16 or GPU weights, or for bfloat16 on a CPU
    without oneDNN's bf16 path.

    Why: oneDNN reorders a plain weight into that layout on every call. Measured on
    a DiT-S/2 step (weights from DRAM): 4-13% of each token GEMM, ~2 ms of a 44 ms
    compiled fp32 step. The copy is taken now and does not follow later updates of
    ``weight``: it is for frozen inference weights (the Engine packs only where it
    freezes anyway).
    """
    if (_DIRECT is None or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            or not _onednn.available() or weight.device.type != "cpu"
            or weight.dtype not in GEMV_ROWS or weight.dim() != 2 or min(weight.shape) == 0
            or _onednn.bf16_reason(weight) is not None):
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(int(rows), 1))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str = "none", backend: str | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x W^T + b)``: ``F.linear`` (then a GELU) through flashcore's backend table.

    Args:
        x: (..., K), at least one dimension.
        weight: (N, K), same dtype and device as ``x``.
        bias: (N,) or None, same dtype and device.
        activation: "none", "gelu" (erf) or "gelu_tanh" (the tanh approximation).
        backend: ``reference``/``cpp``/``onednn``/``auto`` or None (context, env, auto); see
            ``flashcore.ops``. With ``backend="cpp"`` given explicitly and no gradient to
            record, the native kernel is called straight, without the Python layers of
            the ``flashcore::linear`` op around it (~17 us a call, the price of a small
            GEMM); the Engine's linear layers run this way.
        packed: ``pack_weight(weight, rows)``, or None. Used on that same direct path
            when x has more than ``GEMV_ROWS`` rows; every other path reads ``weight``.
    Returns:
        (..., N) in the dtype of ``x`` (the autocast dtype inside an autocast region).
    """
    _checks.tensor(OP, "x", x)
    _checks.tensor(OP, "weight", weight, ndim=2)
    if bias is not None:
        _checks.tensor(OP, "bias", bias, ndim=1)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension (..., K), got a scalar")
    # (traced, the fake of a oneDNN-layout tensor reports a strided layout: checked in eager only)
    if packed is not None and not ((packed.is_mkldnn or torch.compiler.is_compiling())
                                   and packed.shape == weight.shape and packed.dtype == weight.dtype):
        raise ValueError(f"{OP}: packed must come from pack_weight(weight, rows): a oneDNN-layout tensor of "
                         f"weight's shape and dtype, got {packed.layout} {tuple(packed.shape)} {packed.dtype}")
    x, weight, bias = _autocast(x, weight, bias)
    if packed is not None and packed.dtype != weight.dtype:
        packed = None                                                   # autocast cast the weight: a new copy
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{OP}: {name} must match x in dtype and device "
                             f"({t.dtype}/{t.device} vs {x.dtype}/{x.device})")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{OP}: x has {x.shape[-1]} features (last dim of {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects K = {k}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"{OP}: bias has {bias.shape[0]} elements but weight {tuple(weight.shape)} "
                         f"has N = {n} outputs")
    if (backend == _DIRECT_BACKEND and _DIRECT is not None
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and x.device.type == _DIRECT_DEVICE and _DIRECT.supports(x, weight, bias, activation) is None):
        if packed is not None and x.numel() > GEMV_ROWS[x.dtype] * k:
            weight = packed
        return _DIRECT.impl(x, weight, bias, activation)                 # the row: the native op, no wrapper
    return _linear_op(x, weight, bias, activation, backend or "")
