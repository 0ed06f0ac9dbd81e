"""The CUDA C++ extension ``flashcore._C_cuda``: is a kernel built, and a row that calls it.

Built only where setup.py found a CUDA torch and toolkit (csrc/cuda). Importing it
(after ``flashcore._C``, which declares the schemas) registers its kernels under
``torch.ops.flashcore_C`` for the CUDA dispatch key. A row is available when its kernel
is built and a GPU is present; which inputs it takes is declared by its op.
"""
from __future__ import annotations

import torch

from ._rows import Row

try:
    from .. import _C  # noqa: F401  - declares the schemas
    from .. import _C_cuda  # noqa: F401
    _LOADED = True
except ImportError:
    _LOADED = False


def has_kernel(name: str) -> bool:
    """Is ``flashcore_C::<name>`` compiled with a CUDA kernel?"""
    if not _LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"flashcore_C::{name}", "CUDA")
    except RuntimeError:
        return False


def row(name: str, supports) -> Row:
    """The "cuda" row calling ``torch.ops.flashcore_C.<name>`` with the op's own arguments."""
    built = has_kernel(name)

    def impl(*args):
        return getattr(torch.ops.flashcore_C, name)(*args)

    return Row(impl, lambda: built and torch.cuda.is_available(), supports, "cuda")
