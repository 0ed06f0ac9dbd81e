"""Image latency end to end: the 3-step student against the 50-step CFG teacher.

Both run on the same engine and the same network (the student is a copy of the
teacher's architecture, so its cost per step is the teacher's cost per NFE):
the student does 3 steps x 1 NFE, the teacher 50 steps x 2 NFE (one 2B batch).
Weights: checkpoints/mnist-teacher when it exists (and checkpoints/mnist-student-3step
for the student, else the teacher's weights: latency does not depend on them),
otherwise the shipped UNet config with random weights; the markdown says which.

Providers: ``eager`` (flashcore.sampler.sample, the repo's eager path),
``flashcore`` (Engine, compiled step reused at every step), and for the student
``flashcore-sampler`` (the whole 3-step loop as one compiled graph).

    python bench/bench_e2e.py [--quick] [--providers eager,flashcore]
"""
from __future__ import annotations

import gc
import sys

import torch

from flashcore import benchmarking as B
from flashcore.engine import Engine
from flashcore.models import Denoiser, ModelConfig, load_pretrained
from flashcore.sampler import sample
from flashcore.schedule import NoiseSchedule, ScheduleConfig

NAME = "e2e"
TITLE = "Image latency: 3-step student against 50-step CFG teacher (CPU)"
CHECKPOINTS = B.ROOT / "checkpoints"
QUICK = ModelConfig(arch="unet", sample_size=16, channels=1, num_classes=10, block_out_channels=(8, 16),
                    layers_per_block=1, attention_head_dim=8)
NOTES: list[str] = ["value: ms per image (p50 of a whole sampler call / batch); compile rows in seconds; "
                    "student and teacher providers of one batch and dtype timed side by side "
                    "(benchmarking.measure_interleaved)"]


def load_models(quick: bool):
    """(teacher, student, guidance, schedule, description of the weights)."""
    teacher_dir, student_dir = CHECKPOINTS / "mnist-teacher", CHECKPOINTS / "mnist-student-3step"
    if not quick and teacher_dir.is_dir():
        teacher, meta = load_pretrained(str(teacher_dir), kinds=("teacher",))
        what = f"teacher weights from {teacher_dir.name}"
        if student_dir.is_dir():
            student, _ = load_pretrained(str(student_dir), kinds=("student",))
            what += f", student weights from {student_dir.name}"
        else:
            student = teacher
            what += "; no student checkpoint, the student runs the teacher's weights"
        return (teacher, student, float(meta.get("guidance") or 2.0),
                NoiseSchedule(ScheduleConfig(**meta["schedule"])), what)
    torch.manual_seed(0)
    cfg = QUICK if quick else ModelConfig()
    model = Denoiser(cfg).eval()
    what = ("tiny UNet (--quick), random weights" if quick else
            "no checkpoints/mnist-teacher: the shipped UNet config (ModelConfig()) with random weights")
    return model, model, 2.0, NoiseSchedule(), what


def run(quick: bool = False, providers=None, log=None) -> list[dict]:
    teacher, student, guidance, sched, what = load_models(quick)
    del NOTES[1:]
    NOTES.append(what)
    teacher_steps = 5 if quick else 50
    roles = {"student_3step": (student, 3, 1.0), f"teacher_{teacher_steps}step_cfg": (teacher, teacher_steps, guidance)}
    batches = (1,) if quick else (1, 8)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    timing = (dict(rounds=2, per_round=1, warmup=0, pause=0.0) if quick else
              dict(rounds=5, per_round=4, seconds_per_provider=20.0, warmup=1))
    rows, p50 = [], {}
    with torch.no_grad():
        for b in batches:
            for dtype in dtypes:
                # every (role, provider) of this batch and dtype, timed side by side below: the
                # teacher / student ratios then share the machine's state (it drifts by 10-20%)
                provs, fulls = {}, {}
                for role, (model, steps, w) in roles.items():
                    cfg = model.cfg
                    shape = (cfg.channels, cfg.sample_size, cfg.sample_size)
                    labels = torch.arange(b) % cfg.num_classes
                    x_T = torch.randn((b,) + shape, generator=torch.Generator().manual_seed(0))
                    fulls[role] = (b,) + shape
                    if B.keep_provider("eager", providers):
                        if dtype == torch.float32:
                            provs[(role, "eager")] = (None, lambda m=model, s=steps, w=w, sh=shape, lab=labels,
                                                      x=x_T: sample(m, lab, schedule=sched, steps=s, shape=sh,
                                                                    guidance=w, x_T=x))
                        else:
                            eng_b = Engine(model, sched, steps=steps, guidance=w, dtype=dtype, compile=False)
                            provs[(role, "eager")] = (None, lambda e=eng_b, lab=labels, x=x_T: e.sample(lab, x_T=x))
                    for graph in (("step", "sampler") if steps <= 4 else ("step",)):
                        name = "flashcore" if graph == "step" else "flashcore-sampler"
                        if not B.keep_provider(name, providers):
                            continue
                        eng = Engine(model, sched, steps=steps, guidance=w, dtype=dtype, compile=True, graph=graph)
                        provs[(role, name)] = (eng, lambda e=eng, lab=labels, x=x_T: e.sample(lab, x_T=x))
                for (role, prov), (eng, _) in provs.items():
                    if eng is not None:
                        eng.warmup((b,))
                        rows.append(B.make_row(f"{role}.compile", prov, fulls[role], dtype,
                                               B.timing_of_seconds(eng.compile_seconds), "s", eng.compile_seconds))
                timed = B.measure_interleaved({k: fn for k, (_, fn) in provs.items()}, **timing)
                for (role, prov), tm in timed.items():
                    p50[(role, prov, b, dtype)] = tm.p50_ms
                    rows.append(B.make_row(role, prov, fulls[role], dtype, tm, "ms/image", tm.p50_ms / b))
                    if log:
                        log(f"{role:22s} {prov:18s} b={b} {B.dtype_name(dtype)} {tm.p50_ms:9.1f} ms/call "
                            f"{tm.p50_ms / b:8.2f} ms/image (n={tm.samples})")
                del provs
                gc.collect()
                torch._dynamo.reset()
    _ratio_notes(rows, p50, roles)
    return rows


def _ratio_notes(rows, p50, roles) -> None:
    """Student rows note the teacher's latency over theirs (same provider, batch, dtype)."""
    student, teacher = list(roles)
    for r in rows:
        if r["name"] != student:
            continue
        key = (teacher, r["provider"] if r["provider"] != "flashcore-sampler" else "flashcore",
               int(r["shape"].split("x")[0]), r["dtype"])
        t = next((v for (ro, pr, b, dt), v in p50.items() if (ro, pr, b, B.dtype_name(dt)) == key), None)
        if t:
            r["note"] = f"teacher / student latency {t / r['p50_ms']:.1f}x (teacher {t:.0f} ms)"


if __name__ == "__main__":
    sys.exit(B.script_main(__name__))
