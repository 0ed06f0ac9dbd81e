"""The sampler step as one traceable function: network evaluation(s), then the fused update.

Notation as in ``flashcore.sampler`` (Imagine Flash, Kohler et al., arXiv 2405.05224):

    1. eps_c[, eps_u] = model(x_t, t, c)[, model(x_t, t, null)]    (1 NFE, or 2 NFE batched as 2B)
    2. x_s, x0        = sampler_step(x_t, eps_c, eps_u, x_T; a_t, s_t, a_s, s_s, nc)

Why a second custom op: ``flashcore::sampler_step`` takes the schedule values as
Python floats, which torch.compile bakes into the graph as constants, so a
compiled step would be re-traced at every grid position (and hit dynamo's
recompile limit on a 50-step teacher). ``flashcore::engine_update`` takes them as
one float64 tensor ``coef = [a_t, s_t, a_s, s_s, nc]`` instead: the graph sees a
tensor input whose values may change freely. Inside (opaque to the compiler) it
reads the floats back and applies the step with ``flashcore.plan.apply``, as the
eager sampler does, so the backend table, the fused kernels and the arithmetic
are exactly the eager sampler's. float64 keeps the floats bit-identical to ``NoiseSchedule.alpha_sigma``,
which is what makes the eager engine equal ``sampler.sample`` exactly.
"""
from __future__ import annotations

import contextlib

import torch

from ..plan import COEF_FIELDS, PlanStep, StepPlan, apply

__all__ = ["COEF_FIELDS", "coefficient_table", "engine_update", "make_sampler", "make_step"]


@torch.library.custom_op("flashcore::engine_update", mutates_args=())
def engine_update(x: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor | None, x_T: torch.Tensor,
                  coef: torch.Tensor, guidance: float, clip: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # t is not needed by the update itself (the coefficients carry the t == T rule)
    return apply(PlanStep.from_coef(-1, coef), x, eps_c, eps_u, x_T, guidance=guidance, clip=clip,
                 backend=backend or None)


@engine_update.register_fake
def _(x, eps_c, eps_u, x_T, coef, guidance, clip, backend):
    return torch.empty_like(x), torch.empty_like(x)


def coefficient_table(plan: StepPlan) -> list[torch.Tensor]:
    """One float64 ``coef`` tensor per step of ``plan``, in ``COEF_FIELDS`` order."""
    return plan.coefs()


def make_step(model, *, guidance: float, clip: float, autocast_dtype: torch.dtype | None,
              backend: str | None = None):
    """``step(x, x_T, t, labels, coef) -> (x_next, x0)`` for ``model``.

    ``x``/``x_T`` (B, C, H, W) in the state dtype (float32), ``t``/``labels`` (B,)
    int64, ``coef`` from ``coefficient_table``. ``guidance != 1`` evaluates the
    model on cond and null labels as one 2B batch (``model.eps_cfg``).
    ``autocast_dtype`` runs the network under CPU autocast; the update stays in
    the state dtype so the few-step sampler does not accumulate bf16 rounding.
    """
    cfg = guidance != 1.0
    backend = backend or ""

    def step(x, x_T, t, labels, coef):
        ctx = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            if cfg:
                eps_c, eps_u = model.eps_cfg(x, t, labels)           # (B, C, H, W) each
            else:
                eps_c, eps_u = model(x, t, labels), None
        eps_c = eps_c.to(x.dtype)
        eps_u = None if eps_u is None else eps_u.to(x.dtype)
        return engine_update(x, eps_c, eps_u, x_T, coef, guidance, clip, backend)

    return step


def make_sampler(step):
    """The whole few-step loop as one function of (x_T, labels, ts, coefs).

    Compiled, dynamo unrolls the loop over the (constant) number of steps into a
    single graph; ``ts`` and ``coefs`` are lists of tensors, so their values do not
    specialise it.
    """
    def sampler(x_T, labels, ts: list[torch.Tensor], coefs: list[torch.Tensor]):
        x = x_T
        x0 = x_T
        for t, coef in zip(ts, coefs):
            x, x0 = step(x, x_T, t, labels, coef)
        return x0

    return sampler
