"""The step plan: one description of a few-step sampler run, shared by the
sampler, the diffusers scheduler, the engine and the distillation rollouts.

Notation (Imagine Flash, Kohler et al., arXiv 2405.05224; trailing grids from
Lin et al., arXiv 2305.08891). For grid times t_0 = T > t_1 > ... > t_{n-1}:

    step i:  t = t_i,  s = t_{i+1}   (the last step lands on x0: a_s = 1, s_s = 0)
             x0  = (x_t - s_t * eps) / a_t
             d   = x_T  if noise correction is on and t == T,  else eps
             x_s = a_s * x0 + s_s * d

Everything a step needs besides the network is in its ``PlanStep``: the four
schedule values and whether noise correction applies. ``apply`` is the one
place that turns a step and the network's outputs into the fused
``flashcore.ops.sampler_step`` call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import sampler_step
from .schedule import NoiseSchedule, trailing_grid

# order of the float64 coefficient tensor that the compiled engine passes around
COEF_FIELDS = ("a_t", "s_t", "a_s", "s_s", "noise_correction")


@dataclass(frozen=True)
class PlanStep:
    t: int
    a_t: float
    s_t: float
    a_s: float
    s_s: float
    noise_correction: bool       # only ever true at t == T

    def coef(self) -> torch.Tensor:
        """The step as a float64 tensor in ``COEF_FIELDS`` order (exact: the floats are float64)."""
        return torch.tensor([self.a_t, self.s_t, self.a_s, self.s_s, float(self.noise_correction)],
                            dtype=torch.float64)

    @staticmethod
    def from_coef(t: int, coef: torch.Tensor) -> "PlanStep":
        a_t, s_t, a_s, s_s, nc = coef.tolist()
        return PlanStep(t, a_t, s_t, a_s, s_s, bool(nc))


@dataclass(frozen=True)
class StepPlan:
    grid: tuple[int, ...]
    steps: tuple[PlanStep, ...]

    @staticmethod
    def build(schedule: NoiseSchedule, steps: int | None = None, *, grid: list[int] | None = None,
              noise_correction: bool = True) -> "StepPlan":
        """The plan for ``steps`` trailing steps (or an explicit descending ``grid``)."""
        if grid is None:
            if steps is None:
                raise ValueError("plan: pass steps or grid")
            grid = trailing_grid(steps, schedule.cfg.num_train_timesteps)
        grid = [int(t) for t in grid]
        if not grid:
            raise ValueError("plan: the grid is empty")
        # non-increasing: a teacher's k steps from a small tau may repeat a time (see teacher_grid)
        if any(b > a for a, b in zip(grid, grid[1:])) or not 0 <= grid[-1] <= grid[0] <= schedule.T:
            raise ValueError(f"plan: the grid must be descending times in 0..{schedule.T}, got {grid}")
        out = []
        for i, t in enumerate(grid):
            a_t, s_t = schedule.alpha_sigma(t)
            a_s, s_s = schedule.alpha_sigma(grid[i + 1]) if i + 1 < len(grid) else (1.0, 0.0)
            out.append(PlanStep(t, a_t, s_t, a_s, s_s, bool(noise_correction and t == schedule.T)))
        return StepPlan(tuple(grid), tuple(out))

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> PlanStep:
        return self.steps[i]

    def __iter__(self):
        return iter(self.steps)

    def index(self, t: int) -> int:
        """Position of grid time ``t``; a ValueError names the grid if it is not on it."""
        try:
            return self.grid.index(int(t))
        except ValueError:
            raise ValueError(f"timestep {int(t)} is not on the grid {list(self.grid)}") from None

    def coefs(self) -> list[torch.Tensor]:
        return [s.coef() for s in self.steps]


def apply(step: PlanStep, x: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor | None = None,
          x_T: torch.Tensor | None = None, *, guidance: float = 1.0, clip: float = 0.0,
          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise-corrected update (CFG combine, x0, optional clamp, next state); returns (x_s, x0).

    ``x_T`` is the sampler's starting noise; it is read only where the step's
    noise correction is on (t == T), where it may also be ``x`` itself.
    """
    nc = step.noise_correction
    if nc and x_T is None:
        raise ValueError(f"plan: step at t={step.t} applies noise correction and needs x_T")
    return sampler_step(x, eps_c.to(x.dtype), eps_u=None if eps_u is None else eps_u.to(x.dtype),
                        x_T=x_T if nc else None, a_t=step.a_t, s_t=step.s_t, a_s=step.a_s, s_s=step.s_s,
                        guidance=guidance, noise_correction=nc, clip=clip, backend=backend)
