"""Shared test set-up: seeds, and the Triton interpreter for CPU runs.

TRITON_INTERPRET must be set before anything imports triton: the Triton rows then take
CPU tensors and run in the interpreter, so the same parametrised op tests exercise them
on a machine without a GPU (at the small shapes flashcore.testing.cases gives them).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same generator state, whatever ran before it."""
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    """The pytest-benchmark tests check in a test run that every provider runs and agrees,
    one call each: no timing, and none of its wide tables after the summary. Timings
    come with ``--benchmark-only`` or ``--benchmark-enable`` (tests/test_bench_kernels.py).

    Set here rather than in addopts so that ``-p no:benchmark`` still works; runs before
    the plugin's own (trylast) configure hook reads the option.
    """
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_only"):
        config.option.benchmark_disable = True
