"""Shifted Reconstruction Loss (loss + gradient in one pass) and the re-noising
of x0, flashcore against the eager reference and torch.compile of it.

srl_loss reads x_t, eps_S, x0_T and writes the gradient (plus a scalar);
srl_renoise reads x0, eps' and writes chi. GB/s counts bytes read plus written
at a >= 64 MB size, against a preallocated copy of the same footprint measured
in the same run; the training batch latents are reported in microseconds per call.

``srl_loss`` times the forward (the reference computes loss and gradient
explicitly); ``srl_loss.fwd_bwd`` times what training runs, the loss and
``torch.autograd.grad(loss, eps_S)``: eager and compile differentiate the
formula with autograd, flashcore returns the gradient its forward wrote. Its
GB/s counts the same minimal traffic (3 tensors read, 1 written).

    python bench/bench_srl_loss.py [--quick] [--providers eager,flashcore]
"""
from __future__ import annotations

import sys

import torch

from flashcore import benchmarking as B
from flashcore.ops import srl_loss, srl_loss_ref, srl_renoise, srl_renoise_ref

NAME = "srl_loss"
TITLE = "SRL loss + gradient and re-noising (CPU)"
LATENTS = [(1, 4, 32, 32), (8, 4, 32, 32), (128, 1, 28, 28)]
A_T, S_T = 0.55, 0.83
OPS = {"srl_loss": (3, 1), "srl_loss.fwd_bwd": (3, 1), "srl_renoise": (2, 1)}   # tensors read, written
NOTES = ("value: GB/s (bytes read + written) at the large size (16 MiB a tensor, under glibc's 32 MiB mmap "
         "threshold: see flashcore.benchmarking.bandwidth_shape), microseconds per call at the latent sizes",
         "copy: dst.copy_(src) into a preallocated dst, measured in the same run at the footprint of the GB/s "
         "rows it is compared with (2x32 MiB for srl_loss, 2x24 MiB for srl_renoise), same byte count",
         "srl_loss is timed forward only: its fused kernel writes the gradient in the same pass",
         "srl_loss.fwd_bwd: loss + torch.autograd.grad(loss, eps_S); eager/compile through autograd of "
         "mean(((x_t - s_t eps_S) / a_t - x0_T)^2), GB/s over the minimal traffic (3 reads, 1 write)")


def _srl_eager_loss(x_t, eps, tgt):
    """The SRL loss as one writes it in PyTorch; autograd derives its backward."""
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    x0_s = (x_t.to(acc) - S_T * eps.to(acc)) / A_T
    return (x0_s - tgt.to(acc)).square().mean()


def _fwd_bwd(loss_fn, x_t, eps, tgt):
    def run():
        loss = loss_fn(x_t, eps, tgt)
        (grad,) = torch.autograd.grad(loss, eps)
        return loss.detach(), grad
    return run


def _providers(op: str, xs) -> dict:
    if op == "srl_loss.fwd_bwd":
        x_t, eps, tgt = xs
        eps = eps.detach().clone().requires_grad_()
        provs = {"eager": _fwd_bwd(_srl_eager_loss, x_t, eps, tgt),
                 "compile": _fwd_bwd(B.compile_fresh(_srl_eager_loss), x_t, eps, tgt)}
        for b in B.flashcore_backends("srl_loss", x_t, eps, tgt, A_T, S_T):
            provs[f"flashcore-{b}"] = _fwd_bwd(
                lambda a, e, t, b=b: srl_loss(a, e, t, a_t=A_T, s_t=S_T, backend=b), x_t, eps, tgt)
        return provs
    if op == "srl_loss":
        def ref(a, b, c):
            return srl_loss_ref(a, b, c, A_T, S_T)
        public = (lambda b: lambda: srl_loss(*xs, a_t=A_T, s_t=S_T, backend=b))
        args = (*xs, A_T, S_T)
    else:
        def ref(a, b):
            return srl_renoise_ref(a, b, A_T, S_T)
        public = (lambda b: lambda: srl_renoise(*xs, a=A_T, s=S_T, backend=b))
        args = (*xs, A_T, S_T)
    compiled = B.compile_fresh(ref)
    provs = {"eager": lambda: ref(*xs), "compile": lambda: compiled(*xs)}
    for b in B.flashcore_backends(op, *args):
        provs[f"flashcore-{b}"] = public(b)
    if op == "srl_loss":
        # the public op returns the loss only (the gradient is kept for backward): compare the loss
        provs = {k: (lambda f=f, k=k: f() if k.startswith("flashcore") else f()[0]) for k, f in provs.items()}
    return provs


def run(quick: bool = False, providers=None, log=None) -> list[dict]:
    rows, copies = [], {}
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    timing = dict(warmup=1, repeats=3, min_sample_ms=0.2) if quick else dict(warmup=3, repeats=25)
    for op, (n_in, n_out) in OPS.items():
        for dtype in dtypes:
            # the GB/s size last: 16 MiB a tensor (B.bandwidth_shape): srl_loss 67 MB, srl_renoise 50 MB
            shapes = B.elementwise_shapes(dtype, LATENTS, quick)
            for shape in shapes:
                g = torch.Generator().manual_seed(0)
                xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(n_in)]
                rows += B.elementwise_case(op, shape, dtype, xs, n_out, _providers(op, xs),
                                           bandwidth=shape == shapes[-1], copies=copies, providers=providers,
                                           timing=timing, log=log)
    return rows


if __name__ == "__main__":
    sys.exit(B.script_main(__name__))
