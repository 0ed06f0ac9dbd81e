"""GPU kernels proven without a GPU.

1. Triton: every kernel compiles ahead of time for sm_80 and sm_90 with
   Triton's own compiler, within the generation's register and shared-memory
   limits, and the attention kernels emit tensor-core instructions.
2. CUDA C++: every kernel file compiles with nvcc for sm_80 and sm_90a with
   warnings as errors.

Slow (``-m slow``, ``make test-slow``): the Triton builds (one subprocess
compiling every kernel and variant, ~30-60 s from a cold Triton cache), the
nvcc build of attention_bwd.cu (~20-35 s an arch) and of the torch binding
(~60 s). The quick set keeps nvcc for the other kernel files and the host
emulation.
3. CUDA C++ logic: the same kernel sources, built by g++ against the host
   emulation (csrc/cuda/host_emu.h), run their whole grid on the CPU through
   the raw-pointer launchers and match the ops' references.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashcore.cli_bench import load_bench
from flashcore.ops import (attention_bwd_ref, attention_ref, sampler_step_ref, srl_loss_ref,
                           srl_renoise_ref)

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
report = load_bench("gpu_build_report")     # the bench scripts' one loader (flashcore/cli_bench.py)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
# Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448, "sm_90a": 232448}
FC_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


# ------------------------------------------------------------ Triton AOT ---

TRITON_KERNELS = ["attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_delta", "sampler_step", "srl_loss",
                  "srl_renoise"]


@pytest.fixture(scope="module")
def triton_builds(tmp_path_factory):
    """Every Triton kernel, every variant (dtype, head dim), the first config of each
    generation, compiled for sm_80 and sm_90 by the report script in a subprocess: the
    tests run with TRITON_INTERPRET=1, under which kernels are not compilable JIT functions."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("aot") / "triton.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_build_report.py"), "--skip-cuda", "--variants",
                          "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return [report.Built(**r) for r in json.loads(out.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [f"sm_{a}" for a in report.ARCHS])
@pytest.mark.parametrize("name", TRITON_KERNELS)
def test_triton_kernel_compiles_for_gpu(triton_builds, name, arch):
    rows = [b for b in triton_builds if b.kernel == name and b.arch == arch]
    assert rows, f"{name} was not built for {arch}"
    for b in rows:
        assert 0 < b.registers <= 255, b
        assert b.shared <= SMEM_LIMIT[b.arch], b
        if name.startswith("attn_") and name != "attn_bwd_delta" and not b.variant.startswith("fp32"):
            assert b.mma == ("wgmma" if arch == "sm_90" else "mma.sync"), f"attention off the tensor cores: {b}"


@pytest.mark.slow
def test_triton_variants_cover_dtypes_and_odd_head_dims(triton_builds):
    variants = {b.variant.split()[0] + " " + b.variant.split()[1] for b in triton_builds if b.kernel == "attn_fwd"}
    assert {"fp16 d=64", "bf16 d=64", "fp32 d=64", "fp16 d=80", "fp16 d=128"} <= variants


# ------------------------------------------------------------ nvcc ---------

needs_nvcc = pytest.mark.skipif(not report.nvcc(), reason="nvcc not found")


@needs_nvcc
@pytest.mark.parametrize("arch", sorted(report.NVCC_ARCHS))
@pytest.mark.parametrize("src", [pytest.param(p.name, marks=[pytest.mark.slow] if p.name == "attention_bwd.cu" else [])
                                 for p in report.kernel_sources()])
def test_cuda_kernel_compiles_with_nvcc(src, arch, tmp_path):
    # attention files: two of the four padded head dims (one per tile shape) keep CI quick;
    # bench/gpu_build_report.py compiles all of them
    extra = ["-DFLASHCORE_CUDA_CHECK_SUBSET"] if src.startswith("attention") else []
    out = report.compile_cuda(CUDA_DIR / src, arch, tmp_path, extra)
    rows = report.parse_ptxas(out, arch)
    assert rows, f"ptxas reported no kernel for {src}"
    mma = report.sass_mma(tmp_path / f"{Path(src).stem}.{arch}.o")
    for r in rows:
        assert r.registers <= 255 and r.shared <= 48 * 1024, r
        if "attn_" in r.kernel and "delta" not in r.kernel and ("6__half" in r.kernel or "bfloat16" in r.kernel):
            assert mma[r.kernel] == "HMMA", f"{r.kernel} does not use the tensor cores on {arch}"


@needs_nvcc
@pytest.mark.slow
def test_cuda_binding_compiles_with_nvcc(tmp_path):
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    report.compile_cuda(CUDA_DIR / "binding.cu", "sm_80", tmp_path,
                        incs + ["-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"])


# ------------------------------------------------------------ host emulation

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The CUDA sources built by g++ against host_emu.h, loaded through ctypes."""
    if not shutil.which("g++"):
        pytest.skip("g++ not found")
    lib = report.build_emu_lib(tmp_path_factory.mktemp("emu") / "libflashcore_cuda_emu.so")
    so = ctypes.CDLL(str(lib))
    so.fc_srl_loss_workspace.restype = ctypes.c_int64
    return so


@pytest.fixture(params=["forward", "reverse"])
def emu_ordered(emu, request):
    """The emulation with a block's threads resumed in index order, then in reverse: a
    missing barrier then reads unwritten (or overwritten) shared memory in one of them."""
    emu.fc_emu_set_reverse_order(int(request.param == "reverse"))
    yield emu
    emu.fc_emu_set_reverse_order(0)


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _f(x):
    return ctypes.c_float(x)


def test_emulator_rounds_16_bit_floats_like_torch(emu):
    every_half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    out = torch.empty(every_half.numel(), dtype=torch.float32)
    emu.fc_emu_half_to_float(_p(every_half), _p(out), ctypes.c_int64(out.numel()))
    want = every_half.view(torch.float16).float()
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-7, 1e-5, 1.0, 300.0, 7e4)] +
                  [torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 5.96e-8, 2.98e-8])])
    for conv, dt in ((emu.fc_emu_float_to_half, torch.float16), (emu.fc_emu_float_to_bf16, torch.bfloat16)):
        bits = torch.empty(x.numel(), dtype=torch.int16)
        conv(_p(x), _p(bits), ctypes.c_int64(x.numel()))
        assert torch.equal(bits, x.to(dt).view(torch.int16)), dt


def test_emulator_barriers_and_shuffles(emu):
    assert emu.fc_emu_detects_deadlock() == 1
    a = torch.arange(64, dtype=torch.int32)
    b = torch.zeros(64, dtype=torch.int32)
    emu.fc_emu_reverse(_p(a), _p(b), 64)
    assert torch.equal(b, a.flip(0))
    for order in (0, 1):   # the emulator's own race check: a missing barrier is seen either way
        emu.fc_emu_set_reverse_order(order)
        fresh = a + 1000 * (order + 1)   # new values: static shared memory keeps the last launch's
        emu.fc_emu_reverse_without_barrier(_p(fresh), _p(b), 64)
        assert not torch.equal(b, fresh.flip(0))
    emu.fc_emu_set_reverse_order(0)
    x = torch.rand(64)
    y = torch.zeros(64)
    emu.fc_emu_warp_sums(_p(x), _p(y), 64)
    torch.testing.assert_close(y, torch.cat([x[:32].sum().expand(32), x[32:].sum().expand(32)]))


DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _close(got, want, dtype):
    """At most one unit in the last place of the output dtype apart (float32 maths either side)."""
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [(False, False, 0.0), (True, False, 0.0), (True, True, 1.0), (False, True, 0.5)],
                         ids=["plain", "cfg", "cfg-nc-clip", "nc-clip"])
def test_cuda_sampler_step_on_host(emu, dtype, cfg):
    has_u, nc, clip = cfg
    g = torch.Generator().manual_seed(1)
    n = 3 * 256 * 2 + 17          # more than the emulated grid of 3 blocks: the grid-stride loop turns
    xt, ec, eu, xT = (torch.randn(n, generator=g).to(dtype) for _ in range(4))
    eu, xT = (eu if has_u else None), (xT if nc else None)
    xn, x0 = torch.empty_like(xt), torch.empty_like(xt)
    k = (0.3, 0.95, 0.7, 0.71, 2.5, clip)
    rc = emu.fc_sampler_step(_p(xt), _p(ec), _p(eu), _p(xT), _p(xn), _p(x0), ctypes.c_int64(n), FC_DT[dtype],
                             *map(_f, k), None)
    assert rc == 0
    want = sampler_step_ref(xt, ec, eu, xT, *k[:5], noise_correction=nc, clip=clip)
    _close(xn, want[0], dtype)
    _close(x0, want[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_srl_loss_and_renoise_on_host(emu_ordered, dtype):
    emu = emu_ordered
    g = torch.Generator().manual_seed(2)
    n = 5000
    xt, es, tgt = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    grad, loss = torch.empty_like(xt), torch.empty(1)
    ws = torch.empty(emu.fc_srl_loss_workspace(ctypes.c_int64(n)))
    rc = emu.fc_srl_loss(_p(xt), _p(es), _p(tgt), _p(grad), _p(loss), _p(ws), ctypes.c_int64(n), FC_DT[dtype],
                         _f(0.4), _f(0.9), None)
    assert rc == 0
    want_loss, want_grad = srl_loss_ref(xt, es, tgt, 0.4, 0.9)
    torch.testing.assert_close(loss[0], want_loss, rtol=1e-5, atol=0)
    _close(grad / want_grad.abs().max(), want_grad / want_grad.abs().max(), dtype)
    out = torch.empty_like(xt)
    assert emu.fc_srl_renoise(_p(xt), _p(es), _p(out), ctypes.c_int64(n), FC_DT[dtype], _f(0.3), _f(0.8), None) == 0
    _close(out, srl_renoise_ref(xt, es, 0.3, 0.8), dtype)


# (B, H, Nq, Nk, D): every padded head dim (24->32, 40->64, 80->96, 128), odd lengths, a
# query tile shorter than the block, keys fewer than one tile.
ATTN_SHAPES = [(1, 2, 70, 90, 40), (2, 1, 17, 33, 80), (1, 1, 5, 3, 128), (1, 1, 33, 65, 24)]


def _attn_inputs(shape, dtype, seed):
    B, H, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (Nq, Nk, Nk))
    return q, k, v, torch.randn(B, H, Nq, D, generator=g).to(dtype), D ** -0.5


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_attention_on_host(emu_ordered, dtype, shape):
    """FlashAttention's rule: error vs the float64 reference at most twice that of the
    reference run in the input precision, plus a small atol."""
    emu = emu_ordered
    q, k, v, do, scale = _attn_inputs(shape, dtype, seed=3)
    B, H, Nq, Nk, D = shape
    atol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    o, lse = torch.empty_like(q), torch.empty(B, H, Nq)
    assert emu.fc_attention_fwd(_p(q), _p(k), _p(v), _p(o), _p(lse), B, H, Nq, Nk, D, FC_DT[dtype], _f(scale),
                                None) == 0
    o64, lse64 = attention_ref(q.double(), k.double(), v.double(), scale)
    o_low, _ = attention_ref(q, k, v, scale)
    assert _err(o, o64) <= 2 * _err(o_low, o64) + atol
    assert _err(lse, lse64) <= 1e-4

    dq, dk, dv, delta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(B, H, Nq)
    assert emu.fc_attention_bwd(_p(do), _p(q), _p(k), _p(v), _p(o), _p(lse), _p(dq), _p(dk), _p(dv), _p(delta),
                                B, H, Nq, Nk, D, FC_DT[dtype], _f(scale), None) == 0
    want = attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), o64, lse64, scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attention_ref(*leaves, scale)[0].backward(do)      # the low-precision baseline, autograd in dtype
    for name, got, ref, low in zip(("dq", "dk", "dv"), (dq, dk, dv), want, (t.grad for t in leaves)):
        assert _err(got, ref) <= 2 * _err(low, ref) + atol, name


def test_cuda_launchers_refuse_what_they_do_not_take(emu):
    q = torch.zeros(1, 1, 4, 160, dtype=torch.float16)
    o, lse = torch.empty_like(q), torch.empty(1, 1, 4)
    assert emu.fc_attention_fwd(_p(q), _p(q), _p(q), _p(o), _p(lse), 1, 1, 4, 4, 160, 0, _f(1.0), None) == -2
    assert emu.fc_attention_fwd(_p(q), _p(q), _p(q), _p(o), _p(lse), 1, 1, 4, 4, 16, 7, _f(1.0), None) == -1
    assert emu.fc_attention_fwd(_p(q), _p(q), _p(q), _p(o), _p(lse), 1, 1, 0, 4, 16, 0, _f(1.0), None) == -3


def test_cuda_attention_shared_memory_fits_a100_and_h100(emu):
    for dt in FC_DT.values():
        for d in (32, 64, 96, 128):
            for smem in (emu.fc_attention_fwd_smem(dt, d), emu.fc_attention_bwd_smem(dt, d)):
                assert 0 < smem <= SMEM_LIMIT["sm_80"]
