"""GPU benchmark of flashcore's kernels against PyTorch's and xformers' attention.

Providers, side by side in one run:
  attention     flashcore-triton, flashcore-cuda, sdpa-flash, sdpa-efficient,
                sdpa-cudnn (PyTorch SDPA with one backend forced), xformers
                (memory_efficient_attention, when installed), eager (matmul-softmax-matmul)
  sampler_step  flashcore-triton, flashcore-cuda, eager, compile (torch.compile of the
                reference); the step is also timed as a replayed CUDA graph
  srl_loss      flashcore-triton, flashcore-cuda, eager, compile

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
run, warm-up first) with quantiles 0.5/0.2/0.8, or ``do_bench_cudagraph`` for
the graph rows; never a synchronize per iteration. Attention is reported in
TFLOP/s (4 B H Nq Nk D forward, x2.5 for backward) with the share of the
device's dense peak, element-wise ops in GB/s (bytes read plus written).
Element-wise rows also get the share of the device's HBM peak. Rows are
appended to a CSV in the columns of the CPU benchmarks, one case at a time (a
run stopped by a time limit keeps what it measured); ``compile`` providers get a
``<op>.compile`` row (unit s) for their first call.

    python bench/bench_gpu.py                       # all ops, default shapes, CSV under out/bench/
    python bench/bench_gpu.py --ops attention --dtype bf16 --csv bench/results/results.csv
    python bench/bench_gpu.py --quick --budget-s 60 # the short set make gpu-check runs
    python bench/bench_gpu.py --dry-run             # no GPU: plan, providers, CSV format
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flashcore import benchmarking as B

COLUMNS = B.COLUMNS           # the CPU benchmarks' columns, appended to the same results.csv
append_csv = B.append_csv
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTILES = [0.5, 0.2, 0.8]


@dataclass(frozen=True)
class Peak:
    tflops: dict            # dtype -> dense TFLOP/s (tensor cores for fp16/bf16; plain fp32, no TF32)
    gbps: float             # DRAM (HBM) bandwidth, GB/s


# Published peaks, for the "% of peak" figures; dense, i.e. without the 2:4 sparsity
# that the data sheets' headline tensor figures assume (those are twice these):
#   NVIDIA H100 Tensor Core GPU data sheet: SXM5 / PCIe / NVL: BF16 and FP16 989 / 756 / 835
#     TFLOPS dense (1,979 / 1,513 / 1,671 sparse), FP32 67 / 51 / 60 TFLOPS,
#     memory 3.35 / 2.0 / 3.9 TB/s;
#   NVIDIA H200 Tensor Core GPU data sheet: SXM / NVL: BF16 and FP16 989 / 835 dense
#     (1,979 / 1,671 sparse), FP32 67 / 60 TFLOPS, HBM3e 4.8 TB/s both;
#   NVIDIA A100 Tensor Core GPU data sheet: BF16 and FP16 312, FP32 19.5 TFLOPS, memory
#     2,039 GB/s (80 GB SXM), 1,935 (80 GB PCIe), 1,555 (40 GB);
#   NVIDIA L4 and A10 data sheets: 121 / 125 dense BF16, 30.3 / 31.2 FP32, 300 / 600 GB/s.
# Keys are regular expressions over torch.cuda.get_device_name(), most specific first
# (an H100 SXM names itself "NVIDIA H100 80GB HBM3", an H200 SXM "NVIDIA H200").
PEAKS = {
    r"H200 NVL": Peak({"fp16": 835.0, "bf16": 835.0, "fp32": 60.0}, 4800.0),
    r"H200": Peak({"fp16": 989.0, "bf16": 989.0, "fp32": 67.0}, 4800.0),
    r"H100 NVL": Peak({"fp16": 835.0, "bf16": 835.0, "fp32": 60.0}, 3900.0),
    r"H100 PCIe": Peak({"fp16": 756.0, "bf16": 756.0, "fp32": 51.0}, 2000.0),
    r"H100": Peak({"fp16": 989.0, "bf16": 989.0, "fp32": 67.0}, 3350.0),
    r"A100.*80GB.*PCIe|A100-PCIE-80GB": Peak({"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}, 1935.0),
    r"A100-SXM4-80GB|A100.*80GB": Peak({"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}, 2039.0),
    r"A100": Peak({"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}, 1555.0),
    r"\bL4\b": Peak({"fp16": 121.0, "bf16": 121.0, "fp32": 30.3}, 300.0),
    r"\bA10\b": Peak({"fp16": 125.0, "bf16": 125.0, "fp32": 31.2}, 600.0),
}
# (B, H, N, D): DiT-S/2 at 256 tokens, DiT-XL/2 (16 heads x 72) at 256 and 1024 tokens,
# longer sequences, the awkward head dims 40 and 80.
ATTN_SHAPES = [(8, 6, 256, 64), (8, 16, 256, 72), (8, 16, 1024, 72), (4, 16, 1024, 64), (2, 16, 4096, 64),
               (2, 16, 4096, 128), (4, 12, 1024, 40), (4, 12, 1024, 80)]
EW_SHAPES = [(8, 4, 32, 32), (16, 4, 64, 64), (4, 16, 128, 128), (64, 16, 128, 128)]
# --quick (make gpu-check): the model shapes that matter most, a latent-sized (launch-bound)
# and a 32 MiB-per-tensor (bandwidth-bound, well past the 50-60 MB L2) element-wise case
ATTN_SHAPES_QUICK = [(8, 6, 256, 64), (8, 16, 256, 72), (8, 16, 1024, 72)]
EW_SHAPES_QUICK = [(8, 4, 32, 32), (64, 16, 128, 128)]


@dataclass
class Case:
    name: str              # op, with ".bwd" / ".graph" for the variants
    provider: str
    shape: tuple
    dtype: str
    unit: str              # TFLOP/s or GB/s
    work: float            # FLOPs or bytes per call
    build: Callable[[str], Callable[[], object]] | None   # device -> the timed callable
    why_not: str | None = None   # set when the provider cannot run here


# ------------------------------------------------------------ providers ---

def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return run


def _xformers():
    import xformers.ops as xops   # (B, N, H, D) layout

    def run(q, k, v):
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return run


def _flashcore(op: str, backend: str):
    import flashcore.ops as ops
    fn = getattr(ops, op)

    def run(*args, **kwargs):
        return fn(*args, backend=backend, **kwargs)
    return run


def attention_providers() -> dict[str, Callable[[], Callable]]:
    from flashcore.ops import attention_ref
    provs = {
        "flashcore-triton": lambda: _flashcore("attention", "triton"),
        "flashcore-cuda": lambda: _flashcore("attention", "cuda"),
        "sdpa-flash": lambda: _sdpa("flash"),
        "sdpa-efficient": lambda: _sdpa("efficient"),
        "sdpa-cudnn": lambda: _sdpa("cudnn"),
        "eager": lambda: (lambda q, k, v: attention_ref(q, k, v, q.shape[-1] ** -0.5)[0]),
    }
    if _importable("xformers"):
        provs["xformers"] = _xformers
    return provs


def _importable(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def backend_reason(op: str, backend: str, device: str) -> str | None:
    """Why a flashcore backend will not run this op here, or None."""
    from flashcore.ops import backends_for
    if device != "cuda" or backend not in backends_for(op):
        return f"{backend} backend not available (needs a GPU and the built kernels)"
    return None


# ------------------------------------------------------------ cases -------

def attention_cases(dtypes, shapes, device: str) -> list[Case]:
    cases = []
    for dt in dtypes:
        for (B, H, N, D) in shapes:
            flops = 4.0 * B * H * N * N * D
            for prov, make in attention_providers().items():
                why = None
                if prov.startswith("flashcore-"):
                    why = backend_reason("attention", prov.split("-")[1], device)
                elif device != "cuda":
                    why = "needs a CUDA device"
                for bwd in (False, True):
                    cases.append(Case("attention.bwd" if bwd else "attention", prov, (B, H, N, D), dt, "TFLOP/s",
                                      flops * (2.5 if bwd else 1.0), _attention_builder(make, (B, H, N, D), dt, bwd),
                                      why))
    return cases


def _attention_builder(make, shape, dt, bwd: bool):
    def build(device):
        fn = make()
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape, device=device, dtype=DTYPES[dt], generator=g).requires_grad_(bwd)
                   for _ in range(3))
        if not bwd:
            return lambda: fn(q, k, v)
        out = fn(q, k, v)
        dout = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return build


def elementwise_cases(dtypes, shapes, device: str) -> list[Case]:
    from flashcore.ops import sampler_step_ref, srl_loss_ref
    step = lambda xt, ec, eu, xT: sampler_step_ref(xt, ec, eu, xT, 0.3, 0.95, 0.7, 0.71, 4.0, True, 1.0)  # noqa: E731
    loss = lambda xt, es, tg: srl_loss_ref(xt, es, tg, 0.4, 0.9)   # noqa: E731
    kw = dict(a_t=0.3, s_t=0.95, a_s=0.7, s_s=0.71, guidance=4.0, noise_correction=True, clip=1.0)
    cases = []
    for dt in dtypes:
        size = torch.tensor([], dtype=DTYPES[dt]).element_size()
        for shape in shapes:
            n = math.prod(shape)
            for op, nin, nout, ref, call in (
                    ("sampler_step", 4, 2, step,
                     lambda f: (lambda xt, ec, eu, xT: f(xt, ec, eps_u=eu, x_T=xT, **kw))),
                    ("srl_loss", 3, 1, loss, lambda f: (lambda xt, es, tg: f(xt, es, tg, a_t=0.4, s_t=0.9)))):
                provs = {"flashcore-triton": lambda op=op, call=call: call(_flashcore(op, "triton")),
                         "flashcore-cuda": lambda op=op, call=call: call(_flashcore(op, "cuda")),
                         "eager": lambda ref=ref: ref,
                         "compile": lambda ref=ref: B.compile_fresh(ref)}   # own dynamo cache per case
                for prov, make in provs.items():
                    why = backend_reason(op, prov.split("-")[1], device) if prov.startswith("flashcore-") else \
                        (None if device == "cuda" else "needs a CUDA device")
                    names = [op] + ([f"{op}.graph"] if op == "sampler_step" and prov != "compile" else [])
                    for name in names:
                        cases.append(Case(name, prov, shape, dt, "GB/s", float(n * size * (nin + nout)),
                                          _ew_builder(make, shape, dt, nin), why))
    return cases


def _ew_builder(make, shape, dt, nin):
    def build(device):
        fn = make()
        g = torch.Generator(device=device).manual_seed(0)
        xs = [torch.randn(shape, device=device, dtype=DTYPES[dt], generator=g) for _ in range(nin)]
        return lambda: fn(*xs)
    return build


# ------------------------------------------------------------ timing ------

def time_case(case: Case, device: str) -> tuple[tuple[float, float, float], float]:
    """((p50, p20, p80) in ms, seconds of the first call: compile and autotuning)."""
    import triton.testing as tt
    fn = case.build(device)
    t0 = time.perf_counter()
    fn()                                       # warm-up and compile outside the timed region
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if case.name.endswith(".graph"):
        return tuple(tt.do_bench_cudagraph(fn, rep=50, quantiles=QUANTILES)), first
    return tuple(tt.do_bench(fn, warmup=25, rep=100, quantiles=QUANTILES)), first


def device_peak(device_name: str) -> Peak | None:
    for pattern, pk in PEAKS.items():
        if re.search(pattern, device_name):
            return pk
    return None


def peak(device_name: str, dtype: str) -> float | None:
    """Dense TFLOP/s of ``dtype`` ("fp16", "bf16", "fp32") on this device, or None if unknown."""
    pk = device_peak(device_name)
    return pk.tflops[dtype] if pk else None


def peak_gbps(device_name: str) -> float | None:
    pk = device_peak(device_name)
    return pk.gbps if pk else None


def share_of_peak(unit: str, value: float, device_name: str, dtype: str) -> float | None:
    """``value`` (TFLOP/s or GB/s) as a percentage of the device's published peak."""
    pk = peak(device_name, dtype) if unit == "TFLOP/s" else peak_gbps(device_name) if unit == "GB/s" else None
    return 100.0 * value / pk if pk else None


def row(case: Case, ms: tuple[float, float, float], device_name: str) -> dict:
    p50, p20, p80 = ms
    scale = 1e-12 if case.unit == "TFLOP/s" else 1e-9
    value = case.work * scale / (p50 * 1e-3) if p50 and p50 > 0 else float("nan")
    return {"name": case.name, "provider": case.provider, "shape": "x".join(map(str, case.shape)),
            "dtype": case.dtype, "p50_ms": f"{p50:.5f}", "p20_ms": f"{p20:.5f}", "p80_ms": f"{p80:.5f}",
            "unit": case.unit, "value": f"{value:.6g}", "device": device_name, "commit": B.git_commit(),
            "torch": torch.__version__,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def compile_row(case: Case, seconds: float, device_name: str) -> dict:
    """The first call of a ``compile`` provider (trace, inductor, Triton builds), unit s."""
    ms = seconds * 1e3
    r = row(case, (ms, ms, ms), device_name)
    r.update(name=f"{case.name}.compile", unit="s", value=f"{seconds:.6g}")
    return r


# ------------------------------------------------------------ main --------

def plan(ops, dtypes, device: str, quick: bool = False) -> list[Case]:
    cases = []
    if "attention" in ops:
        cases += attention_cases(dtypes, ATTN_SHAPES_QUICK if quick else ATTN_SHAPES, device)
    if ops & {"sampler_step", "srl_loss"}:
        cases += [c for c in elementwise_cases(dtypes, EW_SHAPES_QUICK if quick else EW_SHAPES, device)
                  if c.name.split(".")[0] in ops]
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="attention,sampler_step,srl_loss")
    ap.add_argument("--dtype", default="fp16,bf16", help="comma list of fp16,bf16,fp32")
    ap.add_argument("--quick", action="store_true", help="the short shape set (make gpu-check)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no case after this many seconds (the cases left are listed as not run)")
    ap.add_argument("--csv", default=None,
                    help="CSV to append to (default: results.csv in a new folder under out/bench/; "
                         "bench/results/results.csv for the committed table)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no timing: list every case with its provider's status and check the CSV format")
    args = ap.parse_args(argv)
    ops = set(args.ops.split(","))
    dtypes = args.dtype.split(",")
    unknown = (ops - {"attention", "sampler_step", "srl_loss"}) | (set(dtypes) - set(DTYPES))
    if unknown:
        ap.error(f"unknown op or dtype: {sorted(unknown)}")
    if args.csv:
        try:       # --quick never writes the committed tables
            B.resolve_out_dir(Path(args.csv).parent, quick=args.quick)
        except ValueError as e:
            ap.error(str(e))
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    cases = plan(ops, dtypes, device, args.quick)
    if args.dry_run:
        # every row must format into the CSV's columns; timings are placeholders
        for c in cases:
            r = row(c, (float("nan"),) * 3, "dry-run")
            assert list(r) == COLUMNS and list(compile_row(c, 1.0, "dry-run")) == COLUMNS, list(r)
            status = "runs on a GPU" if c.why_not is None else f"skipped here: {c.why_not}"
            sys.stdout.write(f"{c.name:18s} {c.provider:17s} {r['shape']:14s} {c.dtype:5s} {c.unit:8s} {status}\n")
        sys.stdout.write(f"{len(cases)} cases, CSV columns: {','.join(COLUMNS)}\n")
        return 0
    if device != "cuda":
        sys.stderr.write("no CUDA device: use --dry-run here\n")
        return 2
    name = torch.cuda.get_device_name()
    csv_path = Path(args.csv) if args.csv else B.resolve_out_dir(None, quick=args.quick) / "results.csv"
    start, n_rows, not_run = time.monotonic(), 0, 0
    for c in cases:
        if c.why_not:
            sys.stdout.write(f"skip {c.name} {c.provider}: {c.why_not}\n")
            continue
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            not_run += 1
            continue
        try:
            ms, first = time_case(c, device)
        except Exception as e:  # noqa: BLE001 - one provider failing (e.g. SDPA backend refusing a shape) is a row skipped
            sys.stdout.write(f"skip {c.name} {c.provider} {c.shape} {c.dtype}: {type(e).__name__}: {e}\n")
            continue
        r = row(c, ms, name)
        new = [compile_row(c, first, name)] if c.provider == "compile" else []
        append_csv(csv_path, new + [r])          # case by case: a run cut short keeps its rows
        n_rows += len(new) + 1
        pct = share_of_peak(c.unit, float(r["value"]), name, c.dtype)
        share = f" ({pct:.0f}% of peak)" if pct is not None else ""
        sys.stdout.write(f"{c.name:18s} {c.provider:17s} {r['shape']:14s} {c.dtype:5s} p50 {r['p50_ms']} ms  "
                         f"{r['value']} {c.unit}{share}\n")
        sys.stdout.flush()
    if not_run:
        sys.stdout.write(f"not run: {not_run} cases (past --budget-s {args.budget_s:g} s)\n")
    sys.stdout.write(f"appended {n_rows} rows to {csv_path}\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
