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
import subprocess

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
