"""``flashcore ablate``: the full Imagine Flash recipe against each ablation and
forward distillation, with one budget and one seed, then one table and one
picture.

Every variant is a ``flashcore distill`` run in ``OUT/runs/<variant>`` (resumed
if an earlier ``ablate`` stopped part-way; a finished run is not trained
again), its exported student (the validation-selected EMA, the same rule for
every row) evaluated with ``flashcore eval`` at 1..n steps. The teacher's own
n-step and 50-step CFG sampling are the reference rows. Results go to
``OUT/ablation.md`` (with each row's command), ``OUT/ablation.json`` and
``OUT/ablation.png`` (the same labels and noise in every row).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from flashcore.checkpoint import portable_path, read_json, write_json

from . import common
from .distill import DistillConfig, distill

# (row name, config overrides, the distill flag that gives them)
VARIANTS = [
    ("full", {}, ""),
    ("forward", {"backward": False}, "--no-backward"),
    ("no-srl", {"srl": False}, "--no-srl"),
    ("no-noise-correction", {"noise_correction": False}, "--no-noise-correction"),
    ("no-adversarial", {"adversarial": False}, "--no-adversarial"),
]
DESCRIPTION = {
    "full": "backward distillation + SRL + noise correction + discriminator",
    "forward": "forward distillation: the student starts from noised real images",
    "no-srl": "target from the student's own state x_t (tau = t), no re-noised x0",
    "no-noise-correction": "no noise correction at t = T (training rollouts and sampling)",
    "no-adversarial": "no discriminator term",
}
TEACHER_REFERENCE_STEPS = 50


def _eval_cached(path: str, model: str, steps: int, samples: int, features: list[str] | None, *,
                 seed: int = 0, **kw) -> dict:
    """``flashcore eval`` in the given feature spaces (default: eval's headline ones,
    never the validation classifier that picked the students), with sampling seed
    ``seed``, cached in ``path``. A cached file is reused only when it answers the same
    request: model, samples, steps, seed, feature spaces and every other argument in ``kw``
    as given (None, "the model's own", is a value of its own), recorded in the file as
    ``request``; anything else is evaluated afresh, so the same command gives the same JSON."""
    from flashcore.evaluate import evaluate
    asked = list(features) if features else None
    request = json.loads(json.dumps({"model": model, "samples": samples, "steps": steps, "seed": seed,
                                     "features": asked, **{k: kw[k] for k in sorted(kw)}}, default=str))
    if os.path.exists(path):
        r = read_json(path)
        if r.get("request") == request:
            return r
    r = {**evaluate(model, features, steps=steps, samples=samples, seed=seed, **kw), "features_asked": asked,
         "request": request}
    write_json(path, r)
    return r


def _finished(run_dir: str, iters: int) -> bool:
    step = common.saved_step(run_dir)
    return step is not None and step >= iters


def row_command(cfg: DistillConfig, run_dir: str, flag: str, flags_of) -> str:
    return " ".join(["flashcore distill"] + flags_of(cfg) + ["--out", run_dir] + ([flag] if flag else []))


def ablate(base: DistillConfig, out: str, classifier: str, *, samples: int = 1000,
           variants: list[str] | None = None, flags_of=None, progress: bool = True,
           command: str | None = None, device=None, features: list[str] | None = None) -> dict:
    """Train and evaluate every variant; returns the results dict written to ablation.json."""
    with common.run_folder(out, resume=None, what="ablate"):
        try:
            return _ablate(base, out, classifier, samples=samples, variants=variants, flags_of=flags_of,
                           progress=progress, command=command, device=device, features=features)
        except common.Interrupted as e:          # resuming an ablation is running it again, not --resume
            raise common.RunError(f"ablate: interrupted by {e.signame} at iteration {e.step} of {e.total} of "
                                  f"{e.run_dir!r}; its checkpoint is saved, run the same ablate command again "
                                  f"to continue") from None


def _ablate(base: DistillConfig, out: str, classifier: str, *, samples: int, variants: list[str] | None,
            flags_of, progress: bool, command: str | None, device=None,
            features: list[str] | None = None) -> dict:
    from flashcore.evaluate import generate
    from flashcore.images import labelled_rows
    from flashcore.models import load_pretrained
    chosen = [v for v in VARIANTS if variants is None or v[0] in variants]
    if variants is not None and len(chosen) != len(set(variants)):
        known = ", ".join(v[0] for v in VARIANTS)
        raise ValueError(f"ablate: unknown variant in {variants}; known: {known}")
    n = base.steps
    os.makedirs(out, exist_ok=True)
    rows = []
    for name, over, flag in chosen:
        cfg = dataclasses.replace(base, **over)
        run_dir = os.path.join(out, "runs", name)
        if not _finished(run_dir, cfg.iters):
            print(f"ablate: training {name!r} ({DESCRIPTION[name]}) in {run_dir}", flush=True)
            distill(cfg, run_dir, resume=common.has_state(run_dir), progress=progress, device=device)
        student = os.path.join(run_dir, "student")
        meta = read_json(os.path.join(student, "config.json"))
        evals = {s: _eval_cached(os.path.join(run_dir, f"eval-{s}step.json"), student, s, samples, features,
                                 seed=base.seed, noise_correction=cfg.noise_correction, device=device) for s in range(1, n + 1)}
        rows.append({"name": name, "what": DESCRIPTION[name], "run": run_dir, "model": student,
                     "command": row_command(cfg, run_dir, flag, flags_of) if flags_of else None,
                     "selected_iter": meta.get("validation", {}).get("iter", meta.get("train_iters")),
                     "noise_correction": cfg.noise_correction, "eval": evals})
    tdir = os.path.join(out, "teacher")
    os.makedirs(tdir, exist_ok=True)
    teacher_evals = {s: _eval_cached(os.path.join(tdir, f"eval-{s}step.json"), base.teacher, s,
                                     samples, features, seed=base.seed, compile=s == TEACHER_REFERENCE_STEPS,
                                     guidance=base.guidance, device=device)
                     for s in list(range(1, n + 1)) + [TEACHER_REFERENCE_STEPS]}
    result = {"command": command, "steps": n, "iters": base.iters, "seed": base.seed, "samples": samples, "teacher": base.teacher,
              "classifier": classifier, "config": dataclasses.asdict(base), "rows": rows,
              "teacher_rows": teacher_evals}
    paths = {k: portable_path(v, out) for k, v in (("teacher", base.teacher), ("classifier", classifier))}
    write_json(os.path.join(out, "ablation.json"), {**result, **paths, "config": {**result["config"], **paths}})
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(markdown(result))
    # the picture: the same labels and noise in every row, at the student's n steps
    labels = torch.arange(10).repeat(2)
    pics = []
    teacher, tmeta = load_pretrained(base.teacher)
    tg = float(base.guidance if base.guidance is not None else tmeta.get("guidance") or 1.0)
    for s in (TEACHER_REFERENCE_STEPS, n):
        x, _ = generate(teacher, tmeta, labels, steps=s, guidance=tg, seed=0)
        fd = teacher_evals[s]["fd"]
        pics.append((f"teacher {s} steps, CFG {tg:g}\nFD {fd:.1f}", x))
    for r in rows:
        model, meta = load_pretrained(r["model"])
        x, _ = generate(model, meta, labels, steps=n, guidance=1.0, noise_correction=r["noise_correction"], seed=0)
        pics.append((f"{r['name']}, {n} steps\nFD {r['eval'][n]['fd']:.1f}", x))
    labelled_rows(pics, os.path.join(out, "ablation.png"),
                  title=f"{n}-step students after {base.iters} iterations (seed {base.seed}) and the teacher")
    return result


def _shown(path: str) -> str:
    """A path as the table shows it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _recall(r: dict) -> str:
    space = r.get("feature_spaces", {}).get(r.get("headline_space"), {})
    return f"{space['recall']:.3f}" if "recall" in space else "-"


def markdown(res: dict) -> str:
    n = res["steps"]
    cols = list(range(1, n + 1))
    head = ["row", "what"] + [f"FD @{s}" for s in cols] + [f"acc @{s}" for s in cols] + [
        f"recall @{n}", f"washed @{n}", "selected iter"]
    space = res["teacher_rows"][str(n) if str(n) in res["teacher_rows"] else n].get("headline_space", "?")
    lines = [f"# Ablation: {n}-step students, {res['iters']} iterations each, seed {res['seed']}", "",
             f"FD, accuracy and recall from `flashcore eval` ({res['samples']} samples, sampling seed {res['seed']} "
             f"(the distillation seed), feature space "
             f"`{space}`, against the eval split; the JSON holds every headline space). Every student is the EMA "
             f"checkpoint that the validation FD (classifier `{_shown(res['classifier'])}`, train split, seed 1) "
             "picked during its run; that space is never reported here."]
    if res.get("command"):
        lines += ["", f"Produced by `{res['command']}`."]
    lines += ["",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = res["teacher_rows"]
    t = {int(k): v for k, v in t.items()}
    for s in [TEACHER_REFERENCE_STEPS]:
        lines.append(f"| teacher {s} steps | CFG {t[s]['guidance']:g}, {t[s]['nfe']} NFE | "
                     + " | ".join([f"{t[s]['fd']:.1f}" if c == n else "" for c in cols])
                     + " | " + " | ".join([f"{t[s]['accuracy']:.3f}" if c == n else "" for c in cols])
                     + f" | {_recall(t[s])} | {t[s]['washed_share']:.3f} | |")
    lines.append(f"| teacher DDIM | CFG {t[n]['guidance']:g}, noise corrected, 2 NFE a step | "
                 + " | ".join(f"{t[c]['fd']:.1f}" for c in cols) + " | "
                 + " | ".join(f"{t[c]['accuracy']:.3f}" for c in cols)
                 + f" | {_recall(t[n])} | {t[n]['washed_share']:.3f} | |")
    for r in res["rows"]:
        e = {int(k): v for k, v in r["eval"].items()}
        lines.append(f"| {r['name']} | {r['what']} | " + " | ".join(f"{e[c]['fd']:.1f}" for c in cols) + " | "
                     + " | ".join(f"{e[c]['accuracy']:.3f}" for c in cols)
                     + f" | {_recall(e[n])} | {e[n]['washed_share']:.3f} | {r['selected_iter']} |")
    lines += ["", "Commands (one per row):", "", "```"]
    lines += [r["command"] for r in res["rows"] if r["command"]]
    lines += ["```", ""]
    return "\n".join(lines)
