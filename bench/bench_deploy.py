"""Deployment paths of the shipped 3-step student, side by side (docs/deploy.md).

Providers, each making x0 for one batch from the same x_T and labels:

  flashcore-run  build/flashcore-run (C++, no Python) on the pt2 export, kept running in
                 --serve mode: each timed call is one line on its stdin and its "ok"
                 answer (a pipe round trip, tens of microseconds, is in the time)
  eager          the Python engine without compilation (flashcore.engine.Engine,
                 compile=False): flashcore's kernels, eager PyTorch around them
  flashcore      the Python engine compiled (Engine, graph="sampler"); not in --quick
  onnxruntime    the ONNX export on ORT's CPU execution provider (fp32 only: its CPU
                 kernels have no bf16 convolution or GEMM)
  openvino       the same ONNX file on OpenVINO's CPU plugin, latency mode, with the
                 inference precision hint f32 or bf16

Per-image latency: every provider of one batch (both dtypes) timed side by side by
``benchmarking.measure_interleaved`` in this process (p50 of a call / batch; p20-p80
the spread). Cold start: a fresh process per provider (bench/deploy_child.py; the
runner itself), from just before its spawn to its first image, artifacts already
written and in the page cache; the compiled engine's child compiles with an empty
inductor cache, as a first launch would. Peak RSS: that child's own VmHWM after the
first image and a few more calls. rel. err: ||x0 - x0_ref|| / ||x0_ref|| against the
eager fp32 engine from the same x_T.

    python bench/bench_deploy.py [--quick] [--providers a,b] [--threads N] [--batches 1,8] [--dtypes fp32,bf16]
                                 [--out-dir D] [--json P]
    flashcore bench --suite deploy [--quick]
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flashcore import benchmarking as B
from flashcore.ops import _onednn

NAME = "deploy"
TITLE = "Deploying the shipped 3-step student: C++ runner, Python engine, ONNX Runtime, OpenVINO (CPU)"
STUDENT = B.ROOT / "checkpoints" / "mnist-student-3step"
RUNNER = B.ROOT / "build" / "flashcore-run"
CHILD = Path(__file__).resolve().parent / "deploy_child.py"
ARTIFACTS = B.ROOT / "out" / "deploy"
SHAPE = (1, 28, 28)
BASE_NOTES = ("value: ms per image (p50 of a batch call / batch); p50/p20-p80 ms: per batch call; every provider of "
              "a batch, both dtypes, timed side by side (measure_interleaved)",
              "cold start (unit s): process spawn to first image in a fresh process; note: its peak RSS (VmHWM) "
              "and the artifact's size",
              "bf16: flashcore-run runs a --bf16 export (weights and network in bfloat16, update in fp32); the "
              "engine runs CPU autocast; OpenVINO its bf16 inference precision hint on the fp32 ONNX file; "
              "ONNX Runtime has no bf16 CPU kernels")
NOTES: list[str] = list(BASE_NOTES)      # run() adds why a dtype or precision differs from what was asked


def threads_default() -> int:
    """Intra-op threads of every provider: FLASHCORE_BENCH_THREADS, else torch's default
    (on an oversubscribed machine 1 is far faster: docs/deploy.md)."""
    return int(os.environ.get("FLASHCORE_BENCH_THREADS") or torch.get_num_threads())


def artifact(fmt: str, batch: int, bf16: bool) -> tuple[Path, float | None]:
    """(path, export seconds; None when reused). Exported once per version of the
    checkpoint, the exporter's source and torch (the key in the name), then reused."""
    from flashcore import export
    # every file of the checkpoint, whichever layout (pipeline folder or config.json + model/)
    key = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(STUDENT.rglob("*")) if p.is_file())
                       + Path(export.__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:10]
    path = ARTIFACTS / f"student-b{batch}{'-bf16' if bf16 else ''}-{key}.{fmt}"
    if path.exists():
        return path, None
    r = export.export_sampler(export.ExportConfig(model=str(STUDENT), out=str(path), format=fmt, batch=batch,
                                                  bf16=bf16))
    return path, r["seconds"]


def size_mib(path: Path) -> float:
    return (sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir()
            else path.stat().st_size) / 2 ** 20


class Runner:
    """flashcore-run --serve on one package: ``__call__`` is one timed call in that process."""

    def __init__(self, pt2: Path, labels: list[int], threads: int, raw: str):
        self.p = subprocess.Popen([str(RUNNER), str(pt2), "--labels", ",".join(map(str, labels)), "--seed", "0",
                                   "--threads", str(threads), "--serve", "--raw", raw,
                                   "--out", raw + ".png"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"flashcore-run failed: {self.p.communicate()[1].strip() or line}")

    def __call__(self) -> None:
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        if not self.p.stdout.readline().startswith("ok"):
            raise RuntimeError(f"flashcore-run failed: {self.p.communicate()[1].strip()}")

    def close(self) -> str:
        out, err = self.p.communicate()
        if self.p.returncode != 0:
            raise RuntimeError(f"flashcore-run failed: {err.strip()}")
        return out


def cold_start(provider: str, art: Path, batch: int, dtype: str, threads: int, calls: int) -> tuple[float, float]:
    """(seconds from spawn to first image, peak RSS MiB) of a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        env["TORCHINDUCTOR_CACHE_DIR"] = tmp          # the compiled engine's first launch: no cache
        if provider == "flashcore-run":
            cmd = [str(RUNNER), str(art), "--labels", ",".join(str(i % 10) for i in range(batch)), "--seed", "0",
                   "--runs", str(calls), "--threads", str(threads), "--out", os.path.join(tmp, "g.png")]
        else:
            cmd = [sys.executable, str(CHILD), provider, str(art), str(batch), dtype, str(threads), str(calls)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"deploy: {provider} cold start failed: {r.stderr.strip().splitlines()[-1:]}")
    if provider == "flashcore-run":
        got = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
        first, rss = float(got["first image at unix time"]), float(got["peak RSS"].split()[0])
    else:
        got = json.loads(r.stdout.strip().splitlines()[-1])
        first, rss = got["first_unix"], got["peak_rss_mib"]
    return first - t0, rss


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def run(quick: bool = False, providers=None, log=None, threads: int | None = None,
        batches: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None) -> list[dict]:
    from deploy_child import openvino_request
    from flashcore.engine import Engine
    from flashcore.models import load_pretrained
    from flashcore.schedule import NoiseSchedule, ScheduleConfig
    import numpy as np
    import onnxruntime as ort

    NOTES[:] = BASE_NOTES                  # a second run() in one process starts from the base notes again
    threads = threads or threads_default()
    torch.set_num_threads(threads)
    use_runner = B.keep_provider("flashcore-run", providers)
    if use_runner and not RUNNER.exists():
        # `flashcore bench` (all suites) still runs on an install without the CMake build
        use_runner, why = False, f"flashcore-run left out: {RUNNER} is not built (cmake -B build ...; docs/deploy.md)"
        if why not in NOTES:
            NOTES.append(why)
        if log:
            log(why)
    model, meta = load_pretrained(str(STUDENT))
    sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
    batches = batches or ((1,) if quick else (1, 8))
    if dtypes is None:
        dtypes = ("fp32",) if quick else ("fp32", "bf16")
        if "bf16" in dtypes and not _onednn.bf16_native():
            # bf16 here would be emulated by torch and silently f32 in OpenVINO: no comparison of bf16 at all
            dtypes = ("fp32",)
            why = (f"bf16 left out: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
                   "(python bench/bench_deploy.py --dtypes bf16 runs it anyway)")
            if why not in NOTES:
                NOTES.append(why)
            if log:
                log(why)
    timing = (dict(rounds=2, per_round=1, warmup=0, pause=0.0) if quick else
              dict(rounds=5, per_round=6, seconds_per_provider=15.0, warmup=2))
    calls = 1 if quick else 3
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for b in batches:
        torch.manual_seed(0)
        x_T = torch.randn((b,) + SHAPE)            # what flashcore-run draws for --seed 0
        labels = torch.arange(b) % 10
        feeds = {"x_T": x_T.numpy(), "labels": labels.numpy()}
        with torch.no_grad():
            ref = Engine(model, sched, steps=3, compile=False, graph="sampler").sample(labels, x_T=x_T)
        fns, outs, arts, export_s, runners, precision = {}, {}, {}, {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            for dt in dtypes:
                if use_runner:
                    pt2, export_s[("flashcore-run", dt)] = artifact("pt2", b, dt == "bf16")
                    arts[("flashcore-run", dt)] = pt2
                    raw = os.path.join(tmp, f"x0-{dt}.f32")
                    runners[dt] = fns[("flashcore-run", dt)] = Runner(pt2, labels.tolist(), threads, raw)
                for name in ("eager",) + (() if quick else ("flashcore",)):
                    if B.keep_provider(name, providers):
                        eng = Engine(model, sched, steps=3, dtype=torch_dtype[dt], compile=name == "flashcore",
                                     graph="sampler")
                        if name == "flashcore":
                            eng.warmup((b,))
                            export_s[(name, dt)] = eng.compile_seconds
                        arts[(name, dt)] = STUDENT
                        fns[(name, dt)] = lambda e=eng: e.sample(labels, x_T=x_T)
                        outs[(name, dt)] = fns[(name, dt)]()
                onnx_provs = [p for p in ("onnxruntime", "openvino") if B.keep_provider(p, providers)
                              and (p == "openvino" or dt == "fp32")]
                if onnx_provs:
                    onnx, s = artifact("onnx", b, False)
                    for p in onnx_provs:
                        arts[(p, dt)], export_s[(p, dt)] = onnx, s
                if "onnxruntime" in onnx_provs:
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = threads
                    sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
                    fns[("onnxruntime", dt)] = lambda s=sess: s.run(None, feeds)
                    outs[("onnxruntime", dt)] = torch.from_numpy(fns[("onnxruntime", dt)]()[0])
                if "openvino" in onnx_provs:
                    req, precision[("openvino", dt)] = openvino_request(str(onnx), dt, threads)
                    fns[("openvino", dt)] = lambda r=req: r.infer(feeds, share_inputs=True)
                    outs[("openvino", dt)] = torch.from_numpy(np.array(fns[("openvino", dt)]()[0]))
            timed = B.measure_interleaved(fns, **timing)
            for dt, r in runners.items():
                r.close()
                outs[("flashcore-run", dt)] = torch.from_numpy(
                    np.fromfile(os.path.join(tmp, f"x0-{dt}.f32"), dtype=np.float32).reshape(ref.shape))
        for (prov, dt), tm in timed.items():
            art = arts[(prov, dt)]
            cold, rss = cold_start(prov, STUDENT if prov in ("eager", "flashcore") else art, b, dt, threads, calls)
            note = f"peak RSS {rss:.0f} MiB; {'checkpoint' if art == STUDENT else art.suffix[1:]} {size_mib(art):.1f} MiB"
            asked = "bf16" if dt == "bf16" else "f32"
            fell_back = (f"computed in {precision[(prov, dt)]}, not {dt}: no native bf16 on this CPU"
                         if precision.get((prov, dt), asked) != asked else None)
            if fell_back:
                note += "; " + fell_back
            extra = dict(peak_rss_mib=round(rss, 1), artifact_mib=round(size_mib(art), 2), cold_s=round(cold, 3),
                         threads=threads, export_s=export_s.get((prov, dt)))
            err = rel_err(outs[(prov, dt)], ref)
            rows.append(B.make_row("student_3step", prov, (b,) + SHAPE, dt, tm, "ms/image", tm.p50_ms / b,
                                   rel_err=err, **({"note": fell_back} if fell_back else {}), **extra))
            rows.append(B.make_row("student_3step.cold_start", prov, (b,) + SHAPE, dt, B.timing_of_seconds(cold), "s",
                                   cold, note=note, **extra))
            if log:
                log(f"b={b} {prov:14s} {dt} {tm.p50_ms / b:8.2f} ms/image (p20-p80 {tm.p20_ms / b:.2f}-"
                    f"{tm.p80_ms / b:.2f}, n={tm.samples})  cold {cold:6.2f} s  RSS {rss:5.0f} MiB  "
                    f"rel.err {err:.1e}")
    return rows


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1, fp32, few calls: a smoke run")
    ap.add_argument("--providers", default=None, help="comma list of provider names or prefixes")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of every provider "
                    "(default FLASHCORE_BENCH_THREADS, else torch's)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8; --quick 1)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (default both; --quick fp32)")
    ap.add_argument("--out-dir", default=None, help=f"default: a new folder under {B.RUNS_DIR}")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    try:
        out_dir = B.resolve_out_dir(a.out_dir, quick=a.quick)
    except ValueError as e:
        ap.error(str(e))
    provs = tuple(a.providers.split(",")) if a.providers else None
    rows = run(quick=a.quick, providers=provs, log=lambda s: print(s, flush=True), threads=a.threads,
               batches=tuple(int(x) for x in a.batches.split(",")) if a.batches else None,
               dtypes=tuple(a.dtypes.split(",")) if a.dtypes else None)
    B.publish(NAME, TITLE, rows, out_dir, notes=NOTES)
    if a.json:
        B.write_json(a.json, rows)
    print(f"{len(rows)} rows -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
