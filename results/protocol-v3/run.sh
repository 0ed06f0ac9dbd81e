#!/usr/bin/env bash
# flashcore eval (2,000 samples, the 8-bit images generate writes) of the
# v-prediction teacher and of the students distill.sh made: a student of
# distillation seed s is scored with sampling seed s; the teacher's rows with
# sampling seeds 0, 1, 2. Writes results/protocol-v3/<row>-s<seed>.json (the
# committed ones were made with RUNS=/work/runs/protocol-v3, recorded as runs/protocol-v3);
# python results/summarize.py results/protocol-v3 makes summary.md.
# Usage: results/protocol-v3/run.sh [rows...]  (rows: student<n>-<steps>, teacher-<steps>, student1k4-1:
# the 1-step students distilled with --k 4 into $RUNS_K4, default runs/k4; see distill.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/flashcore ] && PATH="$PWD/.venv/bin:$PATH"   # the make install environment
out=results/protocol-v3
TEACHER=${TEACHER:-checkpoints/mnist-teacher}
RUNS=${RUNS:-runs/protocol-v3}
N=${SAMPLES:-2000}
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(student3-3 student2-2 student1-1 teacher-1 teacher-2 teacher-3 teacher-50)
for row in "${rows[@]}"; do
  for seed in ${SEEDS:-0 1 2}; do
    f=$out/$row-s$seed.json
    [ -f "$f" ] && continue
    case $row in
      student1k4-1) model=${RUNS_K4:-runs/k4}/student1-seed$seed/student; steps=1; extra=() ;;
      student*) n=${row#student}; n=${n%%-*}; model=$RUNS/student$n-seed$seed/student; steps=${row#*-}; extra=() ;;
      teacher-50) model=$TEACHER; steps=50; extra=(--compile) ;;
      teacher-*) model=$TEACHER; steps=${row#teacher-}; extra=() ;;
      *) echo "unknown row $row" >&2; exit 2 ;;
    esac
    flashcore eval --model "$model" --steps $steps --samples $N --seed $seed "${extra[@]}" --json "$f"
  done
done
