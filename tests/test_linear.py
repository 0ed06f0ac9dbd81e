"""linear on every CPU backend: the error rule against the float64 oracle, layouts,
opcheck, gradcheck (float64: the onednn row declines it), torch.compile, dispatch,
autocast, bad inputs; the native kernel's direct path (no autograd) and its own
checks; and the model transform (shared parameters, same state_dict, output
within the error rule on a tiny DiT and UNet)."""
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from flashcore import testing
from flashcore.engine import FlashcoreGELU, FlashcoreLinear, flashcore_linear_copy, use_flashcore_linear
from flashcore.models import Denoiser
from flashcore.ops import _dispatch, backends_for, use_backend
from flashcore.ops.linear import _linear_op, linear, linear_ref

from _fixtures import TINY_DIT, TINY_UNET

OP = "linear"
# (x shape, N): K = 40 and 33 (not a multiple of a vector width), batch 1, 3-D/4-D/1-D inputs,
# a DiT-S/2 FF. The cpp row's GEMV takes M <= 4 rows in fp32 and M <= 2 in bf16 (N = 7 and 5:
# a partial block of 4 rows), oneDNN the rest: M = 1, 2, 4 and 6, 7, 15 cover both sides.
SHAPES = [((1, 40), 24), ((2, 33), 7), ((2, 2, 33), 7), ((3, 5, 40), 17), ((2, 1, 3, 8), 5), ((40,), 3),
          ((7, 384), 1536)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VARIANTS = {"none": ("none", True), "none-nobias": ("none", False), "gelu": ("gelu", True),
            "gelu_tanh": ("gelu_tanh", True), "gelu_tanh-nobias": ("gelu_tanh", False)}


def _inputs(xshape, n, dtype, bias=True, requires_grad=False):
    k = xshape[-1]
    x = torch.randn(xshape).to(dtype)
    w = (torch.randn(n, k) * k ** -0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    if requires_grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(True)
    return x, w, b


def _check(backend, x, w, b, activation):
    testing.skip_unless_supported(OP, backend, x, w, b, activation)
    out = linear(x, w, b, activation=activation, backend=backend)
    ref = linear_ref(x, w, b, activation)
    oracle = linear_ref(*testing.to64((x, w, b)), activation)
    testing.assert_close_to_oracle(out, ref, oracle)


@pytest.mark.parametrize("backend,shape", testing.cases(OP, SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_oracle(backend, shape, dtype, variant):
    activation, bias = VARIANTS[variant]
    x, w, b = _inputs(*shape, dtype, bias)
    _check(backend, x, w, b, activation)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["strided", "transposed", "weight-transposed", "bias-expanded",
                                    "bias-strided"])
def test_layouts_match_oracle(backend, dtype, layout):
    x, w, b = _inputs((3, 9, 40), 24, dtype)
    if layout == "strided":
        x = testing.make_noncontiguous(x)                              # every other element
    elif layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)             # dense, not contiguous
    elif layout == "weight-transposed":
        w = w.t().contiguous().t()                                     # W stored as (K, N)
    elif layout == "bias-expanded":
        b = b[:1].expand(24)                                           # stride 0: oneDNN read past its end
    else:
        b = testing.make_noncontiguous(b)                              # stride 2: oneDNN read b[0..N)
    assert not (x.is_contiguous() and w.is_contiguous() and b.is_contiguous())
    _check(backend, x, w, b, "gelu_tanh")


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_empty_batch(backend):
    x, w, b = _inputs((0, 40), 8, torch.float32)
    assert linear(x, w, b, backend=backend).shape == (0, 8)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_opcheck(backend, variant):
    activation, bias = VARIANTS[variant]
    x, w, b = _inputs((2, 3, 40), 8, torch.float32, bias, requires_grad=True)
    torch.library.opcheck(_linear_op, (x, w, b, activation, backend))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_float64_falls_back_to_the_reference(monkeypatch, variant):
    """oneDNN's inner product takes no float64: asked for by name, the row warns once and
    the reference runs; gradcheck then checks the backward's maths in float64."""
    activation, bias = VARIANTS[variant]
    x, w, b = _inputs((2, 3, 6), 5, torch.float64, bias, requires_grad=True)
    calls = testing.spy_backends(monkeypatch, OP)
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="onednn.*float64"):
        linear(x, w, b, activation=activation, backend="onednn")
    assert calls == ["reference"]
    inputs = (x, w) if b is None else (x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # warned once already
        assert torch.autograd.gradcheck(
            lambda x, w, b=None: linear(x, w, b, activation=activation, backend="onednn"), inputs)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_float32_gradients_match_autograd_of_the_reference(backend, activation):
    x, w, b = _inputs((3, 4, 40), 24, torch.float32, requires_grad=True)
    g = torch.randn(3, 4, 24)
    got = torch.autograd.grad(linear(x, w, b, activation=activation, backend=backend), (x, w, b), g)
    want = torch.autograd.grad(linear_ref(x, w, b, activation), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", testing.cpu_backends(OP))
def test_compile_matches_eager(backend):
    x, w1, b1 = _inputs((2, 9, 40), 64, torch.float32)
    _, w2, b2 = _inputs((1, 64), 40, torch.float32)

    def ff(x, w1, b1, w2, b2):                                         # weights are graph inputs
        return x + linear(linear(x, w1, b1, activation="gelu_tanh", backend=backend), w2, b2, backend=backend)

    eager = ff(x, w1, b1, w2, b2)
    compiled = torch.compile(ff, fullgraph=True)(x, w1, b1, w2, b2)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_dispatch(monkeypatch):
    """auto: cpp (else onednn) for float32/bfloat16 CPU tensors (bfloat16 only where
    oneDNN computes it: else the reference, quietly), the reference (quietly) for
    float64; explicit argument > use_backend > FLASHCORE_BACKEND."""
    from flashcore.ops import _onednn
    fast = next((b for b in ("cpp", "onednn") if b in testing.cpu_backends(OP)), None)
    if fast is None:
        pytest.skip("neither the native extension nor oneDNN is built")
    calls = testing.spy_backends(monkeypatch, OP)
    monkeypatch.delenv("FLASHCORE_BACKEND", raising=False)
    x, w, b = _inputs((3, 40), 8, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dt in (torch.float32, torch.bfloat16):
            linear(x.to(dt), w.to(dt), b.to(dt))
            assert calls[-1] == (fast if dt == torch.float32 or _onednn.bf16_native() else "reference")
        linear(x.double(), w.double(), b.double())
    assert calls[-1] == "reference"
    linear(x, w, b, backend="reference")
    assert calls[-1] == "reference"
    with use_backend("reference"):
        linear(x, w, b)
        assert calls[-1] == "reference"
        linear(x, w, b, backend=fast)
        assert calls[-1] == fast
    monkeypatch.setenv("FLASHCORE_BACKEND", "reference")
    linear(x, w, b)
    assert calls[-1] == "reference"
    with use_backend(fast):
        linear(x, w, b)
        assert calls[-1] == fast


def test_backends_for_lists_the_rows_that_take_the_inputs_in_priority_order():
    """The public question "which backends would run these inputs": auto's order for the
    inputs' device, the reference last; rows that decline the dtype or the device left out."""
    x, w, b = _inputs((3, 40), 8, torch.float32)
    built = backends_for(OP)
    fast = [name for name in ("cpp", "onednn") if name in built]
    assert built == fast + ["reference"]
    assert backends_for(OP, x, w, b, "none") == fast + ["reference"]
    assert backends_for(OP, x.double(), w.double(), b.double(), "none") == ["reference"]
    assert backends_for(OP, *(t.to("meta") for t in (x, w, b)), "none") == ["reference"]


def test_a_backend_asked_for_on_another_device_falls_back_once(monkeypatch):
    """The cpp row takes CPU tensors: asked for by name on another device the reference
    runs, with one warning. The direct path checks the same row: meta tensors go to the
    op (whose fake answers them) instead of reaching the native kernel."""
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("the native extension is not built")
    x, w, b = (t.to("meta") for t in _inputs((3, 40), 8, torch.float32))
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="'cpp' not used .*takes cpu tensors"):
        assert _dispatch.resolve(OP, "meta", "cpp", x, w, b, "none") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve(OP, "meta", "cpp", x, w, b, "none") == "reference"
    calls = testing.spy_backends(monkeypatch, OP)
    with torch.no_grad():
        out = linear(x, w, b, backend="cpp")
    assert calls == [] and out.device.type == "meta" and out.shape == (3, 8)


def _require_native():
    if "cpp" not in testing.cpu_backends(OP):
        pytest.skip("the native extension is not built")


def test_cpp_without_autograd_skips_the_custom_op(monkeypatch):
    """backend="cpp" and nothing to differentiate: the native kernel is called straight
    (the op's Python layers cost ~17 us a call); with a gradient to record the call goes
    through flashcore::linear, whose autograd gives the reference's gradients."""
    _require_native()
    lin = importlib.import_module("flashcore.ops.linear")          # the module; ops.linear is the function
    wrapped = []
    monkeypatch.setattr(lin, "_linear_op", lambda *a, _op=lin._linear_op: wrapped.append(a[4]) or _op(*a))
    calls = testing.spy_backends(monkeypatch, OP)
    x, w, b = _inputs((3, 40), 8, torch.float32)
    with torch.no_grad():
        out = linear(x, w, b, activation="gelu", backend="cpp")
    assert calls == ["cpp"] and wrapped == []
    testing.assert_close_to_oracle(out, linear_ref(x, w, b, "gelu"), linear_ref(*testing.to64((x, w, b)), "gelu"))
    linear(x, w, b, backend="cpp")                                     # grad mode on, no input needs it
    assert wrapped == []
    w.requires_grad_(True)
    y = linear(x, w, b, backend="cpp")
    assert wrapped == ["cpp"] and calls[-1] == "cpp"
    (g,) = torch.autograd.grad(y.sum(), w)
    torch.testing.assert_close(g, torch.autograd.grad(linear_ref(x, w, b).sum(), w)[0])
    linear(x, w, b)                                                    # no explicit backend: through the op
    assert wrapped[-1] == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_weight_gives_the_plain_result(monkeypatch, dtype):
    """pack_weight's oneDNN-layout copy: used on the direct cpp path above GEMV_ROWS rows
    (the same oneDNN arithmetic, so within a few ulps of the plain weight), compiled
    too; every other path reads the plain weight; anything but a packed copy of this
    weight is refused."""
    _require_native()
    from flashcore.ops.linear import GEMV_ROWS, pack_weight
    x, w, b = _inputs((3, 7, 40), 24, dtype)
    packed = pack_weight(w, 21)
    if packed is None:
        pytest.skip("torch built without oneDNN")
    assert packed.is_mkldnn and packed.shape == w.shape
    with torch.no_grad():
        plain = linear(x, w, b, activation="gelu_tanh", backend="cpp")
        got = linear(x, w, b, activation="gelu_tanh", backend="cpp", packed=packed)
        torch.testing.assert_close(got, plain, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        fn = torch.compile(lambda x: linear(x, w, b, activation="gelu_tanh", backend="cpp", packed=packed),
                           fullgraph=True)
        torch.testing.assert_close(fn(x), got, rtol=0, atol=0)
        small = x[:1, :GEMV_ROWS[dtype]]                                # the GEMV's rows: plain weight
        torch.testing.assert_close(linear(small, w, b, backend="cpp", packed=packed),
                                   linear(small, w, b, backend="cpp"), rtol=0, atol=0)
    calls = testing.spy_backends(monkeypatch, OP)
    linear(x, w, b, backend="reference", packed=packed)                # other rows: the plain weight
    assert calls == ["reference"]
    with pytest.raises(ValueError, match="packed must come from pack_weight"):
        linear(x, w, b, backend="cpp", packed=w)
    with pytest.raises(ValueError, match="packed must come from pack_weight"):
        linear(x[..., :8], w[:, :8], b, backend="cpp", packed=packed)
    assert pack_weight(w.double(), 21) is None
    if dtype == torch.float32:                                          # autocast casts weight: packed unused
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x, w, b, backend="cpp", packed=packed)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), backend="cpp"),
                                   rtol=0, atol=0)


def test_native_kernel_rejects_bad_inputs_with_a_message():
    """The C++ entry point checks what the Python wrapper checks, for callers that reach it directly."""
    _require_native()
    op = torch.ops.flashcore_C.linear
    x, w, b = _inputs((3, 40), 8, torch.float32)
    for args, msg in [((x.double(), w.double(), b.double(), "none"), "float32 or bfloat16"),
                      ((x, w.bfloat16(), b, "none"), "weight has dtype"),
                      ((x[:, :39], w, b, "none"), "x has 39 features"),
                      ((x, w, b[:7], "none"), "bias must have shape"),
                      ((x, w, b.double(), "none"), "bias must be a CPU tensor of x's dtype"),
                      ((x, w[0], b, "none"), "weight must be"),
                      ((x, w[:0], b[:0], "none"), "empty weight"),
                      ((x, w, b, "relu"), "activation must be"),
                      ((x[0, 0], w[:, :1], b, "none"), "at least one dimension")]:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_autocast_casts_like_f_linear():
    """Under CPU bf16 autocast float32 inputs are cast first, as autocast does for F.linear."""
    x, w, b = _inputs((3, 5, 40), 24, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b, activation="gelu_tanh")
        ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    assert out.dtype == ref.dtype == torch.bfloat16
    oracle = linear_ref(*testing.to64((x.bfloat16(), w.bfloat16(), b.bfloat16())), "gelu_tanh")
    testing.assert_close_to_oracle(out, ref, oracle)


def test_bad_inputs_name_the_argument():
    x, w, b = _inputs((3, 40), 8, torch.float32)
    with pytest.raises(ValueError, match="weight must match x in dtype"):
        linear(x, w.bfloat16(), b)
    with pytest.raises(ValueError, match="bias must match x in dtype"):
        linear(x, w, b.double())
    with pytest.raises(ValueError, match="x has 39 features"):
        linear(x[:, :39], w, b)
    with pytest.raises(ValueError, match="bias has 7 elements"):
        linear(x, w, b[:7])
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        linear(x, w[0], b)
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        linear(x, w, b[None])
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        linear(x.long(), w, b)
    with pytest.raises(ValueError, match="at least one dimension"):
        linear(x[0, 0], w[:, :1], b)
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="unknown backend"):
        linear(x, w, b, backend="mkl")


# ------------------------------------------------------------ the model transform --
def _model_inputs(b=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 1, 16, 16, generator=g), torch.tensor([999, 500, 3][:b]),
            torch.tensor([1, 2, 10][:b]))


@pytest.mark.parametrize("cfg", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_transform_keeps_parameters_and_output(cfg):
    """Same Parameter objects and state_dict keys; float32 output within the error rule
    (twice the float32 model's own error against the float64 model, plus atol)."""
    model = Denoiser(cfg).eval()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    fast = flashcore_linear_copy(model)
    assert sum(type(m) is nn.Linear for m in model.modules()) == n_linear   # the original is untouched
    assert not any(type(m) is nn.Linear for m in fast.modules())
    assert sum(isinstance(m, FlashcoreLinear) for m in fast.modules()) == n_linear
    assert list(fast.state_dict()) == list(model.state_dict())
    assert all(p is q for p, q in zip(fast.parameters(), model.parameters()))
    fast.load_state_dict(model.state_dict())                               # checkpoints load unchanged
    inputs = _model_inputs()
    with torch.no_grad():
        out, ref = fast(*inputs), model(*inputs)
        oracle = copy.deepcopy(model).double()(inputs[0].double(), *inputs[1:])
    testing.assert_close_to_oracle(out, ref, oracle)


def test_transform_fuses_the_dit_feed_forward_gelu_and_follows_weight_updates():
    model = Denoiser(TINY_DIT).eval()
    fast = flashcore_linear_copy(model)
    ff = fast.net.transformer_blocks[0].ff.net
    assert isinstance(ff[0], FlashcoreGELU) and ff[0].proj.activation == "gelu_tanh"
    inputs = _model_inputs()
    with torch.no_grad():
        model.net.transformer_blocks[0].ff.net[0].proj.weight.mul_(3.0)   # an in-place update on the model
        testing.assert_close_to_oracle(fast(*inputs), model(*inputs),
                                       copy.deepcopy(model).double()(inputs[0].double(), *inputs[1:]))
    unfused = flashcore_linear_copy(model, fuse_gelu=False)
    assert not any(isinstance(m, FlashcoreGELU) for m in unfused.modules())


def test_transform_leaves_subclasses_hooked_and_shared_layers_alone():
    class MyLinear(nn.Linear):
        pass

    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda *a: None)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(MyLinear(4, 4), hooked, shared, nn.Sequential(shared), nn.ReLU())
    assert use_flashcore_linear(model) == 1
    assert type(model[0]) is MyLinear and model[1] is hooked
    assert isinstance(model[2], FlashcoreLinear) and model[3][0] is model[2]   # one replacement, both places
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), model[4](shared(shared(hooked(model[0](x))))))
    with pytest.raises(ValueError, match="itself an nn.Linear"):
        use_flashcore_linear(nn.Linear(2, 2))


@pytest.mark.parametrize("cfg", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_fused_qkv_matches_unfused_and_keeps_parameters(monkeypatch, cfg):
    """One GEMM per self-attention on stacked copies of q/k/v: the same output as the
    unfused copy within the error rule, two fewer linear calls per attention, the
    same Parameter objects and state_dict; the copies are a snapshot (frozen weights)."""
    model = Denoiser(cfg).eval()
    unfused, fused = flashcore_linear_copy(model), flashcore_linear_copy(model, fuse_qkv=True)
    attns = [m for m in fused.modules() if getattr(m, "fused_projections", False)]
    assert attns and all(isinstance(m.to_qkv, FlashcoreLinear) for m in attns)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert all(p is q for p, q in zip(fused.parameters(), model.parameters()))
    assert not any(hasattr(m, "to_qkv") for m in model.modules())          # the original is untouched
    inputs = _model_inputs()
    calls = testing.spy_backends(monkeypatch, OP)
    with torch.no_grad():
        out = fused(*inputs)
        n_fused = len(calls)
        want = unfused(*inputs)
        assert len(calls) - n_fused == n_fused + 2 * len(attns)
        oracle = copy.deepcopy(model).double()(inputs[0].double(), *inputs[1:])
        testing.assert_close_to_oracle(out, model(*inputs), oracle)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        q = attns[0].to_q.weight
        q.mul_(3.0)                                                          # shared with the model
        torch.testing.assert_close(attns[0].to_qkv.weight[:q.shape[0]] * 3.0, q)   # the copy did not follow


def test_processor_runs_diffusers_fused_projections():
    """diffusers' own ``Attention.fuse_projections()`` (to_qkv) runs through FlashcoreAttnProcessor."""
    model = Denoiser(TINY_DIT).eval()
    fused = copy.deepcopy(model)
    for m in fused.modules():
        if hasattr(m, "fuse_projections") and not m.is_cross_attention:
            m.fuse_projections()
    ran = []
    for m in fused.modules():
        if getattr(m, "fused_projections", False):
            m.to_qkv.register_forward_hook(lambda *a: ran.append(1))
    inputs = _model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    assert len(ran) == TINY_DIT.num_layers
