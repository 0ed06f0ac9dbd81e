"""The engine's configuration: what a user sets (``EngineConfig``) and, after one
resolve step, what the engine runs with (``ResolvedEngine``: no "auto" left).

Kept apart from ``engine.py`` so the policy ("auto" rules) can be read, tested
and printed in one place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import ops
from ..plan import StepPlan
from ..schedule import NoiseSchedule

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRAPHS = ("step", "sampler")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class EngineConfig:
    """What ``Engine`` can be asked for; every field is documented on ``Engine``."""
    steps: int | None = None
    grid: tuple[int, ...] | None = None
    guidance: float = 1.0
    noise_correction: bool = True
    clip: float = 0.0
    dtype: torch.dtype = torch.float32
    compile: bool = True
    freeze: bool | str = "auto"
    buckets: tuple[int, ...] | None | str = "auto"
    graph: str = "step"
    mode: str | None = "auto"
    backend: str | None = None
    shape: tuple[int, int, int] | None = None
    cache_dir: str | None = None
    linear: bool | str = "auto"

    def replace(self, **kw) -> "EngineConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"engine: unknown option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **kw)

    def resolve(self, model, schedule: NoiseSchedule) -> "ResolvedEngine":
        """Validate, and turn every "auto" into a decision for this model and machine."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self.dtype not in DTYPES:
            raise ValueError(f"engine: dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if self.dtype == torch.float16 and device.type != "cuda":
            raise ValueError("engine: dtype float16 is for CUDA devices; on the CPU use bfloat16")
        if self.graph not in GRAPHS:
            raise ValueError(f"engine: graph must be one of {GRAPHS}, got {self.graph!r}")
        for name in ("linear", "freeze"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"engine: {name} must be True, False or 'auto', got {getattr(self, name)!r}")
        try:
            plan = StepPlan.build(schedule, self.steps, grid=self.grid, noise_correction=self.noise_correction)
        except ValueError as e:
            raise ValueError(f"engine: {e}") from None
        compiled = bool(self.compile)
        # the linear row: the native kernel (GEMV at small M, oneDNN above) where built, else oneDNN alone;
        # both are CPU kernels, so a CUDA model keeps nn.Linear (cuBLAS)
        built = ops.backends_for("linear") if device.type == "cpu" else []
        linear_backend = next((b for b in ("cpp", "onednn") if b in built), None)
        # auto: compiled float32 only, so the eager engine stays bit-equal to sampler.sample
        # (oneDNN sums in another order) and bf16 keeps inductor's own packing of frozen weights
        linear = (compiled and self.dtype == torch.float32 and linear_backend is not None
                  if self.linear == "auto" else bool(self.linear))
        freeze = (compiled and (self.dtype == torch.bfloat16 or linear) if self.freeze == "auto"
                  else bool(self.freeze))
        if self.buckets == "auto":
            buckets = BUCKETS if compiled else None
        else:
            buckets = tuple(self.buckets) if self.buckets else None
        shape = (tuple(self.shape) if self.shape is not None
                 else (model.cfg.channels, model.cfg.sample_size, model.cfg.sample_size))
        return ResolvedEngine(
            plan=plan, guidance=float(self.guidance), clip=float(self.clip), dtype=self.dtype,
            compiled=compiled, freeze=freeze, buckets=buckets, graph=self.graph,
            # auto: CUDA graphs on a GPU (a few-step sampler is launch-bound there), inductor's default on the CPU
            mode=("reduce-overhead" if compiled and device.type == "cuda" else None) if self.mode == "auto"
            else self.mode,
            backend=self.backend, shape=shape, cache_dir=self.cache_dir, linear=linear,
            linear_backend=linear_backend, fuse_qkv=linear and compiled and freeze)


@dataclass(frozen=True)
class ResolvedEngine:
    plan: StepPlan
    guidance: float
    clip: float
    dtype: torch.dtype
    compiled: bool
    freeze: bool
    buckets: tuple[int, ...] | None
    graph: str
    mode: str | None
    backend: str | None
    shape: tuple[int, int, int]
    cache_dir: str | None
    linear: bool
    linear_backend: str | None
    fuse_qkv: bool          # self-attention q/k/v as one GEMM: only where the weights are frozen anyway

    @property
    def autocast(self) -> torch.dtype | None:
        return None if self.dtype == torch.float32 else self.dtype

    @property
    def cuda_graphs(self) -> bool:
        return self.mode is not None and "reduce-overhead" in self.mode
