"""Attention forward: flashcore against the eager matmul-softmax-matmul reference,
torch.compile of it, and torch.nn.functional.scaled_dot_product_attention.

DiT-S/2 heads (H = 6, D = 64) at 256 tokens (a 32x32x4 latent, patch 2) and
1024 tokens, batch 1 (and 8 for the batched student step), fp32 and bf16.
GFLOP/s counts 4 B H N^2 D for the forward (two matmuls, 2 FLOPs a MAC).

    python bench/bench_attention.py [--quick] [--providers eager,sdpa,flashcore]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from flashcore import benchmarking as B
from flashcore.ops import attention, attention_ref

NAME = "attention"
TITLE = "Attention forward (CPU)"
SHAPES = [(1, 6, 256, 64), (1, 6, 1024, 64), (8, 6, 256, 64)]   # (B, H, N, D)
NOTES = ("value: GFLOP/s, 4 B H N^2 D per forward",
         "sdpa: torch.nn.functional.scaled_dot_product_attention with PyTorch's CPU kernel choice")


def _providers(q, k, v) -> dict:
    scale = q.shape[-1] ** -0.5

    def ref(q, k, v):
        return attention_ref(q, k, v, scale)[0]

    compiled = B.compile_fresh(ref)
    provs = {"eager": lambda: ref(q, k, v), "compile": lambda: compiled(q, k, v),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    for b in B.flashcore_backends("attention", q, k, v, scale):
        provs[f"flashcore-{b}"] = (lambda b=b: attention(q, k, v, backend=b))
    return provs


def run(quick: bool = False, providers=None, log=None) -> list[dict]:
    shapes = SHAPES[:1] if quick else SHAPES
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    timing = dict(warmup=1, repeats=3, min_sample_ms=0.2) if quick else dict(warmup=3, repeats=25)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            b, h, n, d = shape
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
            rows += B.bench_case("attention", shape, dtype, _providers(q, k, v), unit="GFLOP/s",
                                 work=4.0 * b * h * n * n * d, providers=providers, timing=timing, log=log)
    return rows


if __name__ == "__main__":
    sys.exit(B.script_main(__name__))
