#!/usr/bin/env bash
# Re-measures the shipped checkpoints with flashcore eval's protocol: 8-bit images,
# two headline feature spaces trained apart from the validation classifier,
# precision/recall/diversity and pixel statistics with real-vs-real floors,
# 2,000 samples, sampling seeds 0, 1, 2. Writes results/protocol-v2/<row>-s<seed>.json.
# Usage: results/protocol-v2/run.sh [rows...]   (default: every row; the 50-step teacher last)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/protocol-v2
N=${SAMPLES:-2000}
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(student3-3 student3-2 student3-1 student1-1 teacher-1 teacher-2 teacher-3 teacher-50)
for row in "${rows[@]}"; do
  case $row in
    student3-*) model=checkpoints/mnist-student-3step; steps=${row#student3-}; extra=() ;;
    student1-*) model=checkpoints/mnist-student-1step; steps=${row#student1-}; extra=() ;;
    teacher-50) model=checkpoints/mnist-teacher; steps=50; extra=(--compile) ;;
    teacher-*)  model=checkpoints/mnist-teacher; steps=${row#teacher-}; extra=() ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  for seed in 0 1 2; do
    f=$out/$row-s$seed.json
    [ -f "$f" ] && continue
    flashcore eval --model $model --steps $steps --samples $N --seed $seed "${extra[@]}" --json "$f"
  done
done
