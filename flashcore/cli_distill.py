"""The distillation commands of ``flashcore`` (entry layer): distill (Imagine Flash,
DDIL), disback and ablate. Their flags are derived from the config dataclasses'
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
    return cfg


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


DISTILL_COMMANDS = {
    "distill": (_add_distill, cmd_distill),
    "disback": (_add_disback, cmd_disback),
    "ablate": (_add_ablate, cmd_ablate),
}
