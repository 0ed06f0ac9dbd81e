"""What every flashcore training command shares: config dataclasses saved
next to every checkpoint, EMA, exact resume, atomic checkpoints, NaN guard,
the loss log and the progress bar.

A run directory holds:
    state/weights.safetensors   model, EMA, optimiser tensors
    state/state.json            step, RNG states, optimiser metadata, config, checksum
    <export>/                   the EMA model as a loadable checkpoint (save_pretrained)
    samples/step_XXXXXX.png     a sample grid at each checkpoint
    loss.csv                    step, loss, seconds
    .lock                       while a run holds the folder: its pid (``run_folder``)

``state/`` is replaced as one directory (flashcore.checkpoint.write_dir): a
crash during a save leaves the new state or the previous one, which
``load_state`` finds. docs/checkpoints.md has the details.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import math
import os
import shutil
import signal
import sys
import time

import torch

from flashcore import checkpoint as ck


def native_bf16(cfg, device, what: str, *, resume: bool = False):
    """``cfg`` with ``bf16`` (autocast) turned off when training on a CPU where oneDNN
    has no bfloat16 path (AVX2 only, e.g. AMD Zen 3): there autocast emulates bf16,
    several times slower than float32 (a 3-step distill iteration at batch 64 on a
    2-core Zen 3: 19.5 s in bf16, 3.7 s in float32). Said once on stderr; the config
    saved with the run records what ran. A resumed run keeps the precision it was
    started in (switching half-way would make it a different run than its config
    says): bf16 stays on, emulated, and that is said instead."""
    from flashcore.ops import _onednn
    if getattr(cfg, "bf16", False) and torch.device(device).type == "cpu" and not _onednn.bf16_native():
        cpu = torch.backends.cpu.get_cpu_capability()
        if resume:
            print(f"{what}: this CPU ({cpu}) has no native bfloat16, and the run trained in bf16 autocast: resuming "
                  "in bf16 to keep the run exact (emulated, several times slower)", file=sys.stderr, flush=True)
            return cfg
        print(f"{what}: this CPU ({cpu}) has no native bfloat16; training in "
              "float32 (bf16 autocast would be emulated, several times slower)", file=sys.stderr, flush=True)
        return dataclasses.replace(cfg, bf16=False)
    return cfg


class NonFiniteLoss(RuntimeError):
    pass


class RunError(ValueError):
    """A run that cannot start or did not finish (the CLI prints it as one error line)."""


class RunLocked(RunError):
    """Another live process holds the run folder."""


class Interrupted(RunError):
    """The run stopped on Ctrl-C or SIGTERM after saving its checkpoint."""

    def __init__(self, what: str, unit: str, step: int, total: int, run_dir: str, signame: str):
        self.what, self.unit, self.step, self.total, self.run_dir, self.signame = \
            what, unit, step, total, run_dir, signame
        super().__init__(f"{what}: interrupted by {signame} at {unit} {step} of {total}; checkpoint saved in "
                         f"{run_dir!r}, resume with --resume")


class GracefulStop:
    """First Ctrl-C or SIGTERM: finish the current step, checkpoint, then
    ``raise_if_stopped`` says so. A second Ctrl-C interrupts at once (the last
    checkpoint is kept)."""

    def __init__(self):
        self.requested = False
        self.signum = None
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signum = signum
        signal.signal(signal.SIGINT, self._old[signal.SIGINT])

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def raise_if_stopped(self, what: str, unit: str, step: int, total: int, run_dir: str) -> None:
        """After the final checkpoint: a stopped run is not a finished one, so it raises
        ``Interrupted`` (the CLI exits 1 with that line) instead of returning."""
        if self.requested:
            name = signal.Signals(self.signum).name if self.signum else "a signal"
            raise Interrupted(what, unit, step, total, run_dir, name)


# ---- the run folder: created, locked, cleaned up ----------------------------------------------

class _FolderLock:
    """An exclusive ``flock`` on ``RUN/.lock``, which holds the owner's pid. The kernel
    drops the lock when its process dies, so a file left by a killed run does not block."""

    def __init__(self, run_dir: str, what: str):
        self.path = os.path.join(run_dir, ".lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLocked(f"{what}: {run_dir!r} is in use by another run (pid {holder}); wait for it to "
                                f"finish or use another --out") from None
            # the previous holder may have removed the file between our open and flock: lock the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.remove(self.path)          # while still locked: nobody can hold a removed file's lock
        except FileNotFoundError:
            pass
        os.close(self.fd)


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` or a folder below it holds a completed training state."""
    return any(has_state(root) for root, _, _ in os.walk(path))


@contextlib.contextmanager
def run_folder(run_dir: str, *, resume: bool | None, what: str, lead: bool = True):
    """Hold ``run_dir`` for one run: create it, lock it against a second writer, check
    that it holds a run to resume (``resume=True``) or none (``False``; ``None``: either).
    If the body fails, a folder created by this call that holds no completed checkpoint
    is removed again; a folder that was there before, or a resumable run, never is.
    ``lead=False`` (other ranks of a multi-process run): the checks only."""
    if not lead:
        _check_resume(run_dir, resume, what)
        yield
        return
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"{what}: {run_dir!r} exists and is not a directory")
    missing, d = [], os.path.abspath(run_dir)
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    created = []                         # the folders this call made, deepest first
    for d in reversed(missing):
        try:
            os.mkdir(d)
            created.insert(0, d)
        except FileExistsError:          # another process made it first: it is not ours to remove
            pass
    lock = _FolderLock(run_dir, what)    # on failure the folder is another run's: leave it
    ok = False
    try:
        for d in (run_dir, os.path.join(run_dir, "samples")):
            ck.remove_stale_temps(d)     # a killed writer's leftovers; we hold the folder now
        _check_resume(run_dir, resume, what)
        yield
        ok = True
    finally:
        try:
            if not ok:
                _remove_created(created, run_dir)
        finally:
            lock.release()


def _check_resume(run_dir: str, resume: bool | None, what: str) -> None:
    if resume is False and has_state(run_dir):
        raise RunError(f"{what}: {run_dir!r} already holds a run; pass --resume or use a new --out")
    if resume is True and not has_state(run_dir):
        raise RunError(f"{what}: nothing to resume in {run_dir!r}")


def _remove_created(created: list[str], run_dir: str) -> None:
    if not created or created[0] != os.path.abspath(run_dir) or holds_checkpoint(run_dir):
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for d in created[1:]:                # parents: only if empty (another run may have started there)
        try:
            os.rmdir(d)
        except OSError:
            break


class RankDraws:
    """The random draws of a trainer spread over ``self.world`` processes (distill,
    disback): a per-rank generator for per-sample draws and one that every rank
    shares for batch-level draws (the same generator on one process), drawn on
    the CPU and moved to ``self.device``, with the names checkpoints save them
    under. Call ``init_draws`` once ``rank``, ``world`` and ``device`` are set."""

    def init_draws(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed + 7919 * self.rank)
        self.shared = self.gen if self.world == 1 else torch.Generator().manual_seed(seed + 104729)

    def generators(self, rank: int | None = None) -> dict:
        """Checkpoint names of this rank's generators (``rank``: name them as that rank's)."""
        r = self.rank if rank is None else rank
        g = {"data" if r == 0 else f"data_rank{r}": self.gen}
        if self.world > 1:
            g["shared"] = self.shared
        return g

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter.

    Why not ``diffusers.training_utils.EMAModel`` or ``torch.optim.swa_utils.AveragedModel``:
    the EMA here must be a plain ``Denoiser`` (the validator samples it, ``export``
    saves it) whose state dict has the
    model's own keys, so it lands in the run's one safetensors file and resumes
    exactly. EMAModel keeps shadow tensors outside a module (weights would be
    swapped in and out to sample), AveragedModel renames every key (``module.``)
    and adds a counter, and both would need a custom rule for the teacher's
    warm-up copy (decay 0). Four lines of ``lerp_`` do the same arithmetic."""
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

    def write(d: str) -> None:
        sha = ck.write_tensors(os.path.join(d, "weights.safetensors"), tensors)
        ck.write_json(os.path.join(d, "state.json"), {
            "step": step, "sha256": sha, "optimizers": meta,
            "config": dataclasses.asdict(config), "config_type": type(config).__name__,
            "extra": extra or {}})
    ck.write_dir(os.path.join(run_dir, "state"), write)


STATE_FIELDS = {"step": "int", "sha256": "str", "optimizers": "dict", "config": "dict", "config_type": "str",
                "extra": "dict?"}


def _state_dir(run_dir: str) -> str:
    return ck.current_dir(os.path.join(run_dir, "state"))


def has_state(run_dir: str) -> bool:
    return os.path.exists(os.path.join(_state_dir(run_dir), "state.json"))


def read_state_json(run_dir: str) -> dict:
    """The run's state.json, its fields checked."""
    path = os.path.join(_state_dir(run_dir), "state.json")
    st = ck.read_json(path)
    ck.check_json(st, STATE_FIELDS, path)
    if st["step"] < 0:
        raise ck.CheckpointError(f"checkpoint: {path}: field 'step' must be >= 0, got {st['step']}")
    return st


def load_state(run_dir: str, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
               config_type: str) -> dict:
    """Restore a ``save_state`` checkpoint into the given objects. Every tensor must be
    there with its shape, floating point where the model is, and finite; anything else
    is one CheckpointError naming the file and the tensor."""
    sdir = _state_dir(run_dir)
    st = read_state_json(run_dir)
    if st["config_type"] != config_type:
        raise ck.CheckpointError(f"checkpoint: {run_dir!r} holds a {st['config_type']} run, "
                                 f"not a {config_type} run")
    file = os.path.join(sdir, "weights.safetensors")
    tensors = ck.read_tensors(file, st["sha256"])
    for name, m in modules.items():
        pre = f"{name}/"
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        bad = ck.tensor_problem(sd, m.state_dict())
        if bad and bad[2]:               # missing keys or size mismatches: another architecture
            raise ck.CheckpointError(f"checkpoint: the {name!r} weights in {file} do not fit the model built now "
                                     f"(was the teacher replaced by another architecture?): tensor "
                                     f"{pre + bad[0]!r} {bad[1]}")
        if bad:
            raise ck.CheckpointError(f"checkpoint: {file}: tensor {pre + bad[0]!r} {bad[1]}")
        m.load_state_dict(sd)
    json_path = os.path.join(sdir, "state.json")
    for name, opt in optimizers.items():
        ck.check_json(st["optimizers"], {name: "dict"}, json_path, "optimizers.")
        ck.check_json(st["optimizers"][name], {"param_groups": "list", "state": "dict"}, json_path,
                      f"optimizers.{name}.")
        ck.optimizer_from_flat(opt, tensors, st["optimizers"][name], f"opt_{name}", file)
    restore = {f"rng/{name}": g.set_state for name, g in generators.items()}
    restore["rng/torch"] = torch.set_rng_state
    for key, set_state in restore.items():
        try:
            set_state(tensors[key])
        except (KeyError, RuntimeError, TypeError):
            raise ck.CheckpointError(f"checkpoint: {file}: tensor {key!r} is missing or not a generator "
                                     f"state") from None
    return st


def saved_config(run_dir: str) -> dict:
    return read_state_json(run_dir)["config"]


def saved_config_as(run_dir: str, cls):
    """The run's saved config as a ``cls`` instance, each field's type checked."""
    return ck.config_from_json(cls, saved_config(run_dir), os.path.join(_state_dir(run_dir), "state.json"),
                               "config.")


def saved_extra(run_dir: str) -> dict:
    return read_state_json(run_dir).get("extra") or {}


def saved_step(run_dir: str) -> int | None:
    """The step of the run's last checkpoint (None: no checkpoint)."""
    return read_state_json(run_dir)["step"] if has_state(run_dir) else None


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


def start_config(cfg, cls, run_dir: str, resume: bool, what: str):
    """A trainer's config as it will run: its thread count applied, a resumed run's saved
    settings (only ``steps`` taken from ``cfg``), bf16 as this CPU allows (``native_bf16``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume:
        cfg = dataclasses.replace(saved_config_as(run_dir, cls), steps=cfg.steps)
    return native_bf16(cfg, "cpu", what, resume=resume)


def run_steps(what: str, cfg, run_dir: str, step: int, max_steps_this_call: int | None, progress_on: bool,
              log: "LossLog", opt: torch.optim.Optimizer, body, checkpoint, last=None) -> int:
    """The loop the single-network trainers share (train-teacher, train-vae, train-t2i-teacher):
    from ``step`` to ``cfg.steps`` (at most ``max_steps_this_call`` more), the learning rate
    warmed up linearly to ``cfg.lr`` over ``cfg.warmup`` steps, ``body(step)`` (one optimiser
    step; returns the figures to log, in the log's column order, also shown on the progress
    bar), ``checkpoint(step)`` every ``cfg.checkpoint_every`` steps and at the end, then
    ``last(step)`` if given (interrupted runs too). Ctrl-C or SIGTERM finishes the step,
    checkpoints and raises ``Interrupted``. Returns the last step."""
    stop = GracefulStop()
    end = cfg.steps if max_steps_this_call is None else min(cfg.steps, step + max_steps_this_call)
    bar = progress(cfg.steps, step, what, progress_on)
    try:
        while step < end and not stop.requested:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            figures = body(step)
            step += 1
            log.append(step, list(figures.values()))
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in figures.items()})
            if step % cfg.checkpoint_every == 0 and step < end:
                checkpoint(step)
    finally:
        bar.close()
        stop.restore()
    checkpoint(step)
    if last is not None:
        last(step)
    stop.raise_if_stopped(what, "step", step, cfg.steps, run_dir)
    return step


def descend(loss: torch.Tensor, params, opt: torch.optim.Optimizer, step: int, max_norm: float = 1.0) -> None:
    """One optimiser step on ``loss``: the NaN guard, backward, the gradient clipped to
    ``max_norm`` (its norm guarded too), the update."""
    check_finite(loss, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    check_finite(torch.nn.utils.clip_grad_norm_(params, max_norm), step)
    opt.step()


def check_finite(loss: torch.Tensor, step: int) -> None:
    v = float(loss.detach())
    if not math.isfinite(v):
        raise NonFiniteLoss(f"loss is {v} at step {step}; stopped, the last checkpoint is kept")


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not enabled,
                mininterval=2.0)
