#!/usr/bin/env bash
# One GPU job of the small grid (issue 8; docs/results.md): the points matching $1 at 8 per GPU, stopped
# by a deadline like a preemption (a later call resumes them), archived without checkpoints into $OUT.
#   bash experiments/small/gpu_call.sh 'mdt_seed*,dit_seed*,mdt_ratio0.1,mdt_ratio0.5' 540
#   bash experiments/small/gpu_call.sh 'mdt_ratio0.7,mdt_no_*,mdt_full_only,mdt_masked_only,mdt_loss_removed' 540
# A 30-step smoke run tries base.gin's compile mode (CUDA graphs) first (SKIP_SMOKE=1: not); if it
# fails, the grid compiles without graphs (train.compile = True) and says so. STEPS=N overrides train.steps,
# GIN="binding" adds one, ROOT=dir moves the run dirs (a variant of the same sweep).
#   CALIBRATE=mdt_seed0,dit_seed0 CALIBRATE_ONLY=1 SKIP_SMOKE=1 bash experiments/small/gpu_call.sh '*' 300
set -u
OUT=${OUT:-small_out}
mkdir -p "$OUT"
only=$1
budget=${2:-540}          # seconds from the start of this script to the end of the archive
py=${PYTHON:-python3}
extra=()
[ -n "${STEPS:-}" ] && extra+=(--gin "train.steps = $STEPS")
[ -n "${GIN:-}" ] && extra+=(--gin "$GIN")            # one more binding, e.g. GIN="train.lr = 3e-4"
[ -n "${ROOT:-}" ] && extra+=(--root "$ROOT")         # run dirs elsewhere than the sweep's root
[ -n "${CALIBRATE_ONLY:-}" ] && extra+=(--calibrate-only)   # with CALIBRATE=mdt_seed0,dit_seed0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rm -rf /tmp/small_smoke
if [ -n "${SKIP_SMOKE:-}" ]; then
  echo "smoke run skipped"
elif ! timeout 110 "$py" -m mdtzoo train experiments/small/mdt.gin --run-dir /tmp/small_smoke \
    --gin "train.steps = 30" --gin "EVAL_EVERY = 30" --gin "train.eval_samples = 32" > "$OUT/smoke.log" 2>&1; then
  echo "!! smoke run with CUDA graphs failed; the grid compiles without them:"; tail -n 8 "$OUT/smoke.log"
  extra+=(--gin "train.compile = True")
else
  echo "smoke run ok ($SECONDS s)"; grep -h '"kind": "train"' /tmp/small_smoke/metrics.jsonl | tail -n 1
fi
"$py" experiments/small/run_gpu.py "${SWEEP:-experiments/small/small.sweep}" --gpus 1 --per-gpu 8 --only "$only" \
  "${extra[@]}" --calibrate "${CALIBRATE:-none}" --deadline $((budget - SECONDS - 25)) --archive "$OUT/small.tar.gz"
