"""PyTorch's own oneDNN (``torch.ops.mkldnn``), the "onednn" backend: no code of ours,
so only the question whether this torch build has it. The rows that call it are
declared by their ops (today ``linear``)."""
from __future__ import annotations

import torch

# Both are properties of the torch build and the CPU, asked once at import: asked per
# call they would also be traced by torch.compile, which refuses to trace
# torch.backends.mkldnn.is_available (a skipped function) and so breaks a fullgraph
# compile of anything that dispatches through linear.
_AVAILABLE = bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_BF16 = _AVAILABLE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
_BF16_WHY = f"bfloat16 needs oneDNN's AVX-512 bf16 path, and this CPU has {torch.backends.cpu.get_cpu_capability()}"


def available() -> bool:
    return _AVAILABLE


def bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU. It needs AVX-512 (BW, VL, DQ) or
    AVX-NE-CONVERT; on an AVX2-only CPU (AMD Zen 3, most small x86 boards) it refuses
    to create the primitive ("could not create a primitive descriptor")."""
    return _BF16


def bf16_reason(*tensors) -> str | None:
    """``supports`` check of a row that runs bfloat16 through oneDNN: a reason when a
    bfloat16 tensor meets a CPU without oneDNN's bf16 path, else None."""
    if any(t is not None and t.dtype == torch.bfloat16 for t in tensors) and not bf16_native():
        return _BF16_WHY
    return None
