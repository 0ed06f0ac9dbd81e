"""Teacher training: class-conditional diffusion (Ho et al. 2020) with label
dropout for classifier-free guidance (Ho & Salimans 2022), epsilon or
v-prediction (Salimans & Ho 2022; with a zero-terminal-SNR schedule, Lin et al.
2023, so that x_T carries no signal).

    x0, c ~ data (train split);  t ~ U{0..T};  eps ~ N(0, I)
    c' = null with probability p_uncond (once per sample)
    target = eps  (epsilon)   or   a_t eps - s_t x0  (v_prediction)
    loss = mean((net(a_t x0 + s_t eps, t, c') - target)^2)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from flashcore import data as fdata
from flashcore.images import grid, save_png
from flashcore.models import Denoiser, ModelConfig, save_pretrained
from flashcore.sampler import sample
from flashcore.schedule import NoiseSchedule, ScheduleConfig
from flashcore.validation import COUNT, DECAY, GUIDANCE, LR, SEED, Range, check_bool, check_fields, check_str

from . import common


@dataclass
class TeacherConfig:
    data: str = "mnist"
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    guidance: float = 2.0           # saved with the model: the default CFG scale at sampling
    sample_steps: int = 25          # for the sample grids written at checkpoints
    checkpoint_every: int = 500
    seed: int = 0
    bf16: bool = True               # bf16 autocast for forward/backward (fp32 master weights)
    threads: int = 0                # 0: torch's default
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        # the same checks for a config from code, from the command line and from a run's state.json
        check_fields(self, TEACHER_RANGES, "train-teacher")
        check_str("train-teacher", "data", self.data)
        check_bool("train-teacher", self, ("bf16",))
        if not isinstance(self.schedule, ScheduleConfig) or not isinstance(self.model, ModelConfig):
            raise ValueError("train-teacher: schedule and model must be a ScheduleConfig and a ModelConfig "
                             "(TeacherConfig.from_dict builds them from dicts)")

    @staticmethod
    def from_dict(d: dict) -> "TeacherConfig":
        d = dict(d)
        d["schedule"] = ScheduleConfig(**d.get("schedule", {}))
        d["model"] = ModelConfig(**d.get("model", {}))
        return TeacherConfig(**d)


# every number TeacherConfig holds and the values it may take (the CLI flags parse with these too)
TEACHER_RANGES = {
    "steps": COUNT, "batch_size": COUNT, "lr": LR, "warmup": Range(int, 0, 10 ** 9),
    "weight_decay": Range(float, 0, 10), "ema_decay": DECAY,
    "p_uncond": Range(float, 0, 1, hi_open=True),     # 1: the conditional model would never be trained
    "guidance": GUIDANCE, "sample_steps": Range(int, 1, 1000), "checkpoint_every": COUNT, "seed": SEED,
    "threads": Range(int, 0, 4096),
}


def export(run_dir: str, ema: Denoiser, cfg: TeacherConfig, step: int, name: str = "teacher") -> str:
    out = os.path.join(run_dir, name)
    save_pretrained(ema, out, {"kind": "teacher", "guidance": cfg.guidance, "data": cfg.data,
                               "schedule": dataclasses.asdict(cfg.schedule), "train_steps": step,
                               "train_config": dataclasses.asdict(cfg)}, dtype=torch.float16)
    return out


def sample_grid(ema: Denoiser, sched: NoiseSchedule, cfg: TeacherConfig, shape, path: str, steps: int,
                guidance: float) -> None:
    labels = torch.arange(ema.cfg.num_classes).repeat_interleave(8)
    g = torch.Generator().manual_seed(1234)
    x = sample(ema, labels, schedule=sched, steps=steps, shape=shape, guidance=guidance, generator=g)
    save_png(grid(x, nrow=8), path, scale=2)


def train_teacher(cfg: TeacherConfig, run_dir: str, resume: bool = False, progress: bool = True,
                  max_steps_this_call: int | None = None) -> str:
    """Train (or resume) a teacher in ``run_dir``; returns the exported model directory.
    Raises ``common.Interrupted`` after checkpointing when stopped by Ctrl-C or SIGTERM."""
    with common.run_folder(run_dir, resume=resume, what="train-teacher"):
        return _train_teacher(cfg, run_dir, resume, progress, max_steps_this_call)


def _train_teacher(cfg: TeacherConfig, run_dir: str, resume: bool, progress: bool,
                   max_steps_this_call: int | None) -> str:
    cfg = common.start_config(cfg, TeacherConfig, run_dir, resume, "train-teacher")
    ds = fdata.load(cfg.data, size=cfg.model.sample_size, channels=cfg.model.channels)
    if ds.shape != (cfg.model.channels, cfg.model.sample_size, cfg.model.sample_size):
        cfg.model = dataclasses.replace(cfg.model, channels=ds.shape[0], sample_size=ds.shape[1])
    cfg.model = dataclasses.replace(cfg.model, num_classes=ds.num_classes)
    x_train, y_train = fdata.split(ds, "train")
    sched = NoiseSchedule(cfg.schedule)

    torch.manual_seed(cfg.seed)
    model = Denoiser(cfg.model, schedule=sched).train()
    ema = common.make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume:
        st = common.load_state(run_dir, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen},
                               "TeacherConfig")
        step = st["step"]
    log = common.LossLog(run_dir, step if resume else None)

    def checkpoint(s: int) -> None:
        common.save_state(run_dir, s, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen}, cfg)
        export(run_dir, ema, cfg, s)
        sample_grid(ema, sched, cfg, ds.shape, os.path.join(run_dir, "samples", f"step_{s:06d}.png"),
                    cfg.sample_steps, cfg.guidance)

    def body(step: int) -> dict:
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        x0, c = x_train[idx], y_train[idx]                              # (B, C, H, W), (B,)
        t = torch.randint(0, sched.T + 1, (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        c = model.drop_labels(c, cfg.p_uncond, generator=gen)
        x_t = sched.add_noise(x0, eps, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = model.raw(x_t, t, c)                                  # eps or v (prediction_type)
        loss = (pred.float() - model.target(x0, eps, t)).square().mean()
        common.descend(loss, model.parameters(), opt, step)
        common.ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
        return {"loss": loss.item()}

    common.run_steps("train-teacher", cfg, run_dir, step, max_steps_this_call, progress, log, opt, body, checkpoint)
    return os.path.join(run_dir, "teacher")
