"""``flashcore`` command line: train-teacher, train-classifier, generate, eval, demo.

Invalid arguments print a usage message and exit with code 2 (argparse);
a failed run (missing or corrupt checkpoint, unknown data set, NaN loss)
prints one line ``flashcore: error: ...`` and exits with code 1.
"""
from __future__ import annotations

import argparse
import json
import sys


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


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


COMMANDS = {"train-teacher": (_add_train_teacher, cmd_train_teacher)}


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
