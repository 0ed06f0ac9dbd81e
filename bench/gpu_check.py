"""make gpu-check: the whole GPU verification of a flashcore checkout in one command.

On one H100/H200, from a fresh clone, in at most 8 minutes (TOTAL_S). Stages, each a
subprocess under its own time limit (its process group is ended when the limit is
reached); a stage that fails or runs out of time is reported with the end of its log,
and the next stage still runs:

  env      versions, nvidia-smi, the commit                                   env.json
  build    FLASHCORE_CUDA=1 pip install --no-build-isolation --no-deps -e .
           for this GPU's architecture, then a check that flashcore's CUDA C++
           and Triton attention rows are available                             build.log
  tests    pytest tests/test_gpu_parity.py with TRITON_INTERPRET=0: Triton
           against CUDA C++ against the reference, forward and backward, every
           op; the engine on cuda against the engine on the CPU               tests.txt
  kernels  bench/bench_gpu.py --quick --dtype bf16                             results.csv, bench.log
  models   bench/bench_gpu_models.py --short, with every second the earlier
           stages left unused                                                 results.csv, gpu_models.md

Everything lands in one folder (--out-dir; default out/gpu-check/<UTC time>/), with
summary.md: the stage table (status, seconds, budget), the failures' last log lines,
the test counts and the kernel table. The exit code is 0 only when every stage passed
(a GPU test skipped counts against it: on a GPU with the extension built, none should).

    python bench/gpu_check.py                  # on the GPU machine (make gpu-check)
    python bench/gpu_check.py --dry-run        # anywhere: plan, budgets, files, the
                                               # benchmarks' dry runs on the CPU
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 480.0                     # the whole check, on one H100/H200
MARGIN_S = 10.0                     # for this script's own work around the stages
# seconds per stage; they add up to TOTAL_S - MARGIN_S, and the last stage also gets what
# the others leave unused (a cold build is ~1-2 min of nvcc on 16 cores, the tests' Triton
# autotuning and the engine tests' inductor compiles another ~2 min on an empty cache)
BUDGETS = {"env": 30.0, "build": 150.0, "tests": 180.0, "kernels": 50.0, "models": 60.0}
FILES = ("summary.md", "env.json", "build.log", "tests.txt", "bench.log", "results.csv", "gpu_models.md")
TAIL_LINES = 20


@dataclass
class Stage:
    name: str
    what: str
    budget_s: float
    cmds: list[list[str]]
    log: str                                   # file in the results folder (appended to)
    env: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()                # files the commands use, relative to the checkout
    grace_s: float = 0.0                       # a benchmark's "{budget}": its limit less this (to write its tables)
    status: str = "not run"
    seconds: float = 0.0
    limit_s: float = 0.0
    note: str = ""
    tail: list[str] = field(default_factory=list)


def cuda_archs(env_info: dict) -> str:
    """The build's FLASHCORE_CUDA_ARCHS: the user's, else this GPU's (Hopper: 9.0a, for wgmma)."""
    if os.environ.get("FLASHCORE_CUDA_ARCHS"):
        return os.environ["FLASHCORE_CUDA_ARCHS"]
    cap = env_info.get("capability")
    if not cap:
        return "8.0;9.0a"                      # setup.py's default
    major, minor = cap
    return "9.0a" if major == 9 else f"{major}.{minor}"


def stages(out: Path, env_info: dict, py: str = sys.executable) -> list[Stage]:
    triton_on_gpu = {"TRITON_INTERPRET": "0"}   # tests/conftest.py sets 1 (CPU runs) unless it is set
    junit = out / ".tests.xml"
    timeout = ["--timeout", "150"] if importlib.util.find_spec("pytest_timeout") else []
    check_rows = ("import flashcore.ops as o; b = o.backends_for('attention'); print('attention backends:', b); "
                  "missing = {'cuda', 'triton'} - set(b); assert not missing, f'not available: {missing}'")
    return [
        Stage("env", "versions, nvidia-smi, commit", BUDGETS["env"],
              [[py, str(Path(__file__).resolve()), "--env-json", str(out / "env.json")]], "build.log",
              needs=("bench/gpu_check.py",)),
        Stage("build", "the CUDA extension (setup.py) for this GPU", BUDGETS["build"],
              [[py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], [py, "-c", check_rows]],
              "build.log", {"FLASHCORE_CUDA": "1", "FLASHCORE_CUDA_ARCHS": cuda_archs(env_info),
                            "MAX_JOBS": str(os.cpu_count() or 4), **triton_on_gpu},
              needs=("setup.py", "pyproject.toml", "csrc/cuda/binding.cu", "csrc/cuda/attention_fwd.cu",
                     "csrc/cuda/attention_bwd.cu", "csrc/cuda/sampler_step.cu", "csrc/cuda/srl_loss.cu")),
        Stage("tests", "GPU parity: Triton / CUDA C++ / reference, engine cuda / cpu", BUDGETS["tests"],
              # -v: a line per test as it ends, so a run cut by its limit still shows what passed
              [[py, "-m", "pytest", "-v", "-rs", "--durations=10", "-p", "no:cacheprovider", f"--junitxml={junit}",
                *timeout, "tests/test_gpu_parity.py"]], "tests.txt", triton_on_gpu,
              needs=("tests/test_gpu_parity.py",)),
        Stage("kernels", "kernel benchmark, short set, bf16", BUDGETS["kernels"],
              [[py, "bench/bench_gpu.py", "--quick", "--dtype", "bf16", "--budget-s", "{budget}",
                "--csv", str(out / "results.csv")]], "bench.log", triton_on_gpu, needs=("bench/bench_gpu.py",),
              grace_s=10.0),
        Stage("models", "model benchmark, short set (priority order)", BUDGETS["models"],
              [[py, "bench/bench_gpu_models.py", "--short", "--budget-s", "{budget}", "--out-dir", str(out)]],
              "bench.log", triton_on_gpu, needs=("bench/bench_gpu_models.py", "bench/bench_gpu.py"), grace_s=30.0),
    ]


# ------------------------------------------------------------ running --

def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (pip's compilers, pytest's workers): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, out: Path, limit_s: float) -> Stage:
    """Run the stage's commands in order under one time limit; fills status, seconds, tail."""
    stage.limit_s = limit_s
    log = out / stage.log
    start_at = log.stat().st_size if log.exists() else 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    t0 = time.monotonic()
    status = "pass"
    with log.open("a") as f:
        for cmd in stage.cmds:
            left = limit_s - (time.monotonic() - t0)
            cmd = [c.replace("{budget}", f"{max(left - stage.grace_s, 1.0):.0f}") for c in cmd]
            f.write(f"=== {stage.name}: {' '.join(cmd)}  (limit {left:.0f} s)\n")
            f.flush()
            if left <= 0:
                status = "timeout"
                break
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status = "timeout"
                break
            if rc != 0:
                status = f"fail (exit {rc})"
                break
    stage.seconds = time.monotonic() - t0
    stage.status = status
    text = log.read_text(errors="replace")[start_at:]
    stage.tail = text.splitlines()[-TAIL_LINES:]
    return stage


def run_stages(stage_list: list[Stage], out: Path, total_s: float, after=None) -> list[Stage]:
    """Each stage under min(its budget, what is left of ``total_s``); the last one also
    gets the seconds the earlier stages did not use. ``after(stage)`` runs between stages."""
    t0 = time.monotonic()
    for i, st in enumerate(stage_list):
        left = total_s - (time.monotonic() - t0)
        last = i == len(stage_list) - 1
        limit = left if last else min(st.budget_s, left)
        if limit <= 1:
            st.status, st.note = "not run", "no time left in the total budget"
            continue
        run_stage(st, out, limit)
        if after is not None:
            after(st)
    return stage_list


def test_counts(junit: Path) -> dict | None:
    """pytest's counts from its JUnit XML: tests, failures, errors, skipped."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


# ------------------------------------------------------------ environment --

def collect_env() -> dict:
    """What the results were measured with (run as its own process on the GPU run)."""
    info: dict = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count()}
    for mod in ("torch", "triton", "diffusers", "xformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing or broken package is what this reports
            info[mod] = f"missing ({type(e).__name__})"
    try:
        import torch
        info["torch_cuda"], info["cuda_available"] = torch.version.cuda, torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)),
                        sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                        cudnn=torch.backends.cudnn.version())
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    info["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                               "power.limit,pstate", "--format=csv"])
    info["nvcc"] = (_run([shutil.which("nvcc") or "nvcc", "--version"]) or "").strip().splitlines()[-1:]
    commit = _run(["git", "rev-parse", "HEAD"]) or "unknown"
    dirty = bool((_run(["git", "status", "--porcelain", "--untracked-files=no"]) or "").strip())
    info["commit"] = commit.strip() + (" (uncommitted changes)" if dirty else "")
    return info


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=15)
        return r.stdout if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------ summary --

def _sibling(name: str):
    """Another bench script, imported by name (this folder on sys.path)."""
    import importlib
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def kernel_table(csv_path: Path) -> str:
    """The kernel benchmark's rows with the share of the device's peak (bench_gpu.PEAKS)."""
    import csv
    if not csv_path.exists():
        return "(no results.csv)\n"
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["name"].split(".")[0] in ("attention", "sampler_step", "srl_loss")]
    if not rows:
        return "(no kernel rows)\n"
    bench = _sibling("bench_gpu")
    lines = ["| op | provider | shape | dtype | p50 ms | value | % of peak |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        pct = bench.share_of_peak(r["unit"], float(r["value"]), r["device"], r["dtype"])
        lines.append(f"| {r['name']} | {r['provider']} | {r['shape']} | {r['dtype']} | {float(r['p50_ms']):.4g} | "
                     f"{float(r['value']):.4g} {r['unit']} | {'' if pct is None else f'{pct:.0f}%'} |")
    return "\n".join(lines) + "\n"


def summary(stage_list: list[Stage], out: Path, env_info: dict, dry_run: bool, total_s: float,
            elapsed: float, counts: dict | None) -> str:
    head = ["# flashcore gpu-check" + (" (DRY RUN)" if dry_run else ""), ""]
    if dry_run:
        head += ["**DRY RUN: no GPU was used and nothing was timed. No figure in this folder is a "
                 "measurement**; the stages below were planned and their files and commands checked.", ""]
    head += [f"device: {env_info.get('device', 'none')}; torch {env_info.get('torch')} (CUDA "
             f"{env_info.get('torch_cuda')}); triton {env_info.get('triton')}; diffusers {env_info.get('diffusers')}; "
             f"commit {env_info.get('commit')}; {env_info.get('time')}", "",
             f"total: {elapsed:.0f} s of a {total_s:.0f} s budget", "",
             "| stage | what | status | seconds | limit s | budget s | note |", "|---|---|---|---:|---:|---:|---|"]
    for st in stage_list:
        head.append(f"| {st.name} | {st.what} | {st.status} | {st.seconds:.0f} | {st.limit_s:.0f} | "
                    f"{st.budget_s:.0f} | {st.note} |")
    body = []
    if counts is not None:
        body += ["", f"tests: {counts['tests']} run, {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped (tests.txt)"]
    for st in stage_list:
        if not st.status.startswith(("pass", "dry-run: ok")) and st.tail:
            body += ["", f"## {st.name}: {st.status}, last lines of {st.log}", "", "```", *st.tail, "```"]
    if not dry_run:
        try:
            table = kernel_table(out / "results.csv")
        except Exception as e:  # noqa: BLE001 - the summary is written whatever the CSV holds
            table = f"(no kernel table: {type(e).__name__}: {e})"
        body += ["", "## Kernels (bench/bench_gpu.py --quick)", "", table.rstrip(),
                 "", "## Models", "", "See gpu_models.md (bench/bench_gpu_models.py --short)."]
    body += ["", "## Plan", ""]
    for st in stage_list:
        env = " ".join(f"{k}={v}" for k, v in st.env.items())
        body += [f"- {st.name} ({st.budget_s:.0f} s): " + "; then ".join(f"`{env + ' ' if env else ''}"
                                                                        f"{' '.join(c)}`" for c in st.cmds)]
    return "\n".join(head + body) + "\n"


def print_table(stage_list: list[Stage], out: Path) -> None:
    w = max(len(s.name) for s in stage_list)
    for st in stage_list:
        print(f"{st.name:{w}s}  {st.status:24s} {st.seconds:6.0f} s / {st.limit_s or st.budget_s:4.0f} s  {st.note}")
        if not st.status.startswith(("pass", "dry-run: ok")):
            for line in st.tail[-8:]:
                print(f"    | {line}")
    print(f"results: {out}")


# ------------------------------------------------------------ dry run --

def dry_run(stage_list: list[Stage], out: Path) -> None:
    """Check every stage's files and tools, run the benchmarks' dry runs here (CPU)."""
    import contextlib
    for st in stage_list:
        missing = [p for p in st.needs if not (ROOT / p).exists()]
        tools = {"build": ["pip"], "tests": ["pytest"]}.get(st.name, [])
        missing += [f"python module {m}" for m in tools if importlib.util.find_spec(m) is None]
        notes = []
        if st.name == "build" and shutil.which("nvcc") is None:
            notes.append("nvcc not on PATH here (the GPU machine needs it)")
        if st.name == "tests":
            try:
                compile((ROOT / "tests/test_gpu_parity.py").read_text(), "tests/test_gpu_parity.py", "exec")
            except SyntaxError as e:
                missing.append(f"tests/test_gpu_parity.py does not compile: {e}")
        with (out / st.log).open("a") as f:
            for cmd in st.cmds:
                env = " ".join(f"{k}={v}" for k, v in st.env.items())
                f.write(f"=== {st.name} (dry run, not run): {env} {' '.join(cmd)}  (budget {st.budget_s:.0f} s)\n")
            if st.name in ("kernels", "models"):
                mod = _sibling("bench_gpu" if st.name == "kernels" else "bench_gpu_models")
                args = ["--dry-run", "--quick", "--dtype", "bf16"] if st.name == "kernels" else \
                    ["--dry-run", "--short", "--out-dir", str(out)]
                t0 = time.monotonic()
                with contextlib.redirect_stdout(f):
                    rc = mod.main(args)
                st.seconds = time.monotonic() - t0
                if rc != 0:
                    missing.append(f"its dry run exited {rc}")
        st.status = "dry-run: FAILED" if missing else "dry-run: ok"
        st.note = "; ".join(missing + notes)


# ------------------------------------------------------------ main --

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="the results folder (default: out/gpu-check/<UTC time>/)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: plan, budgets, files, benchmark dry runs")
    ap.add_argument("--total-s", type=float, default=TOTAL_S, help="the whole check's time budget")
    ap.add_argument("--env-json", default=None, help=argparse.SUPPRESS)    # the env stage's own process
    a = ap.parse_args(argv)
    if a.env_json:
        Path(a.env_json).write_text(json.dumps(collect_env(), indent=1) + "\n")
        return 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(a.out_dir) if a.out_dir else ROOT / "out" / "gpu-check" / (stamp + ("-dry-run" if a.dry_run else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    env_info: dict = {}
    stage_list = stages(out, env_info)
    print(("DRY RUN: " if a.dry_run else "") + f"gpu-check, {a.total_s:.0f} s in all; results in {out}")
    for st in stage_list:
        print(f"  {st.name:8s} budget {st.budget_s:4.0f} s  {st.what}")
    if a.dry_run:
        env_info.update(collect_env(), dry_run=True)
        dry_run(stage_list, out)
        counts = None
    else:
        def after(st: Stage) -> None:
            if st.name == "env":
                try:
                    env_info.update(json.loads((out / "env.json").read_text()))
                except (OSError, ValueError):
                    pass
                if not env_info.get("cuda_available"):
                    st.status, st.note = "fail", "no CUDA device visible to torch"
                elif "missing" in str(env_info.get("diffusers")):
                    st.status, st.note = "fail", "diffusers missing (carry its wheel: docs/gpu.md)"
                # the build's architecture follows the GPU env found
                stage_list[1].env["FLASHCORE_CUDA_ARCHS"] = cuda_archs(env_info)
            if st.name == "tests":
                c = test_counts(out / ".tests.xml")
                if c is not None and st.status == "pass" and c["skipped"]:
                    st.status = "partial"
                if c is not None:
                    st.note = f"{c['tests'] - c['failures'] - c['errors'] - c['skipped']} passed, " \
                              f"{c['failures'] + c['errors']} failed, {c['skipped']} skipped"
            print(f"  {st.name:8s} {st.status} in {st.seconds:.0f} s", flush=True)
        run_stages(stage_list, out, a.total_s - MARGIN_S, after)
        counts = test_counts(out / ".tests.xml")
        (out / ".tests.xml").unlink(missing_ok=True)
    env_info["plan"] = {st.name: {"budget_s": st.budget_s, "limit_s": round(st.limit_s, 1),
                                  "commands": [" ".join(c) for c in st.cmds], "env": st.env} for st in stage_list}
    env_info["dry_run"] = a.dry_run
    (out / "env.json").write_text(json.dumps(env_info, indent=1) + "\n")
    for name in FILES:                 # every file exists, even for a stage that never ran
        (out / name).touch()
    text = summary(stage_list, out, env_info, a.dry_run, a.total_s, time.monotonic() - t0, counts)
    (out / "summary.md").write_text(text)
    print_table(stage_list, out)
    ok = all(st.status in ("pass", "dry-run: ok") for st in stage_list)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
