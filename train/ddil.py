"""DDIL's training-state mixture for Imagine Flash distillation (Garrepalli et al.,
"Improved Diffusion Distillation With Imitation Learning", arXiv 2410.11971).

Per batch one source of the states x_t the student trains on, drawn with priors
(beta_fwd, beta_teacher, beta_student):

    fwd      a_t x0 + s_t eps from a real image x0 (the data marginal: diversity)
    teacher  the teacher's own CFG sampler from x_T down to t (``teacher_rollout``)
    student  the student's own rollout from x_T (DAgger: its compounding error)

``train/distill.py`` holds the config fields and draws the states; docs/ddil.md
describes the choices (the teacher's grid, validated priors, reflection).
"""
from __future__ import annotations

import torch

from flashcore.models import Denoiser
from flashcore.plan import StepPlan
from flashcore.sampler import run_plan
from flashcore.schedule import NoiseSchedule

SOURCES = ("fwd", "teacher", "student")      # in the order of the priors


def priors(cfg) -> tuple[float, float, float]:
    """(beta_fwd, beta_teacher, beta_student) of a ``DistillConfig``.

    Validated, not normalised: priors that do not sum to 1 are a mistake to
    report, not to guess at. ``backward=False`` is forward distillation
    (1, 0, 0); ``fwd_share`` = p, from configs before the priors, means
    (p, 0, 1 - p), so their runs resume as they ran. ``beta_student`` None: the rest."""
    if not cfg.backward:
        if cfg.beta_teacher or cfg.beta_student:
            raise ValueError("distill: --no-backward is forward distillation (beta_fwd = 1); it takes no "
                             "--beta-teacher or --beta-student")
        return 1.0, 0.0, 0.0
    fwd = cfg.beta_fwd
    if cfg.fwd_share:
        if fwd and fwd != cfg.fwd_share:
            raise ValueError(f"distill: fwd_share {cfg.fwd_share!r} is the older name of beta_fwd, which is "
                             f"{fwd!r}; give one of them")
        fwd = cfg.fwd_share
    student = 1.0 - fwd - cfg.beta_teacher if cfg.beta_student is None else cfg.beta_student
    if student < -1e-9 or abs(fwd + cfg.beta_teacher + student - 1.0) > 1e-6:
        raise ValueError(f"distill: the DDIL priors beta_fwd {fwd!r}, beta_teacher {cfg.beta_teacher!r}, "
                         f"beta_student {cfg.beta_student!r} must sum to 1")
    return fwd, cfg.beta_teacher, max(student, 0.0)


def choose_source(p: tuple[float, float, float], gen: torch.Generator) -> str:
    """One batch's source. No draw when one source has all the mass, and with
    beta_teacher = 0 the one uniform draw is the ``rand < fwd_share`` of the code
    before the priors: runs without DDIL or with fwd_share keep their random stream."""
    live = [k for k, v in enumerate(p) if v > 0]
    if len(live) == 1:
        return SOURCES[live[0]]
    u = float(torch.rand(1, generator=gen))
    if u < p[0]:
        return "fwd"
    return "teacher" if u < p[0] + p[1] else "student"


def teacher_rollout_grid(grid: list[int], i: int, substeps: int) -> list[int]:
    """The teacher's rollout grid from grid[0] = T down to grid[i]: ``substeps``
    evenly spaced DDIM steps inside each student interval, ending at grid[i]."""
    out = []
    for j in range(i):
        hi, lo = grid[j], grid[j + 1]
        out += [round(hi - (hi - lo) * k / substeps) for k in range(substeps)]
    return out + [grid[i]]


@torch.no_grad()
def teacher_rollout(teacher: Denoiser, sched: NoiseSchedule, grid: list[int], i: int, substeps: int,
                    x_T: torch.Tensor, labels: torch.Tensor, *, guidance: float, noise_correction: bool,
                    clip: float = 0.0) -> torch.Tensor:
    """x at grid[i] from the teacher's own sampler: DDIM with CFG from x_T, noise-corrected
    at t = T like the student's rollouts, on ``teacher_rollout_grid``."""
    fine = teacher_rollout_grid(grid, i, substeps)
    plan = StepPlan.build(sched, grid=fine, noise_correction=noise_correction)
    return run_plan(teacher, plan, x_T, labels, stop=len(fine) - 1, guidance=guidance, clip=clip)[0]
