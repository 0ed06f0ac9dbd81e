"""The distillation commands of ``flashcore`` (entry layer): distill (Imagine Flash,
DDIL), disback, ablate and compare. Their flags are derived from the config dataclasses'
``option`` fields (``cli_checks.config_flags``); ``flashcore.cli`` registers
``DISTILL_COMMANDS``."""
from __future__ import annotations

import json
import os

from .cli_checks import (DEFAULT_CLASSIFIER, DEFAULT_TEACHER, SAMPLES as _samples, add_device_flag as _add_device_flag,
                         build_config, check_resume, command as _command, command_flags, config_flags,
                         device_of as _device, distill_memory, given_config, out_dir, read_config_file)


def _distill_flags(p, ablations: bool = True):
    """distill's flags, derived from DistillConfig's ``option`` fields (flag, help, default, range)."""
    from flashcore.train.distill import DistillConfig
    p.add_argument("--config", default=None,
                   help="a JSON or YAML file of DistillConfig fields; flags given as well override it")
    p.add_argument("--out", required=True, type=out_dir, help="run directory")
    config_flags(p, DistillConfig, "distill", "DISTILL_RANGES",
                 skip=() if ablations else ("backward", "srl", "noise_correction", "adversarial"))


def _run_config(a, cls, what: str):
    """The run's config: a new run takes defaults < --config FILE < flags; a resumed one
    (``--resume`` on a folder with a checkpoint) takes the saved config, where only
    ``--iters`` may differ (anything else given that differs is an error)."""
    from flashcore.train import common
    if getattr(a, "resume", False) and common.has_state(a.out):
        saved = common.saved_config(a.out)
        given = {k: v for k, v in given_config(a, cls).items() if k != "iters"}
        if a.config:
            given.update({k: ("--config " + a.config, v)
                          for k, v in read_config_file(a.config, cls).items() if k != "iters"})
        check_resume(a.out, saved, given, what)
        return build_config(lambda: cls(**{**saved, **({"iters": a.iters} if a.iters else {})}))
    base = {"teacher": DEFAULT_TEACHER, "classifier": DEFAULT_CLASSIFIER}
    if a.config:
        base.update(read_config_file(a.config, cls))
    base.update({k: v for k, (_, v) in given_config(a, cls).items()})
    cfg = build_config(lambda: cls(**base))
    distill_memory(cfg, cfg.val_samples if cfg.val_every else None)     # a resumed run keeps its sizes
    # bf16 as it will run (off on a CPU without native bf16), so that the printed config is the saved one
    from flashcore.devices import resolve_device
    return common.native_bf16(cfg, resolve_device(_device(a)), what)


def _distill_command_flags(cfg) -> list[str]:
    """The distill flags that give ``cfg`` (teacher, steps, iters, seed always; the rest if not default)."""
    return command_flags(cfg, always=("teacher", "steps", "iters", "seed"))


def _print_config(cfg) -> None:
    import dataclasses
    print("config: " + json.dumps(dataclasses.asdict(cfg), sort_keys=True), flush=True)


def _add_distill(sub):
    p = _command(sub, "distill", "Imagine Flash: distil a teacher into a 1-4 step student "
                                 "(under torchrun: DDP over the processes)")
    _distill_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (only --iters may differ from the run's settings)")
    _add_device_flag(p)
    return p


def cmd_distill(a) -> int:
    from flashcore.train.distill import DistillConfig, distill
    cfg = _run_config(a, DistillConfig, "distill")
    _print_config(cfg)
    out = distill(cfg, a.out, resume=a.resume, device=_device(a))
    print(f"student saved to {out}")
    return 0


def _add_ablate(sub):
    p = _command(sub, "ablate", "the full method against each ablation and forward distillation, "
                                "same budget and seed: a table and a picture")
    _distill_flags(p, ablations=False)
    p.add_argument("--samples", type=_samples, default=1000, help="samples per flashcore eval")
    p.add_argument("--variants", default=None, help="comma list (default: all): full,forward,no-srl,"
                                                    "no-noise-correction,no-adversarial")
    p.add_argument("--features", nargs="+", default=None, metavar="DIR",
                   help="feature networks of the evals (default: eval's headline spaces, which are MNIST's)")
    _add_device_flag(p)
    return p


def cmd_ablate(a) -> int:
    from flashcore.train.ablate import ablate
    from flashcore.train.distill import DistillConfig
    cfg = _run_config(a, DistillConfig, "ablate")
    distill_memory(cfg, max(a.samples, cfg.val_samples if cfg.val_every else 0))
    _print_config(cfg)
    command = " ".join(["flashcore ablate"] + _distill_command_flags(cfg) + ["--out", a.out, "--samples", str(a.samples)]
                       + (["--variants", a.variants] if a.variants else [])
                       + (["--features", *a.features] if a.features else []))
    res = ablate(cfg, a.out, cfg.classifier, samples=a.samples,
                 variants=a.variants.split(",") if a.variants else None, flags_of=_distill_command_flags,
                 command=command, device=_device(a), features=a.features)
    print(open(os.path.join(a.out, "ablation.md")).read())
    print(f"table: {os.path.join(a.out, 'ablation.md')}, picture: {os.path.join(a.out, 'ablation.png')}, "
          f"{len(res['rows'])} rows")
    return 0


def _add_disback(sub):
    from flashcore.train.disback import DisBackConfig
    p = _command(sub, "disback", "DisBack: record a degradation path from the teacher to the untrained "
                                 "generator, then distil a 1-4 step student back along it to the teacher "
                                 "(docs/disback.md; under torchrun: DDP over the processes)")
    p.add_argument("--config", default=None,
                   help="a JSON or YAML file of DisBackConfig fields; flags given as well override it")
    p.add_argument("--out", required=True, type=out_dir, help="run directory (path/, state/, student/, logs)")
    config_flags(p, DisBackConfig, "disback", "DISBACK_RANGES")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly, in either stage (only --iters may differ)")
    _add_device_flag(p)
    return p


def cmd_disback(a) -> int:
    from flashcore.train.disback import DisBackConfig, disback
    cfg = _run_config(a, DisBackConfig, "disback")
    _print_config(cfg)
    out = disback(cfg, a.out, resume=a.resume, device=_device(a))
    print(f"student saved to {out}")
    return 0


def _list_of(parse, what: str):
    """argparse ``type`` of a comma list, each item parsed by ``parse``."""
    import argparse

    def of(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {text!r}")
        return tuple(parse(x) for x in items)
    of.__name__ = what
    return of


def _method_names(text: str):
    import argparse

    from flashcore.train.compare import check_methods
    try:
        return check_methods(x.strip() for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("compare: ")) from None


def _add_compare(sub):
    from .validation import COUNT, PROBABILITY, SEED, Range
    from flashcore.train.compare import DEFAULT_METHODS
    p = _command(sub, "compare", "the distillation methods head to head: same teacher, same number of generator "
                                 "updates, several seeds; a table (mean and spread over seeds, eval's protocol), "
                                 "a picture, curves and JSON (docs/compare.md); a rerun skips finished cells")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher checkpoint directory")
    p.add_argument("--out", required=True, type=out_dir, help="folder of the comparison (cells/, compare.md, ...)")
    p.add_argument("--methods", type=_method_names, default=DEFAULT_METHODS,
                   help="comma list (default: " + ",".join(DEFAULT_METHODS) + ")")
    p.add_argument("--steps", type=_list_of(Range(int, 1, 4).parse, "step counts"), default=(1, 2, 3),
                   help="comma list of student step counts (default: 1,2,3)")
    p.add_argument("--seeds", type=_list_of(SEED.parse, "seeds"), default=(0, 1, 2),
                   help="comma list of training seeds (default: 0,1,2)")
    p.add_argument("--iters", type=COUNT.parse, default=2000, help="generator updates of every run (the budget)")
    p.add_argument("--batch-size", type=COUNT.parse, default=64, help="images per update")
    p.add_argument("--samples", type=_samples, default=2000, help="samples per headline eval")
    p.add_argument("--curve-every", type=Range(int, 0, 10 ** 9).parse, default=200,
                   help="score the last EMA generator every N updates for the curves (0: no curves)")
    p.add_argument("--curve-samples", type=_samples, default=500, help="samples per curve point")
    p.add_argument("--val-every", type=Range(int, 0, 10 ** 9).parse, default=100,
                   help="validation interval of every run (picks its exported student; 0: the last)")
    p.add_argument("--val-samples", type=Range(int, 20, 10 ** 9).parse, default=500,
                   help="samples per validation FD")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="validation feature network of every run")
    p.add_argument("--features", nargs="+", default=None, metavar="DIR",
                   help="headline feature networks (default: eval's, checkpoints/mnist-features-bncnn and -mlp)")
    p.add_argument("--ddil-beta-fwd", type=PROBABILITY.parse, default=0.3,
                   help="imagine-flash-ddil: prior of forward-noised real images")
    p.add_argument("--ddil-beta-teacher", type=PROBABILITY.parse, default=0.2,
                   help="imagine-flash-ddil: prior of teacher rollouts (student rollouts: the rest)")
    p.add_argument("--ddil-clip", type=Range(float, 0, 100).parse, default=1.0,
                   help="imagine-flash-ddil: reflection, x0 clamped to [-clip, clip]")
    p.add_argument("--teacher-steps", type=Range(int, 0, 10 ** 4).parse, default=50,
                   help="the teacher's reference row: its CFG sampler at this many steps (0: none)")
    p.add_argument("--distill-config", default=None, metavar="FILE",
                   help="JSON or YAML of further DistillConfig fields for every distill method (e.g. lr)")
    p.add_argument("--disback-config", default=None, metavar="FILE",
                   help="JSON or YAML of further DisBackConfig fields (default: path and switching scaled to "
                        "--iters, docs/compare.md)")
    _add_device_flag(p)
    return p


def cmd_compare(a) -> int:
    from flashcore.evaluate import is_validation_space
    from flashcore.train.compare import CompareConfig, compare
    from flashcore.train.disback import DisBackConfig
    from flashcore.train.distill import DistillConfig
    from .cli_checks import UsageError
    for f in a.features or ():
        if is_validation_space(f, a.classifier):
            raise UsageError(f"--features: {f!r} is the validation classifier that picks the students; pass "
                             "other feature networks")
    cc = build_config(lambda: CompareConfig(
        teacher=a.teacher, classifier=a.classifier, methods=a.methods, steps=a.steps, seeds=a.seeds,
        iters=a.iters, batch_size=a.batch_size, samples=a.samples, curve_every=a.curve_every,
        curve_samples=a.curve_samples, val_every=a.val_every, val_samples=a.val_samples, features=a.features,
        ddil_beta_fwd=a.ddil_beta_fwd, ddil_beta_teacher=a.ddil_beta_teacher, ddil_clip=a.ddil_clip,
        teacher_steps=a.teacher_steps,
        distill=read_config_file(a.distill_config, DistillConfig) if a.distill_config else {},
        disback=read_config_file(a.disback_config, DisBackConfig) if a.disback_config else {}))
    from flashcore.train.compare import cell_config, cells_of
    for c in cells_of(cc):                  # every cell's config is valid before anything trains
        cfg = build_config(lambda: cell_config(cc, *c))
    distill_memory(cfg, max(a.samples, a.curve_samples, a.val_samples if a.val_every else 0))
    given = [("--methods", ",".join(a.methods)), ("--steps", ",".join(map(str, a.steps))),
             ("--seeds", ",".join(map(str, a.seeds))), ("--iters", a.iters), ("--batch-size", a.batch_size),
             ("--samples", a.samples), ("--curve-every", a.curve_every), ("--curve-samples", a.curve_samples),
             ("--val-every", a.val_every), ("--val-samples", a.val_samples)]
    command = " ".join(["flashcore compare", "--teacher", a.teacher, "--out", a.out]
                       + [f"{k} {v}" for k, v in given]
                       + (["--features", *a.features] if a.features else [])
                       + [f"--{k} {v}" for k, v in (("distill-config", a.distill_config),
                                                    ("disback-config", a.disback_config)) if v])
    res = compare(cc, a.out, command=command, device=_device(a))
    print(open(os.path.join(a.out, "compare.md")).read())
    print(f"table: {os.path.join(a.out, 'compare.md')}, picture: {os.path.join(a.out, 'compare.png')}, "
          f"JSON: {os.path.join(a.out, 'compare.json')}, {len(res['rows'])} rows of {len(res['cells'])} runs")
    return 0


DISTILL_COMMANDS = {
    "distill": (_add_distill, cmd_distill),
    "disback": (_add_disback, cmd_disback),
    "ablate": (_add_ablate, cmd_ablate),
    "compare": (_add_compare, cmd_compare),
}
