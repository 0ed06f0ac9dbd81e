"""flashcore's sampler as a diffusers scheduler, so it drops into an ordinary
diffusers denoising loop:

    sched = FlashcoreScheduler(); sched.set_timesteps(3)
    x = torch.randn(...)                          # x_T
    for t in sched.timesteps:
        eps = ...                                 # the model, with CFG combined by the caller
        x = sched.step(eps, t, x).prev_sample

Deterministic DDIM on a trailing grid with the t = T Noise Correction of
Imagine Flash (Kohler et al., arXiv 2405.05224): at t = T the sample passed
in *is* x_T, so the direction term uses it instead of eps. The update runs
through ``flashcore.ops.sampler_step``. Unlike diffusers' DDIMScheduler with
trailing spacing, the previous time is the next grid entry (999 -> 666 ->
333 for three steps), and the last step returns x0.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .plan import StepPlan, apply
from .schedule import NoiseSchedule, ScheduleConfig


class FlashcoreScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 zero_terminal_snr: bool = False, noise_correction: bool = True, clip_sample_range: float = 0.0):
        self.schedule = NoiseSchedule(ScheduleConfig(kind=beta_schedule, num_train_timesteps=num_train_timesteps,
                                                     zero_terminal_snr=zero_terminal_snr))
        self.init_noise_sigma = 1.0
        self.plan: StepPlan | None = None
        self.timesteps = torch.tensor([], dtype=torch.long)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        self.plan = StepPlan.build(self.schedule, num_inference_steps,
                                   noise_correction=self.config.noise_correction)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(self.plan.grid, dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kw):
        if self.plan is None:
            raise ValueError("FlashcoreScheduler: call set_timesteps() before step()")
        try:
            step = self.plan[self.plan.index(timestep)]
        except ValueError as e:
            raise ValueError(f"FlashcoreScheduler: {e}") from None
        # at t == T the sample passed in is x_T itself: the noise-corrected direction
        prev, x0 = apply(step, sample, model_output, x_T=sample, clip=self.config.clip_sample_range)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self):
        return self.config.num_train_timesteps
