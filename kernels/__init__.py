"""flashcore's Triton kernels (installed as ``flashcore.triton_kernels``).

One file per op, each reading kernel -> launcher: ``attention`` (FlashAttention-2
forward and backward), ``sampler_step`` (the fused noise-corrected DDIM update),
``srl_loss`` (the Shifted Reconstruction Loss with its gradient, and the
re-noising). The launchers ``<op>_fwd``/``<op>_bwd`` take the arguments of the
op's reference in ``flashcore.ops`` and are the rows of its "triton" backend.

Importing this package imports triton; ``flashcore.ops`` imports it lazily, on
the first Triton call, so a plain ``import flashcore`` stays cheap.
"""
from .attention import attention_bwd, attention_fwd
from .sampler_step import sampler_step_fwd
from .srl_loss import srl_loss_fwd, srl_renoise_fwd

__all__ = ["attention_fwd", "attention_bwd", "sampler_step_fwd", "srl_loss_fwd", "srl_renoise_fwd"]
