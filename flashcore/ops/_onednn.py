"""The ``onednn`` row of the ``linear`` op: PyTorch's own oneDNN inner product.

``torch.ops.mkldnn._linear_pointwise(x, W, b, attr, scalars, algorithm)`` is the
call inductor emits for linear layers with frozen weights; here it runs on
ordinary (non-constant) weights, which inductor itself refuses to lower, so it
sits behind ``flashcore::linear``. ``attr`` is a oneDNN post-op: "none", or
"gelu" with algorithm "none" (erf) or "tanh".

What the row takes (anything else falls back to the reference, see ``_dispatch``):
CPU tensors, float32 or bfloat16 (float64 and float16 are refused by oneDNN's
inner product here), K > 0 and N > 0, torch built with oneDNN. Any strides:
the input is flattened to (M, K) (a copy only when the view cannot be made) and
``_linear_pointwise`` makes it contiguous itself; a weight or bias that is not
contiguous is copied here first, because the call hands the bias's storage to
oneDNN as if it were dense (an expanded bias was read past its end, a stepped
one gave wrong sums) and its strided weight path is not a documented contract.
"""
from __future__ import annotations

import functools

import torch

from . import _dispatch

# flashcore activation -> (oneDNN post-op attr, algorithm)
_POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


@functools.cache          # a property of the torch build, asked on every call otherwise
def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear(x, weight, bias, activation):
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


_dispatch.register("linear", "onednn", _linear, available=_available,
                   supports=_dispatch.cpu_linear_supports("onednn"))
