"""The native CPU extension ``flashcore._C``: is a kernel built, and a row that calls it.

The extension declares its schemas under ``torch.ops.flashcore_C`` (csrc/registration.cpp)
and implements them for the CPU in csrc/cpu/<op>.cpp. It is optional: an install
without a compiler runs the references. Which inputs a "cpp" row takes is declared by
its op (``ops/<op>.py``), not here.
"""
from __future__ import annotations

import torch

from ._rows import Row

try:
    from .. import _C  # noqa: F401  - loading the library runs its registrations
    _LOADED = True
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _LOADED = False


def has_kernel(name: str) -> bool:
    """Is ``flashcore_C::<name>`` compiled into the extension, with a CPU kernel?"""
    if not _LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"flashcore_C::{name}", "CPU")
    except RuntimeError:  # schema not declared in this build
        return False


def _missing(name: str):
    def impl(*args, **kwargs):
        raise RuntimeError(f"flashcore_C::{name} is not built")
    return impl


def row(name: str, supports) -> Row:
    """The "cpp" row calling ``torch.ops.flashcore_C.<name>`` with the op's own arguments;
    available when that kernel is built (asked once: a build does not change)."""
    built = has_kernel(name)
    impl = getattr(torch.ops.flashcore_C, name).default if built else _missing(name)
    return Row(impl, (lambda: built), supports, "cpu")


# How flashcore/export.py writes each public op into an exported graph (docs/deploy.md):
# ``native`` as the ``flashcore_C::`` op of the same contract (its schema and CPU kernel
# live in the C++ library, so an AOTInductor package runs without Python), ``reference``
# as its PyTorch reference (standard ops: ONNX). Both take the public op's arguments,
# the trailing ``backend`` string included (an artifact has one backend per format).
EXPORT: dict = {}


def export_rule(public: str, native_name: str, native, reference, fake=None) -> None:
    """Declare how ``flashcore::<public>`` is exported; ``fake`` (the native op's
    arguments in, empty outputs out) lets export trace the native op."""
    EXPORT[public] = (native_name, native, reference)
    if fake is not None and has_kernel(native_name):
        torch.library.register_fake(f"flashcore_C::{native_name}")(fake)
