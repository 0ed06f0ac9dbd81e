"""Tables of a results folder's ``<row>-s<seed>.json`` files (``flashcore eval
--json``): every row's mean and spread over its seeds (spread = half the range,
max - min over seeds, so a difference smaller than the two rows' spreads
together is noise). Writes DIR/summary.md and prints it.

    python results/summarize.py results/protocol-v2
    python results/summarize.py results/protocol-v3
    python results/summarize.py results/ablation-v3   (rows from results/ablation-v3/run.sh)
    python results/summarize.py results/t2i           (rows <row>-trained / <row>-held-out: the prompts' phrasings)
"""
import collections
import glob
import json
import os
import statistics
import sys

ORDER = ["teacher-50", "teacher-3", "teacher-nocfg-3", "student3-3", "student3fresh-3", "teacher-2", "teacher-nocfg-2",
         "student2-2", "student3-2", "teacher-1", "teacher-nocfg-1", "student3-1", "student2-1", "student1-1", "student1k4-1",
         "full-3", "no-adversarial-3", "no-noise-correction-3", "no-srl-3", "forward-3"]
NAMES = {"teacher-50": "teacher, 50 CFG steps", "teacher-3": "teacher, 3 CFG steps",
         "teacher-nocfg-3": "teacher, 3 steps without CFG (where every student starts)",
         "teacher-nocfg-2": "teacher, 2 steps without CFG (where every student starts)",
         "teacher-nocfg-1": "teacher, 1 step without CFG (where every student starts)",
         "teacher-2": "teacher, 2 CFG steps", "teacher-1": "teacher, 1 CFG step",
         "student3-3": "3-step student, 3 steps", "student3-2": "3-step student, 2 steps",
         "student3-1": "3-step student, 1 step", "student1-1": "1-step student, k = 1 (earlier, not shipped), 1 step",
         "student2-2": "2-step student, 2 steps",
         "student3fresh-3": "3-step student, SRL fresh noise (the paper's), 3 steps", "student2-1": "2-step student, 1 step",
         "student1k4-1": "1-step student (shipped), k = 4 teacher steps in the SRL target, 1 step",
         "full-3": "full: backward distillation + SRL + noise correction + discriminator (3 steps)",
         "no-adversarial-3": "without the discriminator (3 steps)",
         "no-noise-correction-3": "without noise correction at t = T (3 steps)",
         "no-srl-3": "without SRL: target from the student's own x_t (3 steps)",
         "forward-3": "forward distillation: noised real images, no student rollouts (3 steps)"}
TITLE = {"protocol-v2": "Shipped checkpoints (before the v-prediction teacher)",
         "protocol-v3": "The v-prediction zero-terminal-SNR teacher and its students",
         "t2i": "The text-to-image latent teacher and its 3-step student (accuracy: prompt accuracy)",
         "ablation-v3": "Ablation of the 3-step student (each variant switches one part off; 200 iterations; distillation seed = sampling seed)"}


PROMPT_SETS = (("-held-out", "held-out phrasings"), ("-trained", "trained phrasings"))


def _base(name: str) -> tuple[str, str]:
    """(row, prompt set) of a text-to-image row name such as teacher-50-held-out; ("", "") suffix otherwise."""
    for suffix, words in PROMPT_SETS:
        if name.endswith(suffix):
            return name[:-len(suffix)], words
    return name, ""


def row_name(name: str) -> str:
    base, words = _base(name)
    return NAMES.get(base, base) + (f", {words}" if words else "")


def row_order(name: str):
    base, words = _base(name)
    return (ORDER.index(base) if base in ORDER else len(ORDER), base, words)


def cell(vals, fmt):
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} ± {(max(vals) - min(vals)) / 2:{fmt}}"


def main(here: str):
    runs = collections.defaultdict(list)
    for f in sorted(glob.glob(os.path.join(here, "*-s*.json"))):
        runs[os.path.basename(f).rsplit("-s", 1)[0]].append(json.load(open(f)))
    rows = sorted(runs, key=row_order)
    first = runs[rows[0]][0]
    spaces = list(first["feature_spaces"])
    title = TITLE.get(os.path.basename(os.path.normpath(here)), "Checkpoints")
    out = [f"# {title} under `flashcore eval`'s protocol", "",
           f"{first['samples']} samples per run, sampling seeds as listed; mean ± half the range over seeds. "
           "Images are the 8-bit ones `generate` writes. Feature spaces trained apart from the validation "
           f"classifier (`{first['validation_space']['path']}`, which picked the students and is not reported). "
           "Floors: a class-balanced real train subset of the same size against the eval split.", ""]
    head = ["row", "NFE", "seeds"]
    for s in spaces:
        short = s.replace("mnist-features-", "")
        head += [f"FD {short}", f"recall {short}", f"precision {short}", f"diversity {short}"]
    head += ["accuracy", "mid-tone share", "stroke", "out of range"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # the floor depends on the seed and the sample count only: one run per seed stands for all rows
    by_seed = {r["seed"]: r for name in rows for r in runs[name]}
    seeds = [by_seed[k] for k in sorted(by_seed)]
    floor = ["real (floor)", "", ",".join(str(k) for k in sorted(by_seed))]
    for s in spaces:
        fs = [r["feature_spaces"][s] for r in seeds]
        floor += [cell([f["fd_floor"] for f in fs], ".2f"), cell([f["recall_floor"] for f in fs], ".3f"),
                  cell([f["precision_floor"] for f in fs], ".3f"), cell([f["diversity_floor"] for f in fs], ".2f")]
    px = [r["pixels"] for r in seeds]
    floor += [cell([r["accuracy_floor"] for r in seeds], ".3f"),
              cell([p["midtone_share"]["real"] for p in px], ".3f"), cell([p["stroke"]["real"] for p in px], ".3f"),
              "0"]
    out.append("| " + " | ".join(floor) + " |")
    for name in rows:
        rs = runs[name]
        line = [row_name(name), str(rs[0]["nfe"]), ",".join(str(r["seed"]) for r in rs)]
        for s in spaces:
            fs = [r["feature_spaces"][s] for r in rs]
            line += [cell([f["fd"] for f in fs], ".1f"), cell([f["recall"] for f in fs], ".3f"),
                     cell([f["precision"] for f in fs], ".3f"), cell([f["diversity"] for f in fs], ".2f")]
        line += [cell([r["accuracy"] for r in rs], ".3f"),
                 cell([r["pixels"]["midtone_share"]["value"] for r in rs], ".3f"),
                 cell([r["pixels"]["stroke"]["value"] for r in rs], ".3f"),
                 cell([r["raw_out_of_range"] for r in rs], ".2f")]
        out.append("| " + " | ".join(line) + " |")
    text = "\n".join(out) + "\n"
    with open(os.path.join(here, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python results/summarize.py RESULTS_DIR  (a folder of <row>-s<seed>.json)")
    main(sys.argv[1])
