"""Fused sampler update (flashcore.ops.sampler_step) against the eager reference,
torch.compile of the reference, and this machine's copy bandwidth.

Two variants: the teacher's first step (CFG combine + noise correction + clip:
reads x_t, eps_c, eps_u, x_T, writes x_s, x0) and the student's step (no CFG, no
correction: reads x_t, eps_c, writes x_s, x0). GB/s counts bytes read plus
written at a >= 64 MB size, against a preallocated copy of the same footprint
measured in the same run; the models' real latents are reported in
microseconds per call, where call overhead, not bandwidth, decides.

Each flashcore backend is timed twice: ``flashcore-<b>`` allocates x_s and x0
on every call (like eager), ``flashcore-<b>-out`` writes them into buffers
allocated once (``out=``), as a sampler loop does.

    python bench/bench_sampler_step.py [--quick] [--providers eager,flashcore]
"""
from __future__ import annotations

import sys

import torch

from flashcore import benchmarking as B
from flashcore.ops import sampler_step, sampler_step_ref

NAME = "sampler_step"
TITLE = "Fused sampler update (CPU)"
# the shipped models' latents: DiT latent at batch 1 and 8, the MNIST eval batch
LATENTS = [(1, 4, 32, 32), (8, 4, 32, 32), (128, 1, 28, 28)]
COEF = dict(a_t=0.068, s_t=0.998, a_s=0.55, s_s=0.83)
VARIANTS = {   # name -> (uses eps_u and x_T, tensors read, tensors written)
    "sampler_step": (True, 4, 2),
    "sampler_step.student": (False, 2, 2),
}
NOTES = ("value: GB/s (bytes read + written) at the large size (16 MiB a tensor, under glibc's 32 MiB mmap "
         "threshold: see flashcore.benchmarking.bandwidth_shape), microseconds per call at the latent sizes",
         "copy: dst.copy_(src) into a preallocated dst, measured in the same run at the footprint of the GB/s "
         "rows it is compared with (2x48 MiB for the teacher variant, 2x32 MiB for the student), same byte count",
         "flashcore-<backend>: allocates x_s and x0 on every call; flashcore-<backend>-out: out=(x_s, x0), "
         "buffers allocated once before timing (the sampler loop's use)",
         "eager, compile: the PyTorch reference (allocating)")
PROVIDER_NOTES = {"flashcore-cpp": "allocates outputs each call;", "flashcore-cpp-out": "out= preallocated;"}


def _inputs(shape, dtype, teacher: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4 if teacher else 2)]


def _providers(teacher: bool, xs) -> dict:
    if teacher:
        x_t, e_c, e_u, x_T = xs
        kw = dict(guidance=3.0, noise_correction=True, clip=1.0)
    else:
        (x_t, e_c), e_u, x_T = xs, None, None
        kw = dict(guidance=1.0, noise_correction=False, clip=0.0)
    c = COEF
    args = (c["a_t"], c["s_t"], c["a_s"], c["s_s"], kw["guidance"], kw["noise_correction"], kw["clip"])

    def ref(x_t, e_c, e_u, x_T):
        return sampler_step_ref(x_t, e_c, e_u, x_T, *args)

    compiled = B.compile_fresh(ref)
    provs = {"eager": lambda: ref(x_t, e_c, e_u, x_T), "compile": lambda: compiled(x_t, e_c, e_u, x_T)}
    bufs = (torch.empty_like(x_t), torch.empty_like(x_t))
    for b in B.flashcore_backends("sampler_step", x_t, e_c, e_u, x_T, *args):
        provs[f"flashcore-{b}"] = (lambda b=b: sampler_step(x_t, e_c, eps_u=e_u, x_T=x_T, backend=b, **c, **kw))
        provs[f"flashcore-{b}-out"] = (lambda b=b: sampler_step(x_t, e_c, eps_u=e_u, x_T=x_T, backend=b, out=bufs,
                                                                **c, **kw))
    return provs


def run(quick: bool = False, providers=None, log=None) -> list[dict]:
    rows, copies = [], {}
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    variants = ["sampler_step"] if quick else list(VARIANTS)
    timing = dict(warmup=1, repeats=3, min_sample_ms=0.2) if quick else dict(warmup=3, repeats=25)
    for name in variants:
        teacher, _, n_out = VARIANTS[name]
        for dtype in dtypes:
            # the GB/s size last: 16 MiB a tensor (B.bandwidth_shape): teacher variant 101 MB, student 67 MB
            shapes = B.elementwise_shapes(dtype, LATENTS, quick)
            for shape in shapes:
                xs = _inputs(shape, dtype, teacher)
                rows += B.elementwise_case(name, shape, dtype, xs, n_out, _providers(teacher, xs),
                                           bandwidth=shape == shapes[-1], copies=copies, providers=providers,
                                           timing=timing, log=log, notes=PROVIDER_NOTES)
    return rows


if __name__ == "__main__":
    sys.exit(B.script_main(__name__))
