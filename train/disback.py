"""DisBack distillation (Zhang et al., "Distribution Backtracking Builds A Faster
Convergence Trajectory for Diffusion Distillation", arXiv 2408.15991): score
distillation (DMD/VSD family, Yin et al. arXiv 2311.18828) whose real score
model walks back along a recorded degradation path instead of being the
teacher from the first iteration.

Stage 1, degradation recording (train/disback_path.py): fine-tune a copy of
the teacher on the initial generator's samples, saving s_1 .. s_N on the way.

Stage 2, distribution backtracking. Notation x_t = a_t x0 + s_t eps,
x0_hat(x_t, eps_hat, t) = (x_t - s_t eps_hat) / a_t. The fake model f starts
as s_N; the real model r is s_k, k = target_index(it) (N-1 first, s_0 = the
teacher last). One generator update:

    1. c ~ U{classes};  x_T ~ N(0, I);  i ~ U{0..n-1} (n = steps; 1: i = 0)
       x_{t_i} = i noise-corrected generator steps from x_T, no gradient
       x0 = x0_hat(x_{t_i}, G(x_{t_i}, t_i, c), t_i)                  with gradient
    2. t ~ U{t_min..t_max};  eps ~ N(0, I);  x_t = a_t x0 + s_t eps    (x0 detached)
    3. p_real = x0 - x0_hat(x_t, r with CFG w, t);  p_fake = x0 - x0_hat(x_t, f, t)
       grad = (p_real - p_fake) / mean|p_real|     (mean over each sample's pixels)
    4. L_G = 0.5 mean((x0 - (x0 - grad).detach())^2);  AdamW step on G;  EMA
    5. fake_updates times: the fake model's own diffusion loss (disback_path.dsm_loss)
       on generator samples, no label dropout; the first on step 1's x0, the rest on
       fresh samples. Real images never enter the run.

Choices where the paper leaves things open (each a config field): N = 5 path
checkpoints every 200 degradation iterations at lr 1e-4; label dropout 0.1 while
degrading; 5 fake updates per generator update (DMD2's ratio); t in 20..980
(DMD's 2%..98%); CFG on the real side only, at the teacher's saved scale.
Multi-step generators train as DMD2's backward simulation (step 1). docs/disback.md
has the fields, the cost per iteration and where this differs from the paper.

Under torchrun the generator, fake and auxiliary models are DDP-wrapped, each
rank takes batch_size / N samples, batch-level draws come from a generator all
ranks share; rank 0 alone logs, validates and writes (as in train/distill.py).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as tdist

from flashcore.devices import autocast, resolve_device
from flashcore.models import load_pretrained
from flashcore.plan import StepPlan
from flashcore.schedule import NoiseSchedule, ScheduleConfig
from flashcore.checkpoint import write_json
from flashcore.validation import (COUNT, DECAY, LR, MAX_TIMESTEPS, SEED, Range, check_bool, check_choice,
                                  check_fields, check_str, option)

from . import common
from .disback_path import (SWITCH_RULES, RawNet, dsm_loss, load_path_weights, save_path_checkpoint,
                           target_index, wrap_ddp)
from .distill import (MAX_STUDENT_STEPS, BestStudent, _gather_generators, export, init_distributed, rollout,
                      sample_grid)

GRAD_CLIP = 10.0     # max gradient norm of every update (DMD2's and the released DisBack code's value)


@dataclass
class DisBackConfig:
    """Every knob of a DisBack run; the ``flashcore disback`` flags are derived from the
    ``option`` metadata here (flag and help), defaults and ranges included."""
    teacher: str = option("checkpoints/mnist-teacher", "--teacher",
                          "teacher checkpoint directory (with --resume: the run's)")
    steps: int = option(1, "--steps", "the generator's sampling steps (a trailing grid of 1-4; the paper: 1)")
    iters: int = option(2000, "--iters", "generator updates in stage 2 (with --resume: the run's new end)")
    batch_size: int = option(64, "--batch-size", "images per update, split over the processes under torchrun")
    lr: float = option(2e-5, "--lr", "AdamW learning rate of the generator")
    ema_decay: float = option(0.99, "--ema", "EMA decay of the exported student")
    guidance: float | None = option(None, "--cfg", "CFG scale of the real score model "
                                                   "(default: the teacher's saved scale)")
    t_min: int = option(20, "--t-min", "score matching at times t ~ U{t-min..t-max}")
    t_max: int = option(980, "--t-max", "score matching at times t ~ U{t-min..t-max}")
    path_checkpoints: int = option(5, "--path-checkpoints", "N: degradation checkpoints s_1..s_N")
    path_every: int = option(200, "--path-every", "degradation iterations between path checkpoints")
    path_lr: float = option(1e-4, "--path-lr", "AdamW learning rate of the degrading model")
    label_drop: float = option(0.1, "--label-drop", "null-label share while degrading (keeps CFG meaningful)")
    fake_lr: float = option(1e-4, "--fake-lr", "AdamW learning rate of the fake score model")
    fake_updates: int = option(5, "--fake-updates", "fake-model updates per generator update")
    switch_rule: str = option("fixed", "--switch-rule", "fixed: the next checkpoint every --switch-every "
                                                        "updates; released: the authors' code's rule")
    switch_every: int = option(200, "--switch-every", "generator updates per path checkpoint")
    noise_correction: bool = option(True, switch="--no-noise-correction",
                                    help="without noise correction at t = T (multi-step generators)")
    checkpoint_every: int = option(250, "--checkpoint-every",
                                   "save a checkpoint (and a sample grid) every N generator updates")
    val_every: int = option(100, "--val-every", "validation FD every N updates; student/ is the best "
                                                "(0: off, student/ is the last)")
    val_samples: int = option(500, "--val-samples", "samples per validation FD")
    classifier: str = option("checkpoints/mnist-classifier", "--classifier",
                             "feature network for the validation FD (the train split only)")
    seed: int = option(0, "--seed", "seed of the run's random draws")
    bf16: bool = True
    sample_every_checkpoint: bool = True

    @property
    def clip(self) -> float:
        """DisBack does not threshold x0 (DDIL's reflection is distill's): its students
        sample unclamped, and distill's export, sample grids and validator read 0 here."""
        return 0.0

    def __post_init__(self):
        if isinstance(self.steps, bool) or self.steps not in range(1, MAX_STUDENT_STEPS + 1):
            raise ValueError(f"disback: --steps must be 1..{MAX_STUDENT_STEPS} (a trailing grid), got {self.steps!r}")
        check_fields(self, DISBACK_RANGES, "disback")
        for name in ("teacher", "classifier"):
            check_str("disback", name, getattr(self, name))
        check_choice("disback", "switch_rule", self.switch_rule, SWITCH_RULES)
        check_bool("disback", self, ("noise_correction", "bf16", "sample_every_checkpoint"))
        if self.t_min > self.t_max:
            raise ValueError(f"disback: t_min ({self.t_min}) must not exceed t_max ({self.t_max})")


# every number DisBackConfig holds and the values it may take (the CLI flags parse with these too)
DISBACK_RANGES = {
    "iters": COUNT, "batch_size": COUNT, "lr": LR, "ema_decay": DECAY,
    "guidance": Range(float, 0, 100, optional=True), "t_min": Range(int, 1, MAX_TIMESTEPS),
    "t_max": Range(int, 1, MAX_TIMESTEPS), "path_checkpoints": Range(int, 1, 1000), "path_every": COUNT,
    "path_lr": LR, "label_drop": Range(float, 0, 1, hi_open=True), "fake_lr": LR,
    "fake_updates": Range(int, 1, 1000), "switch_every": COUNT, "checkpoint_every": COUNT,
    "val_every": Range(int, 0, 10 ** 9), "val_samples": Range(int, 20, 10 ** 9), "seed": SEED,
}


class DisBackTrainer(common.RankDraws):
    """Holds every model of both stages and does one iteration of either; ``disback`` drives it."""

    def __init__(self, cfg: DisBackConfig, run_dir: str, rank: int = 0, world: int = 1,
                 device: str | torch.device | None = "cpu"):
        if cfg.batch_size % world:
            raise ValueError(f"disback: batch size {cfg.batch_size} does not split over {world} processes")
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.local_batch = cfg.batch_size // world
        self.device = resolve_device(device)
        teacher, meta = load_pretrained(cfg.teacher, kinds=("teacher",))
        self.meta = meta
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
        if cfg.t_max > self.sched.T:
            raise ValueError(f"disback: t_max {cfg.t_max} is beyond the teacher's last timestep {self.sched.T}")
        self.plan = StepPlan.build(self.sched, cfg.steps, noise_correction=cfg.noise_correction)
        self.grid = list(self.plan.grid)
        self.guidance = float(cfg.guidance if cfg.guidance is not None else meta.get("guidance") or 1.0)
        mc = teacher.cfg
        self.shape = (mc.channels, mc.sample_size, mc.sample_size)
        self.num_classes = mc.num_classes
        torch.manual_seed(cfg.seed)                   # nothing here draws from it; its saved state is then exact

        def trainable_copy():
            return copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.student = trainable_copy()               # G, and G_0 until stage 2 updates it
        self.ema = common.make_ema(self.student)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.aux = trainable_copy()                   # stage 1: becomes s_1 .. s_N
        self.aux_opt = torch.optim.AdamW(self.aux.parameters(), lr=cfg.path_lr, weight_decay=0.0)
        self.fake = trainable_copy()                  # stage 2: starts as s_N (start_backtracking)
        self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=cfg.fake_lr, weight_decay=0.0)
        self.real = copy.deepcopy(self.teacher)       # stage 2: s_k, frozen
        self.real_index = None                        # loaded by set_target
        self.student_fwd = wrap_ddp(self.student, self.device, world)
        self.aux_raw = wrap_ddp(RawNet(self.aux), self.device, world)
        self.fake_raw = wrap_ddp(RawNet(self.fake), self.device, world)
        self.init_draws(cfg.seed)            # the shared generator draws the rollout length

    # -- state for checkpoints ---------------------------------------------------------------
    def modules(self, stage: str) -> dict:
        if stage == "path":
            return {"aux": self.aux}
        return {"student": self.student, "ema": self.ema, "fake": self.fake}

    def optimizers(self, stage: str) -> dict:
        return {"aux_opt": self.aux_opt} if stage == "path" else {"opt": self.opt, "fake_opt": self.fake_opt}

    # -- draws and network calls -----------------------------------------------------------------
    def _times(self, b: int) -> torch.Tensor:
        return torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (b,), generator=self.gen).to(self.device)

    def generator_samples(self, b: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, labels): step 1, one batch of the generator's clean samples."""
        labels = torch.randint(0, self.num_classes, (b,), generator=self.gen).to(self.device)
        x_T = self._randn((b,) + self.shape)
        i = int(torch.randint(0, self.cfg.steps, (1,), generator=self.shared)) if self.cfg.steps > 1 else 0
        x = rollout(self.student, self.plan, i, x_T, labels) if i else x_T                   # (B, C, H, W)
        t = self.grid[i]
        a_t, s_t = self.sched.alpha_sigma(t)
        tt = torch.full((b,), t, dtype=torch.long, device=self.device)
        with torch.set_grad_enabled(grad), autocast(self.device, torch.bfloat16, enabled=self.cfg.bf16):
            eps = (self.student_fwd if grad else self.student)(x, tt, labels)
        return (x - s_t * eps.float()) / a_t, labels

    @torch.no_grad()
    def x0_hat(self, model, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float):
        with autocast(self.device, torch.bfloat16, enabled=self.cfg.bf16):
            if guidance != 1.0:
                eps_c, eps_u = model.eps_cfg(x_t, t, labels)
                eps = eps_u.float() + guidance * (eps_c.float() - eps_u.float())
            else:
                eps = model(x_t, t, labels).float()
        a, s = self.sched.gather(t)
        return (x_t - s * eps) / a

    def _dsm(self, raw, model, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dsm_loss(raw, model, self.sched, x0, labels, self._times(len(x0)), self._randn(x0.shape),
                        self.cfg.bf16)

    def _update(self, loss: torch.Tensor, model, opt, it: int) -> None:
        common.check_finite(loss, it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.check_finite(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP), it)
        opt.step()

    def _mean_over_ranks(self, xs: list[float]) -> list[float]:
        if self.world == 1:
            return xs
        flat = torch.tensor(xs, dtype=torch.float64)
        tdist.all_reduce(flat)
        return (flat / self.world).tolist()

    # -- stage 1 --------------------------------------------------------------------------------
    def degradation_iteration(self, it: int) -> float:
        """One fine-tuning step of the auxiliary model on G_0's samples; its loss."""
        b = self.local_batch
        x0, labels = self.generator_samples(b, grad=False)
        drop = (torch.rand(b, generator=self.gen) < self.cfg.label_drop).to(self.device)    # step 2
        labels = torch.where(drop, torch.full_like(labels, self.aux.null_label), labels)
        loss = self._dsm(self.aux_raw, self.aux, x0, labels)
        self._update(loss, self.aux, self.aux_opt, it)
        return self._mean_over_ranks([float(loss.detach())])[0]

    def save_path(self, k: int, it: int) -> None:
        save_path_checkpoint(self.aux, self.run_dir, k, self.cfg.path_checkpoints, it, self.cfg.teacher, self.meta)

    # -- stage 2 --------------------------------------------------------------------------------
    def start_backtracking(self) -> None:
        """The fake model starts as s_N, the path's end (it models G_0's samples already)."""
        load_path_weights(self.fake, self.run_dir, self.cfg.path_checkpoints, self.teacher)

    def target(self, it: int) -> int:
        cfg = self.cfg
        return target_index(it, cfg.path_checkpoints, cfg.switch_rule, cfg.switch_every, cfg.path_every)

    def set_target(self, k: int) -> None:
        if k != self.real_index:
            load_path_weights(self.real, self.run_dir, k, self.teacher)
            self.real_index = k

    def iteration(self, it: int) -> dict:
        """Steps 1-5 for backtracking iteration ``it`` (0-based)."""
        cfg, b = self.cfg, self.local_batch
        self.set_target(self.target(it))
        x0, labels = self.generator_samples(b, grad=True)                            # 1. (B, C, H, W)
        t = self._times(b)                                                            # 2.
        x_t = self.sched.add_noise(x0.detach(), self._randn(x0.shape), t)
        with torch.no_grad():                                                         # 3.
            p_real = x0.detach() - self.x0_hat(self.real, x_t, t, labels, self.guidance)
            p_fake = x0.detach() - self.x0_hat(self.fake, x_t, t, labels, 1.0)
            w = p_real.abs().mean(dim=(1, 2, 3), keepdim=True)                         # (B, 1, 1, 1)
            grad = torch.nan_to_num((p_real - p_fake) / w)
        loss = 0.5 * torch.nn.functional.mse_loss(x0, (x0 - grad).detach())          # 4.
        self._update(loss, self.student, self.opt, it)
        common.ema_update(self.ema, self.student, cfg.ema_decay)
        fake_losses = []                                                              # 5.
        for j in range(cfg.fake_updates):
            xf, lf = (x0.detach(), labels) if j == 0 else self.generator_samples(b, grad=False)
            lossf = self._dsm(self.fake_raw, self.fake, xf, lf)
            self._update(lossf, self.fake, self.fake_opt, it)
            fake_losses.append(float(lossf.detach()))
        gap, fake = self._mean_over_ranks([float(grad.abs().mean()), sum(fake_losses) / len(fake_losses)])
        return {"gap": gap, "fake": fake, "path_index": self.real_index}


def _validator_view(cfg: DisBackConfig) -> SimpleNamespace:
    """What distill's Validator reads from a config (DisBack does not clamp x0)."""
    return SimpleNamespace(classifier=cfg.classifier, val_samples=cfg.val_samples, steps=cfg.steps,
                           noise_correction=cfg.noise_correction, clip=cfg.clip)


def disback(cfg: DisBackConfig, run_dir: str, resume: bool = False, progress: bool = True,
            max_iters_this_call: int | None = None, device: str | torch.device | None = "auto") -> str:
    """Record the path and backtrack (or resume either stage) in ``run_dir``; returns the
    exported student directory. ``max_iters_this_call`` counts iterations of both stages.
    Under torchrun every rank calls this; rank 0 holds the folder and writes. Raises
    ``common.Interrupted`` (rank 0) after checkpointing when stopped by Ctrl-C or SIGTERM."""
    dev = resolve_device(device)
    rank, world = init_distributed(dev)
    with common.run_folder(run_dir, resume=resume, what="disback", lead=rank == 0):
        return _disback(cfg, run_dir, rank, world, resume, progress, max_iters_this_call, dev)


def _disback(cfg: DisBackConfig, run_dir: str, rank: int, world: int, resume: bool, progress: bool,
             max_iters_this_call: int | None, device: torch.device) -> str:
    lead = rank == 0
    stage, it = "path", 0
    if resume:
        extra = common.saved_extra(run_dir)
        if extra.get("world_size", 1) != world:
            raise ValueError(f"disback: {run_dir!r} was trained on {extra.get('world_size', 1)} process(es); "
                             f"resume it on the same number (got {world}) to keep the run exact")
        cfg = dataclasses.replace(common.saved_config_as(run_dir, DisBackConfig), iters=cfg.iters)
        stage = extra.get("stage", "path")
    cfg = common.native_bf16(cfg, device, "disback", resume=resume)
    if world > 1:
        tdist.barrier()          # every rank has checked run_dir before rank 0 writes to it
    tr = DisBackTrainer(cfg, run_dir, rank, world, device)
    if lead:       # the resolved config beside the checkpoints: `flashcore disback --config RUN/config.json`
        write_json(os.path.join(run_dir, "config.json"), dataclasses.asdict(cfg))
    if resume:
        it = common.load_state(run_dir, tr.modules(stage), tr.optimizers(stage), tr.generators(),
                               "DisBackConfig")["step"]
    budget = [float("inf") if max_iters_this_call is None else max_iters_this_call]
    stop = common.GracefulStop()

    def stop_now() -> bool:
        if budget[0] <= 0:
            return True
        if world == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested))     # a signal may reach the ranks at different steps
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag)

    def save(stage_: str, n: int) -> None:
        gens = _gather_generators(tr)          # a collective: every rank takes part
        if lead:
            common.save_state(run_dir, n, tr.modules(stage_), tr.optimizers(stage_), gens, cfg,
                              extra={"stage": stage_, "world_size": world,
                                     **({"path_index": tr.real_index} if stage_ == "backtrack" else {})})

    try:
        if stage == "path":
            it = _record_path(tr, run_dir, it, stop_now, budget, save, progress and lead)
            if it < cfg.path_checkpoints * cfg.path_every:        # stopped inside stage 1
                save("path", it)
                if lead:
                    stop.raise_if_stopped("disback", "degradation iteration", it,
                                          cfg.path_checkpoints * cfg.path_every, run_dir)
                return os.path.join(run_dir, "student")
            tr.start_backtracking()         # a resumed stage 2 has its fake model from the state
            resume, it = False, 0
        return _backtrack(tr, run_dir, it, resume, stop, stop_now, budget, save, progress and lead)
    finally:
        stop.restore()


def _record_path(tr: DisBackTrainer, run_dir: str, it: int, stop_now, budget, save, show: bool) -> int:
    """Stage 1 from degradation iteration ``it``; returns the iteration it stopped at."""
    cfg, lead = tr.cfg, tr.rank == 0
    total = cfg.path_checkpoints * cfg.path_every
    log = common.LossLog(run_dir, it if it else None, "path.csv") if lead else None
    if lead:
        log.set_header(["dsm", "path_index"])
    tr.student.eval()                  # G_0: no update in this stage
    bar = common.progress(total, it, "disback degradation", show)
    try:
        while it < total and not stop_now():
            loss = tr.degradation_iteration(it)
            it += 1
            budget[0] -= 1
            if lead:
                log.append(it, [loss, it // cfg.path_every])
            bar.update(1)
            bar.set_postfix(dsm=f"{loss:.4f}")
            if it % cfg.path_every == 0:
                if lead:
                    tr.save_path(it // cfg.path_every, it)
                save("path", it)
    finally:
        bar.close()
    tr.student.train()
    return it


def _backtrack(tr: DisBackTrainer, run_dir: str, it: int, resume: bool, stop, stop_now, budget, save,
               show: bool) -> str:
    cfg, lead = tr.cfg, tr.rank == 0
    log = common.LossLog(run_dir, it if resume else None) if lead else None
    if lead:
        log.set_header(["gap", "fake", "path_index"])
    best = BestStudent(cfg.val_every, _validator_view(cfg), tr.meta, run_dir, it if resume else None, lead,
                       extra={"method": "disback"})

    def checkpoint(n: int) -> None:
        save("backtrack", n)
        if not lead:
            return
        export(run_dir, tr, n, "student-last" if best.on else "student", extra={"method": "disback"})
        if cfg.sample_every_checkpoint:
            sample_grid(tr, os.path.join(run_dir, "samples", f"iter_{n:06d}.png"))

    bar = common.progress(cfg.iters, it, f"disback {cfg.steps}-step", show)
    try:
        while it < cfg.iters and not stop_now():
            r = tr.iteration(it)
            it += 1
            budget[0] -= 1
            if lead:
                log.append(it, [r["gap"], r["fake"], r["path_index"]])
            bar.update(1)
            bar.set_postfix(gap=f"{r['gap']:.4f}", fake=f"{r['fake']:.4f}", k=r["path_index"])
            if best.due(it):
                best(tr, it, bar.write)
            if it % cfg.checkpoint_every == 0 and it < cfg.iters:
                checkpoint(it)
    finally:
        bar.close()
    if best.missing(it):
        best(tr, it, bar.write)
    checkpoint(it)
    if tr.world > 1:
        tdist.barrier()          # the files exist for every rank when it returns
    if lead:
        stop.raise_if_stopped("disback", "iteration", it, cfg.iters, run_dir)
    return os.path.join(run_dir, "student")
