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


def _add_demo(sub):
    p = sub.add_parser("demo", help="the shipped teacher draws a grid of digits, timed")
    p.add_argument("--out", default="out/demo.png")
    return p


def cmd_demo(a) -> int:
    return cmd_generate(argparse.Namespace(model=DEFAULT_TEACHER, steps=50, cfg=None, per_class=8, seed=0,
                                           no_noise_correction=False, out=a.out, compile=False, bf16=False))


def _add_distill(sub):
    p = sub.add_parser("distill", help="Imagine Flash: distil a teacher into a 1-4 step student")
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--steps", type=int, choices=(1, 2, 3, 4), required=True, help="student steps")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--iters", type=_positive, default=None)
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--gamma", type=float, default=None, help="tau = round(gamma * t)")
    p.add_argument("--jitter", type=int, default=None, help="tau jitter in timesteps")
    p.add_argument("--k", type=_positive, default=None, help="teacher DDIM steps for the SRL target")
    p.add_argument("--cfg", type=float, default=None, help="teacher guidance (default: the teacher's)")
    p.add_argument("--lambda-adv", type=float, default=None)
    p.add_argument("--fwd-share", type=float, default=None, help="DDIL: share of forward-noised batches")
    p.add_argument("--checkpoint-every", type=_positive, default=None)
    p.add_argument("--val-every", type=int, default=None,
                   help="validation FD every N iterations; student/ is the best (0: off, student/ is the last)")
    p.add_argument("--val-samples", type=_positive, default=None)
    p.add_argument("--classifier", default=None, help="feature network for the validation FD")
    p.add_argument("--seed", type=int, default=None)
    for flag in ("backward", "srl", "noise-correction", "adversarial"):
        p.add_argument(f"--no-{flag}", action="store_true", help=f"ablation: without {flag.replace('-', ' ')}")
    p.add_argument("--resume", action="store_true")
    return p


def cmd_distill(a) -> int:
    import dataclasses

    from flashcore.train.distill import DistillConfig, distill
    over = {"iters": a.iters, "batch_size": a.batch_size, "lr": a.lr, "gamma_ratio": a.gamma,
            "gamma_jitter": a.jitter, "teacher_steps": a.k, "guidance": a.cfg, "lambda_adv": a.lambda_adv,
            "fwd_share": a.fwd_share, "checkpoint_every": a.checkpoint_every, "seed": a.seed,
            "val_every": a.val_every, "val_samples": a.val_samples, "classifier": a.classifier}
    cfg = DistillConfig(teacher=a.teacher, steps=a.steps, backward=not a.no_backward, srl=not a.no_srl,
                        noise_correction=not a.no_noise_correction, adversarial=not a.no_adversarial)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if a.resume and a.iters is None:
        from flashcore.train.common import saved_config
        cfg.iters = saved_config(a.out)["iters"]
    out = distill(cfg, a.out, resume=a.resume)
    print(f"student saved to {out}")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks: kernels, one sampler step, end-to-end image latency")
    p.add_argument("--suite", choices=("kernels", "step", "e2e", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    p.add_argument("--providers", default=None,
                   help="comma list of providers (prefixes): eager,compile,flashcore,sdpa,onnxruntime")
    p.add_argument("--out-dir", default=None, help="results.csv, <name>.md and <name>.png (default bench/results)")
    p.add_argument("--json", default=None, help="also write every row as a JSON object here")
    return p


def cmd_bench(a) -> int:
    from flashcore import benchmarking
    provs = tuple(a.providers.split(",")) if a.providers else None
    rows = benchmarking.run_suite(a.suite, quick=a.quick, providers=provs,
                                  out_dir=a.out_dir or benchmarking.RESULTS_DIR,
                                  log=lambda s: print(s, flush=True))
    if a.json:
        benchmarking.write_json(a.json, rows)
    print(f"{len(rows)} rows -> {a.out_dir or benchmarking.RESULTS_DIR}")
    return 0


COMMANDS = {
    "train-teacher": (_add_train_teacher, cmd_train_teacher),
    "train-classifier": (_add_train_classifier, cmd_train_classifier),
    "eval": (_add_eval, cmd_eval),
    "generate": (_add_generate, cmd_generate),
    "demo": (_add_demo, cmd_demo),
    "distill": (_add_distill, cmd_distill),
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
