"""Deployment paths of the shipped 3-step student, side by side (docs/deploy.md).

Providers, each computing x0 for one batch from the same x_T:

  eager         flashcore.sampler.sample in this Python process
  aoti          the .pt2 package loaded in this process (torch._inductor.aoti_load_package)
  onnxruntime   the ONNX export on ORT's CPU execution provider
  runner        build/flashcore-run on the .pt2 package, a separate process without
                Python: its own per-image median, time to first image and peak RSS
                (VmHWM), parsed from its output

Per-image latency of the in-process providers: benchmarking.measure_interleaved
(p50 of a sampler call / batch). Cold start: loading the artifact and the first call
(in-process), or the runner's time to first image from the start of its main.
Export time: `export_sampler`'s wall time (pt2 includes AOTInductor's C++ compile).

    python bench/bench_deploy.py [--batches 1,8] [--dir out/deploy] [--seconds 10] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

from flashcore import benchmarking as B
from flashcore.export import ExportConfig, export_sampler
from flashcore.models import load_pretrained
from flashcore.sampler import sample
from flashcore.schedule import NoiseSchedule, ScheduleConfig

STUDENT = str(B.ROOT / "checkpoints" / "mnist-student-3step")
RUNNER = str(B.ROOT / "build" / "flashcore-run")


def artifact(fmt: str, batch: int, d: str) -> tuple[str, float | None]:
    """(path, export seconds or None when it was already there)."""
    path = os.path.join(d, f"student-b{batch}.{fmt}")
    if os.path.exists(path):
        return path, None
    return path, export_sampler(ExportConfig(model=STUDENT, out=path, format=fmt, batch=batch))["seconds"]


def run_runner(path: str, labels: list[int], runs: int, threads: int) -> dict:
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([RUNNER, path, "--labels", ",".join(map(str, labels)), "--seed", "0",
                              "--runs", str(runs), "--threads", str(threads), "--out", os.path.join(os.path.dirname(path), "grid.png")],
                             stdout=out, stderr=err)
        p.wait()
        out.seek(0), err.seek(0)
        text, why = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"flashcore-run failed: {why.strip()}")
    first = float(re.search(r"time to first image: ([\d.]+) ms", text).group(1))
    per = float(re.search(r"per image: ([\d.]+) ms", text).group(1))
    # its own VmHWM: wait4's ru_maxrss would keep this (forking) process's high-water mark
    rss = float(re.search(r"peak RSS: ([\d.]+) MiB", text).group(1))
    return {"first_ms": first, "per_image_ms": per, "libpython": "not loaded" in text, "peak_rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dir", default=str(B.ROOT / "out" / "deploy"))
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per provider and batch")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="intra-op threads of every provider (on an oversubscribed machine OpenMP's "
                         "barriers make 2 threads far slower than 1: docs/deploy.md)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    torch.set_num_threads(a.threads)
    model, meta = load_pretrained(STUDENT)
    sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        torch.manual_seed(0)
        x_T, labels = torch.randn(b, 1, 28, 28), torch.arange(b) % 10
        pt2, pt2_s = artifact("pt2", b, a.dir)
        onnx_path, onnx_s = artifact("onnx", b, a.dir)
        t0 = time.perf_counter()
        aoti = torch._inductor.aoti_load_package(pt2)
        aoti(x_T, labels)
        aoti_cold = time.perf_counter() - t0
        import onnxruntime as ort
        t0 = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        feeds = {"x_T": x_T.numpy(), "labels": labels.numpy()}
        sess.run(None, feeds)
        ort_cold = time.perf_counter() - t0
        fns = {"eager": lambda: sample(model, labels, schedule=sched, steps=3, shape=(1, 28, 28), x_T=x_T),
               "aoti": lambda: aoti(x_T, labels), "onnxruntime": lambda: sess.run(None, feeds)}
        with torch.no_grad():
            t = B.measure_interleaved(fns, rounds=3, seconds_per_provider=a.seconds)
        for name, tm in t.items():
            rows.append({"batch": b, "provider": name, "per_image_ms": tm.p50_ms / b,
                         "cold_s": {"aoti": aoti_cold, "onnxruntime": ort_cold}.get(name),
                         "artifact_mib": os.path.getsize({"aoti": pt2, "onnxruntime": onnx_path}[name]) / 2**20
                         if name != "eager" else None,
                         "export_s": {"aoti": pt2_s, "onnxruntime": onnx_s}.get(name)})
        r = run_runner(pt2, labels.tolist(), runs=5, threads=a.threads)
        rows.append({"batch": b, "provider": "runner", "per_image_ms": r["per_image_ms"], "cold_s": r["first_ms"] / 1e3,
                     "artifact_mib": os.path.getsize(pt2) / 2**20, "export_s": pt2_s,
                     "peak_rss_mib": r["peak_rss_mib"],
                     "libpython": r["libpython"]})
    import resource
    py_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| batch | provider | ms/image | cold start s | artifact MiB | export s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else f.format(v)   # noqa: E731
    for r in rows:
        rss = r.get("peak_rss_mib") if r["provider"] == "runner" else py_rss
        print(f"| {r['batch']} | {r['provider']} | {r['per_image_ms']:.1f} | {fmt(r['cold_s'], '{:.2f}')} | "
              f"{fmt(r['artifact_mib'], '{:.1f}')} | {fmt(r['export_s'], '{:.0f}')} | {fmt(rss, '{:.0f}')} |")
    print(f"(in-process providers share one Python process: its peak RSS, {py_rss:.0f} MiB, is shown for each)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
