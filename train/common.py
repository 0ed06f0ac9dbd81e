"""What every flashcore training command shares: config dataclasses saved
next to every checkpoint, EMA, exact resume, atomic checkpoints, NaN guard,
the loss log and the progress bar.

A run directory holds:
    state/weights.safetensors   model, EMA, optimiser tensors
    state/state.json            step, RNG states, optimiser metadata, config, checksum
    <export>/                   the EMA model as a loadable checkpoint (save_pretrained)
    samples/step_XXXXXX.png     a sample grid at each checkpoint
    loss.csv                    step, loss, seconds
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import time

import torch

from flashcore import checkpoint as ck


class NonFiniteLoss(RuntimeError):
    pass


class GracefulStop:
    """First Ctrl-C or SIGTERM: finish the current step, checkpoint, return.
    A second Ctrl-C interrupts at once (the last checkpoint is kept)."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._old[signal.SIGINT])

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def save_state(run_dir: str, step: int, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
               config, extra: dict | None = None) -> None:
    tensors, meta = {}, {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}/{k}"] = v
    for name, opt in optimizers.items():
        t, meta[name] = ck.optimizer_to_flat(opt, f"opt_{name}")
        tensors.update(t)
    for name, g in generators.items():
        tensors[f"rng/{name}"] = g.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    sdir = os.path.join(run_dir, "state")
    sha = ck.write_tensors(os.path.join(sdir, "weights.safetensors"), tensors)
    ck.write_json(os.path.join(sdir, "state.json"), {
        "step": step, "sha256": sha, "optimizers": meta,
        "config": dataclasses.asdict(config), "config_type": type(config).__name__,
        "extra": extra or {}})


def has_state(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "state", "state.json"))


def load_state(run_dir: str, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
               config_type: str) -> dict:
    sdir = os.path.join(run_dir, "state")
    st = ck.read_json(os.path.join(sdir, "state.json"))
    if st.get("config_type") != config_type:
        raise ck.CheckpointError(f"checkpoint: {run_dir!r} holds a {st.get('config_type')} run, "
                                 f"not a {config_type} run")
    tensors = ck.read_tensors(os.path.join(sdir, "weights.safetensors"), st["sha256"])
    for name, m in modules.items():
        pre = f"{name}/"
        try:
            m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        except RuntimeError as e:       # missing keys or size mismatches: another architecture
            first = str(e).strip().splitlines()[-1].strip()
            raise ck.CheckpointError(f"checkpoint: the {name!r} weights in {run_dir!r} do not fit the model "
                                     f"built now (was the teacher replaced by another architecture?): {first}") from None
    for name, opt in optimizers.items():
        ck.optimizer_from_flat(opt, tensors, st["optimizers"][name], f"opt_{name}")
    for name, g in generators.items():
        g.set_state(tensors[f"rng/{name}"])
    torch.set_rng_state(tensors["rng/torch"])
    return st


def saved_config(run_dir: str) -> dict:
    return ck.read_json(os.path.join(run_dir, "state", "state.json"))["config"]


def saved_extra(run_dir: str) -> dict:
    return ck.read_json(os.path.join(run_dir, "state", "state.json")).get("extra") or {}


class LossLog:
    """A CSV log (loss.csv by default) that stays consistent with the checkpoint after a resume."""

    def __init__(self, run_dir: str, resume_step: int | None, name: str = "loss.csv"):
        self.path = os.path.join(run_dir, name)
        rows = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [r for r in f.read().splitlines()[1:] if r and int(r.split(",")[0]) <= resume_step]
        self.header = "step,loss,seconds"
        with open(self.path, "w") as f:
            f.write("\n".join([self.header] + rows) + "\n")
        self.t0 = time.time()

    def rows(self) -> list[dict]:
        """The logged rows as dicts (header names -> floats)."""
        with open(self.path) as f:
            lines = f.read().splitlines()
        names = lines[0].split(",")
        return [dict(zip(names, map(float, r.split(",")))) for r in lines[1:] if r]

    def set_header(self, names: list[str]) -> None:
        self.header = ",".join(["step"] + names + ["seconds"])
        with open(self.path) as f:
            rows = f.read().splitlines()[1:]
        with open(self.path, "w") as f:
            f.write("\n".join([self.header] + rows) + "\n")

    def append(self, step: int, values: list[float]) -> None:
        with open(self.path, "a") as f:
            f.write(f"{step}," + ",".join(f"{v:.6g}" for v in values) + f",{time.time() - self.t0:.1f}\n")


def check_finite(loss: torch.Tensor, step: int) -> None:
    v = float(loss.detach())
    if not math.isfinite(v):
        raise NonFiniteLoss(f"loss is {v} at step {step}; stopped, the last checkpoint is kept")


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not enabled,
                mininterval=2.0)
