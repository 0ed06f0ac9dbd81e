"""``flashcore compare``: the distillation methods head to head on one teacher, one
budget and several seeds (docs/compare.md).

A cell is one (method, steps, seed): one ``flashcore distill`` or ``flashcore
disback`` run in ``OUT/cells/<method>-<n>step-seed<k>/run``. Cells are trained in
chunks of ``curve_every`` generator updates, each chunk a resume of the run
(resume is exact, so the run is the one an uninterrupted command makes); after
each chunk the last EMA generator is scored on ``curve_samples`` samples for the
curves. The finished run's exported student (the validation-selected EMA, the
rule every row shares) is then scored with ``flashcore eval``'s protocol on
``samples`` samples. Everything a cell produces is a file in its folder
(``timing.json``, ``curve.json``, ``eval.json``, ``result.json``), so running the
same command again skips what is done and continues a cell from its last chunk.

The report (table, picture, curves, JSON) is ``train/compare_report.py``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from flashcore.checkpoint import read_json, write_json

from . import common
from .ablate import _eval_cached

# the DisBack defaults' proportions, kept when --iters changes (docs/compare.md):
# stage 1 records path_every * N = PATH_SHARE * iters degradation iterations, and the
# real score model reaches the teacher after TEACHER_AT * iters generator updates
PATH_SHARE = 0.5
TEACHER_AT = 0.4


@dataclass(frozen=True)
class Method:
    name: str
    trainer: str              # "distill" or "disback"
    what: str
    unavailable: str = ""     # why it cannot run ("": it can)


METHODS = (
    Method("imagine-flash", "distill", "Imagine Flash: backward distillation, SRL, noise correction, discriminator"),
    Method("imagine-flash-ddil", "distill", "Imagine Flash with DDIL's state mixture and reflection"),
    Method("disback", "disback", "DisBack: a degradation path, then score distillation backtracking along it"),
    Method("disback-ddil", "disback", "DisBack with DDIL's state mixture and reflection",
           unavailable="DisBack has no DDIL fields yet (its states are its own backward simulation and it "
                       "never thresholds x0; docs/compare.md says where DDIL would fit)"),
    Method("forward", "distill", "forward distillation (the baseline): states are real images noised to t"),
)
BY_NAME = {m.name: m for m in METHODS}
DEFAULT_METHODS = tuple(m.name for m in METHODS if not m.unavailable)
# compare sets these in every cell: a --distill-config / --disback-config file may not
OWN_FIELDS = ("teacher", "steps", "seed", "iters", "batch_size", "val_every", "val_samples", "classifier")
DDIL_FIELDS = ("beta_fwd", "beta_teacher", "beta_student", "clip", "fwd_share", "backward")


def check_methods(names) -> tuple[str, ...]:
    """The method names, checked: an unknown or unavailable one is a ValueError of one line."""
    names = tuple(names)
    if not names:
        raise ValueError("compare: no method given")
    for n in names:
        if n not in BY_NAME:
            raise ValueError(f"compare: unknown method {n!r}; known: {', '.join(BY_NAME)}")
        if BY_NAME[n].unavailable:
            raise ValueError(f"compare: {n} cannot run: {BY_NAME[n].unavailable}")
    if len(set(names)) != len(names):
        raise ValueError(f"compare: a method is named twice in {','.join(names)}")
    return names


@dataclass
class CompareConfig:
    """The head-to-head's settings; the cells' training configs are built from them
    (``cell_config``). ``distill`` and ``disback`` hold further fields of those
    configs (from --distill-config / --disback-config), for every cell of that trainer."""
    teacher: str
    classifier: str
    methods: tuple = DEFAULT_METHODS
    steps: tuple = (1, 2, 3)
    seeds: tuple = (0, 1, 2)
    iters: int = 2000
    batch_size: int = 64
    samples: int = 2000
    curve_every: int = 200
    curve_samples: int = 500
    val_every: int = 100
    val_samples: int = 500
    features: tuple | None = None
    ddil_beta_fwd: float = 0.3
    ddil_beta_teacher: float = 0.2
    ddil_clip: float = 1.0
    teacher_steps: int = 50
    distill: dict = field(default_factory=dict)
    disback: dict = field(default_factory=dict)

    def __post_init__(self):
        from .distill import MAX_STUDENT_STEPS, DistillConfig
        from .disback import DisBackConfig
        self.methods = check_methods(self.methods)
        self.steps, self.seeds = tuple(self.steps), tuple(self.seeds)
        self.features = tuple(self.features) if self.features else None
        for name, values in (("steps", self.steps), ("seeds", self.seeds)):
            if not values or len(set(values)) != len(values):
                raise ValueError(f"compare: --{name} must be a list without repeats, got {values}")
        if any(s not in range(1, MAX_STUDENT_STEPS + 1) for s in self.steps):
            raise ValueError(f"compare: --steps must be in 1..{MAX_STUDENT_STEPS}, got {self.steps}")
        if self.val_every and self.curve_every and self.curve_every < self.val_every:
            # a chunk that ends before the first validation would validate there, which an
            # uninterrupted run does not: the selected student could differ
            raise ValueError(f"compare: --curve-every ({self.curve_every}) must be at least --val-every "
                             f"({self.val_every}), or 0")
        for what, cls, given in (("--distill-config", DistillConfig, self.distill),
                                 ("--disback-config", DisBackConfig, self.disback)):
            names = {f.name for f in dataclasses.fields(cls)}
            for k in given:
                if k not in names:
                    raise ValueError(f"compare: {what}: {k!r} is not a {cls.__name__} field")
                if k in OWN_FIELDS or (cls is DistillConfig and k in DDIL_FIELDS):
                    raise ValueError(f"compare: {what}: {k!r} is set by compare itself (a flag of compare, "
                                     "or what tells the methods apart)")

    def training_settings(self) -> dict:
        """What every cell's training depends on: a rerun in the same folder must keep it."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in ("teacher", "classifier", "iters", "batch_size", "curve_every", "curve_samples",
                                  "val_every", "val_samples", "ddil_beta_fwd", "ddil_beta_teacher", "ddil_clip",
                                  "distill", "disback")}


def _disback_schedule(cc: CompareConfig) -> dict:
    """path_every and switch_every in DisBack's default proportions to the budget,
    unless the --disback-config file sets them."""
    from .disback import DisBackConfig
    n = cc.disback.get("path_checkpoints", DisBackConfig.path_checkpoints)
    out = {"path_every": max(1, round(PATH_SHARE * cc.iters / n)),
           "switch_every": max(1, round(TEACHER_AT * cc.iters / max(1, n - 1)))}
    return {k: v for k, v in out.items() if k not in cc.disback}


def cell_config(cc: CompareConfig, method: str, steps: int, seed: int):
    """The DistillConfig or DisBackConfig of one cell."""
    common_fields = {"teacher": cc.teacher, "classifier": cc.classifier, "steps": steps, "seed": seed,
                     "iters": cc.iters, "batch_size": cc.batch_size, "val_every": cc.val_every,
                     "val_samples": cc.val_samples}
    if BY_NAME[method].trainer == "disback":
        from .disback import DisBackConfig
        return DisBackConfig(**{**cc.disback, **_disback_schedule(cc), **common_fields})
    from .distill import DistillConfig
    over = {"forward": {"backward": False},
            "imagine-flash-ddil": {"beta_fwd": cc.ddil_beta_fwd, "beta_teacher": cc.ddil_beta_teacher,
                                   "clip": cc.ddil_clip}}.get(method, {})
    return DistillConfig(**{**cc.distill, **over, **common_fields})


def cell_name(method: str, steps: int, seed: int) -> str:
    return f"{method}-{steps}step-seed{seed}"


def cells_of(cc: CompareConfig) -> list[tuple[str, int, int]]:
    return [(m, s, k) for m in cc.methods for s in cc.steps for k in cc.seeds]


def cell_command(cfg, run_dir: str) -> str:
    """The distill or disback command that trains this cell's run in one go."""
    from flashcore.validation import command_flags
    what = "disback" if type(cfg).__name__ == "DisBackConfig" else "distill"
    return " ".join([f"flashcore {what}"] + command_flags(cfg, always=("teacher", "steps", "iters", "seed"))
                    + ["--out", run_dir])


# ---- one cell ---------------------------------------------------------------------------------

def _position(run: str, disback: bool) -> tuple[str, int]:
    """(stage, iteration) of a run's last checkpoint: stage "path" or "backtrack" for
    DisBack, "train" for distill; ("path"/"train", 0) before any checkpoint."""
    if not common.has_state(run):
        return ("path" if disback else "train"), 0
    stage = common.saved_extra(run).get("stage", "path") if disback else "train"
    return stage, common.saved_step(run)


def _log_seconds(path: str, lo: int, hi: int) -> float | None:
    """Seconds the log's rows with step in (lo, hi] took: the last row's ``seconds``
    (each training call's log clock starts when its loop does)."""
    if not os.path.exists(path):
        return None
    lines = open(path).read().splitlines()
    if not lines:
        return None
    names = lines[0].split(",")
    if "seconds" not in names:
        return None
    si, ti = names.index("step"), names.index("seconds")
    vals = [float(r.split(",")[ti]) for r in lines[1:] if r and lo < int(r.split(",")[si]) <= hi]
    return max(vals) if vals else None


def _reduced(r: dict) -> dict:
    """The figures of an eval a curve keeps."""
    keep = ("fd", "fd_floor", "precision", "recall", "density", "coverage", "accuracy")
    return {"samples": r["samples"], "seed": r["seed"], "seconds": r["seconds"],
            "feature_spaces": {n: {k: s[k] for k in keep} for n, s in r["feature_spaces"].items()}}


def _features(cc: CompareConfig):
    return list(cc.features) if cc.features else None


def _curve_point(cc: CompareConfig, cfg, run: str, it: int, curve: dict, device) -> None:
    """Score the last EMA generator at update ``it`` on ``curve_samples`` samples."""
    from flashcore.validation import sampling_clip
    from flashcore.evaluate import evaluate
    last = os.path.join(run, "student-last" if cfg.val_every else "student")
    path = os.path.join(last, "config.json")
    meta = read_json(path) if os.path.exists(path) else {}
    if meta.get("train_iters") != it:      # a crash between the state's save and the export: no point
        curve[str(it)] = None
        return
    r = evaluate(last, _features(cc), steps=cfg.steps, samples=cc.curve_samples, seed=0,
                 noise_correction=cfg.noise_correction, clip=sampling_clip(meta, None), device=device)
    curve[str(it)] = _reduced(r)


def run_cell(cc: CompareConfig, out: str, method: str, steps: int, seed: int, device=None, note=None) -> dict:
    """Train (or continue) one cell, score it and return its result (also ``result.json``)."""
    from flashcore.validation import sampling_clip
    from .disback import disback
    from .distill import distill
    cfg = cell_config(cc, method, steps, seed)
    is_db = BY_NAME[method].trainer == "disback"
    train = disback if is_db else distill
    cdir = os.path.join(out, "cells", cell_name(method, steps, seed))
    run = os.path.join(cdir, "run")
    os.makedirs(cdir, exist_ok=True)
    tpath, cpath = os.path.join(cdir, "timing.json"), os.path.join(cdir, "curve.json")
    timing = read_json(tpath) if os.path.exists(tpath) else {"segments": []}
    curve = read_json(cpath) if os.path.exists(cpath) else {}
    path_total = cfg.path_checkpoints * cfg.path_every if is_db else 0
    while True:
        stage, it = _position(run, is_db)
        if (stage != "path" and it and cc.curve_every and (it % cc.curve_every == 0 or it == cfg.iters)
                and str(it) not in curve):
            _curve_point(cc, cfg, run, it, curve, device)     # here, so a crash during it costs nothing
            write_json(cpath, curve)
        if stage != "path" and it >= cfg.iters:
            break
        if stage == "path":
            n = path_total - it           # the call ends at backtracking's update 0
        else:
            n = cfg.iters - it
            if cc.curve_every:
                n = min(n, cc.curve_every - it % cc.curve_every)
        if note:
            note(f"{cell_name(method, steps, seed)} {'path' if stage == 'path' else 'update'} {it}")
        t0 = time.perf_counter()
        try:
            train(cfg, run, resume=common.has_state(run), progress=False, max_iters_this_call=n, device=device)
        finally:
            # the time of a call counts once its iterations are in a checkpoint
            stage2, it2 = _position(run, is_db)
            if (stage2, it2) != (stage, it):
                end = it2 if stage2 == stage else path_total
                log = os.path.join(run, "path.csv" if stage == "path" else "loss.csv")
                timing["segments"].append({"stage": stage, "from": it, "to": end,
                                           "seconds": time.perf_counter() - t0,
                                           "loop_seconds": _log_seconds(log, it, end)})
                write_json(tpath, timing)
    student = os.path.join(run, "student")
    meta = read_json(os.path.join(student, "config.json"))
    ev = _eval_cached(os.path.join(cdir, "eval.json"), student, steps, cc.samples, _features(cc), seed=seed,
                      noise_correction=cfg.noise_correction, clip=sampling_clip(meta, None), device=device)
    segs = timing["segments"]
    stage2_secs = sum(s["seconds"] for s in segs if s["stage"] != "path")
    result = {
        "method": method, "steps": steps, "seed": seed, "trainer": "disback" if is_db else "distill",
        "run": os.path.relpath(run, out), "command": cell_command(cfg, run),
        "config": dataclasses.asdict(cfg),
        "path_iters": path_total,
        "seconds": sum(s["seconds"] for s in segs),
        "path_seconds": sum(s["seconds"] for s in segs if s["stage"] == "path"),
        "seconds_per_update": stage2_secs / cfg.iters,
        "loop_seconds": sum(s["loop_seconds"] or 0.0 for s in segs),
        "selected_iter": meta.get("validation", {}).get("iter", meta.get("train_iters")),
        "clip": sampling_clip(meta, None), "noise_correction": cfg.noise_correction,
        "eval": ev, "curve": curve, "segments": segs,
    }
    write_json(os.path.join(cdir, "result.json"), result)
    return result


def _cell_done(cc: CompareConfig, out: str, cell) -> dict | None:
    """A cell's saved result if it is complete for these eval settings, else None."""
    path = os.path.join(out, "cells", cell_name(*cell), "result.json")
    if not os.path.exists(path):
        return None
    r = read_json(path)
    ev = r.get("eval", {})
    asked = list(cc.features) if cc.features else None
    return r if ev.get("samples") == cc.samples and ev.get("features_asked", 0) == asked else None


# ---- the whole comparison -------------------------------------------------------------------

def compare(cc: CompareConfig, out: str, *, progress: bool = True, command: str | None = None,
            device=None) -> dict:
    """Run every cell not done yet, then write the report; returns compare.json's dict."""
    with common.run_folder(out, resume=None, what="compare"):
        try:
            return _compare(cc, out, progress=progress, command=command, device=device)
        except common.Interrupted as e:      # continuing a comparison is running it again
            raise common.RunError(f"compare: interrupted by {e.signame} at {e.unit} {e.step} of {e.total} of "
                                  f"{e.run_dir!r}; its checkpoint is saved, run the same compare command again "
                                  "to continue") from None


def _check_settings(cc: CompareConfig, out: str) -> None:
    path = os.path.join(out, "settings.json")
    want = cc.training_settings()
    if os.path.exists(path):
        have = read_json(path)
        for k, v in want.items():
            if k in ("teacher", "classifier"):
                same = os.path.realpath(str(v)) == os.path.realpath(str(have.get(k)))
            else:
                same = have.get(k) == v
            if not same:
                raise common.RunError(f"compare: {out!r} was started with {k} = {have.get(k)!r}, not {v!r}; "
                                      "its finished cells would not be comparable: use another --out")
    else:
        write_json(path, want)


def _compare(cc: CompareConfig, out: str, *, progress: bool, command: str | None, device) -> dict:
    from . import compare_report
    os.makedirs(out, exist_ok=True)
    _check_settings(cc, out)
    cells = cells_of(cc)
    done = {c: _cell_done(cc, out, c) for c in cells}
    bar = common.progress(len(cells), sum(r is not None for r in done.values()), "compare cells", progress)
    results = []
    try:
        for c in cells:
            r = done[c]
            if r is None:
                bar.set_postfix_str(cell_name(*c))
                r = run_cell(cc, out, *c, device=device,
                             note=lambda s: bar.set_postfix_str(s) if progress else None)
                bar.update(1)
            results.append(r)
    finally:
        bar.close()
    teacher = None
    if cc.teacher_steps:
        teacher = _eval_cached(os.path.join(out, "teacher", f"eval-{cc.teacher_steps}step.json"), cc.teacher,
                               cc.teacher_steps, cc.samples, _features(cc), device=device)
    return compare_report.write(cc, out, results, teacher, command=command, device=device)
