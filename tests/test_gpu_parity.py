"""On a CUDA GPU: the Triton and the CUDA C++ kernels against each other and the reference.

Skipped on machines without a GPU (all of flashcore's CI so far); see docs/gpu.md.
Error rule for attention (FlashAttention's): error against the float64 oracle at most
twice that of the reference run in the input precision, plus a small atol.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flashcore.ops as ops

pytestmark = [pytest.mark.requires_cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_BACKENDS = ("triton", "cuda")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _backend(name: str) -> str:
    if name not in ops.backends_for("attention"):
        pytest.skip(f"{name} backend not built on this GPU machine")
    return name


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 128, 64), (1, 4, 257, 40), (2, 2, 100, 80), (1, 2, 65, 128),
                                   (1, 1, 1, 64)], ids=lambda s: "x".join(map(str, s)))
def test_attention_forward_backward(backend, dtype, shape):
    backend = _backend(backend)
    B, H, N, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N + 7 * i, D, device="cuda", generator=g).to(dtype) for i in (0, 1, 1))
    do = torch.randn(B, H, N, D, device="cuda", generator=g).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings():
        # a silent fallback to the reference would prove nothing
        warnings.filterwarnings("error", message="flashcore", category=RuntimeWarning)
        out = ops.attention(*leaves, backend=backend)
        out.backward(do)
    oracle = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = ops.attention_ref(*oracle, D ** -0.5)[0]
    out64.backward(do.double())
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    out_low = ops.attention_ref(*low, D ** -0.5)[0]
    out_low.backward(do)
    assert _err(out, out64) <= 2 * _err(out_low, out64) + ATOL[dtype]
    for a, o, lo in zip(leaves, oracle, low):
        assert _err(a.grad, o.grad) <= 2 * _err(lo.grad, o.grad) + ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_and_cuda_attention_agree(dtype):
    for b in GPU_BACKENDS:
        _backend(b)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 4, 333, 80, device="cuda", generator=g).to(dtype) for _ in range(3))
    a = ops.attention(q, k, v, backend="triton")
    b = ops.attention(q, k, v, backend="cuda")
    ref = ops.attention_ref(q.double(), k.double(), v.double(), 80 ** -0.5)[0]
    assert _err(a, b) <= _err(a, ref) + _err(b, ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_ops(backend, dtype):
    backend = _backend(backend)
    g = torch.Generator(device="cuda").manual_seed(2)
    xt, ec, eu, xT = (torch.randn(3, 4, 33, 31, device="cuda", generator=g).to(dtype) for _ in range(4))
    kw = dict(a_t=0.3, s_t=0.95, a_s=0.7, s_s=0.71, guidance=3.0, clip=1.0)
    for nc in (False, True):
        got = ops.sampler_step(xt, ec, eps_u=eu, x_T=xT, noise_correction=nc, backend=backend, **kw)
        want = ops.sampler_step(xt, ec, eps_u=eu, x_T=xT, noise_correction=nc, backend="reference", **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=ATOL[dtype] * 8, rtol=ATOL[dtype] * 8)
    es = ec.clone().requires_grad_()
    loss = ops.srl_loss(xt, es, xT, a_t=0.4, s_t=0.9, backend=backend)
    loss.backward()
    es_ref = ec.clone().requires_grad_()
    want = ops.srl_loss(xt, es_ref, xT, a_t=0.4, s_t=0.9, backend="reference")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(es.grad, es_ref.grad, rtol=ATOL[dtype] * 8, atol=ATOL[dtype] * 8)
    chi = ops.srl_renoise(xt, ec, a=0.3, s=0.8, backend=backend)
    torch.testing.assert_close(chi, ops.srl_renoise(xt, ec, a=0.3, s=0.8, backend="reference"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sampler_step_captures_in_a_cuda_graph(backend):
    backend = _backend(backend)
    xt, ec, xT = (torch.randn(4, 4, 32, 32, device="cuda") for _ in range(3))
    step = lambda: ops.sampler_step(xt, ec, x_T=xT, a_t=0.1, s_t=0.99, a_s=0.5, s_s=0.86,   # noqa: E731
                                    noise_correction=True, backend=backend)
    step()                                             # compile/tune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    xt.copy_(torch.randn_like(xt))
    graph.replay()
    torch.cuda.synchronize()
    want = ops.sampler_step(xt, ec, x_T=xT, a_t=0.1, s_t=0.99, a_s=0.5, s_s=0.86, noise_correction=True,
                            backend="reference")
    torch.testing.assert_close(out[0], want[0])
