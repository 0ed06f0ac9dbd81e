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

from .ops import sampler_step
from .sampler import step_coeffs
from .schedule import NoiseSchedule, ScheduleConfig, trailing_grid


class FlashcoreScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 zero_terminal_snr: bool = False, noise_correction: bool = True, clip_sample_range: float = 0.0):
        self.schedule = NoiseSchedule(ScheduleConfig(kind=beta_schedule, num_train_timesteps=num_train_timesteps,
                                                     zero_terminal_snr=zero_terminal_snr))
        self.init_noise_sigma = 1.0
        self.grid: list[int] = []
        self.timesteps = torch.tensor([], dtype=torch.long)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        self.grid = trailing_grid(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(self.grid, dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kw):
        if not self.grid:
            raise ValueError("FlashcoreScheduler: call set_timesteps() before step()")
        t = int(timestep)
        if t not in self.grid:
            raise ValueError(f"FlashcoreScheduler: timestep {t} is not on the grid {self.grid}")
        a_t, s_t, a_s, s_s = step_coeffs(self.schedule, self.grid, self.grid.index(t))
        nc = self.config.noise_correction and t == self.schedule.T
        prev, x0 = sampler_step(sample, model_output.to(sample.dtype), x_T=sample if nc else None,
                                a_t=a_t, s_t=s_t, a_s=a_s, s_s=s_s, noise_correction=nc,
                                clip=self.config.clip_sample_range)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self):
        return self.config.num_train_timesteps
