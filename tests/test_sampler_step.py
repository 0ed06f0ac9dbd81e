"""sampler_step on every CPU backend: the error rule against the float64 oracle,
opcheck, gradcheck, torch.compile, dispatch and bad inputs."""
import pytest
import torch

from flashcore import testing
from flashcore.ops.sampler_step import _sampler_step_op, _sampler_step_out_op, sampler_step, sampler_step_ref

OP = "sampler_step"
SHAPES = [(1, 1, 7, 9), (2, 3, 16, 16), (3, 4, 33, 17), (5,)]  # odd lengths, batch 1
SMALL = [(1, 3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SCHED = dict(a_t=0.3, s_t=0.954, a_s=0.7, s_s=0.714)
VARIANTS = {  # CFG + noise correction + DDIL clamp (teacher, first step); a student step; CFG only
    "teacher_nc_clip": dict(cfg=True, noise_correction=True, clip=1.0, guidance=4.5),
    "student": dict(cfg=False, noise_correction=False, clip=0.0, guidance=1.0),
    "cfg": dict(cfg=True, noise_correction=False, clip=0.0, guidance=3.0),
}


def _inputs(shape, dtype, layout):
    ts = [torch.randn(shape).to(dtype) for _ in range(4)]             # x_t, eps_c, eps_u, x_T
    if layout == "strided":
        ts = [testing.make_noncontiguous(t) for t in ts]
    elif layout == "permuted":                                        # dense, not contiguous
        ts = [t.t() if t.dim() == 2 else t.transpose(0, -1) for t in ts]
    return ts


def _args(ts, v):
    x, ec, eu, xT = ts
    return (x, ec, eu if v["cfg"] else None, xT if v["noise_correction"] else None,
            SCHED["a_t"], SCHED["s_t"], SCHED["a_s"], SCHED["s_s"], v["guidance"],
            v["noise_correction"], v["clip"])


def _check(backend, args):
    testing.skip_unless_supported(OP, backend, *args)
    x, ec, eu, xT, a_t, s_t, a_s, s_s, w, nc, clip = args
    out = sampler_step(x, ec, eps_u=eu, x_T=xT, a_t=a_t, s_t=s_t, a_s=a_s, s_s=s_s, guidance=w,
                       noise_correction=nc, clip=clip, backend=backend)
    ref = sampler_step_ref(*args)
    oracle = sampler_step_ref(*testing.to64(args))
    for o, r, g, name in zip(out, ref, oracle, ("x_next", "x0")):
        testing.assert_close_to_oracle(o, r, g, name=name)


@pytest.mark.parametrize("backend,shape", testing.cases(OP, SHAPES, SMALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_oracle(backend, shape, dtype, variant):
    _check(backend, _args(_inputs(shape, dtype, "contiguous"), VARIANTS[variant]))


@pytest.mark.parametrize("backend,shape", testing.cases(OP, [(3, 4, 33, 17), (1, 70001)], SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["strided", "permuted"])
def test_layouts_match_oracle(backend, shape, dtype, layout):
    _check(backend, _args(_inputs(shape, dtype, layout), VARIANTS["teacher_nc_clip"]))


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_opcheck(backend):
    x, ec, eu, xT = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(4))
    torch.library.opcheck(_sampler_step_op, (x, ec, eu, xT, 0.3, 0.95, 0.7, 0.71, 3.0, True, 1.5, backend))
    torch.library.opcheck(_sampler_step_op, (x, ec, None, None, 0.3, 0.95, 0.7, 0.71, 1.0, False, 0.0, backend))


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck(backend, variant):
    v = VARIANTS[variant]
    ts = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    args = _args(ts, v)
    testing.skip_unless_supported(OP, backend, *args)
    inputs = tuple(t for t in args[:4] if t is not None)

    def f(*tensors):
        it = iter(tensors)
        x, ec = next(it), next(it)
        eu = next(it) if v["cfg"] else None
        xT = next(it) if v["noise_correction"] else None
        return sampler_step(x, ec, eps_u=eu, x_T=xT, guidance=v["guidance"], clip=v["clip"],
                            noise_correction=v["noise_correction"], backend=backend, **SCHED)

    assert torch.autograd.gradcheck(f, inputs)


def test_compile_matches_eager():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    x, ec, eu, xT = (torch.randn(2, 4, 8, 8) for _ in range(4))

    def f(x, ec, eu, xT):
        return sampler_step(x, ec, eps_u=eu, x_T=xT, guidance=2.0, noise_correction=True, clip=1.0,
                            backend="cpp", **SCHED)

    eager = f(x, ec, eu, xT)
    compiled = torch.compile(f, fullgraph=True)(x, ec, eu, xT)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch(monkeypatch):
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    x, ec = torch.randn(3, 5), torch.randn(3, 5)
    testing.check_dispatch(monkeypatch, OP, lambda backend: sampler_step(x, ec, backend=backend, **SCHED))


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="eps_c"):
        sampler_step(x, torch.randn(3, 2), **SCHED)
    with pytest.raises(ValueError, match="eps_u"):
        sampler_step(x, x, eps_u=x.double(), **SCHED)
    with pytest.raises(ValueError, match="x_T"):
        sampler_step(x, x, noise_correction=True, **SCHED)
    with pytest.raises(ValueError, match="x_t"):
        sampler_step(x.long(), x.long(), **SCHED)
    with pytest.raises(ValueError, match="a_t"):
        sampler_step(x, x, **{**SCHED, "a_t": float("nan")})
    with pytest.raises(ValueError, match="a_t"):
        sampler_step(x, x, **{**SCHED, "a_t": 0.0})
    with pytest.raises(ValueError, match="guidance"):
        sampler_step(x, x, guidance=float("inf"), **SCHED)
    with pytest.raises(ValueError, match="clip"):
        sampler_step(x, x, clip=-1.0, **SCHED)


def test_native_checks_raise_not_crash():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    native = torch.ops.flashcore_C.sampler_step
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="sampler_step: eps_c has shape"):
        native(x, torch.randn(3, 2), None, None, 0.3, 0.9, 0.7, 0.7, 1.0, False, 0.0)
    with pytest.raises(RuntimeError, match="sampler_step: eps_u has dtype"):
        native(x, x, x.half(), None, 0.3, 0.9, 0.7, 0.7, 1.0, False, 0.0)
    with pytest.raises(RuntimeError, match="sampler_step: x_T is required"):
        native(x, x, None, None, 0.3, 0.9, 0.7, 0.7, 1.0, True, 0.0)
    with pytest.raises(RuntimeError, match="sampler_step: s_s must be finite"):
        native(x, x, None, None, 0.3, 0.9, 0.7, float("inf"), 1.0, False, 0.0)
    with pytest.raises(RuntimeError, match="sampler_step: x_t must be float"):
        native(x.int(), x.int(), None, None, 0.3, 0.9, 0.7, 0.7, 1.0, False, 0.0)


# ---------------------------------------------------------------- out= form --

def _out_buffers(like, layout):
    def permuted():                                                   # dense, not contiguous
        return torch.empty(like.shape[::-1], dtype=like.dtype).permute(*reversed(range(like.dim())))

    if layout == "permuted":
        return [permuted() for _ in range(2)]
    if layout == "strided":
        return [testing.make_noncontiguous(torch.empty_like(like, memory_format=torch.contiguous_format))
                for _ in range(2)]
    if layout == "mixed":                                             # one contiguous, one permuted
        return [torch.empty_like(like, memory_format=torch.contiguous_format), permuted()]
    return [torch.empty_like(like) for _ in range(2)]


def _call(args, backend, out=None):
    x, ec, eu, xT, a_t, s_t, a_s, s_s, w, nc, clip = args
    return sampler_step(x, ec, eps_u=eu, x_T=xT, a_t=a_t, s_t=s_t, a_s=a_s, s_s=s_s, guidance=w,
                        noise_correction=nc, clip=clip, backend=backend, out=out)


@pytest.mark.parametrize("backend,shape", testing.cases(OP, SHAPES + [(1, 70001)], SMALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_out_matches_oracle_and_allocating_form(backend, shape, dtype, variant):
    args = _args(_inputs(shape, dtype, "contiguous"), VARIANTS[variant])
    testing.skip_unless_supported(OP, backend, *args)
    out = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
    got = _call(args, backend, out=tuple(out))
    assert got[0] is out[0] and got[1] is out[1]
    alloc = _call(args, backend)
    oracle = sampler_step_ref(*testing.to64(args))
    for o, a, r, g, name in zip(out, alloc, sampler_step_ref(*args), oracle, ("x_next", "x0")):
        torch.testing.assert_close(o, a, rtol=0, atol=0)             # same kernel, same bits
        testing.assert_close_to_oracle(o, r, g, name=name)


@pytest.mark.parametrize("backend,shape", testing.cases(OP, [(3, 4, 33, 17)], SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_layout", ["contiguous", "permuted", "strided"])
@pytest.mark.parametrize("out_layout", ["permuted", "strided", "mixed"])
def test_out_layouts(backend, shape, dtype, in_layout, out_layout):
    args = _args(_inputs(shape, dtype, in_layout), VARIANTS["teacher_nc_clip"])
    testing.skip_unless_supported(OP, backend, *args)
    out = _out_buffers(args[0], out_layout)
    strides = [o.stride() for o in out]
    _call(args, backend, out=tuple(out))
    assert [o.stride() for o in out] == strides                      # written in place, not replaced
    for o, a in zip(out, _call(args, backend)):
        torch.testing.assert_close(o, a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_out_bad_buffers_raise_clearly(backend):
    x, ec, eu, xT = (torch.randn(2, 3, 5) for _ in range(4))

    def call(out, **kw):
        return sampler_step(x, ec, eps_u=eu, x_T=xT, noise_correction=True, backend=backend, out=out,
                            **{**SCHED, **kw})

    good = torch.empty_like(x)
    with pytest.raises(ValueError, match=r"out\[0\] \(x_next\) has dtype torch.float64"):
        call((good.double(), good.clone()))
    with pytest.raises(ValueError, match=r"out\[1\] \(x0\) has dtype torch.bfloat16"):
        call((good, good.bfloat16()))
    with pytest.raises(ValueError, match=r"out\[1\] \(x0\) has shape \(2, 15\)"):
        call((good, torch.empty(2, 15)))
    with pytest.raises(ValueError, match=r"out\[0\] \(x_next\) must be a floating tensor"):
        call((good.long(), good))
    with pytest.raises(ValueError, match="out must be a pair"):
        call(good)
    with pytest.raises(ValueError, match="out must be a pair"):
        call((good,))
    # aliasing: an input itself, a view of one, the two buffers one another
    with pytest.raises(ValueError, match=r"out\[0\] \(x_next\) shares memory with x_t"):
        call((x, good))
    with pytest.raises(ValueError, match=r"out\[1\] \(x0\) shares memory with eps_u"):
        call((good, eu.view(2, 15).view(2, 3, 5)))
    with pytest.raises(ValueError, match=r"out\[1\] \(x0\) shares memory with x_T"):
        big = torch.cat([xT.flatten(), torch.zeros(10)])
        xT_view = big[:30].view(2, 3, 5)
        sampler_step(x, ec, eps_u=eu, x_T=xT_view, noise_correction=True, backend=backend,
                     out=(good, big[5:35].view(2, 3, 5)), **SCHED)
    with pytest.raises(ValueError, match=r"\(x_next\) and out\[1\] \(x0\) share memory"):
        call((good, good))
    # elements at one address: a broadcast view, an overlapping as_strided view (no stride 0)
    with pytest.raises(ValueError, match=r"out\[0\] \(x_next\) has elements that share memory"):
        call((torch.empty(1, 3, 5).expand(2, 3, 5), torch.empty_like(good)))
    with pytest.raises(ValueError, match=r"out\[1\] \(x0\) has elements that share memory"):
        call((good, torch.empty(40).as_strided((2, 3, 5), (5, 5, 1))))
    # a layout the quick test cannot clear (strides 2 and 3 interleave) but that is disjoint
    sparse = torch.full((30,), float("nan")).as_strided((3, 2), (2, 3))
    x6, e6 = torch.randn(3, 2), torch.randn(3, 2)
    got = sampler_step(x6, e6, backend=backend, out=(sparse, torch.empty(3, 2)), **SCHED)
    torch.testing.assert_close(got[0], sampler_step(x6, e6, backend=backend, **SCHED)[0], rtol=0, atol=0)
    # no autograd through out=
    with pytest.raises(ValueError, match="out= does not support autograd"):
        sampler_step(x.requires_grad_(), ec, eps_u=eu, x_T=xT, noise_correction=True, backend=backend,
                     out=(good, torch.empty_like(good)), **SCHED)
    with pytest.raises(ValueError, match="out= does not support autograd"):     # the op itself too
        _sampler_step_out_op(x, ec, None, None, 0.3, 0.9, 0.7, 0.7, 1.0, False, 0.0, backend, good,
                             torch.empty_like(good))
    with torch.no_grad():                                             # fine without grad mode
        call((good, torch.empty_like(good)))


def test_out_bumps_version_counters():
    """Like any in-place op, so autograd notices a buffer it saved being overwritten."""
    x, ec = torch.randn(2, 3), torch.randn(2, 3)
    w = torch.randn(2, 3, requires_grad=True)
    buf, x0 = torch.empty(2, 3), torch.empty(2, 3)
    y = (buf * w).sum()                                               # saves buf for backward
    with torch.no_grad():
        sampler_step(x, ec, out=(buf, x0), **SCHED)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_out_disjoint_views_of_one_buffer_are_fine():
    x, ec = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    buf = torch.empty(2, 2, 3, 5)                                     # both outputs in one allocation
    for backend in testing.cpu_backends(OP):
        sampler_step(x, ec, backend=backend, out=(buf[0], buf[1]), **SCHED)
        for o, r in zip(buf, sampler_step(x, ec, backend=backend, **SCHED)):
            torch.testing.assert_close(o, r, rtol=0, atol=0)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_out_opcheck(backend):
    x, ec, eu, xT, o1, o2 = (torch.randn(2, 3, 5) for _ in range(6))
    torch.library.opcheck(_sampler_step_out_op, (x, ec, eu, xT, 0.3, 0.95, 0.7, 0.71, 3.0, True, 1.5, backend,
                                                 o1, o2))
    torch.library.opcheck(_sampler_step_out_op, (x, ec, None, None, 0.3, 0.95, 0.7, 0.71, 1.0, False, 0.0,
                                                 backend, o1, o2))


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_out_compile_fullgraph_matches_eager(backend):
    if backend in testing.SLOW_BACKENDS:
        pytest.skip("interpreted Triton under torch.compile is not worth the minutes")
    x, ec, eu, xT = (torch.randn(2, 4, 8, 8) for _ in range(4))

    def f(x, ec, eu, xT, x_next, x0):
        sampler_step(x, ec, eps_u=eu, x_T=xT, guidance=2.0, noise_correction=True, clip=1.0,
                     backend=backend, out=(x_next, x0), **SCHED)
        return x_next * 1.0, x0 + 0.0                                 # the graph reads the buffers back

    eager_bufs = [torch.empty_like(x) for _ in range(2)]
    compiled_bufs = [torch.empty_like(x) for _ in range(2)]
    eager = f(x, ec, eu, xT, *eager_bufs)
    compiled = torch.compile(f, fullgraph=True)(x, ec, eu, xT, *compiled_bufs)
    for a, b in zip(eager + tuple(eager_bufs), compiled + tuple(compiled_bufs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_native_out_checks_raise_not_crash():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("cpp backend not built")
    native = torch.ops.flashcore_C.sampler_step_out
    x, ec = torch.randn(2, 3), torch.randn(2, 3)
    k = (0.3, 0.9, 0.7, 0.7, 1.0, False, 0.0)
    with pytest.raises(RuntimeError, match="sampler_step: x_next has dtype"):
        native(x, ec, None, None, *k, x.double(), torch.empty_like(x))
    with pytest.raises(RuntimeError, match="sampler_step: x0 has shape"):
        native(x, ec, None, None, *k, torch.empty_like(x), torch.empty(3, 2))
    with pytest.raises(RuntimeError, match="sampler_step: x0 has elements that share memory"):
        native(x, ec, None, None, *k, torch.empty_like(x), torch.empty(1, 3).expand(2, 3))
    with pytest.raises(RuntimeError, match="sampler_step: x_next has elements that share memory"):
        native(x, ec, None, None, *k, torch.empty(4).as_strided((2, 3), (1, 1)), torch.empty_like(x))
    with pytest.raises(RuntimeError, match="sampler_step: x_next shares memory with eps_c"):
        native(x, ec, None, None, *k, ec, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="sampler_step: x_next shares memory with x0"):
        y = torch.empty_like(x)
        native(x, ec, None, None, *k, y, y)


# Triton only (appended by the GPU-kernel work): more elements than one program of the
# interpreter's 1024-wide tile, so several programs and a ragged last one run.
@pytest.mark.skipif("triton" not in testing.cpu_backends(OP), reason="the triton row runs here only interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_several_programs(dtype, variant):
    _check("triton", _args(_inputs((3, 1001), dtype, "contiguous"), VARIANTS[variant]))
