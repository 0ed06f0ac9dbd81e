"""Shared test set-up: seeds, the Triton interpreter for CPU runs, and a check that no
test leaves the process's signal stack changed.

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


@pytest.fixture(autouse=True)
def _signal_stack_unchanged():
    """A test that leaves the main thread's alternate signal stack changed fails here,
    named, and the stack is put back. A library that installs one of its own and unmaps
    it later (OpenVINO's CPU plugin did: bench/deploy_child.py keep_signal_stack) turns
    the next signal, in whatever later test sends one, into a SIGSEGV of the whole run."""
    from flashcore.cli_bench import load_bench
    dc = load_bench("deploy_child")
    with dc.keep_signal_stack():
        before = dc.signal_stack()
        yield
        after = dc.signal_stack()
    assert after == before, (f"the test changed the thread's alternate signal stack from {before} to {after} "
                             f"(address, flags, size); wrap the call that does it in keep_signal_stack")


def pytest_configure(config):
    """The pytest-benchmark tests check in a test run that every provider runs and agrees,
    one call each: no timing, and none of its wide tables after the summary. Timings
    come with ``--benchmark-only`` or ``--benchmark-enable`` (tests/test_bench_kernels.py).

    Set here rather than in addopts so that ``-p no:benchmark`` still works; runs before
    the plugin's own (trylast) configure hook reads the option.
    """
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_only"):
        config.option.benchmark_disable = True
