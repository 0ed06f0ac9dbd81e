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

import json
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


def openvino_request(artifact: str, dtype: str, threads: int):
    """(infer request, the precision OpenVINO really computes in: "f32" or "bf16") for
    ARTIFACT compiled on the CPU plugin with ``openvino_config``: the one way the deploy
    and step suites set OpenVINO up. The precision is the compiled model's own answer
    because a CPU without native bf16 turns the bf16 hint into f32 without a warning."""
    import openvino as ov
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
