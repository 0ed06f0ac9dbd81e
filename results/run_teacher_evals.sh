#!/usr/bin/env bash
# Reproduces results/teacher-*.json (the teacher rows of the README's results table).
set -euo pipefail
cd "$(dirname "$0")/.."
flashcore eval --model checkpoints/mnist-teacher --steps 50 --samples 1000 --json results/teacher-50.json
for n in 1 2 3; do
  flashcore eval --model checkpoints/mnist-teacher --steps $n --samples 1000 --json results/teacher-$n.json
  flashcore eval --model checkpoints/mnist-teacher --steps $n --samples 1000 --no-noise-correction --json results/teacher-$n-nonc.json
done
