"""Imagine Flash distillation (Kohler et al., "Imagine Flash: Accelerating Emu
Diffusion Models with Backward Distillation", arXiv 2405.05224).

Notation: x_t = a_t x0 + s_t eps; grid = trailing grid of the student's n steps.
One iteration:

    1. i ~ U{0..n-1};  t = grid[i];  c ~ U{classes};  x_T ~ N(0, I)
    2. x_t = f_student^i(x_T) without gradient, noise-corrected at t = T
       (backward distillation; --no-backward: x_t = a_t x0 + s_t eps from real data)
    3. eps_S = student(x_t, t, c);  x0_S = (x_t - s_t eps_S) / a_t
    4. tau = gamma(t) = round(r t) + jitter;  chi = a_tau x0_S + s_tau eps'
       (--no-srl: chi = x_t, tau = t)
    5. x0_T = teacher, k DDIM steps with CFG from chi at tau, x0 at the last visited time
    6. L = w_i mean((x0_T - x0_S)^2) + lambda_adv L_G(D(noised x0_S))   (SRL: flashcore.ops.srl_loss)
    7. D step on real against x0_S, both noised to a random time (train/discriminator.py)

Optionally (DDIL, Garrepalli et al., arXiv 2410.11971) a share ``fwd_share``
of batches takes forward-noised real states in step 2, and ``clip`` clamps
x0 estimates to the data range in rollouts and targets.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from flashcore import data as fdata
from flashcore.images import grid as image_grid
from flashcore.images import save_png
from flashcore.models import Denoiser, load_pretrained, save_pretrained
from flashcore.ops import srl_loss, srl_renoise
from flashcore.sampler import denoise_step, sample
from flashcore.schedule import NoiseSchedule, ScheduleConfig, trailing_grid

from . import common
from .discriminator import Discriminator, d_loss, g_loss

MAX_STUDENT_STEPS = 4


@dataclass
class DistillConfig:
    teacher: str = "checkpoints/mnist-teacher"
    steps: int = 3                    # the student's sampling steps
    iters: int = 2000
    batch_size: int = 64
    lr: float = 2e-5
    ema_decay: float = 0.99
    gamma_ratio: float = 0.75         # tau = round(gamma_ratio * t)
    gamma_jitter: int = 0             # + U{-j..j} timesteps
    teacher_steps: int = 1            # k
    guidance: float | None = None     # teacher CFG; None: the teacher's saved scale
    backward: bool = True
    srl: bool = True
    noise_correction: bool = True
    adversarial: bool = True
    lambda_adv: float = 1e-2
    d_lr: float = 1e-4
    fwd_share: float = 0.0            # DDIL: share of batches from forward-noised real data
    step_weights: tuple = ()          # per grid step loss weights; () = all 1
    clip: float = 0.0                 # DDIL reflection: clamp x0 to [-clip, clip]
    checkpoint_every: int = 250
    seed: int = 0
    bf16: bool = True
    sample_every_checkpoint: bool = True

    def __post_init__(self):
        if self.steps not in range(1, MAX_STUDENT_STEPS + 1):
            raise ValueError(f"distill: --steps must be 1..{MAX_STUDENT_STEPS} (a trailing grid), got {self.steps}")
        if self.teacher_steps < 1:
            raise ValueError("distill: teacher_steps (k) must be >= 1")
        if not 0.0 < self.gamma_ratio <= 1.0:
            raise ValueError(f"distill: gamma_ratio must be in (0, 1], got {self.gamma_ratio}")
        if self.step_weights and len(self.step_weights) != self.steps:
            raise ValueError(f"distill: step_weights needs {self.steps} values, got {len(self.step_weights)}")
        self.step_weights = tuple(self.step_weights)


def teacher_grid(tau: int, k: int) -> list[int]:
    """k DDIM steps from tau, visiting tau, tau (k-1)/k, ..., tau/k."""
    return [max(1, round(tau * (k - j) / k)) for j in range(k)]


@torch.no_grad()
def rollout(student: Denoiser, sched: NoiseSchedule, grid: list[int], i: int, x_T: torch.Tensor,
            labels: torch.Tensor, noise_correction: bool, clip: float = 0.0) -> torch.Tensor:
    """x at grid[i] after i student steps from x_T (noise-corrected at t = T)."""
    x = x_T
    for j in range(i):
        x, _ = denoise_step(student, sched, grid, j, x, labels, x_T, noise_correction=noise_correction,
                            clip=clip)
    return x


class Distiller:
    """Holds the models and does one iteration; ``distill`` drives it."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        teacher, meta = load_pretrained(cfg.teacher, kinds=("teacher",))
        self.meta = meta
        self.teacher = teacher.eval().requires_grad_(False)
        self.sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
        self.grid = trailing_grid(cfg.steps, self.sched.cfg.num_train_timesteps)
        self.guidance = float(cfg.guidance if cfg.guidance is not None else meta.get("guidance") or 1.0)
        mc = teacher.cfg
        self.shape = (mc.channels, mc.sample_size, mc.sample_size)
        torch.manual_seed(cfg.seed)
        self.student = Denoiser(mc)
        self.student.load_state_dict(teacher.state_dict())
        self.student.train()
        self.ema = common.make_ema(self.student)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.disc = Discriminator(mc.channels, mc.num_classes)
        self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._real = None
        if not cfg.backward or cfg.adversarial or cfg.fwd_share > 0:
            # real images serve the discriminator and forward distillation only
            ds = fdata.load(meta["data"], size=mc.sample_size, channels=mc.channels)
            self._real = fdata.split(ds, "train")

    # -- state for checkpoints ------------------------------------------------------------
    def modules(self):
        return {"student": self.student, "ema": self.ema, "disc": self.disc}

    def optimizers(self):
        return {"opt": self.opt, "d_opt": self.d_opt}

    def _randint(self, lo: int, hi: int, n: int = 1) -> torch.Tensor:
        return torch.randint(lo, hi, (n,), generator=self.gen)

    def _real_batch(self, b: int):
        idx = self._randint(0, len(self._real[0]), b)
        return self._real[0][idx], self._real[1][idx]

    def student_state(self, b: int):
        """(x_t, t, labels, i, used_real) for one batch: steps 1-2."""
        cfg, sched = self.cfg, self.sched
        i = int(self._randint(0, cfg.steps))
        t = self.grid[i]
        forward = (not cfg.backward) or (cfg.fwd_share > 0 and float(torch.rand(1, generator=self.gen)) < cfg.fwd_share)
        if forward:
            x0, labels = self._real_batch(b)
            eps = torch.randn(x0.shape, generator=self.gen)
            a_t, s_t = sched.alpha_sigma(t)
            return a_t * x0 + s_t * eps, t, labels, i, True
        labels = self._randint(0, self.teacher.cfg.num_classes, b)
        x_T = torch.randn((b,) + self.shape, generator=self.gen)
        self.student.eval()
        x_t = rollout(self.student, sched, self.grid, i, x_T, labels, cfg.noise_correction, cfg.clip)
        self.student.train()
        return x_t, t, labels, i, False

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, x0_s: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
        """Steps 4-5: the teacher's x0 from the re-noised student prediction."""
        cfg, sched = self.cfg, self.sched
        if cfg.srl:
            tau = round(cfg.gamma_ratio * t)
            if cfg.gamma_jitter:
                tau += int(self._randint(-cfg.gamma_jitter, cfg.gamma_jitter + 1))
            tau = min(max(tau, 1), sched.T)
            a, s = sched.alpha_sigma(tau)
            chi = srl_renoise(x0_s, torch.randn(x0_s.shape, generator=self.gen), a=a, s=s)
        else:
            chi, tau = x_t, t
        return sample(self.teacher, labels, schedule=sched, steps=cfg.teacher_steps, shape=self.shape,
                      guidance=self.guidance, noise_correction=False, clip=cfg.clip, x_T=chi,
                      grid=teacher_grid(tau, cfg.teacher_steps))

    def iteration(self, it: int = 0) -> dict:
        cfg, sched = self.cfg, self.sched
        b = cfg.batch_size
        x_t, t, labels, i, _ = self.student_state(b)                               # (B, C, H, W)
        a_t, s_t = sched.alpha_sigma(t)
        tt = torch.full((b,), t, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            eps_s = self.student(x_t, tt, labels)
        eps_s = eps_s.float()
        x0_s = (x_t - s_t * eps_s) / a_t                                            # 3. with grad
        x0_t = self.target(x_t, x0_s.detach(), t, labels)                           # 4-5.
        w = cfg.step_weights[i] if cfg.step_weights else 1.0
        l_srl = srl_loss(x_t, eps_s, x0_t, a_t=a_t, s_t=s_t)                       # 6.
        loss = w * l_srl
        out = {"srl": float(l_srl.detach()), "adv": 0.0, "d": 0.0, "i": i}
        if cfg.adversarial:
            real, real_lab = self._real_batch(b)
            td = self._randint(0, sched.T + 1, b)
            noise = torch.randn(real.shape, generator=self.gen)
            fake_t = sched.add_noise(x0_s, noise, td)
            l_adv = g_loss(self.disc(fake_t, td, labels))
            loss = loss + cfg.lambda_adv * l_adv
            out["adv"] = float(l_adv.detach())
        common.check_finite(loss, it)
        self.opt.zero_grad(set_to_none=True)
        self.disc.zero_grad(set_to_none=True)       # the student's loss must not train D
        loss.backward()
        common.check_finite(torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0), it)
        self.opt.step()
        if cfg.adversarial:                                                        # 7.
            real_t = sched.add_noise(real, noise, td)
            ld = d_loss(self.disc(real_t, td, real_lab), self.disc(fake_t.detach(), td, labels))
            common.check_finite(ld, it)
            self.d_opt.zero_grad(set_to_none=True)
            ld.backward()
            self.d_opt.step()
            out["d"] = float(ld.detach())
        common.ema_update(self.ema, self.student, cfg.ema_decay)
        return out


def export(run_dir: str, dist: Distiller, it: int, name: str = "student") -> str:
    cfg = dist.cfg
    out = os.path.join(run_dir, name)
    save_pretrained(dist.ema, out, {
        "kind": "student", "guidance": None, "data": dist.meta["data"], "steps": cfg.steps,
        "grid": dist.grid, "noise_correction": cfg.noise_correction, "schedule": dist.meta["schedule"],
        "teacher": cfg.teacher, "train_iters": it, "distill_config": dataclasses.asdict(cfg)},
        dtype=torch.float16)
    return out


def sample_grid(dist: Distiller, path: str) -> None:
    labels = torch.arange(dist.teacher.cfg.num_classes).repeat_interleave(8)
    x = sample(dist.ema, labels, schedule=dist.sched, steps=dist.cfg.steps, shape=dist.shape,
               noise_correction=dist.cfg.noise_correction, generator=torch.Generator().manual_seed(1234))
    save_png(image_grid(x, nrow=8), path, scale=2)


def distill(cfg: DistillConfig, run_dir: str, resume: bool = False, progress: bool = True,
            max_iters_this_call: int | None = None) -> str:
    """Distil (or resume) a student in ``run_dir``; returns the exported student directory."""
    os.makedirs(run_dir, exist_ok=True)
    if not resume and common.has_state(run_dir):
        raise ValueError(f"distill: {run_dir!r} already holds a run; pass --resume or use a new --out")
    if resume:
        if not common.has_state(run_dir):
            raise ValueError(f"distill: nothing to resume in {run_dir!r}")
        cfg = DistillConfig(**{**common.saved_config(run_dir), "iters": cfg.iters})
    dist = Distiller(cfg)
    it = 0
    if resume:
        it = common.load_state(run_dir, dist.modules(), dist.optimizers(), {"data": dist.gen},
                               "DistillConfig")["step"]
    log = common.LossLog(run_dir, it if resume else None)
    log.set_header(["srl", "adv", "d", "grid_index"])

    def checkpoint(n: int) -> None:
        common.save_state(run_dir, n, dist.modules(), dist.optimizers(), {"data": dist.gen}, cfg)
        export(run_dir, dist, n)
        if cfg.sample_every_checkpoint:
            sample_grid(dist, os.path.join(run_dir, "samples", f"iter_{n:06d}.png"))

    stop = common.GracefulStop()
    end = cfg.iters if max_iters_this_call is None else min(cfg.iters, it + max_iters_this_call)
    bar = common.progress(cfg.iters, it, f"distill {cfg.steps}-step", progress)
    try:
        while it < end and not stop.requested:
            r = dist.iteration(it)
            it += 1
            log.append(it, [r["srl"], r["adv"], r["d"], r["i"]])
            bar.update(1)
            bar.set_postfix(srl=f"{r['srl']:.4f}", adv=f"{r['adv']:.3f}")
            if it % cfg.checkpoint_every == 0 and it < end:
                checkpoint(it)
    finally:
        bar.close()
        stop.restore()
    checkpoint(it)
    return os.path.join(run_dir, "student")
