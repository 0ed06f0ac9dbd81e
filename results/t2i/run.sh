#!/usr/bin/env bash
# The text-to-image latent teacher and its 3-step Imagine Flash student, end to end
# (docs/text_to_image.md): train-vae, train-t2i-teacher, three distillation seeds at a
# fixed budget, and flashcore eval of every row on trained and held-out phrasings.
# Every step is skipped when its output exists, so a rerun resumes where it stopped.
# Writes results/t2i/<row>-<prompts>-s<seed>.json; python results/summarize.py results/t2i
# makes results/t2i/summary.md. (The committed JSONs were made with RUNS=/work/runs, recorded as runs/t2i.)
# Usage: results/t2i/run.sh [stage...]   stages: vae teacher distill eval (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/flashcore ] && PATH="$PWD/.venv/bin:$PATH"   # the make install environment
out=results/t2i
RUNS=${RUNS:-runs/t2i}
TEACHER=${TEACHER:-$RUNS/teacher/teacher}
N=${SAMPLES:-2000}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(vae teacher distill eval)
has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# a stage counts as done when its export records the full step count (an interrupted run exports too)
if has vae && ! grep -q '"train_steps": 3000' "$RUNS/vae/vae/flashcore.json" 2>/dev/null; then
  flashcore train-vae --out "$RUNS/vae" --steps 3000 $([ -d "$RUNS/vae/state" ] && echo --resume)
fi
if has teacher && ! grep -q '"train_steps": 6000' "$RUNS/teacher/teacher/flashcore.json" 2>/dev/null; then
  if [ -d "$RUNS/teacher/state" ]; then
    flashcore train-t2i-teacher --out "$RUNS/teacher" --resume --steps 6000
  else
    flashcore train-t2i-teacher --out "$RUNS/teacher" --vae "$RUNS/vae/vae" --steps 6000 --checkpoint-every 500
  fi
fi
# a fixed budget (no validation: nothing picks the student by any metric), set before any
# text-to-image result was seen; adversarial, forward states and validation need real latents
# with prompts, which a latent teacher's data set does not give (docs/text_to_image.md)
if has distill; then
  for seed in ${SEEDS:-0 1 2}; do
    grep -q '"train_iters": 100' "$RUNS/student3-seed$seed/student/flashcore.json" 2>/dev/null && continue
    flashcore distill --teacher "$TEACHER" --steps 3 --iters 100 --checkpoint-every 50 --srl-noise student \
      --no-adversarial --val-every 0 --seed $seed --out "$RUNS/student3-seed$seed" \
      $([ -d "$RUNS/student3-seed$seed/state" ] && echo --resume)
  done
fi
if has eval; then
  held=$out/prompts-held-out.txt
  python -c "from flashcore.data import caption_bank; print('\n'.join(caption_bank(held_out=True)))" > "$held"
  for row in ${ROWS:-student3-3 teacher-50 teacher-3 teacher-nocfg-3}; do
    for prompts in held-out trained; do
      for seed in ${SEEDS:-0 1 2}; do
        f=$out/$row-$prompts-s$seed.json
        [ -f "$f" ] && continue
        case $row in
          student3-3) model=$RUNS/student3-seed$seed/student; steps=3; extra=() ;;
          teacher-nocfg-*) model=$TEACHER; steps=${row#teacher-nocfg-}; extra=(--cfg 1) ;;
          teacher-*) model=$TEACHER; steps=${row#teacher-}; extra=() ;;
          *) echo "unknown row $row" >&2; exit 2 ;;
        esac
        [ $prompts = held-out ] && extra+=(--prompts "$held")
        flashcore eval --model "$model" --steps $steps --samples $N --seed $seed "${extra[@]}" --json "$f"
      done
    done
  done
fi
