"""A diffusers attention processor whose attention core is ``flashcore.ops.attention``.

It keeps diffusers' ``Attention`` module as it is (projections, norms,
residual, rescale) and replaces only the softmax(q k^T) v in the middle, so a
diffusers model runs flashcore's kernels through the public processor API
(``model.set_attn_processor(FlashcoreAttnProcessor())``).

Fused projections: when the module carries ``to_qkv`` with ``fused_projections``
set (diffusers' ``Attention.fuse_projections()``, or the engine's frozen copy,
``flashcore/engine/linear.py``), self-attention runs one (..., 3C) GEMM instead of
three and splits the result; cross-attention still uses ``to_q``/``to_k``/``to_v``.
"""
from __future__ import annotations

import torch

from ..ops import attention


class FlashcoreAttnProcessor:
    """Self- and cross-attention without masks (the models flashcore ships use none)."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("FlashcoreAttnProcessor: attention masks are not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:                                                         # (B, C, H, W) -> (B, HW, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        if encoder_hidden_states is None and getattr(attn, "fused_projections", False) \
                and getattr(attn, "to_qkv", None) is not None:
            sizes = (attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features)
            q, k, v = attn.to_qkv(hidden_states).split(sizes, dim=-1)     # views of (B, N, 3 H*D)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)  # (B, N, H*D)
        bsz, heads = q.shape[0], attn.heads
        d = k.shape[-1] // heads
        q = q.view(bsz, -1, heads, d).transpose(1, 2)                      # (B, H, N, D)
        k = k.view(bsz, -1, heads, d).transpose(1, 2)
        v = v.view(bsz, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        # the kernels read one dtype: under autocast the projections may differ
        k, v = k.to(q.dtype), v.to(q.dtype)
        out = attention(q, k, v, scale=attn.scale, backend=self.backend)   # (B, H, N, D)
        out = out.transpose(1, 2).reshape(bsz, -1, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
