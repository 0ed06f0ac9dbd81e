"""Noise schedules of variance-preserving diffusion and the timestep grids.

Notation (Ho et al. 2020; Lin et al. 2023, "Common Diffusion Noise Schedules
and Sample Steps are Flawed", arXiv 2305.08891):

    x_t = a_t * x0 + s_t * eps,   a_t = sqrt(alphas_cumprod[t]),  a_t^2 + s_t^2 = 1

``t`` runs over ``0..T`` with ``T = num_train_timesteps - 1`` (999 by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")

# An exactly zero a_T (zero terminal SNR) makes x0_hat = (x_t - s_t eps) / a_t
# undefined. flashcore keeps an epsilon-prediction head and clamps a_t from
# below instead of switching to a v-prediction head.
A_FLOOR = 1e-3


# (beta_start, beta_end) when a config leaves them unset; the cosine schedule has no range
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def beta_range(kind: str, beta_start: float | None = None, beta_end: float | None = None) -> tuple[float, float]:
    """The (beta_start, beta_end) a linear or scaled-linear schedule uses: the given ones, else its defaults."""
    b0, b1 = BETA_RANGE.get(kind, BETA_RANGE["linear"])
    return (b0 if beta_start is None else float(beta_start)), (b1 if beta_end is None else float(beta_end))


def make_betas(kind: str, num_train_timesteps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None, trained_betas=()) -> torch.Tensor:
    """Betas in float64 for the named schedule, or ``trained_betas`` as given (then ``kind``
    and the range are unused, as in diffusers' schedulers)."""
    n = num_train_timesteps
    if kind not in SCHEDULES:
        raise ValueError(f"schedule: unknown kind {kind!r}; expected one of {SCHEDULES}")
    if trained_betas is not None and len(trained_betas):
        b = torch.as_tensor(list(trained_betas), dtype=torch.float64)
        if b.ndim != 1 or len(b) != n:
            raise ValueError(f"schedule: trained_betas must hold num_train_timesteps = {n} values, got {len(b)}")
        # beta = 1 only where a zero-terminal-SNR rescale put it (a_T = 0); beyond (0, 1] no variance is preserved
        if not bool(torch.isfinite(b).all()) or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("schedule: trained_betas must be finite values in (0, 1]")
        return b
    b0, b1 = beta_range(kind, beta_start, beta_end)
    if kind == "linear":
        # DDPM (Ho et al. 2020)
        return torch.linspace(b0, b1, n, dtype=torch.float64)
    if kind == "scaled_linear":
        # Stable Diffusion / Emu family: linear in sqrt(beta)
        return torch.linspace(math.sqrt(b0), math.sqrt(b1), n, dtype=torch.float64) ** 2

    # cosine: Nichol & Dhariwal 2021 (diffusers' squaredcos_cap_v2)
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so
    that a_T = 0 while a_0 is kept."""
    a = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    abar = a ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "scaled_linear"
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False
    beta_start: float | None = None
    beta_end: float | None = None
    # a schedule given as its betas (a diffusers config's trained_betas); empty: made from ``kind``
    trained_betas: tuple[float, ...] = ()

    def __post_init__(self):
        # a JSON list stays hashable and equal to the tuple it stands for
        object.__setattr__(self, "trained_betas", tuple(self.trained_betas or ()))


class NoiseSchedule:
    """Tables a_t, s_t (float64 on CPU; look-ups return Python floats or
    float32 tensors)."""

    def __init__(self, cfg: ScheduleConfig | None = None, **kw):
        cfg = cfg or ScheduleConfig(**kw)
        if cfg.num_train_timesteps < 2:
            raise ValueError("schedule: num_train_timesteps must be at least 2")
        self.cfg = cfg
        betas = make_betas(cfg.kind, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.trained_betas)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.a = self.alphas_cumprod.sqrt().clamp_min(A_FLOOR)
        # from the floored a, so that a_t^2 + s_t^2 = 1 holds at the floor too (a v-prediction
        # model's eps = s x_t + a v then gives back x0 = a x_t - s v exactly, see models/denoiser.py)
        self.s = (1 - self.a ** 2).clamp_min(0).sqrt()
        self.T = cfg.num_train_timesteps - 1
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        if not 0 <= int(t) <= self.T:
            raise ValueError(f"schedule: t={t} outside 0..{self.T}")
        return float(self.a[int(t)]), float(self.s[int(t)])

    def gather(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample a_t, s_t shaped (B, 1, 1, 1) for broadcasting."""
        # indexed on t's device (no device-to-host sync on a GPU); float32 tables cached per device
        tab = self._tables.get(t.device)
        if tab is None:
            tab = self._tables[t.device] = (self.a.float().to(t.device), self.s.float().to(t.device))
        shape = (-1,) + (1,) * (ndim - 1)
        idx = t.long()
        return tab[0][idx].view(shape), tab[1][idx].view(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.gather(t, x0.ndim)
        return a * x0 + s * eps


def trailing_grid(n_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing timesteps (Lin et al. 2023, Table 2): start at T, spaced T/n.

    1 step {999}; 2 steps {999, 499}; 3 {999, 666, 333}; 4 {999, 749, 499, 249}.
    """
    if not isinstance(n_steps, int) or n_steps < 1 or n_steps > num_train_timesteps:
        raise ValueError(f"grid: n_steps must be an integer in 1..{num_train_timesteps}, got {n_steps!r}")
    T = num_train_timesteps
    return [T - 1 - (i * T) // n_steps for i in range(n_steps)]
