"""``flashcore`` command line: train-teacher, train-classifier, generate, eval, demo.

Invalid arguments print a usage message and exit with code 2 (argparse);
a failed run (missing or corrupt checkpoint, unknown data set, NaN loss)
prints one line ``flashcore: error: ...`` and exits with code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_ROOT = os.environ.get("FLASHCORE_HOME", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TEACHER = os.path.join(_ROOT, "checkpoints", "mnist-teacher")
DEFAULT_CLASSIFIER = os.path.join(_ROOT, "checkpoints", "mnist-classifier")


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def _add_engine_flags(p):
    p.add_argument("--compile", action="store_true", help="torch.compile the sampler step (compile time counts)")
    p.add_argument("--bf16", action="store_true", help="run the network in bfloat16 autocast")


def _engine_kwargs(a) -> dict:
    import torch
    return {"compile": a.compile, "dtype": torch.bfloat16 if a.bf16 else torch.float32}


def _add_train_teacher(sub):
    p = sub.add_parser("train-teacher", help="train a class-conditional diffusion teacher")
    p.add_argument("--out", required=True, help="run directory (checkpoints, samples, loss log)")
    p.add_argument("--data", default="mnist", help="mnist | digits | folder:PATH")
    p.add_argument("--steps", type=_positive, default=None, help="total optimiser steps")
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--arch", choices=("unet", "dit"), default=None)
    p.add_argument("--checkpoint-every", type=_positive, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--export", default=None, help="also copy the final teacher to this directory")
    return p


def cmd_train_teacher(a) -> int:
    import dataclasses
    import shutil

    from flashcore.train.teacher import TeacherConfig, train_teacher
    cfg = TeacherConfig(data=a.data)
    over = {k: v for k, v in {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                              "checkpoint_every": a.checkpoint_every, "seed": a.seed}.items() if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    if a.no_bf16:
        cfg.bf16 = False
    if a.arch:
        cfg.model = dataclasses.replace(cfg.model, arch=a.arch)
    if a.resume and a.steps is None:
        from flashcore.train.common import saved_config
        cfg.steps = saved_config(a.out)["steps"]
    out = train_teacher(cfg, a.out, resume=a.resume)
    if a.export:
        shutil.copytree(out, a.export, dirs_exist_ok=True)
        out = a.export
    print(f"teacher saved to {out}")
    return 0


def _add_train_classifier(sub):
    p = sub.add_parser("train-classifier", help="train the metric classifier (FD features, accuracy)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="mnist")
    p.add_argument("--epochs", type=_positive, default=None)
    p.add_argument("--seed", type=int, default=None)
    return p


def cmd_train_classifier(a) -> int:
    import dataclasses

    from flashcore.train.classifier import ClassifierTrainConfig, train_classifier
    over = {k: v for k, v in {"epochs": a.epochs, "seed": a.seed}.items() if v is not None}
    meta = train_classifier(dataclasses.replace(ClassifierTrainConfig(data=a.data), **over), a.out)
    print(f"classifier saved to {a.out}: eval accuracy {meta['eval_accuracy']:.4f}")
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="FD, class accuracy and blank/washed shares of a model's samples")
    p.add_argument("--model", required=True, help="teacher or student checkpoint directory")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    p.add_argument("--steps", type=_positive, required=True)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's own)")
    p.add_argument("--samples", type=_positive, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-noise-correction", action="store_true")
    p.add_argument("--clip", type=float, default=0.0, help="clamp x0 to [-clip, clip] (0: off)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    _add_engine_flags(p)
    return p


def cmd_eval(a) -> int:
    from flashcore.checkpoint import write_json
    from flashcore.evaluate import evaluate
    r = evaluate(a.model, a.classifier, steps=a.steps, guidance=a.cfg, samples=a.samples, seed=a.seed,
                 noise_correction=not a.no_noise_correction, clip=a.clip, **_engine_kwargs(a))
    if a.json:
        write_json(a.json, r)
    print(json.dumps(r, indent=2))
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample a grid of images from a model")
    p.add_argument("--model", default=DEFAULT_TEACHER)
    p.add_argument("--steps", type=_positive, default=50)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--per-class", type=_positive, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-noise-correction", action="store_true")
    p.add_argument("--out", default="out/samples.png")
    _add_engine_flags(p)
    return p


def cmd_generate(a) -> int:
    import torch

    from flashcore.evaluate import generate
    from flashcore.images import grid, save_png
    from flashcore.models import load_pretrained
    model, meta = load_pretrained(a.model)
    guidance = a.cfg if a.cfg is not None else float(meta.get("guidance") or 1.0)
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(a.per_class)
    x, secs = generate(model, meta, labels, steps=a.steps, guidance=guidance,
                       noise_correction=not a.no_noise_correction, seed=a.seed, **_engine_kwargs(a))
    save_png(grid(x, nrow=a.per_class), a.out, scale=2)
    print(f"{len(labels)} images, {a.steps} steps, cfg {guidance}: {secs:.2f} s "
          f"({1000 * secs / len(labels):.1f} ms/image) -> {a.out}")
    return 0


DEFAULT_STUDENT = os.path.join(_ROOT, "checkpoints", "mnist-student-3step")
DEFAULT_STUDENT_1STEP = os.path.join(_ROOT, "checkpoints", "mnist-student-1step")


def _add_demo(sub):
    p = sub.add_parser("demo", help="the shipped teacher at 50 CFG steps beside the distilled student at "
                                    "1, 2 and 3 steps: one picture, the time per image of each")
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--student", default=DEFAULT_STUDENT, help="the student for the 3- and 2-step rows")
    p.add_argument("--student-1step", default=DEFAULT_STUDENT_1STEP,
                   help="a student distilled for 1 step, for the 1-step row ('' or missing: --student at 1 step)")
    p.add_argument("--teacher-steps", type=_positive, default=50)
    p.add_argument("--per-class", type=_positive, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo.png")
    return p


def cmd_demo(a) -> int:
    """Every row draws the same labels from the same noise, in one batch on the
    eager float32 engine; each model makes one untimed 1-image call first so the
    times are steady-state sampling, not first-call set-up."""
    import torch

    from flashcore.evaluate import generate
    from flashcore.images import labelled_rows
    from flashcore.models import load_pretrained
    teacher, tmeta = load_pretrained(a.teacher, kinds=("teacher",))
    student, smeta = load_pretrained(a.student, kinds=("student",))
    one = None
    if a.student_1step and os.path.exists(os.path.join(a.student_1step, "config.json")):
        one = load_pretrained(a.student_1step, kinds=("student",))
    for m, path in ((student, a.student), (one[0] if one else student, a.student_1step)):
        if teacher.cfg != m.cfg:
            raise ValueError(f"demo: the student {path!r} does not have the teacher's architecture")
    guidance = float(tmeta.get("guidance") or 1.0)
    labels = torch.arange(teacher.cfg.num_classes).repeat(a.per_class)
    max_steps = int(smeta.get("steps") or 3)
    runs = [(teacher, tmeta, a.teacher_steps, guidance, f"teacher, {a.teacher_steps} steps, CFG {guidance:g}")]
    runs += [(student, smeta, s, 1.0, f"{max_steps}-step student, {s} step{'s' if s > 1 else ''}")
             for s in range(max_steps, 1 if one else 0, -1)]
    if one:
        runs.append((one[0], one[1], 1, 1.0, "1-step student, 1 step"))
    rows, times = [], []
    for model, meta, steps, g, name in runs:
        nc = bool(meta.get("noise_correction", True))
        generate(model, meta, labels[:1], steps=1, guidance=g, noise_correction=nc, seed=a.seed)   # warm-up
        x, secs = generate(model, meta, labels, steps=steps, guidance=g, noise_correction=nc, seed=a.seed)
        ms = 1000 * secs / len(labels)
        nfe = steps * (2 if g != 1.0 else 1)
        times.append(ms)
        rows.append((f"{name}\n{nfe} NFE, {ms:.1f} ms/image", x))
        print(f"{name:28s} {nfe:4d} NFE  {ms:8.1f} ms/image  ({times[0] / ms:5.1f}x the teacher's speed)",
              flush=True)
    labelled_rows(rows, a.out, title=f"{len(labels)} images per row, same noise and labels; eager float32, "
                                     f"batch {len(labels)}, {torch.get_num_threads()} threads")
    print(f"-> {a.out}")
    return 0


# distill flag -> DistillConfig field, for the value-taking flags (ablation switches come apart)
_DISTILL_FLAGS = [("--iters", "iters", _positive), ("--batch-size", "batch_size", _positive), ("--lr", "lr", float),
                  ("--gamma", "gamma_ratio", float), ("--jitter", "gamma_jitter", int), ("--k", "teacher_steps", _positive),
                  ("--cfg", "guidance", float), ("--lambda-adv", "lambda_adv", float), ("--d-lr", "d_lr", float),
                  ("--fwd-share", "fwd_share", float), ("--ema", "ema_decay", float),
                  ("--checkpoint-every", "checkpoint_every", _positive), ("--val-every", "val_every", int),
                  ("--val-samples", "val_samples", _positive), ("--classifier", "classifier", str),
                  ("--seed", "seed", int)]
_DISTILL_HELP = {"--gamma": "tau = round(gamma * t)", "--jitter": "tau jitter in timesteps",
                 "--k": "teacher DDIM steps for the SRL target", "--cfg": "teacher guidance (default: the teacher's)",
                 "--fwd-share": "DDIL: share of forward-noised batches", "--ema": "EMA decay of the exported student",
                 "--val-every": "validation FD every N iterations; student/ is the best (0: off, student/ is the last)",
                 "--classifier": "feature network for the validation FD"}
_ABLATIONS = (("backward", "backward"), ("srl", "srl"), ("noise-correction", "noise_correction"),
              ("adversarial", "adversarial"))


def _distill_flags(p, ablations: bool = True):
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--steps", type=int, choices=(1, 2, 3, 4), required=True, help="student steps")
    p.add_argument("--out", required=True, help="run directory")
    for flag, _, typ in _DISTILL_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=_DISTILL_HELP.get(flag))
    if ablations:
        for flag, _ in _ABLATIONS:
            p.add_argument(f"--no-{flag}", action="store_true", help=f"ablation: without {flag.replace('-', ' ')}")


def _distill_config(a):
    import dataclasses

    from flashcore.train.distill import DistillConfig
    cfg = DistillConfig(teacher=a.teacher, steps=a.steps, classifier=DEFAULT_CLASSIFIER,
                        **{f: not getattr(a, "no_" + flag.replace("-", "_"), False) for flag, f in _ABLATIONS})
    over = {field: getattr(a, flag[2:].replace("-", "_")) for flag, field, _ in _DISTILL_FLAGS}
    return dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})


def _distill_command_flags(cfg) -> list[str]:
    """The distill flags that give ``cfg`` (teacher, steps, iters, seed always; the rest if not default)."""
    from flashcore.train.distill import DistillConfig
    default = DistillConfig(teacher=cfg.teacher, steps=cfg.steps, classifier=DEFAULT_CLASSIFIER)
    out = ["--teacher", cfg.teacher, "--steps", str(cfg.steps)]
    for flag, field, _ in _DISTILL_FLAGS:
        v = getattr(cfg, field)
        if field in ("iters", "seed") or v != getattr(default, field):
            out += [flag, str(v)]
    return out


def _add_distill(sub):
    p = sub.add_parser("distill", help="Imagine Flash: distil a teacher into a 1-4 step student "
                                       "(under torchrun: DDP over the processes)")
    _distill_flags(p)
    p.add_argument("--resume", action="store_true")
    return p


def cmd_distill(a) -> int:
    from flashcore.train.distill import distill
    cfg = _distill_config(a)
    if a.resume and a.iters is None:
        from flashcore.train.common import saved_config
        cfg.iters = saved_config(a.out)["iters"]
    out = distill(cfg, a.out, resume=a.resume)
    print(f"student saved to {out}")
    return 0


def _add_ablate(sub):
    p = sub.add_parser("ablate", help="the full method against each ablation and forward distillation, "
                                      "same budget and seed: a table and a picture")
    _distill_flags(p, ablations=False)
    p.add_argument("--samples", type=_positive, default=1000, help="samples per flashcore eval")
    p.add_argument("--variants", default=None, help="comma list (default all): full,forward,no-srl,"
                                                    "no-noise-correction,no-adversarial")
    return p


def cmd_ablate(a) -> int:
    from flashcore.train.ablate import ablate
    cfg = _distill_config(a)
    command = " ".join(["flashcore ablate"] + _distill_command_flags(cfg) + ["--out", a.out, "--samples", str(a.samples)]
                       + (["--variants", a.variants] if a.variants else []))
    res = ablate(cfg, a.out, cfg.classifier, samples=a.samples,
                 variants=a.variants.split(",") if a.variants else None, flags_of=_distill_command_flags,
                 command=command)
    print(open(os.path.join(a.out, "ablation.md")).read())
    print(f"table: {os.path.join(a.out, 'ablation.md')}, picture: {os.path.join(a.out, 'ablation.png')}, "
          f"{len(res['rows'])} rows")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks: kernels, one sampler step, end-to-end image latency")
    p.add_argument("--suite", choices=("kernels", "step", "e2e", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    p.add_argument("--providers", default=None,
                   help="comma list of providers (prefixes): eager,compile,flashcore,sdpa,onnxruntime")
    p.add_argument("--out-dir", default=None,
                   help="results.csv, <name>.md and <name>.png (default: a new folder under out/bench/; "
                        "bench/results updates the committed tables, not allowed with --quick)")
    p.add_argument("--json", default=None, help="also write every row as a JSON object here")
    return p


def cmd_bench(a) -> int:
    from flashcore import benchmarking
    provs = tuple(a.providers.split(",")) if a.providers else None
    out_dir = benchmarking.resolve_out_dir(a.out_dir, quick=a.quick)
    rows = benchmarking.run_suite(a.suite, quick=a.quick, providers=provs, out_dir=out_dir,
                                  log=lambda s: print(s, flush=True))
    if a.json:
        benchmarking.write_json(a.json, rows)
    print(f"{len(rows)} rows -> {out_dir}")
    return 0


COMMANDS = {
    "train-teacher": (_add_train_teacher, cmd_train_teacher),
    "train-classifier": (_add_train_classifier, cmd_train_classifier),
    "eval": (_add_eval, cmd_eval),
    "generate": (_add_generate, cmd_generate),
    "demo": (_add_demo, cmd_demo),
    "distill": (_add_distill, cmd_distill),
    "ablate": (_add_ablate, cmd_ablate),
    "bench": (_add_bench, cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashcore", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    from flashcore.checkpoint import CheckpointError
    from flashcore.train.common import NonFiniteLoss
    try:
        return COMMANDS[a.command][1](a)
    except (CheckpointError, NonFiniteLoss, ValueError) as e:
        print(f"flashcore: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
