"""Route a model's ``nn.Linear`` layers through ``flashcore.ops.linear``.

Why: in float32 PyTorch's linear layers run on MKL, the slow GEMM on this AMD
CPU; ``flashcore.ops.linear`` picks oneDNN on CPU tensors (see
``flashcore/ops/linear.py``). The transform swaps modules, never parameters:
each ``FlashcoreLinear`` holds the very ``Parameter`` objects of the layer it
replaces, under the same names, so ``state_dict`` keys are unchanged,
checkpoints load either way and optimiser state still points at the weights.

diffusers' feed-forward ``GELU`` module (``proj`` Linear, then ``F.gelu``) is
swapped as a whole for ``FlashcoreGELU``, which runs the GELU as oneDNN's
post-op on the GEMM output; its child is still called ``proj``.

Left alone: subclasses of ``nn.Linear`` (their forward may differ; e.g.
``nn.MultiheadAttention``'s ``out_proj`` is never called as a module),
parametrised layers (weight norm) and layers with forward hooks.

Fused QKV (``fuse_qkv=True``, off by default): a self-attention's ``to_q``,
``to_k``, ``to_v`` read the same input, so one GEMM against the stacked (3C, K)
weight replaces three (DiT-S/2, M = 256 tokens, one thread: 1.15 -> 1.04 ms a
block, two fewer op calls). oneDNN needs that weight in one tensor, so it is a
copy: a non-persistent buffer taken when the transform runs, which does not
follow later updates of the model's weights. That breaks the promise above
(in-place updates reach the copy), and no cheap check can restore it: in-place
writes through ``.data`` leave the version counter alone, and re-stacking on
every call costs more than the fusion saves. So it is for frozen inference
weights only; the Engine turns it on only where it already keeps the weights of
its first call (compiled with ``freeze``). Parameters, ``state_dict`` keys and
the unfused ``to_q``/``to_k``/``to_v`` (still used for cross-attention) are
unchanged; ``FlashcoreAttnProcessor`` reads ``to_qkv``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ops
from ..models.attention_processor import FlashcoreAttnProcessor
from ..ops.linear import GEMV_ROWS, pack_weight

_GELU_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}      # diffusers' ``approximate`` -> ops.linear


class FlashcoreLinear(nn.Module):
    """``nn.Linear``'s forward through ``flashcore.ops.linear``, on shared parameters
    (or, given plain tensors, on non-persistent buffers: the fused QKV copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 backend: str | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, nn.Parameter):
            self.weight = weight
            self.register_parameter("bias", bias)
        else:
            self.register_buffer("weight", weight, persistent=False)
            self.register_buffer("bias", bias, persistent=False)
        self.activation, self.backend = activation, backend
        self.register_buffer("packed", None, persistent=False)      # oneDNN-layout copy: pack_linear_weights

    @classmethod
    def from_linear(cls, lin: nn.Linear, activation: str = "none", backend: str | None = None):
        return cls(lin.weight, lin.bias, activation, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, activation=self.activation, backend=self.backend,
                          packed=self.packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")


class FlashcoreGELU(nn.Module):
    """diffusers' ``GELU`` (Linear ``proj`` then GELU) as one fused op; same child name."""

    def __init__(self, proj: FlashcoreLinear):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _swappable(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and not parametrize.is_parametrized(m)
            and not (m._forward_hooks or m._forward_pre_hooks))


def _diffusers_gelu():
    try:
        from diffusers.models.activations import GELU
    except ImportError:  # pragma: no cover - diffusers is a dependency; keep the transform usable without it
        return None
    return GELU


def _fusable_self_attention(m: nn.Module) -> bool:
    """A diffusers ``Attention`` run by flashcore's processor (which reads ``to_qkv``),
    not cross-attention, not fused already, with three plain projections that agree."""
    if not (isinstance(getattr(m, "processor", None), FlashcoreAttnProcessor)
            and getattr(m, "is_cross_attention", True) is False and not getattr(m, "fused_projections", False)):
        return False
    projs = [getattr(m, n, None) for n in ("to_q", "to_k", "to_v")]
    if not all(p is not None and _swappable(p) for p in projs):
        return False
    ref = projs[0].weight
    return all(p.in_features == projs[0].in_features and (p.bias is None) == (projs[0].bias is None)
               and p.weight.dtype == ref.dtype and p.weight.device == ref.device for p in projs)


def _fuse_qkv(attn: nn.Module, backend: str | None) -> None:
    """Give ``attn`` a ``to_qkv`` on stacked copies of its q/k/v weights (see the module docstring)."""
    projs = (attn.to_q, attn.to_k, attn.to_v)
    with torch.no_grad():
        weight = torch.cat([p.weight for p in projs])                               # (3C, K)
        bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])  # (3C,)
    attn.to_qkv = FlashcoreLinear(weight, bias, "none", backend).train(attn.training)
    attn.fused_projections = True


def use_flashcore_linear(model: nn.Module, *, fuse_gelu: bool = True, fuse_qkv: bool = False,
                         backend: str | None = None) -> int:
    """Swap, in place, every plain ``nn.Linear`` under ``model`` (and, with
    ``fuse_gelu``, every diffusers ``GELU`` feed-forward projection) for the
    flashcore modules above. Returns the number of linear layers now routed
    through ``flashcore.ops.linear``. Use ``flashcore_linear_copy`` to leave
    ``model`` itself untouched. ``fuse_qkv`` adds stacked q/k/v copies for
    self-attention: frozen inference weights only (module docstring)."""
    if _swappable(model):
        raise ValueError("use_flashcore_linear: model is itself an nn.Linear; use "
                         "FlashcoreLinear.from_linear(model) instead")
    if fuse_qkv:
        for m in [m for m in model.modules() if _fusable_self_attention(m)]:
            _fuse_qkv(m, backend)
    gelu_cls = _diffusers_gelu() if fuse_gelu else None
    done: dict[int, nn.Module] = {}          # a module shared at two places gets one replacement

    def swap(m: nn.Module) -> nn.Module | None:
        if (gelu_cls is not None and type(m) is gelu_cls and m.approximate in _GELU_ACTIVATION
                and _swappable(m.proj) and not (m._forward_hooks or m._forward_pre_hooks)):
            proj = FlashcoreLinear.from_linear(m.proj, _GELU_ACTIVATION[m.approximate], backend)
            return FlashcoreGELU(proj).train(m.training)
        if _swappable(m):
            return FlashcoreLinear.from_linear(m, "none", backend).train(m.training)
        return None

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if id(child) not in done:
                new = swap(child)
                done[id(child)] = new if new is not None else child
                if new is None:
                    walk(child)
            setattr(parent, name, done[id(child)])

    walk(model)
    return sum(isinstance(m, FlashcoreLinear) for m in model.modules())


def flashcore_linear_copy(model: nn.Module, *, fuse_gelu: bool = True, fuse_qkv: bool = False,
                          backend: str | None = None) -> nn.Module:
    """A copy of ``model``'s module tree with ``use_flashcore_linear`` applied, sharing
    every parameter and buffer with ``model`` (nothing is copied but the module
    objects): in-place weight updates and ``load_state_dict`` on ``model`` reach
    the copy, and ``model`` keeps its own forward. Except with ``fuse_qkv``: the
    stacked q/k/v weights are copies taken now, for frozen inference weights."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo)
    use_flashcore_linear(clone, fuse_gelu=fuse_gelu, fuse_qkv=fuse_qkv, backend=backend)
    return clone


def pack_linear_weights(model: nn.Module, probe) -> int:
    """Give each ``FlashcoreLinear`` under ``model`` that runs on more rows than the
    native GEMV takes, when ``probe()`` runs, a copy of its weight in oneDNN's
    layout (``ops.linear.pack_weight``), so no call reorders it again. Returns the
    number of layers packed. Like the fused q/k/v, the copies are taken now and do
    not follow the model's weights: frozen inference weights only. Layers that ran
    as a GEMV (a conditioning vector at batch <= 4) keep their plain weight only.
    """
    rows: dict[nn.Module, int] = {}

    def seen(mod, args):
        x = args[0]
        rows[mod] = max(rows.get(mod, 0), x.numel() // max(x.shape[-1], 1))

    hooks = [m.register_forward_pre_hook(seen) for m in model.modules() if isinstance(m, FlashcoreLinear)]
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in hooks:
            h.remove()
    n = 0
    for m, r in rows.items():
        if r > GEMV_ROWS.get(m.weight.dtype, r) and (p := pack_weight(m.weight, r)) is not None:
            m.packed = p
            n += 1
    return n
