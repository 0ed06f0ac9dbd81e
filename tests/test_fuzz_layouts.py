"""Every public op on every CPU backend, with every tensor argument in a random layout.

Each case draws from its own seed a shape, a dtype and, for every tensor argument (the
bias and out= buffers included), a layout: contiguous, a storage offset, stepped slices,
a permutation (dense but not contiguous: a transpose, (B, N, H, D) read as (B, H, N, D)),
broadcast (stride-0) dimensions, or several of these stacked. An argument is a chain of
views on a contiguous base buffer: the same chain on a float64 copy of the base feeds the
oracle, and gradients are compared on the bases, so broadcasting and slicing are part of
what autograd checks. Results must meet the error rule of ``flashcore.testing`` (at most
twice the reference's own error in the input dtype, plus a few ulps, against the
reference run in float64). Inputs must come back unchanged; an out= buffer must be
written at its elements and nowhere else (the rest of its base keeps a sentinel), and one
whose elements share addresses (a broadcast view) must be refused with a ValueError.

Triton is left out: its CPU interpreter runs ~1000x slower than torch, too slow for
hundreds of cases (and triton is not installed on every CPU machine).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from flashcore import testing
from flashcore.ops import _onednn, backends_for
from flashcore.ops.attention import _attention_bwd, attention, attention_bwd_ref, attention_ref
from flashcore.ops.linear import ACTIVATIONS, GEMV_ROWS, linear, linear_ref, pack_weight
from flashcore.ops.sampler_step import sampler_step, sampler_step_ref
from flashcore.ops.srl_loss import srl_loss, srl_loss_ref, srl_renoise, srl_renoise_ref

ALL_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KINDS = ("contiguous", "offset", "strided", "permuted", "expanded", "mixed")
PLACE_KINDS = ("contiguous", "offset", "strided", "permuted", "mixed-noexpand")   # for given values
SENTINEL = 1234.5                                    # exact in every float dtype used here


@dataclass
class Layout:
    kind: str
    base_shape: tuple
    views: list                                      # outermost first; applied innermost first
    broadcast: bool                                  # some dimension of size > 1 has stride 0

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        t = base
        for f in reversed(self.views):
            t = f(t)
        return t


def draw_layout(rng: random.Random, shape: tuple, kind: str) -> Layout:
    """Views that turn a contiguous base into a tensor of ``shape`` laid out as ``kind``."""
    parts = {"contiguous": [], "offset": ["offset"], "strided": ["slice"], "permuted": ["permute"],
             "expanded": ["expand"],
             "mixed": rng.sample(["expand", "permute", "slice", "offset"], rng.randint(2, 4)),
             "mixed-noexpand": rng.sample(["permute", "slice", "offset"], rng.randint(2, 3))}[kind]
    s, views, broadcast = list(shape), [], False
    for part in ("expand", "permute", "slice", "offset"):            # outermost first
        if part not in parts:
            continue
        if part == "expand":
            dims = [d for d, n in enumerate(s) if n > 1]
            if not dims:
                continue
            pick = set(rng.sample(dims, rng.randint(1, len(dims))))
            target = tuple(s)
            s = [1 if d in pick else n for d, n in enumerate(s)]
            views.append(lambda t, target=target: t.expand(target))
            broadcast = True
        elif part == "permute" and len(s) >= 2:
            p = list(range(len(s)))
            big = [d for d, n in enumerate(s) if n > 1]
            # reorder the dimensions of size > 1 where there are two (else any change)
            while (len(big) >= 2 and [d for d in p if d in big] == big) or p == sorted(p):
                rng.shuffle(p)
            inv = sorted(range(len(p)), key=p.__getitem__)
            s = [s[i] for i in p]
            views.append(lambda t, inv=tuple(inv): t.permute(inv))
        elif part == "slice" and s:
            steps = [rng.choice((1, 2, 3)) for _ in s]
            big = [d for d, n in enumerate(s) if n > 1] or list(range(len(s)))
            steps[rng.choice(big)] = rng.choice((2, 3))                 # at least one real step
            starts = [rng.randint(0, 2) for _ in s]
            idx = tuple(slice(a, a + (n - 1) * st + 1, st) for a, n, st in zip(starts, s, steps))
            s = [a + (n - 1) * st + 1 + rng.randint(0, 1) for a, n, st in zip(starts, s, steps)]
            views.append(lambda t, idx=idx: t[idx])
        elif part == "offset":
            off, n, target = rng.randint(1, 5), math.prod(s), tuple(s)
            s = [n + off + rng.randint(0, 2)]
            views.append(lambda t, off=off, n=n, target=target: t[off:off + n].view(target))
    return Layout(kind, tuple(s), views, broadcast)


class Case:
    """The random draws of one case: layouts and values, reproducible from the seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.layouts: dict[str, str] = {}            # argument -> layout kind, for messages

    def randn(self, shape, scale=1.0):
        return torch.randn(shape, generator=self.gen) * scale

    def arg(self, name: str, shape: tuple, dtype, scale=1.0):
        """(base, layout): random values in a random layout; ``layout(base)`` is the argument."""
        lay = draw_layout(self.rng, tuple(shape), self.rng.choice(KINDS))
        self.layouts[name] = lay.kind
        return self.randn(lay.base_shape, scale).to(dtype), lay

    def place(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """``values`` copied into a random non-broadcast layout."""
        kind = self.rng.choice(PLACE_KINDS)
        lay = draw_layout(self.rng, tuple(values.shape), kind)
        self.layouts[name] = kind
        t = lay(torch.full(lay.base_shape, float("nan"), dtype=values.dtype))
        return t.copy_(values)

    def __str__(self):
        return ", ".join(f"{k}={v}" for k, v in self.layouts.items())


def _views(pairs, dtype=None, grad=False):
    """Arguments from (base, layout) pairs (None kept): the base cast to ``dtype`` and made a
    leaf when ``grad``. Returns (args, leaves)."""
    args, leaves = [], []
    for p in pairs:
        if p is None:
            args.append(None)
            continue
        base, lay = p
        leaf = base.detach().to(dtype or base.dtype).requires_grad_(grad)
        leaves.append(leaf)
        args.append(lay(leaf))
    return args, leaves


def _uses(op, backend, *args):
    """The requested backend runs these inputs itself (a silent fallback would test nothing)."""
    assert backend in backends_for(op, *args)


def _unchanged(pairs, before, case):
    for p, b in zip([p for p in pairs if p is not None], before):
        assert torch.equal(p[0], b), f"an input's memory was written ({case})"


def _grads_close(got, ref, oracle, case, names, factor=2.0):
    """The error rule for each gradient, its atol scaled by the largest gradient of the same
    backward when that is larger: a gradient that is zero by cancellation (dq with a single
    key, whose softmax is constant) still carries rounding of the terms that cancelled."""
    common = max((o.abs().max().item() for o in oracle if o.numel()), default=0.0)
    for g, r, o, name in zip(got, ref, oracle, names):
        assert g.shape == o.shape and g.dtype == r.dtype, f"grad {name}: {g.shape} {g.dtype} ({case})"
        o = o.detach().to(torch.float64)
        base = (r.detach().to(torch.float64) - o).abs().max().item() if o.numel() else 0.0
        scale = max(o.abs().max().item() if o.numel() else 0.0, common)
        bound = factor * base + testing.ATOL_ULPS[g.dtype] * torch.finfo(g.dtype).eps * scale
        err = (g.detach().to(torch.float64) - o).abs().max().item() if o.numel() else 0.0
        assert err <= bound, f"grad {name}: error {err:.3g} against the float64 oracle exceeds {bound:.3g} " \
                             f"({factor:g} x the reference's own error in {r.dtype} + atol) ({case})"


def _backends(op):
    return [b for b in testing.cpu_backends(op) if b not in testing.SLOW_BACKENDS]


def _params(op, n):
    return [pytest.param(b, i, id=f"{b}-{i:02d}") for b in _backends(op) for i in range(n)]


# ---------------------------------------------------------------- linear
@pytest.mark.parametrize("backend,i", _params("linear", 48))
def test_linear(backend, i):
    case = Case(1000 + i)
    rng = case.rng
    dtype = rng.choice((torch.float32, torch.bfloat16))
    if not _onednn.bf16_native():         # no oneDNN bf16 on this CPU (AVX2): the same case in float32
        dtype = torch.float32
    # M = 1..8 rows: both sides of the cpp kernel's GEMV / oneDNN split (4 fp32, 2 bf16 rows)
    lead = rng.choice(((), (1,), (2,), (3,), (5,), (8,), (2, 3), (2, 1, 3)))
    k, n = rng.choice((1, 3, 16, 33)), rng.choice((1, 5, 8, 17))
    act = rng.choice(ACTIVATIONS)
    pairs = [case.arg("x", lead + (k,), dtype), case.arg("weight", (n, k), dtype, k ** -0.5),
             case.arg("bias", (n,), dtype) if rng.random() < 0.8 else None]
    grad = i % 3 == 0
    before = [p[0].clone() for p in pairs if p is not None]
    (x, w, b), leaves = _views(pairs, grad=grad)
    _uses("linear", backend, x, w, b, act)
    rows = math.prod(lead)
    packed = None
    if backend == "cpp" and not grad and rows > GEMV_ROWS[dtype] and rng.random() < 0.4:
        packed = pack_weight(w, rows)                                  # oneDNN's blocked copy
        case.layouts["packed"] = "yes"
    out = linear(x, w, b, activation=act, backend=backend, packed=packed)
    ref = linear_ref(x, w, b, act)
    (x64, w64, b64), leaves64 = _views(pairs, torch.float64, grad=grad)
    oracle = linear_ref(x64, w64, b64, act)
    testing.assert_close_to_oracle(out, ref, oracle, name=f"linear ({case}, act={act})")
    _unchanged(pairs, before, case)
    if grad:
        g = case.randn(out.shape).to(dtype)
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(ref, leaves, g)
        exact = torch.autograd.grad(oracle, leaves64, g.double())
        _grads_close(got, want, exact, case, ("x", "weight", "bias"))


# ---------------------------------------------------------------- attention
def _attention_case(case: Case):
    rng = case.rng
    dtype = rng.choice((torch.float32, torch.bfloat16, torch.float64))
    B, H = rng.choice((1, 2)), rng.choice((1, 2, 3))
    # past one query block (128) and one key block (256) now and then
    nq, nk = rng.choice((1, 5, 17, 130)), rng.choice((1, 7, 33, 260))
    d = rng.choice((1, 8, 33))
    dv = rng.choice((d, 16))
    pairs = [case.arg("q", (B, H, nq, d), dtype), case.arg("k", (B, H, nk, d), dtype),
             case.arg("v", (B, H, nk, dv), dtype)]
    return dtype, pairs, rng.choice((None, 0.3))


@pytest.mark.parametrize("backend,i", _params("attention", 30))
def test_attention(backend, i):
    case = Case(2000 + i)
    dtype, pairs, scale = _attention_case(case)
    grad = i % 2 == 0
    before = [p[0].clone() for p in pairs]
    (q, k, v), leaves = _views(pairs, grad=grad)
    c = q.shape[-1] ** -0.5 if scale is None else scale
    _uses("attention", backend, q, k, v, c)
    out = attention(q, k, v, scale=scale, backend=backend)
    ref = attention_ref(q, k, v, c)[0]
    (q64, k64, v64), leaves64 = _views(pairs, torch.float64, grad=grad)
    oracle = attention_ref(q64, k64, v64, c)[0]
    testing.assert_close_to_oracle(out, ref, oracle, name=f"attention ({case})")
    _unchanged(pairs, before, case)
    if grad:
        base, lay = case.arg("dout", out.shape, dtype)                 # dout in a layout of its own
        dout = lay(base)
        got = torch.autograd.grad(out, leaves, dout)
        want = torch.autograd.grad(ref, leaves, dout)
        exact = torch.autograd.grad(oracle, leaves64, lay(base.double()))
        _grads_close(got, want, exact, case, ("q", "k", "v"))


@pytest.mark.parametrize("backend,i", _params("attention_bwd", 16))
def test_attention_bwd(backend, i):
    """The backward op called directly, so dout, out and lse take random layouts too (the
    autograd path hands it a contiguous dout and the forward's own out and lse)."""
    case = Case(3000 + i)
    dtype, pairs, scale = _attention_case(case)
    (q, k, v), _ = _views(pairs)
    c = q.shape[-1] ** -0.5 if scale is None else scale
    (q64, k64, v64), _ = _views(pairs, torch.float64)
    out64, lse64 = attention_ref(q64, k64, v64, c)
    base, lay = case.arg("dout", out64.shape, dtype)
    dout = lay(base)
    out = case.place("out", out64.to(dtype))
    lse = case.place("lse", lse64.to(torch.float64 if dtype == torch.float64 else torch.float32))
    before = [p[0].clone() for p in pairs] + [out.clone(), lse.clone(), base.clone()]
    _uses("attention_bwd", backend, dout, q, k, v, out, lse, c)
    got = _attention_bwd(dout, q, k, v, out, lse, c, backend)
    # the baseline is autograd of the reference in the input dtype, as in test_attention.py
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(attention_ref(*leaves, c)[0], leaves, dout)
    exact = attention_bwd_ref(lay(base.double()), q64, k64, v64, out64, lse64, c)
    _grads_close(got, want, exact, case, ("dq", "dk", "dv"))
    after = [p[0] for p in pairs] + [out, lse, base]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), f"an input's memory was written ({case})"


# ---------------------------------------------------------------- sampler_step
SAMPLER_SHAPES = ((7,), (3, 5), (2, 3, 4), (2, 3, 4, 5), (1, 1, 6), (3, 1, 4), (2, 130, 130))


@pytest.mark.parametrize("backend,i", _params("sampler_step", 40))
def test_sampler_step(backend, i):
    case = Case(4000 + i)
    rng = case.rng
    dtype = rng.choice(ALL_FLOATS)
    shape = SAMPLER_SHAPES[i % len(SAMPLER_SHAPES)] if i < len(SAMPLER_SHAPES) else rng.choice(SAMPLER_SHAPES[:-1])
    cfg, nc = rng.random() < 0.6, rng.random() < 0.4
    pairs = [case.arg("x_t", shape, dtype), case.arg("eps_c", shape, dtype),
             case.arg("eps_u", shape, dtype) if cfg else None, case.arg("x_T", shape, dtype) if nc else None]
    k = dict(a_t=rng.uniform(0.2, 1.0), s_t=rng.uniform(0.1, 1.0), a_s=rng.uniform(0.2, 1.0),
             s_s=rng.uniform(0.0, 1.0), guidance=rng.choice((1.0, 3.5)), noise_correction=nc,
             clip=rng.choice((0.0, 1.5)))
    use_out, grad = i % 2 == 1, i % 4 == 0
    before = [p[0].clone() for p in pairs if p is not None]
    (x_t, eps_c, eps_u, x_T), leaves = _views(pairs, grad=grad)
    pos = (x_t, eps_c, eps_u, x_T, k["a_t"], k["s_t"], k["a_s"], k["s_s"], k["guidance"], nc, k["clip"])
    _uses("sampler_step", backend, *pos)
    call = dict(eps_u=eps_u, x_T=x_T, backend=backend, **k)
    ref = sampler_step_ref(*pos)
    oracle = sampler_step_ref(*_views(pairs, torch.float64)[0], *pos[4:])
    if use_out:
        lays = [draw_layout(rng, shape, rng.choice(PLACE_KINDS + ("expanded",))) for _ in range(2)]
        case.layouts.update({"out[0]": lays[0].kind, "out[1]": lays[1].kind})
        bases = [torch.full(lay.base_shape, SENTINEL, dtype=dtype) for lay in lays]
        bufs = tuple(lay(b_) for lay, b_ in zip(lays, bases))
        if any(lay.broadcast for lay in lays):
            with pytest.raises(ValueError, match="has elements that share memory"):
                sampler_step(x_t, eps_c, out=bufs, **call)
            return
        res = sampler_step(x_t, eps_c, out=bufs, **call)
        assert all(r is b_ for r, b_ in zip(res, bufs)), "out= must return the buffers themselves"
        for lay, b_ in zip(lays, bases):                               # nothing outside the view written
            mask = torch.zeros(lay.base_shape, dtype=torch.bool)
            lay(mask).fill_(True)
            assert torch.all(b_[~mask] == SENTINEL), f"out= wrote outside its elements ({case})"
    else:
        res = sampler_step(x_t, eps_c, **call)
    for r, rr, o, name in zip(res, ref, oracle, ("x_next", "x0")):
        testing.assert_close_to_oracle(r, rr, o, name=f"{name} ({case}, {k})")
    _unchanged(pairs, before, case)
    if grad:
        g = [case.randn(shape).to(dtype) for _ in range(2)]
        args64, leaves64 = _views(pairs, torch.float64, grad=True)
        got = torch.autograd.grad(res, leaves, g)
        want = torch.autograd.grad(ref, leaves, g)
        exact = torch.autograd.grad(sampler_step_ref(*args64, *pos[4:]), leaves64, [t.double() for t in g])
        names = [nm for nm, p in zip(("x_t", "eps_c", "eps_u", "x_T"), pairs) if p is not None]
        _grads_close(got, want, exact, case, names)


# ---------------------------------------------------------------- srl_loss, srl_renoise
@pytest.mark.parametrize("backend,i", _params("srl_loss", 24))
def test_srl_loss(backend, i):
    case = Case(5000 + i)
    rng = case.rng
    dtype = rng.choice(ALL_FLOATS)
    shape = rng.choice(SAMPLER_SHAPES[:-1]) if i else SAMPLER_SHAPES[-1]
    a_t, s_t = rng.uniform(0.2, 1.0), rng.uniform(0.1, 1.0)
    pairs = [case.arg(nm, shape, dtype) for nm in ("x_t", "eps_s", "x0_target")]
    grad = i % 2 == 0
    before = [p[0].clone() for p in pairs]
    args, leaves = _views(pairs, grad=grad)
    _uses("srl_loss", backend, *args, a_t, s_t)
    loss = srl_loss(*args, a_t=a_t, s_t=s_t, backend=backend)
    ref = srl_loss_ref(*args, a_t, s_t)[0]
    args64, leaves64 = _views(pairs, torch.float64, grad=grad)
    oracle = srl_loss_ref(*args64, a_t, s_t)[0]
    testing.assert_close_to_oracle(loss, ref, oracle, name=f"loss ({case})")
    _unchanged(pairs, before, case)
    if grad:
        w = torch.tensor(rng.choice((1.0, -0.7)))          # 1: the saved gradient returned as is
        got = torch.autograd.grad(loss * w.to(loss.dtype), leaves)
        want = torch.autograd.grad(ref * w.to(ref.dtype), leaves)
        exact = torch.autograd.grad(oracle * w.double(), leaves64)
        _grads_close(got, want, exact, case, ("x_t", "eps_s", "x0_target"))


@pytest.mark.parametrize("backend,i", _params("srl_renoise", 16))
def test_srl_renoise(backend, i):
    case = Case(6000 + i)
    rng = case.rng
    dtype = rng.choice(ALL_FLOATS)
    shape = rng.choice(SAMPLER_SHAPES[:-1]) if i else SAMPLER_SHAPES[-1]
    a, s = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
    pairs = [case.arg("x0", shape, dtype), case.arg("noise", shape, dtype)]
    grad = i % 2 == 0
    before = [p[0].clone() for p in pairs]
    args, leaves = _views(pairs, grad=grad)
    _uses("srl_renoise", backend, *args, a, s)
    out = srl_renoise(*args, a=a, s=s, backend=backend)
    ref = srl_renoise_ref(*args, a, s)
    args64, leaves64 = _views(pairs, torch.float64, grad=grad)
    oracle = srl_renoise_ref(*args64, a, s)
    testing.assert_close_to_oracle(out, ref, oracle, name=f"chi ({case})")
    _unchanged(pairs, before, case)
    if grad:
        g = case.randn(shape).to(dtype)
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(ref, leaves, g)
        exact = torch.autograd.grad(oracle, leaves64, g.double())
        _grads_close(got, want, exact, case, ("x0", "noise"))


# ---------------------------------------------------------------- the draws themselves
def test_layouts_are_what_they_claim():
    """The generator makes what the cases rely on: the right shape and values, and strides
    that really are non-contiguous / broadcast / offset for those kinds."""
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        shape = tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 4)))
        kind = rng.choice(KINDS)
        lay = draw_layout(rng, shape, kind)
        base = torch.arange(math.prod(lay.base_shape), dtype=torch.float64).view(lay.base_shape)
        t = lay(base)
        assert t.shape == shape
        assert t.data_ptr() >= base.data_ptr()
        assert lay.broadcast == any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))
        if kind == "offset":
            assert t.storage_offset() > 0 and t.is_contiguous()
        if kind in ("strided", "permuted") and math.prod(shape) > 1 and not (
                kind == "permuted" and sum(n > 1 for n in shape) < 2):
            assert not t.is_contiguous()
        if kind == "expanded" and any(n > 1 for n in shape):
            assert lay.broadcast
        seen.add((kind, t.is_contiguous()))
    assert {k for k, _ in seen} == set(KINDS)
