"""flashcore's sampler as a diffusers scheduler, so it drops into an ordinary
diffusers denoising loop:

    sched = FlashcoreScheduler(); sched.set_timesteps(3)      # or set_timesteps(timesteps=[999, 499])
    x = torch.randn(...)                          # x_T
    for t in sched.timesteps:
        out = ...                                 # the model (eps, v or x0), with CFG combined by the caller
        x = sched.step(out, t, x).prev_sample

Deterministic DDIM on a trailing grid (or given timesteps) with the t = T
Noise Correction of Imagine Flash (Kohler et al., arXiv 2405.05224): at t = T
the sample passed in *is* x_T, so the direction term uses it instead of eps.
Every step is a ``flashcore.plan`` step run by ``flashcore.plan.apply`` (the
fused ``flashcore.ops.sampler_step``); a v or x0 prediction is turned into eps
first. Unlike diffusers' DDIMScheduler with trailing spacing, the previous time
is the next grid entry (999 -> 666 -> 333 for three steps), and the last step
returns x0.

The config speaks diffusers' names (beta_schedule, beta_start, beta_end,
trained_betas, rescale_betas_zero_snr, prediction_type, clip_sample) and adds a
student's own plan: ``num_inference_steps``, ``timesteps`` (its grid) and
``noise_correction``. The betas come from ``flashcore.schedule.NoiseSchedule``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .plan import PlanStep, StepPlan, apply
from .schedule import NoiseSchedule, ScheduleConfig, beta_range, trailing_grid

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' beta_schedule names -> flashcore.schedule kinds
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# what defines the noise process of the model a config was written for: read from a source
# config whatever its class's defaults are (see ``from_config``)
MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr", "prediction_type")


@dataclass
class FlashcoreSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next grid time (x0 after the last step);
    ``pred_original_sample``: this step's x0 estimate (clamped when clip_sample is on)."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def to_eps(prediction_type: str, out: torch.Tensor, x: torch.Tensor, a_t: float, s_t: float) -> torch.Tensor:
    """The network's output as eps, with x_t = a_t x0 + s_t eps and a_t^2 + s_t^2 = 1:
    v = a eps - s x0 gives eps = s x + a v; x0 gives eps = (x - a x0) / s."""
    out = out.to(x.dtype)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return s_t * x + a_t * out
    return (x - a_t * out) / s_t


def scheduler_config(schedule: ScheduleConfig, prediction_type: str = "epsilon", *, steps: int | None = None,
                     grid: list[int] | None = None, noise_correction: bool = True) -> dict:
    """FlashcoreScheduler's keyword arguments for a flashcore model: its schedule and
    prediction type, and a student's step count, grid and noise correction."""
    kind = {v: k for k, v in BETA_SCHEDULES.items()}[schedule.kind]
    b0, b1 = beta_range(schedule.kind, schedule.beta_start, schedule.beta_end)
    return {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": b0, "beta_end": b1,
            "beta_schedule": kind, "trained_betas": list(schedule.trained_betas) or None,
            "prediction_type": prediction_type, "rescale_betas_zero_snr": schedule.zero_terminal_snr,
            "noise_correction": bool(noise_correction), "num_inference_steps": steps,
            "timesteps": None if grid is None else [int(t) for t in grid]}


def _check_grid(timesteps, T: int) -> list[int]:
    vals = timesteps.tolist() if hasattr(timesteps, "tolist") else list(timesteps)
    ok = bool(vals) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in vals)
    if ok:
        vals = [int(t) for t in vals]
        ok = all(b < a for a, b in zip(vals, vals[1:])) and 0 <= vals[-1] and vals[0] <= T
    if not ok:
        raise ValueError(f"FlashcoreScheduler: timesteps must be strictly descending integers in 0..{T}, "
                         f"got {vals!r}"[:300])
    return vals


def _check_steps(n, T: int) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= T + 1:
        raise ValueError(f"FlashcoreScheduler: num_inference_steps must be an integer in 1..{T + 1}, got {n!r}")
    return int(n)


class FlashcoreScheduler(SchedulerMixin, ConfigMixin):
    # configs of these diffusers schedulers describe the same beta schedules (their other keys are ignored)
    _compatibles = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                    "LCMScheduler", "TCDScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, noise_correction: bool = True,
                 num_inference_steps: int | None = None, timesteps: list[int] | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"FlashcoreScheduler: prediction_type {prediction_type!r} is not supported; "
                             f"expected one of {PREDICTION_TYPES}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"FlashcoreScheduler: beta_schedule {beta_schedule!r} is not supported; "
                             f"expected one of {tuple(BETA_SCHEDULES)}")
        if trained_betas is not None and hasattr(trained_betas, "tolist"):
            trained_betas = trained_betas.tolist()
        self.schedule = NoiseSchedule(ScheduleConfig(
            kind=BETA_SCHEDULES[beta_schedule], num_train_timesteps=num_train_timesteps,
            zero_terminal_snr=rescale_betas_zero_snr, beta_start=beta_start, beta_end=beta_end,
            trained_betas=tuple(trained_betas or ())))
        T = self.schedule.T
        if num_inference_steps is not None:
            _check_steps(num_inference_steps, T)
        if timesteps is not None:
            grid = _check_grid(timesteps, T)
            if num_inference_steps is not None and num_inference_steps != len(grid):
                raise ValueError(f"FlashcoreScheduler: num_inference_steps = {num_inference_steps} but "
                                 f"timesteps has {len(grid)}")
        # diffusers' layout: float32 tables; alphas_cumprod unfloored (add_noise is the forward process;
        # the a_t floor of flashcore.schedule only guards x0 = (x - s eps) / a in the steps)
        self.betas = self.schedule.betas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.init_noise_sigma = 1.0
        self.plan: StepPlan | None = None
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor([], dtype=torch.long)
        self.custom_timesteps = False
        self._begin_index: int | None = None
        self._step_index: int | None = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """As ``ConfigMixin.from_config``, but the source's ``MODEL_KEYS`` are always
        taken: diffusers drops every value a config holds at its own class's default
        (``_use_default_values``), so ``DDPMScheduler().config`` would otherwise come
        out on this class's defaults (scaled_linear) instead of its linear betas."""
        if isinstance(config, dict):
            for k in MODEL_KEYS:
                if k in config and k not in kwargs:
                    kwargs[k] = config[k]
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ---- the grid ----------------------------------------------------------------------------

    @property
    def has_default_plan(self) -> bool:
        """Whether the config names a step count or grid of its own (a student's)."""
        return self.config.timesteps is not None or self.config.num_inference_steps is not None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None):
        """The grid: ``timesteps`` as given (strictly descending), else ``num_inference_steps``
        trailing steps (the config's own grid when it has that many), else the config's plan."""
        T = self.schedule.T
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("FlashcoreScheduler: pass num_inference_steps or timesteps, not both")
        saved = self.config.timesteps
        custom = timesteps is not None
        if custom:
            grid = _check_grid(timesteps, T)
        elif num_inference_steps is not None:
            n = _check_steps(num_inference_steps, T)
            grid = list(saved) if saved is not None and len(saved) == n else trailing_grid(n, T + 1)
        elif saved is not None:
            grid = list(saved)
        elif self.config.num_inference_steps is not None:
            grid = trailing_grid(self.config.num_inference_steps, T + 1)
        else:
            raise ValueError("FlashcoreScheduler: pass num_inference_steps or timesteps (this config has no "
                             "step count of its own)")
        # the t == T noise-correction rule is the plan's
        self.plan = StepPlan.build(self.schedule, grid=grid, noise_correction=self.config.noise_correction)
        self.num_inference_steps = len(grid)
        self.custom_timesteps = custom
        self.timesteps = torch.tensor(grid, dtype=torch.long, device=device)
        self._begin_index = None
        self._step_index = None

    @property
    def begin_index(self) -> int | None:
        """Where in ``timesteps`` a pipeline starts (img2img: past the first entries)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    @property
    def step_index(self) -> int | None:
        """The grid position of the next step: after a step at ``timesteps[i]``, i + 1."""
        return self._step_index

    def _plan_step(self, timestep) -> tuple[int, PlanStep]:
        if self.plan is None:
            raise ValueError("FlashcoreScheduler: call set_timesteps() before step()")
        try:
            i = self.plan.index(int(timestep))
        except ValueError as e:
            raise ValueError(f"FlashcoreScheduler: {e}") from None
        return i, self.plan[i]

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The grid time after ``timestep``; -1 after the last (the step that lands on x0)."""
        i, _ = self._plan_step(timestep)
        return torch.tensor(self.plan.grid[i + 1] if i + 1 < len(self.plan) else -1)

    # ---- the model's input and the update ----------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        """One deterministic step from ``timestep`` to the next grid time (x0 after the last)."""
        if eta != 0.0:
            raise ValueError(f"FlashcoreScheduler: the sampler is deterministic (eta = 0), got eta = {eta}")
        if use_clipped_model_output:
            raise ValueError("FlashcoreScheduler: use_clipped_model_output is not supported (the direction term "
                             "is the model's eps, or x_T with noise correction)")
        i, st = self._plan_step(timestep)
        eps = to_eps(self.config.prediction_type, model_output, sample, st.a_t, st.s_t)
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else 0.0
        # at t == T the sample passed in is x_T itself: the noise-corrected direction
        prev, x0 = apply(st, sample, eps, x_T=sample, clip=clip)
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return FlashcoreSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # ---- the forward process ------------------------------------------------------------------

    def _a_s(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(timesteps, device=like.device).long().flatten()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.schedule.T):
            raise ValueError(f"FlashcoreScheduler: timesteps must be in 0..{self.schedule.T}")
        ac = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return ac.sqrt().view(shape), (1 - ac).sqrt().view(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) noise, t per sample (or one t)."""
        a, s = self._a_s(timesteps, original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = a_t noise - s_t x0 (Salimans & Ho 2022) of ``sample`` = x0."""
        a, s = self._a_s(timesteps, sample)
        return a * noise - s * sample

    def __len__(self):
        return self.config.num_train_timesteps
