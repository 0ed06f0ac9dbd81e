"""make gpu-check without a GPU: its dry run, its stage runner (limits, failures, the next
stage still running), and the model benchmark's plan, budget and rows (bench/gpu_check.py,
bench/bench_gpu_models.py)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashcore import benchmarking as B
from flashcore.cli_bench import load_bench

ROOT = Path(__file__).resolve().parents[1]
gpu_check = load_bench("gpu_check")
models = load_bench("bench_gpu_models")
kernels = load_bench("bench_gpu")


def test_dry_run_writes_one_marked_folder_and_passes(tmp_path, capsys):
    out = tmp_path / "check"
    assert gpu_check.main(["--dry-run", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.FILES) and len(files) <= 8
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "No figure in this folder is a measurement" in summary
    for name in ("env", "build", "tests", "kernels", "models"):
        assert f"| {name} |" in summary and f"{name} " in printed
    assert summary.count("dry-run: ok") == 5
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and "torch" in env and "commit" in env
    budgets = [v["budget_s"] for v in env["plan"].values()]
    assert sum(budgets) <= gpu_check.TOTAL_S - gpu_check.MARGIN_S
    assert any("--no-build-isolation" in c for c in env["plan"]["build"]["commands"])
    assert env["plan"]["tests"]["env"]["TRITON_INTERPRET"] == "0"     # conftest would interpret Triton
    with (out / "results.csv").open() as f:                          # a dry run measures nothing
        assert list(csv.reader(f)) == [B.COLUMNS]
    assert (out / "gpu_models.md").read_text().startswith("# DRY RUN")
    log = (out / "bench.log").read_text()
    for prov in models.PROVIDERS:
        assert f"| {prov} |" in (out / "gpu_models.md").read_text()
    assert "sdpa-cudnn" in log and "CSV columns: " + ",".join(B.COLUMNS) in log


def _stage(name, code, budget=30.0, log="x.log"):
    return gpu_check.Stage(name, name, budget, [[sys.executable, "-c", code]], log)


def test_stages_report_failures_and_timeouts_and_the_next_still_runs(tmp_path):
    child = tmp_path / "child.pid"
    sleeper = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(child)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
               "time.sleep(60)")
    st = [_stage("fails", "print('line 1'); print('boom'); raise SystemExit(3)"),
          _stage("hangs", sleeper, budget=2.0),
          _stage("passes", "print('fine')")]
    t0 = time.monotonic()
    gpu_check.run_stages(st, tmp_path, total_s=100.0)
    assert time.monotonic() - t0 < 30
    assert [s.status for s in st] == ["fail (exit 3)", "timeout", "pass"]
    assert st[0].tail[-1] == "boom" and "started" in st[1].tail
    assert 1.5 <= st[1].seconds < 15 and st[1].limit_s == 2.0
    assert st[2].limit_s > 90                          # the last stage gets the time left over
    pid = int(child.read_text())                       # the stage's whole process group was ended
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out stage's child {pid} is still running")
    text = gpu_check.summary(st, tmp_path, {}, False, 100.0, 10.0, None)
    assert "## fails: fail (exit 3), last lines of x.log" in text and "## hangs: timeout" in text
    assert "## passes" not in text


def test_a_stage_over_the_total_budget_is_not_run(tmp_path):
    st = [_stage("a", "pass"), _stage("b", "pass")]
    gpu_check.run_stages(st, tmp_path, total_s=0.5)
    assert [s.status for s in st] == ["not run", "not run"]


def test_test_counts_read_pytest_junit(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" skipped="2">'
                   '</testsuite></testsuites>')
    assert gpu_check.test_counts(xml) == {"tests": 7, "failures": 1, "errors": 0, "skipped": 2}
    assert gpu_check.test_counts(tmp_path / "missing.xml") is None


def test_build_architecture_follows_the_gpu(monkeypatch):
    monkeypatch.delenv("FLASHCORE_CUDA_ARCHS", raising=False)
    assert gpu_check.cuda_archs({"capability": [9, 0]}) == "9.0a"     # H100/H200: wgmma needs sm_90a
    assert gpu_check.cuda_archs({"capability": [8, 0]}) == "8.0"
    assert gpu_check.cuda_archs({}) == "8.0;9.0a"
    monkeypatch.setenv("FLASHCORE_CUDA_ARCHS", "8.6")
    assert gpu_check.cuda_archs({"capability": [9, 0]}) == "8.6"


def test_makefile_gpu_check_runs_the_script():
    r = subprocess.run(["make", "-n", "gpu-check", "GPU_CHECK_ARGS=--dry-run"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "bench/gpu_check.py --dry-run" in r.stdout


# ------------------------------------------------------------ bench_gpu_models --

def test_model_plan_covers_every_provider_in_priority_order():
    cases = models.plan(list(models.MODELS), list(models.ROLES), list(models.DTYPES), [8])
    assert len(cases) == len(models.MODELS) * 2 * 3 * len(models.PROVIDERS)
    assert {c.provider for c in cases} == set(models.PROVIDERS)
    for p in ("eager/sdpa-flash", "eager/sdpa-efficient", "eager/sdpa-cudnn", "eager/xformers", "compile",
              "compile-max-autotune", "flashcore-engine", "eager/flashcore-triton", "eager/flashcore-cuda"):
        assert p in models.PROVIDERS
    tiers = [c.tier for c in cases]
    assert tiers == sorted(tiers)
    first_compiled = next(i for i, c in enumerate(cases) if c.compiled)
    assert all(c.dtype == "bf16" and not c.compiled for c in cases[:first_compiled])
    assert cases[first_compiled].provider in ("compile", "flashcore-engine")
    autotune = [i for i, c in enumerate(cases) if c.provider == "compile-max-autotune" and c.dtype == "bf16"]
    assert min(autotune) > max(i for i, c in enumerate(cases) if c.provider == "flashcore-engine" and c.dtype == "bf16")
    xl = models.MODELS["dit-xl2-1024"].cfg
    assert (xl.num_layers, xl.num_heads, xl.head_dim, xl.patch_size, (xl.sample_size // xl.patch_size) ** 2) == \
        (28, 16, 72, 2, 1024)
    assert models.plan(["unet-mnist"], ["student"], ["bf16"], [1], providers=("eager",))[0].provider == "eager"


def test_model_budget_stops_starting_cases(tmp_path):
    import torch
    cases = models.plan(["dit-s2-256"], ["student"], ["bf16"], [1])
    runner = models.Runner(torch.device("cpu"), True, "random", tmp_path, 0.0, lambda s: None, dry_run=False)
    runner.run(cases)
    assert runner.rows == [] and len(runner.not_run) == len(cases)
    assert all(why.startswith("time budget") for _, why in runner.not_run)
    md = (tmp_path / models.MD_FILE).read_text()
    assert "## Not run" in md and md.count("time budget") == len(cases)


def test_model_rows_derive_the_image_latency_and_the_share_of_peak():
    case = models.Case("dit-xl2-256", "teacher", "bf16", 8, "flashcore-engine")
    tm = B.Timing(20.0, 19.0, 22.0, 10, 1)
    rows = models.case_rows(case, (8, 4, 32, 32), tm, 50, 4.945e12, 0.01, 42.0, "engine: x", "NVIDIA H200")
    step, image, comp = rows
    B.validate_rows(rows)
    assert [r["unit"] for r in rows] == ["ms", "ms/image", "s"]
    assert step["name"] == "dit-xl2-256.teacher_step" and step["value"] == 20.0
    assert image["value"] == pytest.approx(50 * 20.0 / 8) and image["p80_ms"] == pytest.approx(50 * 22.0 / 8)
    assert comp["name"] == "dit-xl2-256.teacher.compile" and comp["value"] == 42.0
    assert "247 TFLOP/s (25% of dense bf16 peak)" in step["note"]           # 4.945 TFLOP in 20 ms of 989
    student = models.case_rows(models.Case("unet-mnist", "student", "fp32", 4, "eager"), (4, 1, 28, 28), tm, 1,
                               1e9, 0.0, None, "", "some GPU")
    assert len(student) == 2 and student[1]["value"] == pytest.approx(5.0) and "% of" not in student[0]["note"]


def test_peak_table_has_h100_and_h200():
    assert kernels.peak("NVIDIA H200", "bf16") == 989.0 and kernels.peak_gbps("NVIDIA H200") == 4800.0
    assert kernels.peak_gbps("NVIDIA H200 NVL") == 4800.0 and kernels.peak("NVIDIA H200 NVL", "fp16") == 835.0
    assert kernels.peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert kernels.peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert kernels.peak_gbps("NVIDIA H100 PCIe") == 2000.0 and kernels.peak("NVIDIA H100 PCIe", "fp32") == 51.0
    assert kernels.peak("NVIDIA L40S", "bf16") is None              # not an L4
    assert kernels.share_of_peak("GB/s", 2400.0, "NVIDIA H200", "bf16") == pytest.approx(50.0)
    assert kernels.share_of_peak("ms", 1.0, "NVIDIA H200", "bf16") is None
