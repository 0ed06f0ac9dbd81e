"""DisBack's degradation path: recording it (stage 1) and the order in which
backtracking (stage 2, train/disback.py) walks it back. Zhang et al.,
"Distribution Backtracking Builds A Faster Convergence Trajectory for
Diffusion Distillation", arXiv 2408.15991.

Notation: x_t = a_t x0 + s_t eps; G_0 the initial generator (the student
initialised from the teacher, before any training); s_0 the teacher; s_k the
auxiliary model after k * path_every degradation iterations, k = 1..N.

Degradation recording, one iteration:

    1. c ~ U{classes};  x_T ~ N(0, I);  x0 = G_0(x_T, c)          no gradient
    2. c' = null label with probability label_drop, once per sample
    3. t ~ U{t_min..t_max};  eps ~ N(0, I)
       loss = mean((raw(a_t x0 + s_t eps, t, c') - target(x0, eps, t))^2)
       (the teacher's own diffusion loss: eps or v, whatever the model predicts)
    4. every path_every iterations: save s_k as RUN/path/<k> (k = 1..N)

Step 2 is ours: the paper fine-tunes with the plain diffusion loss. Without
it the null-label branch keeps the teacher's data marginal while the
conditional branch degrades, and CFG on a path checkpoint would mix the two.

The path s_0 ... s_N runs from the teacher's distribution to G_0's. Stage 2
starts the fake score model at s_N (it already models G_0's samples) and takes
the real score model from the path in reverse, s_{N-1} first, s_0 last
(``target_index``); a target equal to the fake model's start would give a zero
score difference.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from flashcore.checkpoint import portable_path
from flashcore.devices import autocast
from flashcore.models import Denoiser, load_pretrained, save_pretrained
from flashcore.schedule import NoiseSchedule

SWITCH_RULES = ("fixed", "released")
PATH_DIR = "path"


class RawNet(nn.Module):
    """``Denoiser.raw`` as a module's forward, so DistributedDataParallel can wrap
    the denoising-score-matching forward (DDP only hooks ``forward``)."""

    def __init__(self, model: Denoiser):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.raw(x, t, labels)


def wrap_ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``module`` under DistributedDataParallel when more than one process runs, else itself."""
    import torch.distributed as tdist
    if world > 1 and tdist.is_available() and tdist.is_initialized():
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def dsm_loss(raw: nn.Module, model: Denoiser, sched: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor,
             t: torch.Tensor, eps: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The model's own diffusion loss on clean samples ``x0`` (B, C, H, W) at times ``t`` (B,);
    ``raw`` is ``RawNet(model)`` or its DDP wrapper."""
    x_t = sched.add_noise(x0, eps, t)                                              # (B, C, H, W)
    with autocast(x0.device, torch.bfloat16, enabled=bf16):
        pred = raw(x_t, t, labels)
    return (pred.float() - model.target(x0, eps, t)).square().mean()


# ---- the path on disk --------------------------------------------------------------------------

def path_dir(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, PATH_DIR, f"{k:02d}")


def save_path_checkpoint(model: Denoiser, run_dir: str, k: int, n: int, it: int, teacher: str,
                         meta: dict) -> str:
    """s_k as a loadable teacher-kind checkpoint (float32 safetensors, written whole), so
    ``flashcore generate --model RUN/path/<k>`` shows the intermediate distribution."""
    out = path_dir(run_dir, k)
    save_pretrained(model, out, {
        "kind": "teacher", "guidance": meta.get("guidance"), "data": meta.get("data"),
        "schedule": meta["schedule"], "teacher": portable_path(teacher, out),
        "disback_path": {"index": k, "checkpoints": n, "degradation_iters": it}})
    return out


def load_path_weights(model: Denoiser, run_dir: str, k: int, teacher: Denoiser) -> None:
    """Put s_k's weights into ``model`` (k = 0: the teacher's)."""
    if k == 0:
        src = teacher
    else:
        # building the network draws its throw-away initial weights from the global RNG, which a
        # resumed run restores: keep it untouched so that the saved RNG state stays exact
        with torch.random.fork_rng(devices=[]):
            src, _ = load_pretrained(path_dir(run_dir, k), kinds=("teacher",))
        if src.cfg != teacher.cfg:
            raise ValueError(f"disback: {path_dir(run_dir, k)!r} does not have the teacher's architecture")
    with torch.no_grad():
        for p, q in zip(model.state_dict().values(), src.state_dict().values()):
            p.copy_(q)


# ---- which checkpoint is the target --------------------------------------------------------------

def target_index(it: int, n: int, rule: str, switch_every: int, path_every: int) -> int:
    """The path index of the real score model at backtracking iteration ``it`` (0-based).

    ``fixed`` (the paper's rule as flashcore reads it: a fixed number of iterations per
    checkpoint): N-1 for the first ``switch_every`` iterations, then one step toward the
    teacher every ``switch_every`` iterations; s_0 from iteration (N-1) switch_every on.

    ``released``: the rule of the authors' released code, for comparison. At every
    multiple m of ``switch_every`` it moves one step toward the teacher only while the
    current checkpoint's degradation iteration (k * path_every) is at least m. Its
    first move is at m = 0 (so s_N is never a target, as here), but comparing a
    degradation iteration with a backtracking iteration stops the walk early: it reaches
    the teacher only if path_every >= (N-1) * switch_every.
    """
    if rule == "fixed":
        return max(n - 1 - it // switch_every, 0)
    if rule != "released":
        raise ValueError(f"disback: switch_rule must be one of {', '.join(SWITCH_RULES)}; got {rule!r}")
    k = n
    for m in range(0, it + 1, switch_every):
        if k > 0 and k * path_every >= m:
            k -= 1
    return k
