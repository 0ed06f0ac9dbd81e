"""flashcore's ops: one contract each, one backend table each (docs/ops.md).

``attention``, ``linear``, ``sampler_step``, ``srl_loss`` (and ``srl_renoise``)
are the public functions; ``<op>_ref`` are the PyTorch references (the oracle). The
backend is chosen per call (see ``_dispatch``): ``backend=`` argument, then
``use_backend(...)``, then ``FLASHCORE_BACKEND``, then auto. ``backends_for(op, *args)``
says which backends would take given inputs.

Every public module of this package is one op: importing it declares its backend
rows, and the names in its ``__all__`` are this package's.
"""
import importlib
import pkgutil

from ._dispatch import BACKENDS, backends_for, register, use_backend

__all__ = ["BACKENDS", "backends_for", "register", "use_backend"]

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in _module.__all__:
            globals()[_name] = getattr(_module, _name)
        __all__ += _module.__all__
del _info, _module, _name
