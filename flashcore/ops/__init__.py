"""flashcore's ops: one contract each, one backend table each.

``attention``, ``linear``, ``sampler_step``, ``srl_loss`` (and ``srl_renoise``)
are the public functions; ``<op>_ref`` are the PyTorch references (the oracle). The
backend is chosen per call (see ``_dispatch``): ``backend=`` argument, then
``use_backend(...)``, then ``FLASHCORE_BACKEND``, then auto.
"""
from ._dispatch import BACKENDS, available_backends, register, use_backend
from .attention import attention, attention_bwd_ref, attention_ref
from .linear import linear, linear_ref
from .sampler_step import sampler_step, sampler_step_ref
from .srl_loss import srl_loss, srl_loss_ref, srl_renoise, srl_renoise_ref
# backend rows: each module registers its rows when its kernels are available
from . import _cuda, _native, _onednn, _triton  # noqa: F401,E402

__all__ = ["BACKENDS", "available_backends", "register", "use_backend", "attention",
           "attention_ref", "attention_bwd_ref", "linear", "linear_ref", "sampler_step",
           "sampler_step_ref", "srl_loss", "srl_loss_ref", "srl_renoise", "srl_renoise_ref"]
