"""Autotuning lists per GPU generation, and the interpreter switch.

``@triton.autotune`` with two or more configs fails under ``TRITON_INTERPRET=1``
(it benchmarks through a GPU driver), so the interpreter gets one small config.
On a GPU the Ampere (sm_8x) and Hopper (sm_9x) lists are both handed to the
autotuner and pruned to the running device's list before it benchmarks: a
config tuned for one generation's shared memory and warp-group MMA is never
timed on the other.
"""
from __future__ import annotations

import os

# Pin FMA contraction on: Triton 3.9's default, which 3.10 turns off. Results
# then do not shift with the Triton version, and 3.9 stops warning at each compile.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

# Read once, when the kernels are first imported: triton decides at decoration
# time whether a kernel is interpreted, so the answer cannot change later.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def device_major() -> int:
    """Compute capability major of the current CUDA device (8 without one)."""
    import torch
    if INTERPRET or not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_capability()[0]


def cfg(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def autotune(*, ampere: list, hopper: list, interp: triton.Config, key: list[str], fits=None):
    """``triton.autotune`` over the current generation's configs.

    ``fits(config, kwargs)`` drops configs that a shape cannot use (for
    instance 128-row tiles with a 256-wide head dim, which overflow shared
    memory); at least one config is always kept.
    """
    if INTERPRET:
        return triton.autotune([interp], key=key)
    hopper_ids = {id(c) for c in hopper}

    def prune(configs, named_args, **kwargs):
        want_hopper = device_major() >= 9
        kept = [c for c in configs if (id(c) in hopper_ids) == want_hopper]
        if fits is not None:
            kept = [c for c in kept if fits(c, {**named_args, **kwargs})] or kept[-1:]
        return kept or configs[:1]

    return triton.autotune(ampere + hopper, key=key, prune_configs_by={"early_config_prune": prune})

