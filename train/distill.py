"""Imagine Flash distillation (Kohler et al., "Imagine Flash: Accelerating Emu
Diffusion Models with Backward Distillation", arXiv 2405.05224).

Notation: x_t = a_t x0 + s_t eps; grid = trailing grid of the student's n steps.
One iteration:

    1. i ~ U{0..n-1};  t = grid[i];  c ~ U{classes};  x_T ~ N(0, I)
    2. x_t = f_student^i(x_T) without gradient, noise-corrected at t = T
       (backward distillation; --no-backward: x_t = a_t x0 + s_t eps from real data)
    3. eps_S = student(x_t, t, c);  x0_S = (x_t - s_t eps_S) / a_t
    4. tau = gamma(t) = round(r t) + jitter;  chi = a_tau x0_S + s_tau eps'
       (eps' fresh noise; --srl-noise student: eps' = eps_S, see SRL_NOISE)
       (--no-srl: chi = x_t, tau = t)
    5. x0_T = teacher, k DDIM steps with CFG from chi at tau, x0 at the last visited time
    6. L = w_i mean((x0_T - x0_S)^2) + lambda_adv L_G(D(noised x0_S))   (SRL: flashcore.ops.srl_loss)
    7. D step on real against x0_S, both noised to a random time (train/discriminator.py)

More than one process (``torchrun --nproc_per_node=N -m flashcore.cli distill ...``):
each rank takes batch_size / N samples of the same global batch; the
batch-level draws (grid index i, forward-or-backward, tau jitter) come from a
generator all ranks share, per-sample draws from one per rank;
DistributedDataParallel averages the student's gradients (the discriminator's
are averaged by hand: it is called twice before its backward, which DDP does
not allow), so every update is the gradient of the global batch's mean loss,
as in one process. Rank 0 alone logs, validates and writes checkpoints; the
per-rank generator states go into the checkpoint, so a resume with the same N
is exact. Backend gloo on CPU, NCCL on GPU.

DDIL (Garrepalli et al., "Improved Diffusion Distillation With Imitation
Learning", arXiv 2410.11971) widens step 2 into a mixture: per batch, with
priors (beta_fwd, beta_teacher, beta_student), x_t is real data noised forward
to t (keeps the data marginal), the teacher's own CFG rollout from x_T down to
t (``teacher_rollout``), or the student's rollout (DAgger; the Imagine Flash
default, beta_student = 1). ``clip`` > 0 is DDIL's reflected diffusion: x0
estimates are thresholded to [-clip, clip] in both rollouts, in the x0 that
SRL re-noises and in the teacher's target, and the exported student carries
it for sampling. ``fwd_share`` is the older spelling of beta_fwd (the rest
student); see docs/ddil.md.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from flashcore import data as fdata
from flashcore import foreign
from flashcore.checkpoint import portable_path, write_json
from flashcore.images import grid as image_grid
from flashcore.images import save_png
from flashcore.models import Denoiser
from flashcore.ops import srl_loss, srl_renoise
from flashcore.devices import autocast, dist_backend, resolve_device
from flashcore.plan import StepPlan
from flashcore.sampler import run_plan, sample
from flashcore.schedule import NoiseSchedule, ScheduleConfig
from flashcore.validation import (COUNT, DECAY, LR, MAX_TIMESTEPS, NONNEGATIVE, PROBABILITY, SEED, Range,
                                  check_bool, check_fields, check_str, option)

from . import common, ddil
from .ddil import SOURCES, teacher_rollout, teacher_rollout_grid  # noqa: F401 (the rollout code's public names)
from .discriminator import Discriminator, d_loss, g_loss

MAX_STUDENT_STEPS = 4
# SRL's re-noising noise eps' (docs/diversity.md): "fresh" draws it (the paper); "student" reuses the
# student's eps prediction, which makes chi a DDIM jump of the student's own trajectory from t to tau.
# Why the second exists: with fresh noise the target is independent of the student's input given its
# x0, so the regression pulls every x_T of a class toward one mean image (the 1-step collapse).
SRL_NOISE = ("fresh", "student")


@dataclass
class DistillConfig:
    """Every knob of a distillation run; the ``flashcore distill`` flags are derived
    from the ``option`` metadata here (flag and help), defaults and ranges included."""
    teacher: str = option("checkpoints/mnist-teacher", "--teacher",
                          "teacher: a flashcore checkpoint, a diffusers pipeline folder or a model folder with "
                          "its scheduler_config.json (with --resume: the run's)")
    prompts: str = option("", "--prompts", "a text-conditioned teacher's training prompts: a text file, one a line")
    steps: int = option(3, "--steps", "the student's sampling steps (a trailing grid of 1-4)")
    iters: int = option(2000, "--iters", "distillation iterations (with --resume: the run's new end)")
    batch_size: int = option(64, "--batch-size", "images per iteration, split over the processes under torchrun")
    lr: float = option(2e-5, "--lr", "AdamW learning rate of the student")
    ema_decay: float = option(0.99, "--ema", "EMA decay of the exported student")
    gamma_ratio: float = option(0.75, "--gamma", "SRL shift: tau = round(gamma * t)")
    gamma_jitter: int = option(0, "--jitter", "SRL: a random integer in -j..j timesteps added to tau")
    teacher_steps: int = option(1, "--k", "teacher DDIM steps for the SRL target")
    srl_noise: str = option("fresh", "--srl-noise",
                            "SRL re-noising: fresh (new noise, the paper) or student (the student's own eps "
                            "prediction: a DDIM jump from t to tau, so the target is a function of x_t)")
    guidance: float | None = option(None, "--cfg", "teacher guidance scale for the targets "
                                                   "(default: the teacher's saved scale)")
    backward: bool = option(True, switch="--no-backward",
                            help="ablation: forward distillation (states from noised real images)")
    srl: bool = option(True, switch="--no-srl", help="ablation: without the Shifted Reconstruction Loss")
    noise_correction: bool = option(True, switch="--no-noise-correction",
                                    help="ablation: without noise correction at t = T")
    adversarial: bool = option(True, switch="--no-adversarial", help="ablation: without the discriminator")
    lambda_adv: float = option(1e-2, "--lambda-adv", "weight of the discriminator's loss in the student's")
    d_lr: float = option(1e-4, "--d-lr", "AdamW learning rate of the discriminator")
    fwd_share: float = option(0.0, "--fwd-share",
                              "older form of --beta-fwd: that share forward-noised, the rest student rollouts")
    beta_fwd: float = option(0.0, "--beta-fwd", "DDIL prior: share of batches whose states are real images "
                                                "noised forward to t")
    beta_teacher: float = option(0.0, "--beta-teacher", "DDIL prior: share of batches whose states are the "
                                                        "teacher's own CFG rollouts from noise down to t")
    beta_student: float | None = option(None, "--beta-student",
                                        "DDIL prior: share of batches whose states are the student's rollouts "
                                        "(default: the rest, 1 - beta_fwd - beta_teacher)")
    teacher_substeps: int = option(1, "--teacher-substeps",
                                   "DDIL: teacher DDIM steps per student grid interval in its rollouts "
                                   "(1: the student's own grid)")
    step_weights: tuple = ()          # per grid step loss weights; () = all 1
    clip: float = option(0.0, "--clip", "DDIL reflection: threshold x0 to [-clip, clip] in rollouts, targets "
                                        "and the exported student's sampling (1: the data range; 0: off)")
    checkpoint_every: int = option(250, "--checkpoint-every",
                                   "save a checkpoint (and a sample grid) every N iterations")
    val_every: int = option(100, "--val-every", "validation FD every N iterations; student/ is the best "
                                                "(0: off, student/ is the last)")
    val_samples: int = option(500, "--val-samples", "samples per validation FD")
    classifier: str = option("checkpoints/mnist-classifier", "--classifier",
                             "feature network for the validation FD (the train split only)")
    seed: int = option(0, "--seed", "seed of the run's random draws")
    bf16: bool = True
    sample_every_checkpoint: bool = True

    def __post_init__(self):
        # the same checks for a config from code, from the command line and from a run's state.json
        if isinstance(self.steps, bool) or self.steps not in range(1, MAX_STUDENT_STEPS + 1):
            raise ValueError(f"distill: --steps must be 1..{MAX_STUDENT_STEPS} (a trailing grid), got {self.steps!r}")
        check_fields(self, DISTILL_RANGES, "distill")
        for name in ("teacher", "classifier"):
            check_str("distill", name, getattr(self, name))
        check_bool("distill", self, ("backward", "srl", "noise_correction", "adversarial", "bf16",
                                     "sample_every_checkpoint"))
        if not isinstance(self.step_weights, (list, tuple)):
            raise ValueError(f"distill: step_weights must be a list of numbers, got {self.step_weights!r}")
        if self.step_weights and len(self.step_weights) != self.steps:
            raise ValueError(f"distill: step_weights needs {self.steps} values, got {len(self.step_weights)}")
        self.step_weights = tuple(self.step_weights)
        for w in self.step_weights:
            NONNEGATIVE.check("distill: step_weights", w)
        if self.srl_noise not in SRL_NOISE:
            raise ValueError(f"distill: --srl-noise must be one of {', '.join(SRL_NOISE)}, got {self.srl_noise!r}")
        self.priors()                  # raises on priors that do not make a distribution

    def priors(self) -> tuple[float, float, float]:
        """(beta_fwd, beta_teacher, beta_student) the run samples its states with (``ddil.priors``)."""
        return ddil.priors(self)


# every number DistillConfig holds and the values it may take (the CLI flags parse with these too)
DISTILL_RANGES = {
    "iters": COUNT, "batch_size": COUNT, "lr": LR, "ema_decay": DECAY,
    "gamma_ratio": Range(float, 0, 1, lo_open=True), "gamma_jitter": Range(int, 0, MAX_TIMESTEPS),
    "teacher_steps": Range(int, 1, 1000), "guidance": Range(float, 0, 100, optional=True),
    "lambda_adv": Range(float, 0, 100), "d_lr": LR, "fwd_share": PROBABILITY, "clip": Range(float, 0, 100),
    "beta_fwd": PROBABILITY, "beta_teacher": PROBABILITY, "beta_student": Range(float, 0, 1, optional=True),
    "teacher_substeps": Range(int, 1, 100),
    "checkpoint_every": COUNT, "val_every": Range(int, 0, 10 ** 9),
    "val_samples": Range(int, 20, 10 ** 9),       # an FD of fewer samples says nothing
    "seed": SEED,
}


def teacher_grid(tau: int, k: int) -> list[int]:
    """k DDIM steps from tau, visiting tau, tau (k-1)/k, ..., tau/k."""
    return [max(1, round(tau * (k - j) / k)) for j in range(k)]


@torch.no_grad()
def rollout(student: Denoiser, plan: StepPlan, i: int, x_T: torch.Tensor, labels: torch.Tensor,
            clip: float = 0.0) -> torch.Tensor:
    """x at plan.grid[i] after i student steps from x_T (the plan says where noise correction applies)."""
    return run_plan(student, plan, x_T, labels, stop=i, clip=clip)[0]


class Distiller(common.RankDraws):
    """Holds the models and does one iteration; ``distill`` drives it."""

    def __init__(self, cfg: DistillConfig, rank: int = 0, world: int = 1,
                 device: str | torch.device | None = "cpu"):
        if cfg.batch_size % world:
            raise ValueError(f"distill: batch size {cfg.batch_size} does not split over {world} processes")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.local_batch = cfg.batch_size // world
        # every model and tensor of the run lives here; random draws come from CPU generators
        self.device = resolve_device(device)
        teacher, meta = foreign.load_model(cfg.teacher, kinds=("teacher",), prompts=cfg.prompts)
        foreign.check_distill(cfg, meta)
        self.meta = meta
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
        self.plan = StepPlan.build(self.sched, cfg.steps, noise_correction=cfg.noise_correction)
        self.grid = list(self.plan.grid)
        self.guidance = float(cfg.guidance if cfg.guidance is not None else meta.get("guidance") or 1.0)
        mc = teacher.cfg
        self.shape = (mc.channels, mc.sample_size, mc.sample_size)
        torch.manual_seed(cfg.seed)
        self.student = foreign.student_from(teacher, mc).to(self.device)
        self.student.train()
        self.ema = common.make_ema(self.student)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.disc = Discriminator(mc.channels, mc.num_classes).to(self.device)
        self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
        self.init_draws(cfg.seed)
        self.student_fwd = self.student
        if tdist.is_available() and tdist.is_initialized() and world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.student_fwd = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._real = None
        self.priors = cfg.priors()
        if cfg.adversarial or self.priors[0] > 0:
            # real images serve the discriminator and forward distillation only
            ds = fdata.load(meta["data"], size=mc.sample_size, channels=mc.channels)
            self._real = tuple(x.to(self.device) for x in fdata.split(ds, "train"))

    # -- state for checkpoints ------------------------------------------------------------
    def modules(self):
        return {"student": self.student, "ema": self.ema, "disc": self.disc}

    def optimizers(self):
        return {"opt": self.opt, "d_opt": self.d_opt}

    def _randint(self, lo: int, hi: int, n: int = 1) -> torch.Tensor:
        return torch.randint(lo, hi, (n,), generator=self.gen).to(self.device)

    def _real_batch(self, b: int):
        idx = self._randint(0, len(self._real[0]), b)
        return self._real[0][idx], self._real[1][idx]

    def choose_source(self) -> str:
        """One batch's state source (``ddil.choose_source``, from the generator all ranks share)."""
        return ddil.choose_source(self.priors, self.shared)

    def student_state(self, b: int):
        """(x_t, t, labels, i, source) for one batch: steps 1-2, ``source`` one of ``SOURCES``."""
        cfg, sched = self.cfg, self.sched
        i = int(torch.randint(0, cfg.steps, (1,), generator=self.shared))
        t = self.grid[i]
        source = self.choose_source()
        if source == "fwd":
            x0, labels = self._real_batch(b)
            eps = self._randn(x0.shape)
            a_t, s_t = sched.alpha_sigma(t)
            return a_t * x0 + s_t * eps, t, labels, i, source
        labels = self._randint(0, self.teacher.cfg.num_classes, b)
        x_T = self._randn((b,) + self.shape)
        if source == "teacher":
            x_t = teacher_rollout(self.teacher, sched, self.grid, i, cfg.teacher_substeps, x_T, labels,
                                  guidance=self.guidance, noise_correction=cfg.noise_correction, clip=cfg.clip)
            return x_t, t, labels, i, source
        self.student.eval()
        x_t = rollout(self.student, self.plan, i, x_T, labels, cfg.clip)
        self.student.train()
        return x_t, t, labels, i, source

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, x0_s: torch.Tensor, t: int, labels: torch.Tensor,
               eps_s: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 4-5: the teacher's x0 from the re-noised student prediction (``eps_s``, the
        student's detached eps prediction, is the re-noising noise under ``srl_noise="student"``)."""
        cfg, sched = self.cfg, self.sched
        if cfg.srl:
            tau = round(cfg.gamma_ratio * t)
            if cfg.gamma_jitter:
                tau += int(torch.randint(-cfg.gamma_jitter, cfg.gamma_jitter + 1, (1,), generator=self.shared))
            tau = min(max(tau, 1), sched.T)
            a, s = sched.alpha_sigma(tau)
            if cfg.clip:       # reflection: the teacher starts from an in-range x0
                x0_s = x0_s.clamp(-cfg.clip, cfg.clip)
            noise = eps_s if cfg.srl_noise == "student" else self._randn(x0_s.shape)
            chi = srl_renoise(x0_s, noise, a=a, s=s)
        else:
            chi, tau = x_t, t
        return sample(self.teacher, labels, schedule=sched, steps=cfg.teacher_steps, shape=self.shape,
                      guidance=self.guidance, noise_correction=False, clip=cfg.clip, x_T=chi,
                      grid=teacher_grid(tau, cfg.teacher_steps))

    def losses(self, it: int = 0) -> dict:
        """Steps 1-6 on this rank's share of the batch: the student's loss (with its
        graph) and what the discriminator step needs."""
        cfg, sched = self.cfg, self.sched
        b = self.local_batch
        x_t, t, labels, i, source = self.student_state(b)                             # (B, C, H, W)
        a_t, s_t = sched.alpha_sigma(t)
        tt = torch.full((b,), t, dtype=torch.long, device=self.device)
        with autocast(self.device, torch.bfloat16, enabled=cfg.bf16):
            eps_s = self.student_fwd(x_t, tt, labels)
        eps_s = eps_s.float()
        x0_s = (x_t - s_t * eps_s) / a_t                                            # 3. with grad
        x0_t = self.target(x_t, x0_s.detach(), t, labels, eps_s.detach())           # 4-5.
        w = cfg.step_weights[i] if cfg.step_weights else 1.0
        l_srl = srl_loss(x_t, eps_s, x0_t, a_t=a_t, s_t=s_t)                       # 6.
        loss = w * l_srl
        out = {"loss": loss, "srl": l_srl.detach(), "adv": torch.zeros((), device=self.device), "i": i,
               "source": source}
        if cfg.adversarial:
            real, real_lab = self._real_batch(b)
            td = self._randint(0, sched.T + 1, b)
            noise = self._randn(real.shape)
            fake_t = sched.add_noise(x0_s, noise, td)
            l_adv = g_loss(self.disc(fake_t, td, labels))
            out["loss"] = loss + cfg.lambda_adv * l_adv
            out["adv"] = l_adv.detach()
            out["d_inputs"] = (sched.add_noise(real, noise, td), real_lab, fake_t.detach(), td, labels)
        return out

    def d_loss(self, d_inputs) -> torch.Tensor:
        """Step 7's loss: real against the student's x0, both noised to the same times."""
        real_t, real_lab, fake_t, td, labels = d_inputs
        return d_loss(self.disc(real_t, td, real_lab), self.disc(fake_t, td, labels))

    def _mean_over_ranks(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.world == 1:
            return xs
        flat = torch.stack([x.detach().float().reshape(()) for x in xs])
        tdist.all_reduce(flat)
        return list(flat / self.world)

    def iteration(self, it: int = 0) -> dict:
        cfg = self.cfg
        r = self.losses(it)
        common.check_finite(r["loss"], it)
        self.opt.zero_grad(set_to_none=True)
        self.disc.zero_grad(set_to_none=True)       # the student's loss must not train D
        r["loss"].backward()                        # DDP averages the student's gradients here
        common.check_finite(torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0), it)
        self.opt.step()
        ld = torch.zeros((), device=self.device)
        if cfg.adversarial:                                                        # 7.
            ld = self.d_loss(r["d_inputs"])
            common.check_finite(ld, it)
            self.d_opt.zero_grad(set_to_none=True)
            ld.backward()
            if self.world > 1:
                for p in self.disc.parameters():
                    if p.grad is not None:
                        tdist.all_reduce(p.grad)
                        p.grad /= self.world
            self.d_opt.step()
        common.ema_update(self.ema, self.student, cfg.ema_decay)
        srl, adv, d = self._mean_over_ranks([r["srl"], r["adv"], ld])
        return {"srl": float(srl), "adv": float(adv), "d": float(d.detach()), "i": r["i"], "source": r["source"]}


VAL_SEED = 1       # validation noise; `flashcore eval` uses seed 0 and the eval split


class Validator:
    """Model selection without the eval split: FD of the EMA student's samples
    (``val_samples``, seed ``VAL_SEED``) against the *train* split's classifier
    features, plus accuracy, the washed-out share and k-NN recall (k = 5) against a
    class-balanced train subset of the same size. The distillation loss does not
    track quality (a collapsed student has a low loss), this does. The samples are
    scored as ``flashcore generate`` saves them (clamped, 8 bits), like eval's.
    Selection reads FD only; recall is logged so that val.csv gives FD- and
    recall-against-iteration curves in a space no headline table reports."""

    def __init__(self, cfg: DistillConfig, meta: dict):
        from flashcore.evaluate import is_headline_space
        from flashcore.metrics import features_and_logits, load_classifier
        if is_headline_space(cfg.classifier):      # selecting on a reported figure would flatter it
            raise ValueError(f"distill: {cfg.classifier!r} is one of flashcore eval's headline feature networks; "
                             "validation must use another (the default checkpoints/mnist-classifier)")
        self.clf, cmeta = load_classifier(cfg.classifier)
        if cmeta["data"] != meta["data"]:
            raise ValueError(f"distill: the validation classifier {cfg.classifier!r} was trained on "
                             f"{cmeta['data']!r}, the teacher on {meta['data']!r}; pass a classifier for "
                             f"that data (--classifier) or --val-every 0")
        self.cfg, self.meta = cfg, meta
        from flashcore.evaluate import class_balanced_subset
        x_tr, y_tr = fdata.split(fdata.load(meta["data"]), "train")
        self.f_ref, _ = features_and_logits(self.clf, x_tr)
        self.labels = torch.arange(cfg.val_samples) % self.clf.cfg.num_classes
        # recall compares sets of equal size (k-NN radii shrink as a set grows)
        self.f_recall_ref = self.f_ref[class_balanced_subset(y_tr, self.labels, VAL_SEED)]

    @torch.no_grad()
    def __call__(self, model: Denoiser) -> dict:
        from flashcore.evaluate import generate
        from flashcore.metrics import (blank_and_washed, features_and_logits, frechet_distance, manifold_metrics,
                                       user_images)
        x, _ = generate(model, self.meta, self.labels, steps=self.cfg.steps, guidance=1.0,
                        noise_correction=self.cfg.noise_correction, clip=self.cfg.clip, seed=VAL_SEED)
        x = user_images(x.cpu())                      # the classifier stays on the CPU
        f, logits = features_and_logits(self.clf, x)
        return {"fd": frechet_distance(f, self.f_ref),
                "accuracy": float((logits.argmax(1) == self.labels).float().mean()),
                "washed": blank_and_washed(x)[1],
                "recall": manifold_metrics(self.f_recall_ref, f)["recall"]}


class BestStudent:
    """Validation on rank 0 every ``every`` iterations: ``Validator``'s figures in
    ``RUN/val.csv``, and the best EMA student so far exported to ``RUN/student/``.
    Off (``self.on`` False) on other ranks or with ``every`` 0. Shared by distill and disback."""

    def __init__(self, every: int, view, meta: dict, run_dir: str, resume_step: int | None, lead: bool,
                 extra: dict | None = None):
        self.every, self.view, self.run_dir, self.extra = every, view, run_dir, extra or {}
        self.on, self.best = bool(every) and lead, float("inf")
        if self.on:
            # building the classifier draws from torch's global RNG: keep the run's stream as it was
            with torch.random.fork_rng(devices=[]):
                self.validator = Validator(view, meta)
            self.log = common.LossLog(run_dir, resume_step, "val.csv")
            self.log.set_header(["fd", "accuracy", "washed", "recall"])
            self.best = min([r["fd"] for r in self.log.rows()], default=float("inf"))

    def due(self, it: int) -> bool:
        return self.on and it % self.every == 0

    def missing(self, it: int) -> bool:
        """At the end of a run: the last iteration was not validated and no student was exported."""
        return self.on and it % self.every != 0 and not os.path.exists(os.path.join(self.run_dir, "student"))

    def __call__(self, trainer, n: int, write) -> None:
        v = self.validator(trainer.ema)
        self.log.append(n, [v["fd"], v["accuracy"], v["washed"], v["recall"]])
        write(f"iter {n}: validation FD {v['fd']:.1f} accuracy {v['accuracy']:.3f} washed {v['washed']:.3f} "
              f"recall {v['recall']:.3f}"
              + ("  (best so far: exported to student/)" if v["fd"] < self.best else ""))
        if v["fd"] < self.best:
            self.best = v["fd"]
            export(self.run_dir, trainer, n, extra={**self.extra, "validation": {
                "iter": n, **v, "samples": self.view.val_samples, "seed": VAL_SEED, "reference": "train split"}})


def export(run_dir: str, dist: Distiller, it: int, name: str = "student", extra: dict | None = None) -> str:
    cfg = dist.cfg
    out = os.path.join(run_dir, name)
    foreign.save_model(dist.ema, out, {
        "kind": "student", "guidance": None, "data": dist.meta["data"], "steps": cfg.steps,
        "grid": dist.grid, "noise_correction": cfg.noise_correction, "clip": cfg.clip, "schedule": dist.meta["schedule"],
        "teacher": portable_path(cfg.teacher, out), "train_iters": it,
        "distill_config": {**dataclasses.asdict(cfg), "teacher": portable_path(cfg.teacher, out),
                           "classifier": portable_path(cfg.classifier, out)}, **(extra or {})},
        dtype=torch.float16)
    return out


def sample_grid(dist: Distiller, path: str) -> None:
    labels = torch.arange(min(dist.teacher.cfg.num_classes, 16)).repeat_interleave(8)
    x = sample(dist.ema, labels, schedule=dist.sched, steps=dist.cfg.steps, shape=dist.shape,
               noise_correction=dist.cfg.noise_correction, clip=dist.cfg.clip,
               generator=torch.Generator().manual_seed(1234))
    x = foreign.decode(dist.ema, x)                  # a latent model's samples as images
    save_png(image_grid(x, nrow=8), path, scale=2)


def init_distributed(device: torch.device = torch.device("cpu")) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes in the
    environment, else (0, 1). The backend follows the device the ranks' tensors
    are on (``devices.dist_backend``): gloo for CPU tensors even where CUDA exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not tdist.is_initialized():
        tdist.init_process_group(dist_backend(device))
    return tdist.get_rank(), tdist.get_world_size()


def _gather_generators(dist: Distiller) -> dict:
    """Rank 0: every rank's generators under their checkpoint names; other ranks: {}."""
    if dist.world == 1:
        return dist.generators()
    states = [None] * dist.world
    tdist.all_gather_object(states, dist.gen.get_state())
    if dist.rank:
        return {}
    out = dist.generators()
    for r in range(1, dist.world):
        g = torch.Generator()
        g.set_state(states[r])
        out[f"data_rank{r}"] = g
    return out


def distill(cfg: DistillConfig, run_dir: str, resume: bool = False, progress: bool = True,
            max_iters_this_call: int | None = None, device: str | torch.device | None = "auto") -> str:
    """Distil (or resume) a student in ``run_dir``; returns the exported student directory.
    Under torchrun every rank calls this; rank 0 holds the folder and writes. Raises
    ``common.Interrupted`` (rank 0) after checkpointing when stopped by Ctrl-C or SIGTERM."""
    dev = resolve_device(device)                 # cuda:LOCAL_RANK under torchrun on GPUs
    rank, world = init_distributed(dev)
    with common.run_folder(run_dir, resume=resume, what="distill", lead=rank == 0):
        return _distill(cfg, run_dir, rank, world, resume, progress, max_iters_this_call, dev)


def _distill(cfg: DistillConfig, run_dir: str, rank: int, world: int, resume: bool, progress: bool,
             max_iters_this_call: int | None, device: torch.device) -> str:
    lead = rank == 0
    if resume:
        saved_world = common.saved_extra(run_dir).get("world_size", 1)
        if saved_world != world:
            raise ValueError(f"distill: {run_dir!r} was trained on {saved_world} process(es); resume it on "
                             f"the same number (got {world}) to keep the run exact")
        cfg = dataclasses.replace(common.saved_config_as(run_dir, DistillConfig), iters=cfg.iters)
    cfg = common.native_bf16(cfg, device, "distill", resume=resume)
    if world > 1:
        tdist.barrier()          # every rank has checked run_dir before rank 0 writes to it
    dist = Distiller(cfg, rank, world, device)
    it = 0
    if resume:
        it = common.load_state(run_dir, dist.modules(), dist.optimizers(), dist.generators(),
                               "DistillConfig")["step"]
    log = common.LossLog(run_dir, it if resume else None) if lead else None
    if lead:
        log.set_header(["srl", "adv", "d", "grid_index"])
        # the resolved config beside the checkpoints: `flashcore distill --config RUN/config.json` reruns it
        write_json(os.path.join(run_dir, "config.json"), dataclasses.asdict(cfg))
    best = BestStudent(cfg.val_every, cfg, dist.meta, run_dir, it if resume else None, lead)

    def checkpoint(n: int) -> None:
        gens = _gather_generators(dist)          # a collective: every rank takes part
        if not lead:
            return
        common.save_state(run_dir, n, dist.modules(), dist.optimizers(), gens, cfg,
                          extra={"world_size": world})
        export(run_dir, dist, n, "student-last" if best.on else "student")
        if cfg.sample_every_checkpoint:
            sample_grid(dist, os.path.join(run_dir, "samples", f"iter_{n:06d}.png"))

    def stop_now() -> bool:
        if world == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested))     # a signal may reach the ranks at different steps
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag)

    stop = common.GracefulStop()
    end = cfg.iters if max_iters_this_call is None else min(cfg.iters, it + max_iters_this_call)
    bar = common.progress(cfg.iters, it, f"distill {cfg.steps}-step", progress and lead)
    try:
        while it < end and not stop_now():
            r = dist.iteration(it)
            it += 1
            if lead:
                log.append(it, [r["srl"], r["adv"], r["d"], r["i"]])
            bar.update(1)
            bar.set_postfix(srl=f"{r['srl']:.4f}", adv=f"{r['adv']:.3f}")
            if best.due(it):
                best(dist, it, bar.write)
            if it % cfg.checkpoint_every == 0 and it < end:
                checkpoint(it)
    finally:
        bar.close()
        stop.restore()
    if best.missing(it):
        best(dist, it, bar.write)
    checkpoint(it)
    if world > 1:
        tdist.barrier()          # the files exist for every rank when it returns
    if lead:
        stop.raise_if_stopped("distill", "iteration", it, cfg.iters, run_dir)
    return os.path.join(run_dir, "student")
