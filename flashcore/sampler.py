"""Few-step deterministic DDIM sampling with classifier-free guidance and the
t = T Noise Correction of Imagine Flash (Kohler et al., arXiv 2405.05224).

For each grid time t_i (trailing grid, t_0 = T) with next time s = t_{i+1}:

    1. eps_c, eps_u = model(x_t, t, c), model(x_t, t, null)   (2 NFE; 1 NFE without CFG)
    2. x_s, x0 = sampler_step(...)                              (fused update, flashcore.ops)
       with d = x_T at t == T when noise correction is on, and a_s = 1, s_s = 0 at the last step

The sample is the last x0. Every update goes through ``flashcore.ops.sampler_step``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .ops import sampler_step
from .schedule import NoiseSchedule, trailing_grid

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def step_coeffs(schedule: NoiseSchedule, grid: list[int], i: int) -> tuple[float, float, float, float]:
    """(a_t, s_t, a_s, s_s) for step i of ``grid``; the last step lands on x0."""
    a_t, s_t = schedule.alpha_sigma(grid[i])
    a_s, s_s = schedule.alpha_sigma(grid[i + 1]) if i + 1 < len(grid) else (1.0, 0.0)
    return a_t, s_t, a_s, s_s


def denoise_step(model, schedule: NoiseSchedule, grid: list[int], i: int, x: torch.Tensor,
                 labels: torch.Tensor, x_T: torch.Tensor, *, guidance: float = 1.0,
                 noise_correction: bool = True, clip: float = 0.0):
    """One sampler step from grid[i]; returns (x_next, x0)."""
    t = grid[i]
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if guidance != 1.0:
        eps_c, eps_u = model.eps_cfg(x, tt, labels)
    else:
        eps_c, eps_u = model(x, tt, labels), None
    a_t, s_t, a_s, s_s = step_coeffs(schedule, grid, i)
    nc = noise_correction and t == schedule.T
    return sampler_step(x, eps_c.to(x.dtype), eps_u=None if eps_u is None else eps_u.to(x.dtype),
                        x_T=x_T if nc else None, a_t=a_t, s_t=s_t, a_s=a_s, s_s=s_s,
                        guidance=guidance, noise_correction=nc, clip=clip)


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
    grid = grid if grid is not None else trailing_grid(steps, schedule.cfg.num_train_timesteps)
    if x_T is None:
        x_T = torch.randn((len(labels),) + tuple(shape), generator=generator)
    x, traj = x_T, []
    for i in range(len(grid)):
        x, x0 = denoise_step(model, schedule, grid, i, x, labels, x_T, guidance=guidance,
                             noise_correction=noise_correction, clip=clip)
        traj.append(x0)
    return (x0, traj) if return_trajectory else x0
