"""``flashcore bench --suite deploy``: the C++ runner, the Python engine, ONNX Runtime and
OpenVINO on the shipped student, and the CPU identity every benchmark row carries.

No timing is asserted (the machine may be busy): the rows' shape, that every provider
computes the eager engine's images (fp32: relative error below 1e-4, the sums of three
UNet calls in other orders; docs/deploy.md), and that cold start and peak RSS were
measured in a child process.
"""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from flashcore import benchmarking as B
from flashcore.cli import main as cli_main


def test_rows_carry_the_cpu_identity():
    """Vendor, family and model as /proc/cpuinfo's first processor gives them."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    want = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, val = line.partition(":")
            want.setdefault(key.strip(), val.strip())
            if not line.strip():
                break
    row = B.make_row("op", "eager", (2,), torch.float32, B.Timing(1.0, 1.0, 1.0, 1, 1), "us", 1.0)
    assert (row["cpu_vendor"], row["cpu_family"], row["cpu_model"]) == (
        want.get("vendor_id", ""), want.get("cpu family", ""), want.get("model", ""))
    if not torch.cuda.is_available() and want.get("cpu family"):
        assert f"family {want['cpu family']} model {want['model']}" in row["device"]
    # rows made without make_row (bench_gpu.py's) get it when written as JSON
    assert B.with_cpu([{"name": "x"}])[0]["cpu_family"] == row["cpu_family"]


@pytest.fixture(scope="module")
def runner_built():
    """build/flashcore-run, configured and built by CMake; a skip where that fails."""
    root = str(B.ROOT)
    build = os.path.join(root, "build")
    try:
        subprocess.run(["cmake", "-B", build, "-S", root, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                       check=True, capture_output=True, timeout=600)
        subprocess.run(["cmake", "--build", build, "-j2", "--target", "flashcore-run"], check=True,
                       capture_output=True, timeout=1200)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"flashcore-run cannot be built here: {e}")
    return os.path.join(build, "flashcore-run")


@pytest.mark.slow
def test_deploy_suite_quick(runner_built, tmp_path, monkeypatch):
    """Every provider at batch 1 in fp32: a latency row and a cold-start row each."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    # the exports go to the suite's keyed cache (out/deploy), as `flashcore bench` does
    monkeypatch.setenv("FLASHCORE_BENCH_THREADS", "1")
    out, js = tmp_path / "res", tmp_path / "rows.json"
    assert cli_main(["bench", "--suite", "deploy", "--quick", "--out-dir", str(out), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    B.validate_rows(rows)
    lat = {r["provider"]: r for r in rows if r["name"] == "student_3step"}
    cold = {r["provider"]: r for r in rows if r["name"] == "student_3step.cold_start"}
    provs = {"flashcore-run", "eager", "onnxruntime", "openvino"}
    assert set(lat) == set(cold) == provs
    for p in provs:
        r = lat[p]
        assert r["shape"] == "1x1x28x28" and r["dtype"] == "fp32" and r["unit"] == "ms/image"
        assert r["rel_err"] < 1e-4, (p, r["rel_err"])
        assert cold[p]["unit"] == "s" and 0 < cold[p]["value"] < 600
        assert r["peak_rss_mib"] > 10 and r["artifact_mib"] > 0.1
        assert r["cpu_family"] == B.cpu_identity()["cpu_family"]
    assert lat["eager"]["rel_err"] < 1e-6                  # the reference computation itself
    # the runner and the ONNX children load no torch: far below the Python engine's footprint
    assert lat["onnxruntime"]["peak_rss_mib"] < lat["eager"]["peak_rss_mib"]
    assert (out / "deploy.md").exists()
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


_CHILD = r"""
import gc, os, signal, sys
sys.path.insert(0, sys.argv[1])
import deploy_child as dc
before = dc.signal_stack()
if sys.argv[3] == "guarded":
    req, _ = dc.openvino_request(sys.argv[2], "fp32", 1)
else:                                   # what openvino_request did before keep_signal_stack
    import openvino as ov
    req = ov.Core().compile_model(sys.argv[2], "CPU", dc.openvino_config("fp32", 1)).create_infer_request()
after = dc.signal_stack()
del req
gc.collect()
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
os.kill(os.getpid(), signal.SIGTERM)
print(before == after, bool(got), flush=True)
"""


def test_openvino_leaves_the_signal_stack_as_it_found_it(tmp_path):
    """OpenVINO's CPU plugin installs an alternate signal stack of its own in the thread
    that first compiles a model, and unmaps it later: a SIGTERM after that died with
    SIGSEGV (a run's graceful stop, in the quick suite after the step suite's OpenVINO
    rows). ``openvino_request`` puts the thread's stack back; in a fresh process each,
    so that the compile is the plugin's first. The unguarded compile is run too, to show
    the check can see the plugin's change on this machine."""
    pytest.importorskip("openvino")
    from flashcore.cli_bench import BENCH_DIR
    onnx = str(tmp_path / "lin.onnx")
    torch.onnx.export(torch.nn.Linear(4, 4), (torch.ones(1, 4),), onnx, dynamo=False)

    def child(mode):
        return subprocess.run([sys.executable, "-c", _CHILD, str(BENCH_DIR), onnx, mode],
                              capture_output=True, text=True, timeout=120)
    raw = child("raw")
    if raw.returncode == 0 and raw.stdout.split()[:1] == ["True"]:
        pytest.skip("this OpenVINO build leaves the signal stack alone: nothing to guard against")
    assert raw.returncode == -signal.SIGSEGV or (raw.returncode == 0 and raw.stdout.split()[:1] == ["False"]), (
        raw.returncode, raw.stdout, raw.stderr[-2000:])
    r = child("guarded")
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], (r.returncode, r.stdout, r.stderr[-2000:])
