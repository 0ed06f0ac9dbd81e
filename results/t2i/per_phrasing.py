"""Prompt accuracy of a text-to-image model of the captioned digits, phrasing by phrasing
(``flashcore eval``'s figure on the ten captions of one phrasing, 500 samples, seed 0):
which wordings the model understands. Writes a JSON of phrasing -> accuracy.

    python results/t2i/per_phrasing.py runs/t2i/student3-seed0/student 3 results/t2i/phrasings_student3_seed0.json
"""
import json
import sys

from flashcore import data as fdata
from flashcore.evaluate import evaluate


def main(model: str, steps: int, out: str) -> None:
    n_train = len(fdata.PHRASINGS) - fdata.HELD_OUT_PHRASINGS
    rows = {}
    for p, phrasing in enumerate(fdata.PHRASINGS):
        r = evaluate(model, steps=steps, samples=500, seed=0, prompts=[fdata.caption(d, p) for d in range(10)])
        rows[phrasing] = {"held_out": p >= n_train, "accuracy": r["accuracy"]}
        print(f"{phrasing:40s} {'held out' if p >= n_train else 'trained':9s} {r['accuracy']:.3f}", flush=True)
    with open(out, "w") as f:
        json.dump({"model": model, "steps": steps, "samples": 500, "seed": 0, "phrasings": rows}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python results/t2i/per_phrasing.py MODEL STEPS OUT.json")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
