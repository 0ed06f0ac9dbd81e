"""pytest-benchmark suite of the kernels: validate against the reference, then time.

By default the shapes are tiny and each case runs three rounds, so ``pytest -q``
stays fast and only checks that every provider runs and agrees. For numbers,
on a quiet machine:

    FLASHCORE_BENCH_FULL=1 python -m pytest tests/test_bench_kernels.py --benchmark-only \
        --benchmark-columns=median,iqr,min,rounds

which uses bench/'s sizes (the models' latents, a >= 64 MB element-wise size,
DiT-S/2 attention at 256 and 1024 tokens), adds torch.compile of the
reference, and lets pytest-benchmark calibrate the rounds (grouped per op, shape and dtype).
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

from flashcore import benchmarking as B  # noqa: E402
from flashcore.ops import (attention, attention_ref, sampler_step, sampler_step_ref, srl_loss,  # noqa: E402
                           srl_loss_ref)

FULL = os.environ.get("FLASHCORE_BENCH_FULL") == "1"
EW_SHAPES = [(1, 4, 32, 32), (8, 4, 32, 32), (128, 1, 28, 28), (128, 4, 128, 128)] if FULL else [(1, 4, 32, 32)]
ATTN_SHAPES = [(1, 6, 256, 64), (1, 6, 1024, 64)] if FULL else [(1, 2, 64, 32)]
DTYPES = [torch.float32, torch.bfloat16] if FULL else [torch.float32]
C = dict(a_t=0.068, s_t=0.998, a_s=0.55, s_s=0.83)


def _run(benchmark, fn):
    if FULL:
        return benchmark(fn)
    return benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _providers(extra=()):
    # CPU tensors only: the GPU backends have bench/bench_gpu.py
    return ["eager", "flashcore-cpp", *extra] + (["compile"] if FULL else [])


def _case(shape, dtype):
    return f"{'x'.join(map(str, shape))}-{B.dtype_name(dtype)}"


def _pick(op, provider, ref, public, args):
    """The callable for ``provider``, or skip when that backend cannot run these inputs here."""
    if provider == "eager":
        return ref
    if provider == "compile":
        return B.compile_fresh(ref)
    backend = provider.split("-", 1)[1]
    if backend not in B.flashcore_backends(op, *args):
        pytest.skip(f"{backend} backend does not run {op} on these inputs here")
    return lambda *a: public(*a, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=B.dtype_name)
@pytest.mark.parametrize("shape", EW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", _providers())
def test_sampler_step(benchmark, provider, shape, dtype):
    benchmark.group = f"sampler_step {_case(shape, dtype)}"
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]
    kw = dict(guidance=3.0, noise_correction=True, clip=1.0)

    def ref(x_t, e_c, e_u, x_T):
        return sampler_step_ref(x_t, e_c, e_u, x_T, *C.values(), *kw.values())

    def public(x_t, e_c, e_u, x_T, backend):
        return sampler_step(x_t, e_c, eps_u=e_u, x_T=x_T, backend=backend, **C, **kw)

    fn = _pick("sampler_step", provider, ref, public, (*xs, *C.values(), *kw.values()))
    expect = ref(*xs)
    for o, e in zip(fn(*xs), expect):
        torch.testing.assert_close(o.float(), e.float(), **_tol(dtype))
    _run(benchmark, lambda: fn(*xs))


@pytest.mark.parametrize("dtype", DTYPES, ids=B.dtype_name)
@pytest.mark.parametrize("shape", EW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", _providers())
def test_srl_loss(benchmark, provider, shape, dtype):
    benchmark.group = f"srl_loss {_case(shape, dtype)}"
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]

    def ref(x_t, e, tgt):
        return srl_loss_ref(x_t, e, tgt, 0.55, 0.83)[0]

    def public(x_t, e, tgt, backend):
        return srl_loss(x_t, e, tgt, a_t=0.55, s_t=0.83, backend=backend)

    fn = _pick("srl_loss", provider, ref, public, (*xs, 0.55, 0.83))
    torch.testing.assert_close(fn(*xs).float(), ref(*xs).float(), rtol=1e-4, atol=1e-6)
    _run(benchmark, lambda: fn(*xs))


@pytest.mark.parametrize("dtype", DTYPES, ids=B.dtype_name)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", _providers(extra=("sdpa",)))
def test_attention(benchmark, provider, shape, dtype):
    benchmark.group = f"attention {_case(shape, dtype)}"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    scale = shape[-1] ** -0.5

    def ref(q, k, v):
        return attention_ref(q, k, v, scale)[0]

    if provider == "sdpa":
        fn = F.scaled_dot_product_attention
    else:
        fn = _pick("attention", provider, ref, lambda q, k, v, backend: attention(q, k, v, backend=backend),
                   (q, k, v, scale))
    expect = attention_ref(q.float(), k.float(), v.float(), scale)[0]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fn(q, k, v).float(), expect, **tol)
    benchmark.extra_info["gflop"] = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3] / 1e9
    _run(benchmark, lambda: fn(q, k, v))
