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


# ---------------------------------------------------------------------------------------
# The backward of every op on the GPU rows, the attention layout the models hand over,
# and the engine on cuda against the engine on the CPU. Which row ran is observed with
# flashcore.testing.spy_backends: a silent fallback to the reference would prove nothing.

def _ran(calls: list[str], backend: str) -> None:
    assert backend in calls and "reference" not in calls, calls


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_step_backward(backend, dtype, monkeypatch):
    from flashcore.testing import spy_backends
    backend = _backend(backend)
    calls = spy_backends(monkeypatch, "sampler_step")
    g = torch.Generator(device="cuda").manual_seed(3)
    base = [torch.randn(2, 4, 17, 9, device="cuda", generator=g).to(dtype) for _ in range(4)]
    go = [torch.randn(2, 4, 17, 9, device="cuda", generator=g).to(dtype) for _ in range(2)]
    kw = dict(a_t=0.3, s_t=0.95, a_s=0.7, s_s=0.71, guidance=3.0, clip=1.0, noise_correction=True)
    grads = {}
    for b in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in base]
        xs, x0 = ops.sampler_step(leaves[0], leaves[1], eps_u=leaves[2], x_T=leaves[3], backend=b, **kw)
        torch.autograd.backward((xs, x0), go)
        grads[b] = [t.grad for t in leaves]
        if b == backend:
            _ran(calls, backend)
    for a, r in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, r, atol=ATOL[dtype] * 8, rtol=ATOL[dtype] * 8)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_srl_renoise_backward(backend, dtype, monkeypatch):
    from flashcore.testing import spy_backends
    backend = _backend(backend)
    calls = spy_backends(monkeypatch, "srl_renoise")
    g = torch.Generator(device="cuda").manual_seed(4)
    x0, noise, go = (torch.randn(3, 4, 16, 16, device="cuda", generator=g).to(dtype) for _ in range(3))
    grads = {}
    for b in (backend, "reference"):
        leaves = [x0.clone().requires_grad_(), noise.clone().requires_grad_()]
        ops.srl_renoise(*leaves, a=0.3, s=0.8, backend=b).backward(go)
        grads[b] = [t.grad for t in leaves]
        if b == backend:
            _ran(calls, backend)
    for a, r in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_attention_takes_the_processors_strided_layout(dtype, monkeypatch):
    """flashcore's diffusers processor hands over (B, N, H*D) projections viewed as
    (B, H, N, D): Triton runs them as they are (forward and backward); the CUDA C++ row
    declines them (dense inputs only), so inside a model auto picks Triton."""
    from flashcore.testing import spy_backends
    _backend("triton")
    calls = spy_backends(monkeypatch, "attention")
    calls_bwd = spy_backends(monkeypatch, "attention_bwd")
    B, N, H, D = 2, 197, 16, 72                      # DiT-XL/2's heads, an odd token count
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", generator=g).to(dtype)
    q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
    assert not q.is_contiguous() and ops.backends_for("attention", q, k, v, D ** -0.5)[0] == "triton"
    assert "cuda" not in ops.backends_for("attention", q, k, v, D ** -0.5)
    do = torch.randn(B, H, N, D, device="cuda", generator=g).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves)                      # auto
    out.backward(do)
    _ran(calls, "triton")
    _ran(calls_bwd, "triton")
    oracle = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = ops.attention_ref(*oracle, D ** -0.5)[0]
    out64.backward(do.double())
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_low = ops.attention_ref(*low, D ** -0.5)[0]
    out_low.backward(do)
    assert _err(out, out64) <= 2 * _err(out_low, out64) + ATOL[dtype]
    for a, o, lo in zip(leaves, oracle, low):
        assert _err(a.grad, o.grad) <= 2 * _err(lo.grad, o.grad) + ATOL[dtype]


@pytest.fixture
def no_tf32():
    """fp32 means fp32 here: cuDNN convolutions default to TF32 (10-bit mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# (arch, dtype on cuda, compiled): eager and compiled (CUDA graphs, and frozen bf16
# weights), both architectures, every dtype the engine takes on a GPU
ENGINE_CASES = [("dit", torch.float32, False), ("dit", torch.bfloat16, True), ("unet", torch.float32, True),
                ("dit", torch.float16, False)]


@pytest.mark.parametrize("arch,dtype,compiled", ENGINE_CASES,
                         ids=[f"{a}-{str(d)[6:]}-{'compiled' if c else 'eager'}" for a, d, c in ENGINE_CASES])
def test_engine_on_cuda_matches_the_engine_on_cpu(arch, dtype, compiled, no_tf32, monkeypatch):
    """The same model, noise and labels: 3 CFG steps on cuda against the eager CPU engine,
    both against a float64 oracle (sampler.sample on a float64 copy). FlashAttention's rule:
    the cuda run may err at most twice as much as the CPU run of the same precision
    (float16 against CPU bfloat16, which has 3 fewer mantissa bits), plus a small atol
    relative to the output's scale (x0 reaches ~1e2: 1 / a_t at t = T amplifies)."""
    import copy

    from _fixtures import TINY_DIT, TINY_UNET
    from flashcore.engine import Engine
    from flashcore.models import Denoiser
    from flashcore.sampler import sample
    from flashcore.schedule import NoiseSchedule
    from flashcore.testing import spy_backends
    torch.manual_seed(0)
    model = Denoiser(TINY_DIT if arch == "dit" else TINY_UNET).eval()
    sch, labels = NoiseSchedule(), torch.tensor([0, 3, 7])
    shape = (model.cfg.channels, model.cfg.sample_size, model.cfg.sample_size)
    x_T = torch.randn((3,) + shape, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=3, guidance=2.0)
    oracle = sample(copy.deepcopy(model).double(), labels, schedule=sch, shape=shape, x_T=x_T.double(), **kw)
    cpu_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    cpu = Engine(model, sch, dtype=cpu_dtype, compile=False, **kw).sample(labels, x_T=x_T)
    calls = spy_backends(monkeypatch, "attention")
    eng = Engine(copy.deepcopy(model).cuda(), sch, dtype=dtype, compile=compiled, **kw)
    assert eng.device.type == "cuda" and eng.resolved.cuda_graphs == compiled
    out = eng.sample(labels, x_T=x_T)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    _ran(calls, "triton")                              # flashcore's attention ran on the GPU row
    again = eng.sample(labels, x_T=x_T)                # a second call: replayed graphs, same result
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    scale = oracle.abs().max().item()
    err_cpu = (cpu.double() - oracle).abs().max().item()
    err = (out.cpu().double() - oracle).abs().max().item()
    atol = (1e-6 if dtype == torch.float32 else 1e-3) * scale
    assert 0 < err_cpu and err <= 2 * err_cpu + atol, (err, err_cpu, atol)
