"""The benchmark suites behind ``flashcore bench`` (entry layer, docs/architecture.md):
which bench/ scripts make up a suite, and loading them from the source tree
(bench/ holds scripts, not an installed package). The library's
``flashcore.benchmarking`` has the timing, CSV and table utilities they share."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

from . import benchmarking as B

BENCH_DIR = B.BENCH_DIR
SUITES = {
    "kernels": ("bench_sampler_step", "bench_srl_loss", "bench_attention"),
    "step": ("bench_step",),
    "e2e": ("bench_e2e",),
    "deploy": ("bench_deploy",),      # needs build/flashcore-run (docs/deploy.md)
}


def load_bench(module: str):
    """Import ``bench/<module>.py`` from the source tree, once."""
    name = f"flashcore_bench_{module}"
    if name in sys.modules:
        return sys.modules[name]
    path = BENCH_DIR / f"{module}.py"
    if not path.exists():
        raise ValueError(f"bench: {path} not found; run from a flashcore source checkout "
                         f"or set FLASHCORE_HOME to one")
    if str(BENCH_DIR) not in sys.path:        # the scripts import their siblings by name
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_suite(suite: str, *, quick: bool = False, providers: tuple[str, ...] | None = None,
              out_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the bench modules of ``suite`` (or "all"), publish each under ``out_dir``
    (``benchmarking.resolve_out_dir``), return all rows."""
    out_dir = B.resolve_out_dir(out_dir, quick=quick)
    names = [m for s in SUITES.values() for m in s] if suite == "all" else list(SUITES[suite])
    rows: list[dict] = []
    for m in names:
        mod = load_bench(m)
        got = mod.run(quick=quick, providers=providers, log=log)
        B.publish(mod.NAME, mod.TITLE, got, out_dir, notes=getattr(mod, "NOTES", ()))
        rows += got
    return rows
