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
