"""Helpers for the op tests: which backends to run, shapes per backend, the error rule.

The error rule is FlashAttention's (Dao et al., tests/test_flash_attn.py): a backend's
error against a high-precision oracle may be at most twice the error of the PyTorch
reference run in the same low precision, plus a small atol. The oracle is the reference
run on the same (already rounded) inputs upcast to float64, so for float32 inputs the
reference's own float32 error is a meaningful baseline too.
"""
from __future__ import annotations

import torch

from .ops import _dispatch

# Shapes the Triton interpreter can get through in well under a second per case: it is
# about 1000x slower than torch on the CPU (TRITON_INTERPRET=1).
SLOW_BACKENDS = ("triton",)

# The atol of the rule, in units of the output dtype's machine epsilon times the
# oracle's largest magnitude. For 8/11-bit mantissas: half an ulp (one extra rounding,
# e.g. a 1-ulp fp32 difference that flips a bf16 rounding). For float32/float64 the
# reference's own error can be ~0 and only the summation order differs: a few ulps.
ATOL_ULPS = {torch.bfloat16: 0.5, torch.float16: 0.5, torch.float32: 8.0, torch.float64: 64.0}


def cpu_backends(op: str) -> list[str]:
    """Backends that run ``op`` on CPU tensors here: built, and declared for CPU tensors
    (or any device; the Triton rows are only under TRITON_INTERPRET=1)."""
    return [name for name, row in _dispatch.table(op).items()
            if row.available() and row.device_type() in (None, "cpu")]


def cases(op: str, shapes, small_shapes=None) -> list:
    """``pytest.param((backend, shape))`` for every CPU backend of ``op``.

    Backends in ``SLOW_BACKENDS`` get ``small_shapes`` (default: the first shape only).
    """
    import pytest  # noqa: PLC0415 - only the tests import this module's pytest helpers

    out = []
    for backend in cpu_backends(op):
        use = shapes if backend not in SLOW_BACKENDS else (small_shapes or shapes[:1])
        for shape in use:
            out.append(pytest.param(backend, shape, id=f"{backend}-{_shape_id(shape)}"))
    return out


def _shape_id(shape) -> str:
    if isinstance(shape, dict):
        return "-".join(f"{k}{v}" for k, v in shape.items())
    if isinstance(shape, (tuple, list)):
        return "x".join(_shape_id(s) for s in shape)
    return str(shape)


def skip_unless_supported(op: str, backend: str, *args) -> None:
    """Skip (rather than silently test the reference) when ``backend`` declines these inputs."""
    import pytest  # noqa: PLC0415

    why = _dispatch.why_not(_dispatch.table(op)[backend], args[0].device.type, *args)
    if why is not None:
        pytest.skip(f"{backend} does not take these inputs: {why}")


def to64(x):
    """float64 copy of a tensor (or a tuple/list of them, None kept) for the oracle."""
    if isinstance(x, (tuple, list)):
        return type(x)(to64(t) for t in x)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    return x


def error_bound(ref_lowp: torch.Tensor, oracle: torch.Tensor, out_dtype: torch.dtype,
                atol_ulps: float | None = None, factor: float = 2.0) -> float:
    """factor (2) x (reference's error in its own precision) + atol, the largest error allowed."""
    oracle = oracle.detach().to(torch.float64)
    base = (ref_lowp.detach().to(torch.float64) - oracle).abs().max().item() if oracle.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    ulps = ATOL_ULPS[out_dtype] if atol_ulps is None else atol_ulps
    return factor * base + ulps * torch.finfo(out_dtype).eps * max(scale, 1e-30)


def assert_close_to_oracle(out: torch.Tensor, ref_lowp: torch.Tensor, oracle: torch.Tensor, *,
                           name: str = "output", atol_ulps: float | None = None,
                           factor: float = 2.0) -> None:
    """The error rule: ``max|out - oracle| <= factor max|ref_lowp - oracle| + atol`` (factor 2)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != reference's {ref_lowp.dtype}"
    bound = error_bound(ref_lowp, oracle, out.dtype, atol_ulps, factor)
    err = (out.detach().to(torch.float64) - oracle.detach().to(torch.float64)).abs().max().item() \
        if out.numel() else 0.0
    assert err <= bound, f"{name}: error {err:.3g} against the float64 oracle exceeds {bound:.3g} " \
                         f"({factor:g} x the reference's own error in {ref_lowp.dtype} + atol)"


def make_noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, strided storage (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def spy_backends(monkeypatch, op: str) -> list[str]:
    """Record the name of every backend row of ``op`` that runs (restored by monkeypatch)."""
    calls: list[str] = []
    for name, row in _dispatch.table(op).items():
        def impl(*args, _impl=row.impl, _name=name, **kwargs):
            calls.append(_name)
            return _impl(*args, **kwargs)
        monkeypatch.setattr(row, "impl", impl)
    return calls


def check_dispatch(monkeypatch, op: str, run) -> None:
    """The precedence of ``_dispatch`` for one op on CPU tensors, observed by what runs.

    ``run(backend=None)`` calls the public function on small CPU inputs the cpp row
    takes. Checks: explicit argument > ``use_backend`` > ``FLASHCORE_BACKEND`` > auto
    (cpp on CPU); an unavailable backend falls back to the reference, warning once.
    """
    import warnings  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    from .ops import use_backend  # noqa: PLC0415

    calls = spy_backends(monkeypatch, op)
    monkeypatch.delenv("FLASHCORE_BACKEND", raising=False)
    run(backend=None)
    assert calls[-1] == "cpp", "auto should pick cpp for CPU tensors"
    run(backend="reference")
    assert calls[-1] == "reference"
    with use_backend("reference"):
        run(backend=None)
        assert calls[-1] == "reference"
        run(backend="cpp")
        assert calls[-1] == "cpp", "an explicit backend beats the context"
    monkeypatch.setenv("FLASHCORE_BACKEND", "reference")
    run(backend=None)
    assert calls[-1] == "reference", "FLASHCORE_BACKEND is read per call"
    with use_backend("cpp"):
        run(backend=None)
        assert calls[-1] == "cpp", "the context beats the environment"
    monkeypatch.delenv("FLASHCORE_BACKEND")

    # an unbuilt row: falls back to the reference with one warning, then quietly
    monkeypatch.setitem(_dispatch.table(op), "cuda", _dispatch.Row(lambda *a: None, lambda: False,
                                                                  lambda *a, **k: None))
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back to the reference"):
        run(backend="cuda")
    assert calls[-1] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(backend="cuda")
    assert calls[-1] == "reference"
