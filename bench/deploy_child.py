"""One cold start of a deploy-suite provider, in a fresh process (bench/bench_deploy.py).

    python bench/deploy_child.py PROVIDER ARTIFACT BATCH DTYPE THREADS CALLS

Loads ARTIFACT (an ONNX file; for ``eager``/``flashcore`` a checkpoint directory),
makes the first image, then CALLS more, and prints one JSON line: the wall-clock
time of the first image (``first_unix``, the system clock, which the parent reads
before it spawns this process) and this process's peak RSS (VmHWM). It imports only
what its provider needs: the ONNX Runtime and OpenVINO children never import torch,
as a deployment of those would not.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import time


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return -1.0


def onnx_inputs(batch: int):
    import numpy as np
    rng = np.random.default_rng(0)
    return {"x_T": rng.standard_normal((batch, 1, 28, 28), dtype=np.float32),
            "labels": np.arange(batch, dtype=np.int64) % 10}


def make(provider: str, artifact: str, batch: int, dtype: str, threads: int):
    """A zero-argument callable making one batch of images."""
    if provider == "onnxruntime":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(artifact, so, providers=["CPUExecutionProvider"])
        feeds = onnx_inputs(batch)
        return lambda: sess.run(None, feeds)
    if provider == "openvino":
        (req, _), feeds = openvino_request(artifact, dtype, threads), onnx_inputs(batch)
        return lambda: req.infer(feeds, share_inputs=True)
    import torch
    from flashcore.engine import Engine
    from flashcore.models import load_pretrained
    from flashcore.schedule import NoiseSchedule, ScheduleConfig
    torch.set_num_threads(threads)
    model, meta = load_pretrained(artifact)
    eng = Engine(model, NoiseSchedule(ScheduleConfig(**meta["schedule"])), steps=meta["steps"],
                 dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, compile=provider == "flashcore",
                 graph="sampler")
    x_T, labels = torch.randn(batch, 1, 28, 28), torch.arange(batch) % 10

    def call():
        with torch.no_grad():
            return eng.sample(labels, x_T=x_T)
    return call


def openvino_config(dtype: str, threads: int) -> dict:
    """The CPU plugin's settings: latency mode, ``threads`` inference threads, and the
    inference precision (its bf16 runs the fp32 ONNX graph's heavy ops in bfloat16)."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bf16" else "f32"}


class _StackT(ctypes.Structure):          # struct stack_t of sigaltstack(2), Linux x86-64/aarch64
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _sigaltstack():
    """(libc, the calling thread's stack_t), or None where sigaltstack is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        st = _StackT()
        return (libc, st) if libc.sigaltstack(None, ctypes.byref(st)) == 0 else None
    except (OSError, AttributeError, TypeError):     # no libc by that name (not Linux)
        return None


def signal_stack() -> tuple[int, int, int]:
    """The calling thread's alternate signal stack: (address, flags, size); flags 2
    (SS_DISABLE) when it has none, -1 where sigaltstack is not available."""
    got = _sigaltstack()
    return (0, -1, 0) if got is None else (got[1].ss_sp or 0, got[1].ss_flags, got[1].ss_size)


@contextlib.contextmanager
def keep_signal_stack():
    """Puts the calling thread's alternate signal stack back as it was on entry.

    OpenVINO's CPU plugin (2026.4), the first time it compiles a model in a thread,
    installs a 12 KB alternate signal stack of its own there and does not put the old
    one back; that memory is unmapped later (seen when its objects are collected),
    and the thread keeps pointing at it. Python runs the C part of every signal
    handler on the alternate stack (SA_ONSTACK), faulthandler too, so the next
    SIGTERM or Ctrl-C in the process died with SIGSEGV instead of reaching its
    handler (a run's graceful checkpoint on SIGTERM, after the step suite had run
    OpenVINO in the same process). Restoring the previous stack right after the
    compile is enough: the plugin installs its own only once per thread."""
    got = _sigaltstack()
    try:
        yield
    finally:
        if got is not None and got[0].sigaltstack(ctypes.byref(got[1]), None) != 0:
            sys.stderr.write(f"warning: could not restore this thread's signal stack "
                             f"({os.strerror(ctypes.get_errno())}): a later signal may crash the process\n")


def openvino_request(artifact: str, dtype: str, threads: int):
    """(infer request, the precision OpenVINO really computes in: "f32" or "bf16") for
    ARTIFACT compiled on the CPU plugin with ``openvino_config``: the one way the deploy
    and step suites set OpenVINO up. The precision is the compiled model's own answer
    because a CPU without native bf16 turns the bf16 hint into f32 without a warning."""
    import openvino as ov
    with keep_signal_stack():
        compiled = ov.Core().compile_model(artifact, "CPU", openvino_config(dtype, threads))
        return compiled.create_infer_request(), compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def main(argv: list[str]) -> int:
    provider, artifact, batch, dtype, threads, calls = argv
    fn = make(provider, artifact, int(batch), dtype, int(threads))
    fn()
    first = time.time()
    for _ in range(int(calls)):
        fn()
    sys.stdout.write(json.dumps({"first_unix": first, "peak_rss_mib": peak_rss_mib()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
