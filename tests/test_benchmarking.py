"""The benchmark harness and the ``flashcore bench`` command produce well-formed rows.

No timing is asserted (this machine may be busy): only the shape of the output,
the quantile order and numbers derived from rows the test builds itself.
"""
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from flashcore import benchmarking as B
from flashcore.cli_bench import load_bench
from flashcore.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "provider", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms"}


def _row(name="op", provider="eager", p50=2.0, unit="GB/s", value=1.0, **kw):
    return B.make_row(name, provider, (2, 3), torch.float32, B.Timing(p50, p50 * 0.9, p50 * 1.1, 5, 1), unit, value,
                      **kw)


def test_quantile_matches_torch():
    xs = torch.rand(37, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (0.2, 0.5, 0.8):
        assert B.quantile(xs.tolist(), q) == pytest.approx(torch.quantile(xs, q).item(), rel=1e-12)


def test_measure_orders_its_quantiles():
    x = torch.randn(1000)
    t = B.measure(lambda: x.sum(), warmup=1, repeats=7, min_sample_ms=0.2)
    assert 0 < t.p20_ms <= t.p50_ms <= t.p80_ms and t.samples == 7 and t.inner >= 1


def test_measure_interleaved_rotates_blocks_and_times_each_provider(monkeypatch):
    """Blocks of calls per provider in rotating order (a warm-up call opening each
    block), every provider's own durations. The providers advance a fake clock (2 and
    4 ms a call), so the durations are exact whatever else runs on the machine."""
    clock, log = [0.0], []
    monkeypatch.setattr(B.time, "perf_counter", lambda: clock[0])

    def worker(name, secs):
        return lambda: (log.append(name), clock.__setitem__(0, clock[0] + secs))

    got = B.measure_interleaved({"a": worker("a", 0.002), "b": worker("b", 0.004)}, rounds=3, per_round=3,
                                seconds_per_provider=10.0, warmup=1, pause=0.0)
    assert got["a"].samples == got["b"].samples == 9
    assert got["a"].p20_ms == pytest.approx(2.0) and got["a"].p80_ms == pytest.approx(2.0)
    assert got["b"].p50_ms == pytest.approx(4.0)
    body = log[4:]                                    # after warm-up + the one-call probe of each
    blocks = [body[i][0] for i in range(0, len(body), 4)]
    assert blocks == ["a", "b", "b", "a", "a", "b"]  # round r starts at provider r mod 2
    assert all(len(set(body[i:i + 4])) == 1 for i in range(0, len(body), 4))


def test_rows_have_the_shared_columns_and_csv_appends(tmp_path):
    r = _row(max_abs_err=0.0)
    assert list(r)[:len(B.COLUMNS)] == B.COLUMNS and r["shape"] == "2x3" and r["dtype"] == "fp32"
    B.validate_rows([r])
    path = tmp_path / "results.csv"
    B.append_csv(path, [r])
    B.append_csv(path, [r, r])
    with path.open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and list(got[0]) == B.COLUMNS           # extras stay out of the CSV
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        B.append_csv(bad, [r])


def test_gpu_bench_writes_the_same_columns():
    path = ROOT / "bench" / "bench_gpu.py"
    if not path.exists():
        pytest.skip("bench/bench_gpu.py not in this checkout")
    spec = importlib.util.spec_from_file_location("bench_gpu_cols", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert mod.COLUMNS == B.COLUMNS


def test_validate_rejects_bad_rows():
    with pytest.raises(ValueError, match="lacks"):
        B.validate_rows([{"name": "x"}])
    r = _row()
    r["p20_ms"] = r["p80_ms"] + 1
    with pytest.raises(ValueError, match="order"):
        B.validate_rows([r])
    r = _row(value=float("nan"))
    with pytest.raises(ValueError, match="value"):
        B.validate_rows([r])


def test_markdown_speedup_and_copy_share(tmp_path):
    rows = [_row("copy", "torch.copy_", p50=1.0, value=40.0), _row(p50=4.0, value=10.0),
            _row(provider="flashcore-cpp", p50=1.0, value=20.0)]
    table = B.markdown_table(rows)
    assert "| 4.00x |" in table                                   # eager p50 / flashcore p50
    assert "(50% of copy)" in table and "(25% of copy)" in table
    B.write_markdown(tmp_path / "x.md", "title", rows, notes=["a note"])
    text = (tmp_path / "x.md").read_text()
    assert text.startswith("# title") and "- a note\n\n| name" in text


def test_copy_share_uses_the_copy_of_the_same_footprint():
    rows = [_row("copy", "torch.copy_", p50=1.0, value=40.0), _row(value=10.0, copy_gbps=20.0), _row(value=10.0)]
    table = B.markdown_table(rows)
    assert "(50% of copy)" in table and "(25% of copy)" in table   # its own copy, else the first one
    seen = {}
    copy_rows, bw = B.copy_baseline(2 << 20, seen)                  # 1 MiB copied into 1 MiB
    assert [r["name"] for r in copy_rows] == ["copy"] and copy_rows[0]["shape"] == "2x1MiB" and bw > 0
    assert B.copy_baseline(2 << 20, seen) == ([], bw)               # measured once per footprint


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert B.plot(tmp_path / "x.png", "t", [_row(), _row(provider="compile", p50=1.0)])
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_case_times_compile_apart():
    x = torch.randn(256)
    compiled = B.compile_fresh(lambda a: a * 2 + 1)
    provs = {"eager": lambda: x * 2 + 1, "compile": lambda: compiled(x)}
    rows = B.bench_case("toy", (256,), torch.float32, provs, unit="GB/s", work=2 * 256 * 4,
                        timing=dict(warmup=1, repeats=3, min_sample_ms=0.1))
    assert [(r["name"], r["provider"], r["unit"]) for r in rows] == [
        ("toy", "eager", "GB/s"), ("toy.compile", "compile", "s"), ("toy", "compile", "GB/s")]
    assert all(r["max_abs_err"] <= 1e-6 for r in rows if "max_abs_err" in r)
    B.validate_rows(rows)


def _check_rows(rows):
    assert rows and all(isinstance(r, dict) and KEYS <= set(r) and set(B.COLUMNS) <= set(r) for r in rows)
    for r in rows:
        assert all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for k in ("p50_ms", "p20_ms", "p80_ms"))
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]


def test_cli_bench_quick_json(tmp_path):
    """``flashcore bench --quick --json``: the kernels suite (compile providers left out for time)."""
    out, js = tmp_path / "res", tmp_path / "rows.json"
    assert cli_main(["bench", "--suite", "kernels", "--quick", "--providers", "eager,flashcore,sdpa",
                     "--out-dir", str(out), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    _check_rows(rows)
    names = {r["name"] for r in rows}
    assert {"copy", "sampler_step", "srl_loss", "srl_renoise", "attention"} <= names
    provs = {r["provider"] for r in rows}
    assert {"eager", "sdpa"} <= provs and "compile" not in provs
    for r in rows:                                   # every kernel agrees with its reference
        assert r.get("max_abs_err", 0.0) <= (1e-4 if r["name"] == "attention" else 1e-5)
    for name in ("sampler_step", "srl_loss", "attention"):
        assert (out / f"{name}.md").exists() and (out / f"{name}.png").exists()
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def test_bench_without_out_dir_leaves_committed_results_alone(tmp_path, monkeypatch, capsys):
    """A smoke run, and any run not naming --out-dir, writes a fresh run folder, never bench/results."""
    monkeypatch.setattr(B, "RUNS_DIR", tmp_path / "runs")
    before = _snapshot(B.RESULTS_DIR)
    assert before                                   # the committed tables exist to be protected
    argv = ["bench", "--suite", "kernels", "--quick", "--providers", "eager"]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0                      # a second run in the same second gets its own folder
    assert _snapshot(B.RESULTS_DIR) == before
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.endswith(("-quick", "-quick-2")) for r in runs)
    for r in runs:
        assert {"results.csv", "sampler_step.md", "srl_loss.md", "attention.md"} <= {p.name for p in r.iterdir()}
    assert str(runs[-1]) in capsys.readouterr().out
    # naming the committed folder with --quick is refused, before anything runs
    assert cli_main(argv + ["--out-dir", str(B.RESULTS_DIR)]) == 1
    assert "smoke run" in capsys.readouterr().err
    assert _snapshot(B.RESULTS_DIR) == before


def test_resolve_out_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "RUNS_DIR", tmp_path / "runs")
    assert B.resolve_out_dir(tmp_path / "mine", quick=True) == tmp_path / "mine"
    assert B.resolve_out_dir(B.RESULTS_DIR, quick=False) == B.RESULTS_DIR      # the explicit update
    with pytest.raises(ValueError, match="smoke run"):
        B.resolve_out_dir(B.RESULTS_DIR / ".", quick=True)
    full = B.resolve_out_dir(None, quick=False)
    assert full.parent == tmp_path / "runs" and full.is_dir() and not full.name.endswith("quick")


def test_step_and_e2e_suites_quick_without_compile(tmp_path):
    """The step suite's eager, flashcore-eager and ONNX Runtime rows on a tiny DiT
    (the compiled providers are covered by tests/test_engine.py), and the e2e rows."""
    pytest.importorskip("onnxruntime")
    step = load_bench("bench_step")
    rows = step.run(quick=True, providers=("eager", "flashcore-eager", "onnxruntime"))
    _check_rows(rows)
    timed = [r for r in rows if r["unit"] == "ms"]
    assert {(r["name"], r["provider"]) for r in timed} == {
        (n, p) for n in ("student_step", "teacher_step") for p in ("eager", "flashcore-eager", "onnxruntime")}
    assert all(r["rel_err"] < 1e-4 for r in timed)                # fp32 providers agree with eager
    assert {r["name"] for r in rows if r["unit"] == "s"} == {"student_step.export", "teacher_step.export"}
    e2e = load_bench("bench_e2e")
    rows = e2e.run(quick=True, providers=("eager",))
    _check_rows(rows)
    assert {r["name"] for r in rows} == {"student_3step", "teacher_5step_cfg"}
    B.publish(e2e.NAME, e2e.TITLE, rows, tmp_path, notes=e2e.NOTES)
    assert "random weights" in (tmp_path / "e2e.md").read_text()


def test_step_suite_openvino_runs_the_onnx_file_beside_onnxruntime(tmp_path):
    """The openvino provider on the tiny DiT: the ONNX Runtime file, one export per case
    (its rows in both dtypes), fp32 output equal to ORT's, and a bf16 row that says what
    OpenVINO really computed in."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from flashcore.ops._onednn import bf16_native
    step = load_bench("bench_step")
    rows = step.run(quick=True, providers=("onnxruntime", "openvino"), dtypes=("fp32", "bf16"))
    _check_rows(rows)
    timed = {(r["name"], r["provider"], r["dtype"]): r for r in rows if r["unit"] == "ms"}
    roles = ("student_step", "teacher_step")
    assert set(timed) == {(n, p, d) for n in roles for p, d in
                          (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))}
    exports = [r for r in rows if r["unit"] == "s"]
    assert {(r["name"], r["provider"], r["dtype"]) for r in exports} == {
        (f"{n}.export", p, d) for n, p, d in timed}
    for n in roles:
        ov32, ov16 = timed[(n, "openvino", "fp32")], timed[(n, "openvino", "bf16")]
        assert timed[(n, "onnxruntime", "fp32")]["rel_err"] < 1e-4 and ov32["rel_err"] < 1e-4
        assert ov32["precision"] == "f32" and "note" not in ov32
        if bf16_native():
            assert ov16["precision"] == "bf16" and ov16["rel_err"] < 5e-2
        else:
            # the hint fell back: the row says so, and its error is fp32's (it is no bf16 computation)
            assert ov16["precision"] == "f32" and "computed in f32, not bf16" in ov16["note"]
            assert ov16["rel_err"] < 1e-4
    B.publish(step.NAME, step.TITLE, rows, tmp_path, notes=step.NOTES)
    if not bf16_native():
        assert "computed in f32, not bf16" in (tmp_path / "step.md").read_text()
    # the same file, the same inputs: OpenVINO's fp32 step agrees with ORT's (both outputs)
    fc, base = step.build_models(step.QUICK)
    onnx = step.onnx_file(fc, base, "teacher_step", 1, str(tmp_path))
    provs = step.case_providers(fc, base, "teacher_step", 1, torch.float32, onnx,
                                lambda p: p in ("onnxruntime", "openvino"))
    ort_out, ov_out = provs["onnxruntime"].fn(), provs["openvino"].fn()
    for a, b in zip(ort_out, (ov_out[0], ov_out[1])):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        assert a.shape == b.shape and (a - b).norm() / a.norm() < 1e-5


def test_step_suite_leaves_out_openvino_that_does_not_import(monkeypatch, capsys):
    """Without the openvino package the provider is left out with a note; the rest runs."""
    step = load_bench("bench_step")
    monkeypatch.setitem(sys.modules, "openvino", None)           # `import openvino` now raises ImportError
    rows = step.run(quick=True, providers=("eager", "openvino"), log=print)
    assert {r["provider"] for r in rows} == {"eager"}
    assert any(n.startswith("openvino left out: openvino does not import") for n in step.NOTES)
    assert "openvino left out" in capsys.readouterr().out
    step.run(quick=True, providers=("eager",))
    assert list(step.NOTES) == list(step.BASE_NOTES)             # a later run does not inherit the note
