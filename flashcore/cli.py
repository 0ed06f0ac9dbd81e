"""``flashcore`` command line: train-teacher, train-classifier, eval, generate, demo, distill, disback,
ablate, export, export-pipeline, bench.

Exit codes:

* 2, a usage error (argparse prints the command's usage and the reason): an
  unknown command or flag, a value outside its range (the ranges are the
  config dataclasses', so a config file gets the same checks), an output path
  that cannot be written, a size that cannot fit in this machine's memory,
  more sampler steps than the model's schedule has. All of these are found
  before any model is built.
* 1, a failed run: exactly one line ``flashcore: error: <why>`` on stderr (a
  missing or corrupt checkpoint, an unknown data set, an unreadable image, a
  NaN loss, a resume that asks for other settings than the run has); anything
  unexpected is ``flashcore: error: <type>: <message>``, MemoryError included.
* 130: interrupted (Ctrl-C), one line.

No traceback reaches the user unless the environment variable
``FLASHCORE_DEBUG`` is set (to anything but "" or "0"): then the failure's
traceback goes to stderr before its one line.

Warnings that do not stop a run (a student sampled at another step count than
it was distilled for) are one ``flashcore: warning: ...`` line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys

from .cli_checks import (DEFAULT_TEACHER, HelpFormatter, UsageError, build_config, check_memory, check_resume,
                         check_steps, config_flag, data_name, image_shape, model_width, one_line, out_dir, out_file,
                         peek_meta, sample_bytes, sampling_clip, sampling_setup, save_result, train_bytes)
from .cli_checks import ROOT as _ROOT, SAMPLES as _samples
from .cli_checks import add_device_flag as _add_device_flag, command as _command, device_of as _device
from .cli_distill import DISTILL_COMMANDS
from .validation import COUNT, MAX_TIMESTEPS, SEED, Range

DEFAULT_GENERATE_TEACHER_STEPS = 50

_positive = COUNT.parse
_seed = SEED.parse
_sampler_steps = Range(int, 1, MAX_TIMESTEPS).parse     # the model's schedule bounds it further
_guidance = Range(float, 0, 100).parse
_clip = Range(float, 0, 100).parse
_per_class = COUNT.parse                                # this machine's memory bounds it further


def _add_engine_flags(p):
    p.add_argument("--compile", action="store_true", help="torch.compile the sampler step (compile time counts)")
    p.add_argument("--bf16", action="store_true", help="run the network in bfloat16 autocast")
    _add_device_flag(p)


def _engine_kwargs(a) -> dict:
    import torch
    return {"compile": a.compile, "dtype": torch.bfloat16 if a.bf16 else torch.float32, "device": _device(a)}


def _data_shape(name: str, model) -> tuple[int, int]:
    """(channels, size) the training will see: the built-in sets' own, else the model config's."""
    return {"mnist": (1, 28), "digits": (1, 16)}.get(name, (model.channels, model.sample_size))


def _add_train_teacher(sub):
    p = _command(sub, "train-teacher", "train a class-conditional diffusion teacher")
    p.add_argument("--out", required=True, type=out_dir, help="run directory (checkpoints, samples, loss log)")
    p.add_argument("--data", type=data_name, default=None,
                   help="data set: mnist, digits or folder:PATH (one sub-folder per class) (default: mnist)")
    t = ("teacher", "TeacherConfig", "TEACHER_RANGES")
    config_flag(p, "--steps", *t, "steps", "total optimiser steps (with --resume, default: the run's own)")
    config_flag(p, "--batch-size", *t, "batch_size", "images per optimiser step")
    config_flag(p, "--lr", *t, "lr", "AdamW learning rate (after a linear warm-up)")
    p.add_argument("--arch", choices=("unet", "dit"), default=None,
                   help="denoiser architecture (default: unet)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the network predicts; v_prediction pairs with --zero-terminal-snr (default: epsilon)")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the schedule so that x_T carries no signal (a_T = 0, Lin et al. 2023)")
    config_flag(p, "--checkpoint-every", *t, "checkpoint_every", "save a checkpoint and a sample grid every N steps")
    config_flag(p, "--seed", *t, "seed", "seed of the initial weights and of every random draw")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (only --steps may differ from the run's settings)")
    p.add_argument("--export", type=out_dir, default=None,
                   help="also copy the final teacher to this directory (default: none)")
    return p


def cmd_train_teacher(a) -> int:
    import dataclasses
    import shutil

    from flashcore.train import common
    from flashcore.train.teacher import TeacherConfig, train_teacher
    over = {k: v for k, v in {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                              "checkpoint_every": a.checkpoint_every, "seed": a.seed}.items() if v is not None}
    resuming = a.resume and common.has_state(a.out)
    if resuming:
        saved = common.saved_config(a.out)
        given = {k: ("--" + k.replace("_", "-"), v) for k, v in over.items() if k != "steps"}
        if a.data is not None:
            given["data"] = ("--data", a.data)
        if a.no_bf16:
            given["bf16"] = ("--no-bf16", False)
        check_resume(a.out, saved, given, "train-teacher")
        model = {k: (f"--{k.replace('_', '-')}", v) for k, v in
                 {"arch": a.arch, "prediction_type": a.prediction_type}.items() if v}
        check_resume(a.out, saved.get("model") or {}, model, "train-teacher")
        if a.zero_terminal_snr:
            check_resume(a.out, saved.get("schedule") or {}, {"zero_terminal_snr": ("--zero-terminal-snr", True)},
                         "train-teacher")
    cfg = build_config(lambda: TeacherConfig(data=a.data or "mnist", **over))
    if a.no_bf16:
        cfg.bf16 = False
    if a.arch:
        cfg.model = dataclasses.replace(cfg.model, arch=a.arch)
    if a.prediction_type:
        cfg.model = dataclasses.replace(cfg.model, prediction_type=a.prediction_type)
    if a.zero_terminal_snr:
        cfg.schedule = dataclasses.replace(cfg.schedule, zero_terminal_snr=True)
    if resuming and a.steps is None:
        cfg.steps = saved["steps"]
    if not resuming:        # a resumed run keeps the batch size it already ran with
        c, s = _data_shape(cfg.data, cfg.model)
        check_memory("--batch-size", cfg.batch_size,
                     train_bytes(cfg.batch_size, c, s, model_width(dataclasses.asdict(cfg.model))),
                     f"{cfg.batch_size} training images of {c}x{s}x{s} a step")
    out = train_teacher(cfg, a.out, resume=a.resume)
    if a.export:
        shutil.copytree(out, a.export, dirs_exist_ok=True)
        out = a.export
    print(f"teacher saved to {out}")
    return 0


def _add_train_vae(sub):
    p = _command(sub, "train-vae", "train the AutoencoderKL of a text-to-image latent teacher")
    p.add_argument("--out", required=True, type=out_dir, help="run directory; the VAE is written to OUT/vae")
    p.add_argument("--data", type=data_name, default="mnist", help="data set: mnist, digits or folder:PATH")
    t = ("t2i", "VaeConfig", "VAE_RANGES")
    config_flag(p, "--steps", *t, "steps", "total optimiser steps (with --resume, default: the run's own)")
    config_flag(p, "--batch-size", *t, "batch_size", "images per optimiser step")
    config_flag(p, "--lr", *t, "lr", "AdamW learning rate (after a linear warm-up)")
    config_flag(p, "--kl-weight", *t, "kl_weight", "weight of the KL term against the mean absolute pixel error")
    config_flag(p, "--checkpoint-every", *t, "checkpoint_every", "save a checkpoint every N steps")
    config_flag(p, "--seed", *t, "seed", "seed of the initial weights and of every random draw")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    return p


def _resume_t2i(a, over: dict, extra: dict, what: str) -> dict | None:
    """The saved config of the run in ``a.out`` when ``--resume`` finds one, after checking that no
    flag asks for another value than the run has (None: a new run)."""
    from flashcore.train import common
    if not (a.resume and common.has_state(a.out)):
        return None
    saved = common.saved_config(a.out)
    given = {k: ("--" + k.replace("_", "-"), v) for k, v in over.items() if k != "steps"}
    given.update(extra)
    if a.no_bf16:
        given["bf16"] = ("--no-bf16", False)
    check_resume(a.out, saved, given, what)
    return saved


def cmd_train_vae(a) -> int:
    from flashcore.train.t2i import VaeConfig, train_vae
    over = {k: v for k, v in {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "kl_weight": a.kl_weight,
                              "checkpoint_every": a.checkpoint_every, "seed": a.seed}.items() if v is not None}
    saved = _resume_t2i(a, over, {"data": ("--data", a.data)} if a.data != "mnist" else {}, "train-vae")
    if saved is not None:         # the run's own settings (train_vae reads them); only --steps may change
        cfg = build_config(lambda: VaeConfig(steps=a.steps or saved.get("steps") or VaeConfig.steps))
    else:
        cfg = build_config(lambda: VaeConfig(data=a.data, bf16=not a.no_bf16, **over))
    print(f"vae saved to {train_vae(cfg, a.out, resume=a.resume)}")
    return 0


def _add_train_t2i(sub):
    p = _command(sub, "train-t2i-teacher", "train a text-to-image latent teacher (UNet2DConditionModel and CLIP "
                                           "text encoder) on captioned digits, in a train-vae VAE's latent space")
    p.add_argument("--out", required=True, type=out_dir,
                   help="run directory; the teacher pipeline is written to OUT/teacher")
    p.add_argument("--vae", default=None, help="the VAE folder train-vae wrote (OUT/vae of its run); required "
                                               "unless --resume")
    t = ("t2i", "T2ITeacherConfig", "T2I_RANGES")
    config_flag(p, "--steps", *t, "steps", "total optimiser steps (with --resume, default: the run's own)")
    config_flag(p, "--batch-size", *t, "batch_size", "latents per optimiser step")
    config_flag(p, "--lr", *t, "lr", "AdamW learning rate (after a linear warm-up)")
    config_flag(p, "--width", *t, "width", "UNet channels of the first level (the second has twice)")
    config_flag(p, "--guidance", *t, "guidance", "the CFG scale saved with the pipeline")
    config_flag(p, "--checkpoint-every", *t, "checkpoint_every", "save a checkpoint and a sample grid every N steps")
    config_flag(p, "--seed", *t, "seed", "seed of the initial weights and of every random draw")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the UNet predicts (default: epsilon)")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (only --steps may differ from the run's settings)")
    return p


def cmd_train_t2i(a) -> int:
    from flashcore.train.t2i import T2ITeacherConfig, train_t2i_teacher
    over = {k: v for k, v in {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "width": a.width,
                              "guidance": a.guidance, "checkpoint_every": a.checkpoint_every, "seed": a.seed,
                              "prediction_type": a.prediction_type}.items() if v is not None}
    saved = _resume_t2i(a, over, {"vae": ("--vae", a.vae)} if a.vae is not None else {}, "train-t2i-teacher")
    if saved is not None:         # the run's own settings (train_t2i_teacher reads them); only --steps may change
        cfg = build_config(lambda: T2ITeacherConfig(vae=saved.get("vae") or a.vae or "?",
                                                    steps=a.steps or saved.get("steps") or T2ITeacherConfig.steps))
    else:
        if a.vae is None and a.resume:
            raise ValueError(f"train-t2i-teacher: nothing to resume in {a.out!r}")
        if a.vae is None:
            raise UsageError("--vae: the VAE folder is required (train one with flashcore train-vae)")
        cfg = build_config(lambda: T2ITeacherConfig(vae=a.vae, bf16=not a.no_bf16, **over))
    print(f"teacher saved to {train_t2i_teacher(cfg, a.out, resume=a.resume)}")
    return 0


def _add_train_classifier(sub):
    p = _command(sub, "train-classifier", "train a feature network: the validation classifier (--arch cnn) "
                                          "or one of eval's headline feature spaces (bncnn, mlp)")
    p.add_argument("--out", required=True, type=out_dir, help="directory for the classifier (weights, config.json)")
    p.add_argument("--data", type=data_name, default="mnist", help="data set: mnist, digits or folder:PATH")
    t = ("classifier", "ClassifierTrainConfig", "CLASSIFIER_RANGES")
    config_flag(p, "--epochs", *t, "epochs", "passes over the train split")
    config_flag(p, "--seed", *t, "seed", "seed of the initial weights and the batch order")
    p.add_argument("--arch", choices=("cnn", "bncnn", "mlp"), default=None,
                   help="cnn: the validation classifier's; bncnn: wider CNN with batch norm; mlp: pixel-space MLP "
                        "(default: cnn)")
    config_flag(p, "--shift", *t, "shift", "augmentation: random shift within +-PIXELS (whole pixels, one a "
                                            "batch; per image and sub-pixel with --rotate)")
    config_flag(p, "--rotate", *t, "rotate", "augmentation: random rotation within +-DEGREES per image (0: off)")
    config_flag(p, "--width", *t, "width", "first conv's channels, or the MLP's hidden units (0: the "
                                            "architecture's default: 32 cnn/bncnn, 192 mlp)")
    config_flag(p, "--feature-dim", *t, "features", "size of the feature layer", dest="feature_dim")
    return p


def cmd_train_classifier(a) -> int:
    from flashcore.train.classifier import ClassifierTrainConfig, train_classifier
    over = {k: v for k, v in {"epochs": a.epochs, "seed": a.seed, "arch": a.arch, "shift": a.shift,
                              "rotate": a.rotate, "width": a.width, "features": a.feature_dim}.items()
            if v is not None}
    meta = train_classifier(build_config(lambda: ClassifierTrainConfig(data=a.data, **over)), a.out)
    print(f"classifier saved to {a.out}: eval accuracy {meta['eval_accuracy']:.4f}, "
          f"{meta['parameters']} parameters")
    return 0


def _add_sampling_flags(p):
    p.add_argument("--cfg", type=_guidance, default=None,
                   help="guidance scale (default: the model's saved scale; a distilled student has none: 1)")
    p.add_argument("--noise-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="noise correction at t = T (default: as the checkpoint says: a student as it was "
                        "distilled, a teacher on)")
    p.add_argument("--clip", type=_clip, default=None,
                   help="clamp x0 to [-clip, clip] at every step (default: the checkpoint's own, a DDIL student's "
                        "reflection; else 0: off)")
    _add_engine_flags(p)


def _add_eval(sub):
    p = _command(sub, "eval", "score a model's samples as the 8-bit images generate writes: FD, precision/recall, "
                              "density/coverage, diversity in independent feature spaces, class accuracy, pixel "
                              "statistics, each next to its real-vs-real floor")
    p.add_argument("--model", required=True, help="teacher or student checkpoint directory")
    p.add_argument("--features", nargs="+", default=None, metavar="DIR",
                   help="headline feature networks; never the validation classifier that picks students "
                        "(default: checkpoints/mnist-features-bncnn checkpoints/mnist-features-mlp)")
    p.add_argument("--k", type=_positive, default=5,
                   help="neighbours of the k-NN manifolds (precision, recall, density, coverage)")
    p.add_argument("--steps", type=_sampler_steps, required=True,
                   help="sampler steps (at most the model's schedule's timesteps)")
    p.add_argument("--samples", type=_samples, default=1000,
                   help="images to sample and score, classes in turn (at least 2)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sampling noise and of the FD floor's subset")
    p.add_argument("--json", type=out_file, default=None,
                   help="also write the result as JSON here (checked writable before the run; default: none)")
    p.add_argument("--prompts", default=None,
                   help="a text model's prompts, one a line, each a caption of a digit (default: the prompts it "
                        "was trained or distilled on); its digit is what the image is scored against")
    _add_sampling_flags(p)
    return p


def cmd_eval(a) -> int:
    import numpy as np
    import torch

    from flashcore.evaluate import evaluate
    steps, nc, meta = sampling_setup(a.model, a.steps, a.noise_correction)
    if meta is not None:
        check_memory("--samples", a.samples, sample_bytes(a.samples, meta) + a.samples * 4096,
                     f"{a.samples} images to sample and score")
    try:
        r = evaluate(a.model, a.features, steps=steps, guidance=a.cfg, samples=a.samples, seed=a.seed, k=a.k,
                     noise_correction=nc, clip=sampling_clip(meta, a.clip), progress=True,
                     refuse_validation_space=True, prompts=a.prompts,
                     **_engine_kwargs(a))
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as e:
        # the FD's matrix square root fails on non-finite features: the samples were NaN or inf
        raise ValueError(f"eval: the Frechet distance cannot be computed ({' '.join(str(e).split())[:200]}): the "
                         f"features of {a.model!r}'s samples are not finite; are its weights NaN?") from None
    from flashcore.evaluate import summary
    print(summary(r))
    if a.json:
        save_result(a.json, r, "eval")
    return 0


def _add_generate(sub):
    p = _command(sub, "generate", "sample a grid of images from a model")
    p.add_argument("--model", required=True, help="teacher or student checkpoint directory")
    p.add_argument("--steps", type=_sampler_steps, default=None,
                   help=f"sampler steps (default: a student's distilled step count; "
                        f"{DEFAULT_GENERATE_TEACHER_STEPS} for a teacher)")
    p.add_argument("--per-class", type=_per_class, default=8, help="images per class: the grid's columns")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sampling noise")
    p.add_argument("--out", type=out_file, default="out/samples.png", help="the PNG grid to write, a row a class")
    p.add_argument("--prompts", default=None, help="a text model's prompts, a text file with one a line: a row a "
                                                   "prompt (default: the prompts a student was distilled on)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a text model's prompt, a row; repeat for more rows (instead of --prompts)")
    _add_sampling_flags(p)
    return p


def cmd_generate(a) -> int:
    import torch

    from flashcore.evaluate import generate
    from flashcore.foreign import decode, load_model
    from flashcore.images import grid, save_png
    steps, nc, meta = sampling_setup(a.model, a.steps, a.noise_correction, DEFAULT_GENERATE_TEACHER_STEPS)
    if meta is not None:
        n = a.per_class * image_shape(meta)[0]
        check_memory("--per-class", a.per_class, sample_bytes(n, meta), f"{n} images")
    if a.prompt and a.prompts:
        raise UsageError("--prompt and --prompts: give the prompts one way, not both")
    if a.prompt and not all(p.strip() for p in a.prompt):
        raise UsageError("--prompt: a prompt cannot be empty (the empty prompt is the null condition of CFG)")
    model, meta = load_model(a.model, prompts=a.prompt or a.prompts)
    guidance = a.cfg if a.cfg is not None else float(meta.get("guidance") or 1.0)
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(a.per_class)
    x, secs = generate(model, meta, labels, steps=steps, guidance=guidance, noise_correction=nc, seed=a.seed,
                       clip=sampling_clip(meta, a.clip), **_engine_kwargs(a))
    save_png(grid(decode(model, x), nrow=a.per_class), a.out, scale=2)
    print(f"{len(labels)} images, {steps} steps, cfg {guidance}: {secs:.2f} s "
          f"({1000 * secs / len(labels):.1f} ms/image) -> {a.out}")
    return 0


DEFAULT_STUDENT = os.path.join(_ROOT, "checkpoints", "mnist-student-3step")
DEFAULT_STUDENT_1STEP = os.path.join(_ROOT, "checkpoints", "mnist-student-1step")
DEFAULT_STUDENT_2STEP = os.path.join(_ROOT, "checkpoints", "mnist-student-2step")


def _add_demo(sub):
    p = _command(sub, "demo", "the shipped teacher at 50 CFG steps beside the distilled student at "
                              "1, 2 and 3 steps: one picture, the time per image of each")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher checkpoint directory")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="the student for the 3- and 2-step rows")
    p.add_argument("--student-2step", default=DEFAULT_STUDENT_2STEP,
                   help="a student distilled for 2 steps, for the 2-step row ('' or missing: --student at 2 steps)")
    p.add_argument("--student-1step", default=DEFAULT_STUDENT_1STEP,
                   help="a student distilled for 1 step, for the 1-step row ('' or missing: --student at 1 step)")
    p.add_argument("--teacher-steps", type=_sampler_steps, default=50, help="sampler steps of the teacher's row")
    p.add_argument("--per-class", type=_per_class, default=2, help="images per class in every row")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sampling noise (the same in every row)")
    p.add_argument("--out", type=out_file, default="out/demo.png", help="the picture to write (PNG)")
    p.add_argument("--prompts", default=None, help="a text model's prompts, a text file with one a line")
    _add_device_flag(p)
    return p


def cmd_demo(a) -> int:
    """Every row draws the same labels from the same noise, in one batch on the
    eager float32 engine; each model makes one untimed 1-image call first so the
    times are steady-state sampling, not first-call set-up."""
    import torch

    from flashcore.evaluate import generate
    from flashcore.foreign import decode, load_model
    from flashcore.images import labelled_rows
    device = _device(a)
    tpeek = peek_meta(a.teacher)
    check_steps("--teacher-steps", a.teacher_steps, tpeek)
    if tpeek is not None:
        n = a.per_class * image_shape(tpeek)[0]
        check_memory("--per-class", a.per_class, 5 * sample_bytes(n, tpeek), f"5 rows of {n} images")
    teacher, tmeta = load_model(a.teacher, kinds=("teacher",), prompts=a.prompts)
    student, smeta = load_model(a.student, kinds=("student",), prompts=a.prompts)
    own = {}                          # step count -> (model, meta) of a student distilled for it
    for n, path in ((2, a.student_2step), (1, a.student_1step)):
        if path and any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "model_index.json")):
            own[n] = load_model(path, kinds=("student",), prompts=a.prompts)
            if teacher.cfg != own[n][0].cfg:
                raise ValueError(f"demo: the student {path!r} does not have the teacher's architecture")
    if teacher.cfg != student.cfg:
        raise ValueError(f"demo: the student {a.student!r} does not have the teacher's architecture")
    guidance = float(tmeta.get("guidance") or 1.0)
    labels = torch.arange(teacher.cfg.num_classes).repeat(a.per_class)
    max_steps = int(smeta.get("steps") or 3)
    runs = [(teacher, tmeta, a.teacher_steps, guidance, f"teacher, {a.teacher_steps} steps, CFG {guidance:g}")]
    for s in range(max_steps, 0, -1):
        if s in own and s != max_steps:
            runs.append((*own[s], s, 1.0, f"{s}-step student, {s} step{'s' if s > 1 else ''}"))
        else:
            runs.append((student, smeta, s, 1.0, f"{max_steps}-step student, {s} step{'s' if s > 1 else ''}"))
    rows, times = [], []
    for model, meta, steps, g, name in runs:
        nc = bool(meta.get("noise_correction", True))
        clip = sampling_clip(meta, None)
        generate(model, meta, labels[:1], steps=1, guidance=g, noise_correction=nc, seed=a.seed, clip=clip,
                 device=device)                                                                   # warm-up
        x, secs = generate(model, meta, labels, steps=steps, guidance=g, noise_correction=nc, seed=a.seed,
                           clip=clip, device=device)
        ms = 1000 * secs / len(labels)
        nfe = steps * (2 if g != 1.0 else 1)
        times.append(ms)
        x = decode(model, x)                             # a latent model's samples as images
        rows.append((f"{name}\n{nfe} NFE, {ms:.1f} ms/image, {times[0] / ms:.1f}x the teacher's speed", x))
        print(f"{name:28s} {nfe:4d} NFE  {ms:8.1f} ms/image  ({times[0] / ms:5.1f}x the teacher's speed)",
              flush=True)
    labelled_rows(rows, a.out, title=f"Teacher against its distilled students: {len(labels)} images per row, "
                                     f"same noise and labels; eager float32, "
                                     f"batch {len(labels)}, {torch.get_num_threads()} threads")
    print(f"-> {a.out}")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks: kernels, one sampler step, end-to-end image latency")
    p.add_argument("--suite", choices=("kernels", "step", "e2e", "deploy", "all"), default="all")
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
    from flashcore.cli_bench import run_suite
    rows = run_suite(a.suite, quick=a.quick, providers=provs, out_dir=out_dir, log=lambda s: print(s, flush=True))
    if a.json:
        benchmarking.write_json(a.json, rows)
    print(f"{len(rows)} rows -> {out_dir}")
    return 0


def _add_export_pipeline(sub):
    p = _command(sub, "export-pipeline", "write a teacher or student (either layout) as a diffusers pipeline "
                                         "folder: DiffusionPipeline.from_pretrained loads it (docs/diffusers.md)")
    p.add_argument("--model", required=True, help="teacher or student checkpoint directory")
    p.add_argument("--out", required=True, type=out_dir, help="the pipeline folder to write (replaced whole)")
    return p


def cmd_export_pipeline(a) -> int:
    from flashcore.models import load_pretrained, save_pretrained
    from flashcore.models.denoiser import stored_dtype
    if os.path.isdir(a.out) and os.listdir(a.out) and not os.path.exists(os.path.join(a.out, "config.json")):
        # the folder is replaced whole: never one that is not a checkpoint
        raise UsageError(f"--out: {a.out!r} is a folder with other files in it, not a checkpoint; "
                         "name a new folder")
    model, meta = load_pretrained(a.model)
    save_pretrained(model, a.out, meta, dtype=stored_dtype(a.model))       # a float16 student stays float16
    print(f"{meta['kind']} pipeline ({model.cfg.arch}, {model.cfg.prediction_type}) -> {a.out}")
    return 0


def _add_export(sub):
    p = _command(sub, "export", "export a whole few-step sampler (every network call and update; x_T and labels "
                                "in, x0 out) as one Python-free artifact: an AOTInductor .pt2 package for the "
                                "C++ runner flashcore-run, or ONNX of standard ops (docs/deploy.md)")
    p.add_argument("--model", required=True, help="teacher or student checkpoint directory")
    p.add_argument("--steps", type=_sampler_steps, default=None,
                   help="sampler steps (default: a student's distilled step count)")
    p.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="artifact format")
    p.add_argument("--out", required=True, type=out_file, help="the artifact to write (a pt2 name ends in .pt2)")
    p.add_argument("--batch", type=_positive, default=1, help="the batch the artifact is fixed to")
    p.add_argument("--bf16", action="store_true", help="the network in bfloat16 (the update stays float32)")
    return p


def cmd_export(a) -> int:
    from flashcore.export import ExportConfig, export_sampler
    if a.format == "pt2" and not a.out.endswith(".pt2"):
        raise UsageError(f"--out: a pt2 package's name must end in .pt2, got {a.out!r}")
    meta = peek_meta(a.model)
    if a.steps is None and not (meta and meta.get("kind") == "student" and isinstance(meta.get("steps"), int)):
        raise UsageError("--steps: the model is not a student with a distilled step count; pass --steps")
    steps, nc, _ = sampling_setup(a.model, a.steps, None)
    r = export_sampler(ExportConfig(model=a.model, out=a.out, steps=steps, format=a.format, batch=a.batch,
                                    bf16=a.bf16, noise_correction=nc))
    print(f"{r['steps']}-step sampler, batch {r['batch']}, {r['dtype']} -> {a.out} ({a.format}, "
          f"{os.path.getsize(a.out) / 2**20:.1f} MiB) in {r['seconds']:.1f} s")
    return 0


COMMANDS = {
    "train-teacher": (_add_train_teacher, cmd_train_teacher),
    "train-classifier": (_add_train_classifier, cmd_train_classifier),
    "train-vae": (_add_train_vae, cmd_train_vae),
    "train-t2i-teacher": (_add_train_t2i, cmd_train_t2i),
    "eval": (_add_eval, cmd_eval),
    "generate": (_add_generate, cmd_generate),
    "demo": (_add_demo, cmd_demo),
    **DISTILL_COMMANDS,
    "bench": (_add_bench, cmd_bench),
    "export-pipeline": (_add_export_pipeline, cmd_export_pipeline),
    "export": (_add_export, cmd_export),
}


class _Parser(argparse.ArgumentParser):
    """Every parser and sub-parser shows each flag's default in --help."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="flashcore", description=__doc__.split("\n\n")[0].replace("``", "").replace("\n", " "),
                 epilog="Exit codes: 0 done, 2 usage error, 1 failed run (one 'flashcore: error:' line), "
                        "130 interrupted. FLASHCORE_DEBUG=1 shows tracebacks. '<command> --help' for its flags.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for add, _ in COMMANDS.values():
        p = add(sub)
        p.set_defaults(_parser=p)
    return ap


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("FLASHCORE_DEBUG", "") not in ("", "0")
    try:
        a = build_parser().parse_args(argv)          # exits 2 itself on a bad argument
        return COMMANDS[a.command][1](a)
    except UsageError as e:
        a._parser.error(one_line(e))                 # exits 2 with the command's usage
    except KeyboardInterrupt:
        if debug:
            import traceback
            traceback.print_exc()
        print("flashcore: interrupted", file=sys.stderr)
        return 130
    except Exception as e:       # noqa: BLE001  the one place a failure becomes its one line
        if debug:
            import traceback
            traceback.print_exc()
        msg = one_line(e)
        # flashcore's own errors (CheckpointError, NonFiniteLoss, ...) and ValueErrors say what went
        # wrong by themselves; anything else also needs its type to make sense
        own = isinstance(e, ValueError) or type(e).__module__.startswith("flashcore")
        if not own or not msg:
            msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        if isinstance(e, MemoryError) or "can't allocate memory" in msg:
            msg += " (out of memory: try a smaller --batch-size, --per-class or --samples)"
        print(f"flashcore: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
