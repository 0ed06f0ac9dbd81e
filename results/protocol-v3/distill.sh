#!/usr/bin/env bash
# Distils the 1-, 2- and 3-step students of the v-prediction teacher, distillation
# seeds 0, 1, 2, into $RUNS/student<n>-seed<s> (a finished run is skipped, a
# stopped one resumed). SRL re-noises with the student's own noise (--srl-noise student).
# The exported student of each run is the EMA one the validation FD picked
# (checkpoints/mnist-classifier on the train split; no headline space).
# Usage: results/protocol-v3/distill.sh [n ...]   (default: 3 1 2)
# The 1-step students with k = 4 teacher steps in the SRL target (row student1k4-1), in float32
# (the first of them trained on a CPU without native bf16, where distill turns bf16 off; the
# three seeds of the row all train in float32 so that they differ only by seed):
#   RUNS=runs/k4 EXTRA="--srl-noise student --k 4 --config results/protocol-v3/fp32.json" results/protocol-v3/distill.sh 1
# On a CPU without native bf16 (AVX2 only) distill trains in float32 anyway (its config.json says which).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/flashcore ] && PATH="$PWD/.venv/bin:$PATH"   # the make install environment
TEACHER=${TEACHER:-checkpoints/mnist-teacher}
RUNS=${RUNS:-runs/protocol-v3}
ITERS=${ITERS:-200}
EXTRA=${EXTRA:---srl-noise student}   # docs/diversity.md
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(3 1 2)
for n in "${steps[@]}"; do
  for seed in ${SEEDS:-0 1 2}; do
    run=$RUNS/student$n-seed$seed
    [ -f "$run/.done" ] && continue
    resume=(); [ -d "$run" ] && resume=(--resume)
    flashcore distill --teacher "$TEACHER" --steps $n --iters $ITERS --checkpoint-every 50 --val-every 50 \
      --val-samples 500 --seed $seed --out "$run" "${resume[@]}" $EXTRA
    touch "$run/.done"
  done
done
