#!/usr/bin/env bash
# The 3-step ablation under protocol v3 (flashcore eval, 2,000 samples, both headline
# feature spaces), one distillation seed per argument (default 0 1 2): the same
# distill settings as results/protocol-v3/distill.sh, each variant switching one part
# off, evaluated with sampling seed = distillation seed. The full method's row and the
# teacher's rows are the protocol-v3 runs of the same settings and seed, copied, not
# re-run (the full students trained in bf16 on an AMD Zen 4, the committed variants on
# a Zen 5; the runs without noise correction, a no-op with this teacher, land within
# 0.05 FD of the full ones, so the two CPUs agree to about that); the teacher's evals
# (the same eval command and seed) are placed in the ablation folder first so that
# ablate reuses them instead of sampling again. The per-seed ablation.md copies drop
# the checkout's absolute path (the committed ones were made with RUNS=/work/runs/ablation-v3,
# recorded as runs/ablation-v3).
# Then: python results/summarize.py results/ablation-v3
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/flashcore ] && PATH="$PWD/.venv/bin:$PATH"   # the make install environment
RUNS=${RUNS:-runs/ablation-v3}
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for seed in "${seeds[@]}"; do
  out=$RUNS/seed$seed
  mkdir -p "$out/teacher"
  for s in 1 2 3 50; do
    python3 -c "
import json; r=json.load(open('results/protocol-v3/teacher-$s-s$seed.json')); r['features_asked']=None
json.dump(r, open('$out/teacher/eval-${s}step.json','w'), indent=1)"
  done
  flashcore ablate --teacher checkpoints/mnist-teacher --steps 3 --iters 200 --checkpoint-every 50 --val-every 50 \
    --val-samples 500 --seed $seed --srl-noise student --samples 2000 \
    --variants forward,no-srl,no-noise-correction,no-adversarial --out "$out"
  python3 results/ablation_rows.py results/ablation-v3 "$out"
  cp results/protocol-v3/student3-3-s$seed.json results/ablation-v3/full-3-s$seed.json
  for t in 3 50; do cp results/protocol-v3/teacher-$t-s$seed.json results/ablation-v3/teacher-$t-s$seed.json; done
  for f in ablation.md ablation.png; do cp "$out/$f" "results/ablation-v3/seed$seed-$f"; done
  sed -i "s#$PWD/##g" "results/ablation-v3/seed$seed-ablation.md"
done
