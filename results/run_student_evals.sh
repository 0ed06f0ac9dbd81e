#!/usr/bin/env bash
# Reproduces results/student-*.json (the student rows of the README's results table).
set -euo pipefail
cd "$(dirname "$0")/.."
for n in 1 2 3; do
  flashcore eval --model checkpoints/mnist-student-3step --steps $n --samples 1000 --json results/student-3step-$n.json
done
flashcore eval --model checkpoints/mnist-student-1step --steps 1 --samples 1000 --json results/student-1step-1.json
