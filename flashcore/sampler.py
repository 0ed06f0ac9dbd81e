"""Few-step deterministic DDIM sampling with classifier-free guidance and the
t = T Noise Correction of Imagine Flash (Kohler et al., arXiv 2405.05224).

For each step of the plan (``flashcore.plan``: trailing grid, t_0 = T):

    1. eps_c, eps_u = model(x_t, t, c), model(x_t, t, null)   (2 NFE; 1 NFE without CFG)
    2. x_s, x0 = plan.apply(step, ...)                          (fused update, flashcore.ops)
       with d = x_T at t == T when noise correction is on, and a_s = 1, s_s = 0 at the last step

The sample is the last x0.
"""
from __future__ import annotations

from typing import Callable

import torch

from .plan import PlanStep, StepPlan, apply
from .schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoise_step(model, step: PlanStep, x: torch.Tensor, labels: torch.Tensor, x_T: torch.Tensor, *,
                 guidance: float = 1.0, clip: float = 0.0):
    """One sampler step (network call(s) and update); returns (x_next, x0)."""
    tt = torch.full((x.shape[0],), step.t, dtype=torch.long, device=x.device)
    if guidance != 1.0:
        eps_c, eps_u = model.eps_cfg(x, tt, labels)
    else:
        eps_c, eps_u = model(x, tt, labels), None
    return apply(step, x, eps_c, eps_u, x_T, guidance=guidance, clip=clip)


def run_plan(model, plan: StepPlan, x_T: torch.Tensor, labels: torch.Tensor, *, stop: int | None = None,
             guidance: float = 1.0, clip: float = 0.0):
    """Run the first ``stop`` steps of ``plan`` (all by default) from ``x_T``.

    Returns (x, x0s): the state at ``plan.grid[stop]`` (or the last x0 when
    all steps ran) and the x0 estimate of every step taken.
    """
    x, x0s = x_T, []
    for step in plan.steps[:stop]:
        x, x0 = denoise_step(model, step, x, labels, x_T, guidance=guidance, clip=clip)
        x0s.append(x0)
    return (x0s[-1] if stop is None and x0s else x), x0s


@torch.no_grad()
def sample(model, labels: torch.Tensor, *, schedule: NoiseSchedule, steps: int,
           shape: tuple[int, int, int], guidance: float = 1.0, noise_correction: bool = True,
           clip: float = 0.0, x_T: torch.Tensor | None = None,
           generator: torch.Generator | None = None, grid: list[int] | None = None,
           return_trajectory: bool = False):
    """Draw ``len(labels)`` samples in ``steps`` steps; returns x0 (B, C, H, W) float32.

    ``x_T`` defaults to standard normal noise from ``generator``. With
    ``return_trajectory`` also returns the list of x0 estimates per step.
    """
    plan = StepPlan.build(schedule, steps, grid=grid, noise_correction=noise_correction)
    if x_T is None:
        x_T = torch.randn((len(labels),) + tuple(shape), generator=generator)
    x0, traj = run_plan(model, plan, x_T, labels, guidance=guidance, clip=clip)
    return (x0, traj) if return_trajectory else x0
