"""Builds every GPU kernel for sm_80 and sm_90 without a GPU and tabulates the result.

Triton kernels: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
per autotuning config of that generation; registers and local memory (spills)
come from ``cuobjdump --dump-resource-usage`` on the cubin, shared memory from
Triton's metadata, and the PTX tells whether tensor-core instructions were
emitted (``mma.sync`` on sm_80, ``wgmma`` on sm_90).

CUDA C++ kernels: ``nvcc -c -Xptxas -v`` per .cu file and architecture (sm_80,
sm_90a), warnings as errors; ptxas's report gives registers, shared memory and
spill bytes per kernel.

    python bench/gpu_build_report.py               # writes docs/gpu_kernels.md
    python bench/gpu_build_report.py --quick       # one config per kernel, prints only
    python bench/gpu_build_report.py --skip-cuda --variants --json out.json   # what the tests read

Triton kernels compile only when they are real JIT functions, so this runs with
TRITON_INTERPRET unset (the tests, which set it, call it as a subprocess).

The functions here are also what tests/test_gpu_build.py calls.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = (80, 90)
TORCH_DT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclass
class Built:
    kernel: str
    arch: str
    variant: str          # dtype / head dim / tile config
    registers: int
    shared: int           # bytes per block (Triton: dynamic; CUDA: static + what the launcher requests)
    spill: int            # local-memory bytes per thread (spill stores for nvcc)
    mma: str              # tensor-core instruction family seen in the PTX/SASS, or "-"


# ---------------------------------------------------------------- Triton ---

def _triton_specs():
    """(name, jit fn, pointer roles, float args, per-arch configs, extra constexprs per variant)."""
    from flashcore.triton_kernels import attention as A, sampler_step as S, srl_loss as L
    att_f32 = {"LSE", "DELTA"}
    attn_variants = [("fp16", 64), ("fp16", 128), ("bf16", 64), ("fp32", 64), ("fp16", 80)]
    ew_variants = [("fp16", 0), ("bf16", 0), ("fp32", 0)]
    arch_cfg = lambda amp, hop: {80: amp, 90: hop}  # noqa: E731
    return [
        ("attn_fwd", A._attn_fwd.fn, att_f32, {"c2"}, arch_cfg(A.FWD_AMPERE, A.FWD_HOPPER), attn_variants),
        ("attn_bwd_dkdv", A._attn_bwd_dkdv.fn, att_f32, {"c", "c2"}, arch_cfg(A.BWD_AMPERE, A.BWD_HOPPER),
         attn_variants),
        ("attn_bwd_dq", A._attn_bwd_dq.fn, att_f32, {"c", "c2"}, arch_cfg(A.DQ_AMPERE, A.DQ_HOPPER), attn_variants),
        ("attn_bwd_delta", A._attn_bwd_delta, att_f32, set(),
         {80: [_cfg(4, 1, BLOCK_M=64)], 90: [_cfg(4, 1, BLOCK_M=64)]}, [("fp16", 64)]),
        ("sampler_step", S._sampler_step.fn, set(), {"a_t", "s_t", "a_s", "s_s", "w", "clip"},
         arch_cfg(S.EW_AMPERE, S.EW_HOPPER), ew_variants),
        ("srl_loss", L._srl_loss.fn, {"PART"}, {"a_t", "s_t", "g"}, arch_cfg(L.EW_AMPERE, L.EW_HOPPER), ew_variants),
        ("srl_renoise", L._srl_renoise.fn, set(), {"a", "s"}, arch_cfg(L.EW_AMPERE, L.EW_HOPPER), ew_variants),
    ]


def _cfg(num_warps, num_stages, **kw):
    import triton
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def _is_stride(name: str) -> bool:
    return len(name) == 3 and name[0] == "s" and name.islower()      # sqb, sqh, sqm, sqd, ...


def _signature(fn, dtype: str, f32_ptrs: set, floats: set, head_dim: int):
    """Signature, constexpr names and divisibility attrs as the JIT would specialise them at run
    time for contiguous tensors: pointers 16-byte aligned, the unit last-dim stride a constant,
    the other strides and the head dim multiples of 16 when the head dim is."""
    sig, constexprs, attrs, fixed = {}, [], {}, {}
    div16 = [["tt.divisibility", 16]]
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs.append(p.name)
        elif p.name.isupper() and not p.name.startswith(("N_", "HEAD_")) and p.name != "H":
            sig[p.name] = "*fp32" if p.name in f32_ptrs else TORCH_DT[dtype]    # pointers are UPPER_CASE
            attrs[(i,)] = div16
        elif _is_stride(p.name) and p.name.endswith("d"):
            sig[p.name] = "constexpr"
            fixed[p.name] = 1
        else:
            sig[p.name] = "fp32" if p.name in floats else "i32"
            if (_is_stride(p.name) or p.name.startswith("HEAD_")) and head_dim % 16 == 0:
                attrs[(i,)] = div16
    return sig, constexprs, attrs, fixed


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else (shutil.which("cuobjdump") or "")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return int(m.group(1)), max(int(m.group(2)), int(m.group(3)))


def compile_triton(name, fn, f32_ptrs, floats, config, dtype, head_dim, arch) -> Built:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from flashcore.triton_kernels.attention import block_d
    sig, cnames, attrs, fixed = _signature(fn, dtype, f32_ptrs, floats, head_dim)
    consts = dict(config.kwargs)
    if "BLOCK_D" in cnames:
        consts["BLOCK_D"] = block_d(head_dim)
    if "BLOCK_DV" in cnames:
        consts["BLOCK_DV"] = block_d(head_dim)
    if "DOT_F32" in cnames:
        consts["DOT_F32"] = dtype == "fp32"
    for flag in ("HAS_U", "NOISE_CORRECTION", "CLIP"):   # the sampler's widest variant
        if flag in cnames:
            consts[flag] = True
    missing = set(cnames) - set(consts)
    if missing:
        raise ValueError(f"{name}: no value for constexprs {sorted(missing)}")
    k = triton.compile(ASTSource(fn, sig, {**consts, **fixed}, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    regs, local = resource_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
    tiles = "x".join(str(v) for k_, v in sorted(config.kwargs.items()))
    variant = f"{dtype} d={head_dim} {tiles} w{config.num_warps}s{config.num_stages}" if head_dim else \
        f"{dtype} {tiles} w{config.num_warps}"
    return Built(name, f"sm_{arch}", variant, regs, k.metadata.shared, local, mma)


def triton_builds(quick: bool = False, archs=ARCHS, names=None, variants: bool = False):
    """Yields Built rows: every config of each generation for the first variant and the first config
    for the others; ``variants``: the first config for every variant; ``quick``: one row per kernel."""
    from flashcore.triton_kernels.attention import _fits, block_d
    for name, fn, f32_ptrs, floats, configs, kinds in _triton_specs():
        if names is not None and name not in names:
            continue
        for arch in archs:
            for i, (dtype, hd) in enumerate(kinds):
                # the configs the autotuner keeps for this variant (kernels/attention.py, _fits)
                need = {"BLOCK_D": block_d(hd or 64), "DOT_F32": dtype == "fp32"}
                usable = [c for c in configs[arch] if _fits(c, need)]
                for j, config in enumerate(usable):
                    if (quick and (i or j)) or (variants and j) or (i and j):
                        continue
                    yield compile_triton(name, fn, f32_ptrs, floats, config, dtype, hd, arch)


# -------------------------------------------------------------- CUDA C++ ---

NVCC_ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
# What torch's CUDAExtension passes (no implicit half conversions, relaxed constexpr),
# so the check compiles the files as setup.py's build does, plus warnings as errors.
NVCC_FLAGS = ["-std=c++20", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings", "-diag-suppress", "3306",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def nvcc() -> str:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return ""


def kernel_sources() -> list[Path]:
    """The standalone kernel files: everything in csrc/cuda but the torch binding."""
    return sorted(p for p in CUDA_DIR.glob("*.cu") if p.name != "binding.cu")


def compile_cuda(src: Path, arch: str, out_dir: Path, extra: list[str] | None = None) -> str:
    """nvcc -c one file for one architecture; returns ptxas's -v report (raises on error)."""
    cmd = [nvcc(), "-c", str(src), "-o", str(out_dir / f"{src.stem}.{arch}.o"), "-gencode", NVCC_ARCHS[arch],
           *NVCC_FLAGS, *(extra or [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name} for {arch}:\n{' '.join(cmd)}\n{res.stderr}")
    return res.stderr


_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(report: str, arch: str) -> list[Built]:
    """Rows from ptxas -v: one per kernel entry point, under its mangled name."""
    rows, cur, spill = [], None, 0
    for line in report.splitlines():
        if m := _FUNC.search(line):
            cur, spill = m.group(1), 0
        elif (m := _SPILL.search(line)) and cur:
            spill = int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and cur:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append(Built(cur, arch, "", int(m.group(1)), int(smem.group(1)) if smem else 0, spill, "-"))
            cur = None
    return rows


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool:
        return name
    out = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name
    # keep the readable part: function name and template arguments
    return re.sub(r"\(.*\)$", "", out).replace("flashcore::cuda::", "")


def sass_mma(obj: Path) -> dict[str, str]:
    """Mangled kernel name -> "HMMA" when its SASS has tensor-core instructions, else "-"."""
    out = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    return {chunk.split(None, 1)[0]: ("HMMA" if "HMMA" in chunk else "-") for chunk in out.split("Function : ")[1:]}


def build_emu_lib(out: Path) -> Path:
    """The CUDA sources built by g++ against csrc/cuda/host_emu.h (see docs/gpu.md)."""
    srcs = [str(p) for p in kernel_sources()] + [str(CUDA_DIR / "emu_selftest.cpp")]
    cmd = [shutil.which("g++") or "g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
           "-shared", "-fPIC", "-DFLASHCORE_HOST_EMU", "-x", "c++", *srcs, "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"g++ failed on the host emulation build:\n{res.stderr}")
    return out


_DT = {"__half": 0, "__nv_bfloat16": 1, "float": 2}


def dynamic_smem(lib, kernel: str) -> int:
    """Bytes of dynamic shared memory the launcher requests for a demangled attention kernel."""
    m = re.search(r"attn_(fwd|bwd_dq|bwd_dkdv)_kernel<(\w+), (\d+)>", kernel)
    if not m:
        return 0
    fn = lib.fc_attention_fwd_smem if m.group(1) == "fwd" else lib.fc_attention_bwd_smem
    return fn(_DT[m.group(2)], int(m.group(3)))


def cuda_builds(archs=tuple(NVCC_ARCHS)) -> list[Built]:
    import ctypes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = ctypes.CDLL(str(build_emu_lib(Path(tmp) / "emu.so")))
        for src in kernel_sources():
            for arch in archs:
                b_rows = parse_ptxas(compile_cuda(src, arch, Path(tmp)), arch)
                mma = sass_mma(Path(tmp) / f"{src.stem}.{arch}.o")
                for b in b_rows:
                    b.mma = mma.get(b.kernel, "?")
                    b.kernel = _demangle(b.kernel)
                    b.shared += dynamic_smem(lib, b.kernel)
                    b.variant = src.name
                    rows.append(b)
    return rows


# ---------------------------------------------------------------- report ---

def table(rows: list[Built], head: str) -> str:
    lines = [f"| {head} | arch | variant | registers | shared (B) | spill/local (B) | tensor cores |",
             "|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.kernel} | {r.arch} | {r.variant} | {r.registers} | {r.shared} | {r.spill} | {r.mma} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one config per kernel, print only")
    ap.add_argument("--variants", action="store_true", help="Triton: the first config for every variant, print only")
    ap.add_argument("--json", help="also write the rows as JSON to this path")
    ap.add_argument("--out", default=str(ROOT / "docs" / "gpu_kernels.md"))
    ap.add_argument("--skip-triton", action="store_true")
    ap.add_argument("--skip-cuda", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    parts, all_rows = [], []
    if not args.skip_triton:
        rows = list(triton_builds(quick=args.quick, variants=args.variants))
        all_rows += rows
        parts.append(table(rows, "Triton kernel"))
    if not args.skip_cuda:
        if not nvcc():
            print("nvcc not found: CUDA C++ table skipped", file=sys.stderr)
        else:
            rows = cuda_builds()
            all_rows += rows
            parts.append(table(rows, "CUDA C++ kernel"))
    text = "\n\n".join(parts)
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in all_rows]))
    if args.quick or args.variants:
        print(text)
        return 0
    import triton
    import torch
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    header = (f"# GPU kernels: build report\n\nGenerated by `python bench/gpu_build_report.py` on {stamp} "
              f"(triton {triton.__version__}, torch {torch.__version__}, {_nvcc_version()}), no GPU involved: "
              "these are compile-time figures, not measurements. Registers and local memory are per thread, "
              "shared memory per block. Triton rows: every autotuning config of the generation for the first "
              "variant, the first config for the others; `dN` is the head dim (padded to a power of two). "
              "CUDA C++ rows: ptxas -v for each kernel instantiation (template arguments: storage type, "
              "padded head dim); shared memory is static plus the dynamic amount the launcher requests; "
              "tensor cores: HMMA instructions in the kernel's SASS (cuobjdump -sass).\n\n")
    Path(args.out).write_text(header + text + "\n")
    print(f"wrote {args.out}")
    return 0


def _nvcc_version() -> str:
    if not nvcc():
        return "no nvcc"
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"nvcc {m.group(1)}" if m else "nvcc"


if __name__ == "__main__":
    sys.exit(main())
