"""Shared benchmark harness: timing, rows, CSV/JSON/markdown/PNG output, suites.

Rows are dicts with the columns of ``COLUMNS`` (the CPU benchmarks in bench/ and
bench/bench_gpu.py write the same CSV); extra keys (``note``, ``rel_err``...) go
to JSON and markdown only. Timing on the CPU: warm-up first, then ``repeats``
samples, each the mean of enough back-to-back calls to last ``min_sample_ms``
(so microsecond kernels are not timer noise); p50 with p20/p80 over samples.
"""
from __future__ import annotations

import csv
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

COLUMNS = ["name", "provider", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "unit", "value", "device",
           "commit", "torch", "time"]
ROOT = Path(os.environ.get("FLASHCORE_HOME", Path(__file__).resolve().parents[1]))
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"          # the committed tables: written only when named as --out-dir
RUNS_DIR = ROOT / "out" / "bench"             # git-ignored; one folder per run by default
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# ------------------------------------------------------------------ timing --

@dataclass
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    inner: int            # calls per sample


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 25, min_sample_ms: float = 2.0,
            max_seconds: float = 30.0) -> Timing:
    """Time ``fn()`` on the CPU; returns p50/p20/p80 in ms per call.

    ``max_seconds`` caps the sampling phase (slow providers get fewer samples,
    at least 3) so one slow row cannot stall a whole suite.
    """
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(100_000, math.ceil(min_sample_ms * 1e-3 / once)))
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
        if len(samples) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return Timing(quantile(samples, 0.5), quantile(samples, 0.2), quantile(samples, 0.8), len(samples), inner)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 5, per_round: int = 8,
                        seconds_per_provider: float = 10.0, warmup: int = 2,
                        pause: float = 0.2) -> dict[str, Timing]:
    """Time several providers side by side; returns name -> Timing (ms per call).

    ``rounds`` rounds, each running every provider for a block of calls in turn,
    the order rotating from round to round, so that a slow phase of a shared
    machine (this VM's speed drifts by 10-20% over minutes) lands on every
    provider instead of on whichever was measured then. Each block waits
    ``pause`` seconds and makes one untimed call first: thread pools (OpenMP's,
    ONNX Runtime's) keep spinning for a while after their last task and would
    otherwise slow the next provider's first calls. Blocks hold 2 to
    ``per_round`` calls, fewer for slow providers (``seconds_per_provider`` over
    all rounds); p50/p20/p80 over every timed call of a provider.
    """
    once: dict[str, float] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        once[name] = max(time.perf_counter() - t0, 1e-7)
    block = {k: max(2, min(per_round, int(seconds_per_provider / rounds / v))) for k, v in once.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause)
            fns[name]()
            for _ in range(block[name]):
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: Timing(quantile(v, 0.5), quantile(v, 0.2), quantile(v, 0.8), len(v), 1) for k, v in samples.items()}


def timing_of_seconds(seconds: float) -> Timing:
    """A one-shot measurement (compile time) as a Timing with p20 = p50 = p80."""
    ms = seconds * 1e3
    return Timing(ms, ms, ms, 1, 1)


@functools.lru_cache(maxsize=None)
def copy_bandwidth(nbytes: int = 256 << 20) -> tuple[float, Timing]:
    """This machine's copy bandwidth in GB/s (read + write) and its timing, for a copy of
    ``nbytes`` into another ``nbytes``.

    A preallocated destination, so the number is the memory system's and not
    the page-fault rate of fresh allocations (2 against 100 GB/s, docs/cpu_performance.md).
    Cached per process and size: every element-wise row of one run compares with the
    same measurement.
    """
    n = nbytes // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    tm = measure(lambda: dst.copy_(src), warmup=2, repeats=15, min_sample_ms=1.0)
    return 2 * n * 4 / (tm.p50_ms * 1e-3) / 1e9, tm


def copy_baseline(footprint: int, seen: dict[int, float]) -> tuple[list[dict], float]:
    """The copy to compare an element-wise case that moves ``footprint`` bytes with:
    ``dst.copy_(src)`` into a preallocated ``dst``, ``footprint / 2`` bytes each, so both
    count the same bytes (read + written) over the same amount of memory (a smaller
    footprint keeps more of itself in the last-level cache between calls).

    Returns ``([copy row], GB/s)`` the first time a footprint is asked for in ``seen``
    (a dict the bench module keeps per run), ``([], GB/s)`` after that.
    """
    if footprint in seen:
        return [], seen[footprint]
    bw, t = copy_bandwidth(footprint // 2)
    seen[footprint] = bw
    label = f"2x{footprint / 2 / 2 ** 20:.4g}MiB"
    return [make_row("copy", "torch.copy_", label, "fp32", t, "GB/s", bw, copy_gbps=bw)], bw


# ------------------------------------------------------------------ rows ----

@functools.lru_cache(maxsize=None)
def cpu_identity() -> dict[str, str]:
    """The host CPU as /proc/cpuinfo's first processor names it: ``cpu_vendor``
    (vendor_id), ``cpu_family``, ``cpu_model`` and ``cpu_name`` (model name); "" where
    unknown. Every row carries these, on the GPU too (the host feeds the device).

    "AMD EPYC" alone covers Zen 4 and Zen 5 VMs, whose oneDNN speeds differ 2x
    (docs/cpu_performance.md): the family and model tell them apart (25/17 is Zen 4,
    family 26 Zen 5).
    """
    keys = {"vendor_id": "cpu_vendor", "cpu family": "cpu_family", "model": "cpu_model", "model name": "cpu_name"}
    info = dict.fromkeys(keys.values(), "")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in keys and not info[keys[key.strip()]]:
                    info[keys[key.strip()]] = val.strip()
                if not line.strip():
                    break                     # the first processor is enough
    except OSError:
        pass
    info["cpu_name"] = info["cpu_name"] or platform.processor() or platform.machine()
    return info


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = cpu_identity()
    ident = f", {cpu['cpu_vendor']} family {cpu['cpu_family']} model {cpu['cpu_model']}" if cpu["cpu_family"] else ""
    return f"{cpu['cpu_name']} ({torch.get_num_threads()} threads{ident})"


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        # "-dirty" when the tree has uncommitted changes: the rows then came from no commit
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else str(dtype)


def make_row(name: str, provider: str, shape, dtype, timing: Timing, unit: str, value: float, **extra) -> dict:
    """One result row; ``shape`` a tuple (joined with x) or a string, ``dtype`` a torch dtype or a name."""
    shape = "x".join(map(str, shape)) if isinstance(shape, (tuple, list, torch.Size)) else str(shape)
    row = {"name": name, "provider": provider, "shape": shape, "dtype": dtype_name(dtype),
           "p50_ms": round(timing.p50_ms, 6), "p20_ms": round(timing.p20_ms, 6), "p80_ms": round(timing.p80_ms, 6),
           "unit": unit, "value": round(float(value), 4), "device": device_name(), "commit": git_commit(),
           "torch": torch.__version__,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **cpu_identity()}
    row.update(extra)
    return row


def throughput_row(name, provider, shape, dtype, timing: Timing, unit: str, work: float, **extra) -> dict:
    """Row whose value is ``work`` per second: bytes -> GB/s, FLOPs -> GFLOP/s, calls -> us."""
    if unit == "us":
        value = timing.p50_ms * 1e3
    else:
        value = work / (timing.p50_ms * 1e-3) / 1e9
    return make_row(name, provider, shape, dtype, timing, unit, value, **extra)


def validate_rows(rows: Iterable[dict]) -> None:
    """Raise ValueError unless every row has the columns with sane values."""
    for r in rows:
        missing = [c for c in COLUMNS if c not in r]
        if missing:
            raise ValueError(f"benchmark row {r.get('name')!r}/{r.get('provider')!r} lacks {missing}")
        for c in ("p50_ms", "p20_ms", "p80_ms", "value"):
            if not isinstance(r[c], (int, float)) or not math.isfinite(r[c]) or r[c] < 0:
                raise ValueError(f"benchmark row {r['name']}/{r['provider']}: {c}={r[c]!r}")
        if not r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]:
            raise ValueError(f"benchmark row {r['name']}/{r['provider']}: quantiles out of order")


# ------------------------------------------------------------------ output --

def append_csv(path: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to a CSV in ``COLUMNS`` order, writing the header for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open() as f:
            header = f.readline().strip().split(",")
        if header != COLUMNS:
            raise ValueError(f"{path}: header {header} is not {COLUMNS}; write to a new file")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def with_cpu(rows: list[dict]) -> list[dict]:
    """``rows``, each given the host CPU's identity where it was made without it
    (rows not built by ``make_row``, such as bench_gpu.py's)."""
    return [{**cpu_identity(), **r} for r in rows]


def write_json(path: str | Path, rows: list[dict]) -> None:
    rows = with_cpu(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def _group_key(r: dict) -> tuple:
    return r["name"], r["shape"], r["dtype"]


def markdown_table(rows: list[dict]) -> str:
    """Rows with speed-up against the ``eager`` row of the same case, and the
    share of the measured copy bandwidth for GB/s rows."""
    eager = {_group_key(r): r["p50_ms"] for r in rows if r["provider"] == "eager"}
    first_copy = next((r["value"] for r in rows if r["name"] == "copy"), None)
    lines = ["| name | provider | shape | dtype | p50 ms | p20-p80 ms | value | vs eager | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        base = eager.get(_group_key(r))
        speed = f"{base / r['p50_ms']:.2f}x" if base and r["p50_ms"] > 0 and r["unit"] not in ("s",) else ""
        value = f"{r['value']:.4g} {r['unit']}"
        copy_bw = r.get("copy_gbps") or first_copy     # the copy of the same footprint, if measured
        if r["unit"] == "GB/s" and copy_bw and r["name"] != "copy":
            value += f" ({100 * r['value'] / copy_bw:.0f}% of copy)"
        note = r.get("note", "")
        if r.get("rel_err") is not None:
            note = (note + f" rel. err vs eager fp32 {r['rel_err']:.1e}").strip()
        elif r.get("max_abs_err"):
            note = (note + f" max abs err vs eager {r['max_abs_err']:.1e}").strip()
        lines.append(f"| {r['name']} | {r['provider']} | {r['shape']} | {r['dtype']} | {r['p50_ms']:.4g} | "
                     f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g} | {value} | {speed} | {note} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, title: str, rows: list[dict], notes: Iterable[str] = ()) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = rows[0] if rows else {}
    cpu = {**cpu_identity(), **{k: v for k, v in head.items() if k.startswith("cpu_")}}
    meta = (f"device: {head.get('device', device_name())}; cpu: {cpu['cpu_vendor']} family {cpu['cpu_family']} "
            f"model {cpu['cpu_model']}; torch {torch.__version__}; "
            f"commit {head.get('commit', git_commit())}; {head.get('time', '')}")
    body = [f"# {title}", "", meta, ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    path.write_text("\n".join(body) + "\n" + markdown_table(rows))


def plot(path: str | Path, title: str, rows: list[dict]) -> bool:
    """Grouped bars of p50 latency (log scale) per case and provider; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["unit"] != "s" and r["p50_ms"] > 0]      # compile-time rows: table only
    if not rows:
        return False
    cases = list(dict.fromkeys(f"{r['name']}\n{r['shape']} {r['dtype']}" for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(provs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases) + 2), 4.5))
    for j, p in enumerate(provs):
        xs, ys = [], []
        for r in rows:
            if r["provider"] == p:
                xs.append(cases.index(f"{r['name']}\n{r['shape']} {r['dtype']}") + (j - (len(provs) - 1) / 2) * width)
                ys.append(r["p50_ms"])
        ax.bar(xs, ys, width=width, label=p)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency, ms (log)")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=7, rotation=30, ha="right")
    ax.set_title(f"{title} ({device_name()})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def publish(name: str, title: str, rows: list[dict], out_dir: str | Path, notes: Iterable[str] = ()) -> None:
    """Append to ``out_dir/results.csv``; (re)write ``out_dir/<name>.md`` and ``<name>.png``
    (``resolve_out_dir`` says which folders a run may use)."""
    validate_rows(rows)
    out_dir = Path(out_dir)
    append_csv(out_dir / "results.csv", rows)
    write_markdown(out_dir / f"{name}.md", title, rows, notes)
    plot(out_dir / f"{name}.png", title, rows)


def bandwidth_shape(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """A latent-like (B, 4, 128, 128) shape of 16 MiB per tensor, for GB/s rows.

    Four to six such tensors move >= 64 MB (three, for srl_renoise, 50 MB), and
    each stays well under glibc's largest mmap threshold (32 MiB). Above it
    every fresh output of an op is mmapped and page-faulted on every call,
    which times the allocator rather than the kernel (measured here: the same
    fused sampler update at 7 GB/s with 33 MB fp32 tensors, 41 GB/s with 17 MB
    bf16 ones; a fresh ``a + b`` at 1.3 GB/s with 32 MiB tensors, 33 GB/s
    with 16 or 24 MiB).
    """
    per = 4 * 128 * 128 * torch.empty((), dtype=dtype).element_size()
    return ((16 << 20) // per, 4, 128, 128)


# --------------------------------------------------------------- providers --

def flashcore_backends(op: str, *args) -> list[str]:
    """flashcore backends (not the reference) that would really run ``op`` on these inputs.

    On CPU tensors the GPU backends are left out even when they "run": Triton
    then runs in its interpreter (TRITON_INTERPRET=1, for tests, ~1000x slower),
    which is not a kernel worth timing.
    """
    from flashcore.ops import backends_for
    cpu = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
    return [b for b in backends_for(op, *args) if b != "reference" and not (cpu and b in ("triton", "cuda"))]


def compile_fresh(fn: Callable, **kw) -> Callable:
    """torch.compile of a private copy of ``fn``, so each benchmark case has its own
    dynamo cache (one shared code object would hit the recompile limit of 8 and
    silently fall back to eager after a few shapes and dtypes)."""
    from flashcore.engine import fresh_function
    return torch.compile(fresh_function(fn), **kw)


def timed_first_call(fn: Callable[[], object]) -> float:
    """Seconds of the first call: where torch.compile traces and compiles."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _max_err(out, ref) -> float:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    return max((o.double() - r.double()).abs().max().item() for o, r in zip(outs, refs))


def elementwise_shapes(dtype: torch.dtype, latents: list, quick: bool) -> list:
    """The shapes of an element-wise benchmark: the model latents (microseconds), then
    the GB/s size last (``bandwidth_shape``; a small stand-in under ``--quick``)."""
    return [latents[0], (16, 4, 64, 64)] if quick else list(latents) + [bandwidth_shape(dtype)]


def elementwise_case(name: str, shape, dtype, xs: list[torch.Tensor], n_out: int,
                     provs: dict[str, Callable[[], object]], *, bandwidth: bool, copies: dict[int, float],
                     **kw) -> list[dict]:
    """``bench_case`` for an element-wise op reading ``xs`` and writing ``n_out`` tensors
    of their size: microseconds at model sizes; at the bandwidth size GB/s of the
    minimum traffic, beside a copy of the same footprint measured in the same run."""
    work = math.prod(shape) * xs[0].element_size() * (len(xs) + n_out)
    rows, copy_gbps = [], None
    if bandwidth:
        rows, copy_gbps = copy_baseline(work, copies)
    return rows + bench_case(name, shape, dtype, provs, unit="GB/s" if bandwidth else "us", work=work,
                             copy_gbps=copy_gbps, **kw)


def bench_case(name: str, shape, dtype, provs: dict[str, Callable[[], object]], *, unit: str, work: float,
               providers: tuple[str, ...] | None = None, timing: dict | None = None,
               log: Callable[[str], None] | None = None, notes: dict[str, str] | None = None,
               copy_gbps: float | None = None) -> list[dict]:
    """Rows for one case: validate every provider against ``provs["eager"]``, then time it.

    A provider named ``compile`` also gets a ``<name>.compile`` row (unit s) for
    its first call. ``max_abs_err`` (against eager), ``notes[provider]`` and, for GB/s
    rows, ``copy_gbps`` (the copy of the same footprint, see ``copy_baseline``) ride along
    in JSON/markdown.
    """
    rows = []
    expect = provs["eager"]()
    for prov, fn in provs.items():
        if not keep_provider(prov, providers):
            continue
        if prov.startswith("compile"):
            secs = timed_first_call(fn)
            rows.append(make_row(f"{name}.compile", prov, shape, dtype, timing_of_seconds(secs), "s", secs))
        err = _max_err(fn(), expect)
        t = measure(fn, **(timing or {}))
        extra = {"max_abs_err": err}
        if notes and notes.get(prov):
            extra["note"] = notes[prov]
        if copy_gbps and unit == "GB/s":
            extra["copy_gbps"] = copy_gbps
        rows.append(throughput_row(name, prov, shape, dtype, t, unit, work, **extra))
        if log:
            log(f"{name:22s} {prov:17s} {dtype_name(dtype)} {rows[-1]['shape']:14s} p50 {t.p50_ms * 1e3:10.1f} us"
                f"  {rows[-1]['value']:9.4g} {unit}")
    return rows


# ------------------------------------------------------------------ suites --

def resolve_out_dir(out_dir: str | Path | None, *, quick: bool) -> Path:
    """Where a run writes: ``out_dir``, or else a new folder ``out/bench/<UTC time>[-quick]``.

    The committed tables in bench/results change only when that folder is named
    explicitly, and never with a ``--quick`` smoke run (a ValueError).
    """
    if out_dir is not None:
        path = Path(out_dir)
        if quick and path.resolve().is_relative_to(RESULTS_DIR.resolve()):
            raise ValueError(f"bench: --quick is a smoke run; it does not write to the committed {RESULTS_DIR}")
        return path
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    path, n = RUNS_DIR / stamp, 1
    while path.exists():                       # two runs in the same second
        n += 1
        path = RUNS_DIR / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def keep_provider(provider: str, providers: tuple[str, ...] | None) -> bool:
    """``providers`` filters by prefix: "flashcore" keeps flashcore-cpp and flashcore-eager."""
    return providers is None or any(provider.startswith(p) for p in providers)


def script_main(mod_name: str, argv=None) -> int:
    """``python bench/bench_<x>.py [--quick] [--providers a,b] [--out-dir D] [--json P]``."""
    import argparse
    ap = argparse.ArgumentParser(description=f"flashcore benchmark {mod_name}")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    ap.add_argument("--providers", default=None, help="comma list of provider names or prefixes")
    ap.add_argument("--out-dir", default=None,
                    help=f"results.csv, <name>.md and <name>.png (default: a new folder under {RUNS_DIR}; "
                         f"{RESULTS_DIR} for the committed tables)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    try:
        out_dir = resolve_out_dir(a.out_dir, quick=a.quick)
    except ValueError as e:
        ap.error(str(e))
    mod = sys.modules[mod_name]
    provs = tuple(a.providers.split(",")) if a.providers else None
    rows = mod.run(quick=a.quick, providers=provs, log=lambda s: sys.stdout.write(s + "\n"))
    publish(mod.NAME, mod.TITLE, rows, out_dir, notes=getattr(mod, "NOTES", ()))
    if a.json:
        write_json(a.json, rows)
    sys.stdout.write(f"{len(rows)} rows -> {out_dir}\n")
    return 0
