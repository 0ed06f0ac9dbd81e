"""bench/bench_gpu.py is importable and well-formed without a GPU (its --dry-run)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench            # its dataclass looks itself up there
_spec.loader.exec_module(bench)


def test_dry_run_lists_every_provider(capsys):
    assert bench.main(["--dry-run", "--dtype", "fp16,bf16,fp32"]) == 0
    out = capsys.readouterr().out
    for prov in ("flashcore-triton", "flashcore-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "eager",
                 "compile"):
        assert prov in out
    for name in ("attention", "attention.bwd", "sampler_step", "sampler_step.graph", "srl_loss"):
        assert f"\n{name} " in "\n" + out
    assert "CSV columns: " + ",".join(bench.COLUMNS) in out


def test_rows_use_the_cpu_benchmark_columns(tmp_path):
    case = bench.attention_cases(["fp16"], [(2, 3, 128, 64)], "cpu")[0]
    r = bench.row(case, (2.0, 1.5, 2.5), "some GPU")
    assert list(r) == bench.COLUMNS == ["name", "provider", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "unit",
                                        "value", "device", "commit", "torch", "time"]
    # 4 B H N^2 D FLOPs in 2 ms
    assert math.isclose(float(r["value"]), 4 * 2 * 3 * 128 * 128 * 64 / 2e-3 / 1e12, rel_tol=1e-3)
    path = tmp_path / "results.csv"
    bench.append_csv(path, [r])
    bench.append_csv(path, [r])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(bench.COLUMNS) and len(lines) == 3


def test_peak_table_knows_the_target_gpus():
    assert bench.peak("NVIDIA A100-SXM4-80GB", "bf16") and bench.peak("NVIDIA H100 80GB HBM3", "fp16")
    assert bench.peak("some unknown GPU", "fp16") is None
