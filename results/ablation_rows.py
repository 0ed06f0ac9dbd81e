"""Turn ``flashcore ablate`` folders into per-run JSON rows that ``results/summarize.py``
tables with their seed spread: ``<variant>-<n>-s<seed>.json`` (the n-step eval of each
variant's student, from OUT/ablation.json) in DEST.

    python results/ablation_rows.py DEST OUT [OUT ...]
    python results/ablation_rows.py results/ablation-v3 runs/ablation-v3/seed0 runs/ablation-v3/seed1

The full method's row and the teacher's rows of an ablation run with
``--variants forward,...`` (without ``full``) are the protocol-v3 runs of the same
command and seed: ``results/ablation-v3/run.sh`` copies those in.
"""
import json
import os
import sys


def main(dest: str, outs: list[str]) -> None:
    os.makedirs(dest, exist_ok=True)
    for out in outs:
        res = json.load(open(os.path.join(out, "ablation.json")))
        n, seed = res["steps"], res["seed"]
        for row in res["rows"]:
            ev = row["eval"][str(n)]
            model = os.path.join(out, "runs", row["name"], "student")
            ev = {**ev, "model": model if not os.path.isabs(model) else os.path.relpath(model)}
            path = os.path.join(dest, f"{row['name']}-{n}-s{seed}.json")
            with open(path, "w") as f:
                json.dump(ev, f, indent=1)
            print(path)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python results/ablation_rows.py DEST OUT [OUT ...]")
    main(sys.argv[1], sys.argv[2:])
