"""The report of ``flashcore compare`` (train/compare.py): one row per method and step
count, its figures the mean and spread over the seeds; ``OUT/compare.md`` (with every
cell's command), ``OUT/compare.json`` (every number), ``OUT/compare.png`` (the same
labels and noise in every row) and ``OUT/curves-<space>.png`` (FD and recall against
generator updates, one file per headline feature space)."""
from __future__ import annotations

import dataclasses
import math
import os

from flashcore.checkpoint import portable_path, write_json

METRICS = ("fd", "precision", "recall", "density", "coverage", "accuracy")
TABLE_METRICS = (("fd", "FD", ".1f"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"))
PICTURE_PER_CLASS = 2


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (n - 1; None for one value), min, max and the values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n, "values": values}


def cell_text(s: dict, fmt: str) -> str:
    """A table cell: mean ± standard deviation (just the mean for one seed)."""
    return format(s["mean"], fmt) + (f" ± {format(s['std'], fmt)}" if s["std"] is not None else "")


def _spaces(results: list[dict]) -> list[str]:
    return list(results[0]["eval"]["feature_spaces"]) if results else []


def aggregate(results: list[dict], methods, steps) -> list[dict]:
    """One row per (method, steps) present in ``results``, in the order asked."""
    rows = []
    for m in methods:
        for s in steps:
            cells = sorted((r for r in results if r["method"] == m and r["steps"] == s), key=lambda r: r["seed"])
            if not cells:
                continue
            spaces = {}
            for name in _spaces(cells):
                spaces[name] = {k: spread([c["eval"]["feature_spaces"][name][k] for c in cells]) for k in METRICS}
            curve = {}
            its = sorted(set.intersection(*({int(k) for k, v in c["curve"].items() if v} for c in cells)))
            for it in its:
                pts = [c["curve"][str(it)] for c in cells]
                curve[str(it)] = {name: {k: spread([p["feature_spaces"][name][k] for p in pts]) for k in ("fd", "recall")}
                             for name in pts[0]["feature_spaces"]}
            rows.append({"method": m, "steps": s, "seeds": [c["seed"] for c in cells],
                         "feature_spaces": spaces,
                         "seconds": spread([c["seconds"] for c in cells]),
                         "path_seconds": spread([c["path_seconds"] for c in cells]),
                         "seconds_per_update": spread([c["seconds_per_update"] for c in cells]),
                         "selected_iter": [c["selected_iter"] for c in cells],
                         "commands": [c["command"] for c in cells], "curve": curve})
    return rows


def markdown(res: dict) -> str:
    spaces = res["spaces"]
    head = ["method", "steps"] + [f"{label} {sp}" for sp in spaces for _, label, _ in TABLE_METRICS] + [
        "wall-clock s", "s / update", "selected iter"]
    seeds = ", ".join(map(str, res["seeds"]))
    lines = [f"# Head to head: {res['iters']} generator updates a run, seeds {seeds}", "",
             f"Every figure is `flashcore eval`'s protocol (`flashcore.evaluate`): {res['samples']} samples "
             "(sampling seed = the run's distillation seed; the teacher's row: seed 0), clamped to [-1, 1] and "
             "rounded to 8 bits, against the eval split, in the "
             f"headline feature spaces {', '.join(f'`{s}`' for s in spaces)}. Each run's student is the EMA "
             f"generator its validation FD (classifier `{res['classifier']}`, train split) picked; that space is "
             "never reported. A cell is mean ± sample standard deviation over the seeds (one training run "
             "each); `compare.json` holds every seed's figures and the precision/recall floors.", "",
             "Budget: the same number of generator updates (`--iters`) for every method. DisBack's degradation "
             "recording comes on top (" + (f"{res['path_iters']} iterations" if res.get("path_iters") else
                                           "no DisBack row") + "). Wall-clock: seconds of the training "
             "commands (set-up, validation and checkpoints included; DisBack's recording included), "
             "s / update: the seconds of the generator-update stage over `--iters`."]
    if res.get("command"):
        lines += ["", f"Produced by `{res['command']}`."]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = res.get("teacher")
    if t:
        cells = [format(t["feature_spaces"][sp][k], fmt) for sp in spaces for k, _, fmt in TABLE_METRICS]
        lines.append(f"| teacher, CFG {t['guidance']:g} | {t['steps']} | " + " | ".join(cells) + " | | | |")
    for r in res["rows"]:
        cells = [cell_text(r["feature_spaces"][sp][k], fmt) for sp in spaces for k, _, fmt in TABLE_METRICS]
        lines.append(f"| {r['method']} | {r['steps']} | " + " | ".join(cells)
                     + f" | {cell_text(r['seconds'], '.0f')} | {cell_text(r['seconds_per_update'], '.2f')} | "
                     + ", ".join(map(str, r["selected_iter"])) + " |")
    if res.get("unavailable"):
        lines += [""] + [f"Not run: {name}: {why}." for name, why in res["unavailable"].items()]
    if res["curve_every"]:
        note = ("" if res["curve_samples"] >= res["samples"] else
                f" These points use {res['curve_samples']} samples, not the table's {res['samples']}: they are "
                "not the headline protocol, and their FD sits higher (FD falls with the sample count).")
        lines += ["", f"Curves (`curves-<space>.png`): the last EMA generator every {res['curve_every']} updates, "
                      "scored as above but not validation-selected." + note]
    lines += ["", "Commands (one training run per cell; `compare` runs each in chunks of the curve interval, "
                  "resuming exactly):", "", "```"]
    lines += [c for r in res["rows"] for c in r["commands"]]
    lines += ["```", ""]
    return "\n".join(lines)


def _curves(res: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flashcore.checkpoint import atomic_write
    paths = []
    steps = list(res["steps"])
    for sp in res["spaces"]:
        fig, axes = plt.subplots(2, len(steps), figsize=(4.2 * len(steps), 6.4), squeeze=False)
        for j, s in enumerate(steps):
            for i, (k, label) in enumerate((("fd", "FD"), ("recall", "recall"))):
                ax = axes[i][j]
                for r in res["rows"]:
                    if r["steps"] != s or not r["curve"]:
                        continue
                    its = sorted(int(x) for x in r["curve"])
                    pts = [r["curve"][str(it)] for it in its]
                    mean = [p[sp][k]["mean"] for p in pts]
                    sd = [p[sp][k]["std"] or 0.0 for p in pts]
                    line, = ax.plot(its, mean, marker="o", ms=3, label=r["method"])
                    ax.fill_between(its, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                                    color=line.get_color(), alpha=0.15)
                ax.set_title(f"{s} step{'s' if s > 1 else ''}: {label} ({sp})", fontsize=9)
                ax.set_xlabel("generator updates", fontsize=8)
                ax.tick_params(labelsize=7)
                if k == "fd":
                    ax.set_yscale("log")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"mean ± std over seeds {', '.join(map(str, res['seeds']))}; {res['curve_samples']} samples a "
                     "point" + (" (not the table's protocol)" if res["curve_samples"] < res["samples"] else ""),
                     fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, f"curves-{sp}.png")
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def _picture(cc, res: dict, results: list[dict], out: str, device) -> str:
    """One row per method and step count: the first seed's student, the same labels and noise."""
    import torch

    from flashcore.evaluate import generate
    from flashcore.images import labelled_rows
    from flashcore.models import load_pretrained
    teacher, tmeta = load_pretrained(cc.teacher)
    labels = torch.arange(teacher.cfg.num_classes).repeat(PICTURE_PER_CLASS)
    pics = []
    t = res.get("teacher")
    if t:
        x, _ = generate(teacher, tmeta, labels, steps=t["steps"], guidance=t["guidance"], seed=0, device=device)
        pics.append((f"teacher, {t['steps']} steps, CFG {t['guidance']:g}\nFD {t['fd']:.1f}", x.cpu()))
    first = {(r["method"], r["steps"]): r for r in sorted(results, key=lambda r: r["seed"], reverse=True)}
    for row in res["rows"]:
        c = first[(row["method"], row["steps"])]
        model, meta = load_pretrained(os.path.join(out, c["run"], "student"))
        x, _ = generate(model, meta, labels, steps=c["steps"], guidance=1.0, noise_correction=c["noise_correction"],
                        clip=c["clip"], seed=0, device=device)
        pics.append((f"{c['method']}, {c['steps']} step{'s' if c['steps'] > 1 else ''}, seed {c['seed']}\n"
                     f"FD {c['eval']['fd']:.1f}", x.cpu()))
    path = os.path.join(out, "compare.png")
    labelled_rows(pics, path, title=f"Students after {cc.iters} updates and the teacher: same labels and noise "
                                    "in every row")
    return path


def write(cc, out: str, results: list[dict], teacher: dict | None, *, command: str | None = None,
          device=None) -> dict:
    from .compare import BY_NAME
    rows = aggregate(results, cc.methods, cc.steps)
    path_iters = sorted({r["path_iters"] for r in results if r["trainer"] == "disback"})
    res = {"command": command, "methods": list(cc.methods), "steps": list(cc.steps), "seeds": list(cc.seeds),
           "iters": cc.iters, "samples": cc.samples, "curve_every": cc.curve_every,
           "curve_samples": cc.curve_samples, "path_iters": path_iters[0] if path_iters else None,
           "teacher_path": portable_path(cc.teacher, out), "classifier": portable_path(cc.classifier, out),
           "settings": {**dataclasses.asdict(cc), "teacher": portable_path(cc.teacher, out),
                        "classifier": portable_path(cc.classifier, out)},
           "spaces": _spaces(results), "teacher": teacher,
           "unavailable": {m.name: m.unavailable for m in BY_NAME.values() if m.unavailable},
           "what": {m: BY_NAME[m].what for m in cc.methods},
           "rows": rows, "cells": results}
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown(res))
    res["curves"] = [os.path.basename(p) for p in _curves(res, out)] if cc.curve_every else []
    res["picture"] = os.path.basename(_picture(cc, res, results, out, device))
    write_json(os.path.join(out, "compare.json"), res)
    return res
