"""srl_loss and srl_renoise on every CPU backend: the error rule against the float64
oracle, determinism of the fused sum, opcheck, gradcheck, torch.compile, dispatch and
bad inputs."""
import pytest
import torch

from flashcore import testing
from flashcore.ops.srl_loss import (_srl_loss_op, _srl_renoise_op, srl_loss, srl_loss_ref, srl_renoise,
                                    srl_renoise_ref)

OP, OP_R = "srl_loss", "srl_renoise"
SHAPES = [(1, 1, 7, 9), (2, 3, 16, 16), (3, 4, 33, 17), (5,)]  # odd lengths, batch 1
SMALL = [(1, 3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
A_T, S_T = 0.42, 0.907


def _inputs(shape, dtype, layout="contiguous", n=3):
    ts = [torch.randn(shape).to(dtype) for _ in range(n)]
    if layout == "strided":
        ts = [testing.make_noncontiguous(t) for t in ts]
    elif layout == "permuted":
        ts = [t.t() if t.dim() == 2 else t.transpose(0, -1) for t in ts]
    return ts


def _check_loss(backend, args):
    testing.skip_unless_supported(OP, backend, *args)
    loss, grad = _srl_loss_op(*args, backend)
    ref_loss, ref_grad = srl_loss_ref(*args)
    o_loss, o_grad = srl_loss_ref(*testing.to64(args))
    testing.assert_close_to_oracle(loss, ref_loss, o_loss, name="loss")
    testing.assert_close_to_oracle(grad, ref_grad, o_grad, name="grad_eps")


def _check_renoise(backend, args):
    testing.skip_unless_supported(OP_R, backend, *args)
    x0, noise, a, s = args
    out = srl_renoise(x0, noise, a=a, s=s, backend=backend)
    testing.assert_close_to_oracle(out, srl_renoise_ref(*args), srl_renoise_ref(*testing.to64(args)), name="chi")


@pytest.mark.parametrize("backend,shape", testing.cases(OP, SHAPES, SMALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_matches_oracle(backend, shape, dtype):
    _check_loss(backend, (*_inputs(shape, dtype), A_T, S_T))


@pytest.mark.parametrize("backend,shape", testing.cases(OP, [(3, 4, 33, 17), (1, 70001)], SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["strided", "permuted"])
def test_loss_layouts_match_oracle(backend, shape, dtype, layout):
    _check_loss(backend, (*_inputs(shape, dtype, layout), A_T, S_T))


@pytest.mark.parametrize("backend,shape", testing.cases(OP_R, SHAPES + [(1, 70001)], SMALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "permuted"])
def test_renoise_matches_oracle(backend, shape, dtype, layout):
    _check_renoise(backend, (*_inputs(shape, dtype, layout, n=2), 0.3, 0.954))


def test_loss_does_not_depend_on_thread_count():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    args = (*_inputs((3, 100003), torch.float32), A_T, S_T)   # several fixed chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _srl_loss_op(*args, "cpp")
        torch.set_num_threads(max(2, threads))
        many = _srl_loss_op(*args, "cpp")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_opcheck(backend):
    x, eps, tgt = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    torch.library.opcheck(_srl_loss_op, (x, eps, tgt, A_T, S_T, backend))
    torch.library.opcheck(_srl_renoise_op, (x, eps, 0.3, 0.95, backend))


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_gradcheck(backend):
    x, eps, tgt = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    testing.skip_unless_supported(OP, backend, x, eps, tgt, A_T, S_T)
    assert torch.autograd.gradcheck(lambda x, e, t: srl_loss(x, e, t, a_t=A_T, s_t=S_T, backend=backend),
                                    (x, eps, tgt))
    assert torch.autograd.gradcheck(lambda x, n: srl_renoise(x, n, a=0.3, s=0.95, backend=backend), (x, eps))


def test_compile_matches_eager():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    x, eps, tgt, noise = (torch.randn(2, 4, 8, 8) for _ in range(4))

    def f(x, eps, tgt, noise):
        loss = srl_loss(x, eps, tgt, a_t=A_T, s_t=S_T, backend="cpp")
        return loss, srl_renoise(tgt, noise, a=0.3, s=0.95, backend="cpp")

    for a, b in zip(f(x, eps, tgt, noise), torch.compile(f, fullgraph=True)(x, eps, tgt, noise)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch(monkeypatch):
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    x = torch.randn(3, 5)
    testing.check_dispatch(monkeypatch, OP, lambda backend: srl_loss(x, x, x, a_t=A_T, s_t=S_T, backend=backend))
    testing.check_dispatch(monkeypatch, OP_R, lambda backend: srl_renoise(x, x, a=0.3, s=0.9, backend=backend))


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="eps_s"):
        srl_loss(x, torch.randn(3, 2), x, a_t=A_T, s_t=S_T)
    with pytest.raises(ValueError, match="x0_target"):
        srl_loss(x, x, x.double(), a_t=A_T, s_t=S_T)
    with pytest.raises(ValueError, match="x_t"):
        srl_loss([1.0], x, x, a_t=A_T, s_t=S_T)
    with pytest.raises(ValueError, match="s_t"):
        srl_loss(x, x, x, a_t=A_T, s_t=float("nan"))
    with pytest.raises(ValueError, match="a_t"):
        srl_loss(x, x, x, a_t=-1.0, s_t=S_T)
    with pytest.raises(ValueError, match="noise"):
        srl_renoise(x, torch.randn(2, 4), a=0.3, s=0.9)
    with pytest.raises(ValueError, match="s must be finite"):
        srl_renoise(x, x, a=0.3, s=float("inf"))


def test_native_checks_raise_not_crash():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="srl_loss: x0_target has shape"):
        torch.ops.flashcore_C.srl_loss(x, x, torch.randn(3), A_T, S_T)
    with pytest.raises(RuntimeError, match="srl_loss: eps_s has dtype"):
        torch.ops.flashcore_C.srl_loss(x, x.double(), x, A_T, S_T)
    with pytest.raises(RuntimeError, match="srl_loss: a_t must be finite"):
        torch.ops.flashcore_C.srl_loss(x, x, x, float("inf"), S_T)
    with pytest.raises(RuntimeError, match="srl_renoise: noise has shape"):
        torch.ops.flashcore_C.srl_renoise(x, torch.randn(3), 0.3, 0.9)
    with pytest.raises(RuntimeError, match="srl_renoise: a must be finite"):
        torch.ops.flashcore_C.srl_renoise(x, x, float("nan"), 0.9)


# ------------------------------------------------------------- backward path --

@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_backward_is_the_saved_gradient_scaled(backend, dtype, weight):
    """``loss.backward()`` (g == 1) hands back the forward's gradient; a weighted loss
    scales it; a retained graph gives the same gradient twice (nothing scaled in place)."""
    x, tgt = _inputs((3, 4, 33, 17), dtype, n=2)
    eps = torch.randn(3, 4, 33, 17).to(dtype).requires_grad_()
    testing.skip_unless_supported(OP, backend, x, eps, tgt, A_T, S_T)
    _, grad = _srl_loss_op(x, eps.detach(), tgt, A_T, S_T, backend)
    loss = srl_loss(x, eps, tgt, a_t=A_T, s_t=S_T, backend=backend) * weight
    (g1,) = torch.autograd.grad(loss, eps, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, eps)
    expect = grad if weight == 1.0 else grad * torch.tensor(weight, dtype=loss.dtype)
    torch.testing.assert_close(g1, expect, rtol=0, atol=0)
    torch.testing.assert_close(g2, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_backward_to_every_input(backend):
    x, eps, tgt = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    testing.skip_unless_supported(OP, backend, x, eps, tgt, A_T, S_T)
    (srl_loss(x, eps, tgt, a_t=A_T, s_t=S_T, backend=backend) * 2.5).backward()
    ref = ((x - S_T * eps) / A_T - tgt).square().mean() * 2.5
    gx, ge, gt = torch.autograd.grad(ref, (x, eps, tgt))
    for got, want in ((x.grad, gx), (eps.grad, ge), (tgt.grad, gt)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_backward_compile_fullgraph_matches_eager():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    x, tgt = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    def f(x, eps, tgt):
        return srl_loss(x, eps, tgt, a_t=A_T, s_t=S_T, backend="cpp")

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        for weight in (1.0, 0.3):   # g == 1 and a weighted loss (the distillation sum)
            grads.append(torch.autograd.grad(fn(x, eps, tgt) * weight, eps)[0])
    for a, b in zip(grads[:2], grads[2:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# Triton only (appended by the GPU-kernel work): several programs of the interpreter's
# 1024-wide tile, each writing two 512-element partial sums, the last one ragged.
@pytest.mark.skipif("triton" not in testing.cpu_backends(OP), reason="the triton row runs here only interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_several_programs(dtype):
    _check_loss("triton", (*_inputs((3, 1001), dtype), A_T, S_T))
    _check_renoise("triton", (*_inputs((3, 1001), dtype, n=2), 0.3, 0.954))
