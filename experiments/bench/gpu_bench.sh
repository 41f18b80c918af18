#!/usr/bin/env bash
# All of issue 7's GPU measurements, one group per call; JSON per run into $OUT, a table last.
#   bash experiments/bench/gpu_bench.sh train     # attention kernels + the training-step table
#   bash experiments/bench/gpu_bench.sh sample    # 250-step DDPM + CFG sampling, MDT-XL/2
#   bash experiments/bench/gpu_bench.sh tune      # FlexAttention block sizes + kernel profiles
#   bash experiments/bench/gpu_bench.sh kernels   # Triton / Flex variants, sampling
#   bash experiments/bench/gpu_bench.sh ddp       # 1 vs 2 GPUs (DDP), MDT-XL/2 and DiT-XL/2
#   bash experiments/bench/gpu_bench.sh attn      # kernels at S/2 and XL/2 shapes, forward alone too
#   bash experiments/bench/gpu_bench.sh overhead  # compile modes (CUDA graphs) on small models, DiT-XL/2 profile
#   bash experiments/bench/gpu_bench.sh final     # the training-step table again, with and without CUDA graphs
#   bash experiments/bench/gpu_bench.sh diag      # sampling profile and attention paths (50 steps), DiT-XL/2 step
#   bash experiments/bench/gpu_bench.sh paths     # flex (bias materialised) vs triton: XL/2 sampling, XL/2 and S/2 steps
#   bash experiments/bench/gpu_bench.sh final2    # after the materialised bias: 250-step sampling (checked), S/2 B/2 paths, XL/2 profile
#   bash experiments/bench/gpu_bench.sh tune2     # profiles of MDT-XL/2 and S/2 steps; FlexAttention block variants
#   bash experiments/bench/gpu_bench.sh f32       # FlexAttention's bias (and its gradient atomics) in float32 vs bf16
#   bash experiments/bench/gpu_bench.sh table     # the final table in one call: every target model, then 250-step sampling
#   bash experiments/bench/gpu_bench.sh where     # where each step's device time goes, by kernel kind (DiT vs MDT, flex vs triton)
#   bash experiments/bench/gpu_bench.sh tri       # Triton kernel (split head dim, in-kernel delta and dQ) vs FlexAttention: kernels, S/2 and XL/2 steps
#   bash experiments/bench/gpu_bench.sh graphs    # CUDA graphs (reduce-overhead) for the S/2 steps, B/2 paths
#   bash experiments/bench/gpu_bench.sh masked    # Triton masked pass: bias materialised per sample vs gathered in-kernel; B/2 and sampling paths; CUDA graphs
#   bash experiments/bench/gpu_bench.sh after     # after the Triton changes: S/2 steps with CUDA graphs, MDT-XL/2 and S/2 profiles
#   bash experiments/bench/gpu_bench.sh next      # optimizer parts + the bias table's gradient paths, then profiles (with the GPU's idle time per step) of MDT-XL/2, MDT-S/2, DiT-XL/2
#   bash experiments/bench/gpu_bench.sh codegen   # next's optimizer parts and MDT-XL/2 profile, then inductor settings (INDUCTOR_VARIANTS) on DiT-XL/2 and MDT-XL/2
#   bash experiments/bench/gpu_bench.sh fused     # the one-kernel optimiser update (AdamW + EMA + norm) checked, then op by op vs fused in the DiT-XL/2, MDT-XL/2 and MDT-S/2 steps
#   bash experiments/bench/gpu_bench.sh hostbound # is the step host-bound? CUDA graphs and the C++ wrapper at XL/2 (fused update), op-by-op update, optimizer parts
#   bash experiments/bench/gpu_bench.sh final3    # optimizer parts and table-gradient kernels (checked), the table's five steps, MDT-XL/2 with CUDA graphs, 250-step sampling
#   bash experiments/bench/gpu_bench.sh held      # attention block variants at XL/2 shapes; the previous commit's code (OLD=dir holding its mdtzoo/) against this one in the MDT-XL/2 and S/2 steps; MDT-XL/2 without held gradients; its profile
#   bash experiments/bench/gpu_bench.sh final4    # the table's five steps, MDT-XL/2 and S/2 with CUDA graphs, 250-step sampling (checked)
#   bash experiments/bench/gpu_bench.sh ddp2      # (2 GPUs) MDT-XL/2 on 1 GPU, on 2 with DDP, on 2 with CUDA graphs under DDP; 250-step sampling
#   bash experiments/bench/gpu_bench.sh s2prof    # MDT-S/2 and DiT-S/2 profiles with the GPU's idle time per step
#   bash experiments/bench/gpu_bench.sh keptgrad  # the masked pass's bias-gradient kernel with the batch split over programs, against unsplit (g1): kernels at S/2 and XL/2 shapes, the MDT-S/2 step
#   bash experiments/bench/gpu_bench.sh keptgrad2 # the MDT-S/2 step, unsplit (g1) and split kept_grad alternating, twice each
#   bash experiments/bench/gpu_bench.sh align     # Triton kernels with aligned strides and padded dS rows against the previous commit's (OLD=dir): kernels at XL/2 and S/2 shapes, the MDT-XL/2 and S/2 steps
#   bash experiments/bench/gpu_bench.sh kern      # ncu of our attention kernels at XL/2 shapes, a sweep of their launch settings (attn_sweep.py), the MDT-S/2 step
#   bash experiments/bench/gpu_bench.sh steps8    # the MDT-S/2 step: previous commit's code (OLD) / this one / with the sweep's settings (sw8), alternating; MDT-XL/2 old / sw8
#   bash experiments/bench/gpu_bench.sh final5    # the table's five steps (session 8's code), then MDT-XL/2 with the previous commit's code (OLD, its own inductor cache)
#   bash experiments/bench/gpu_bench.sh final6    # session 10's defaults: the table's five steps, MDT-S/2 with CUDA graphs
#   bash experiments/bench/gpu_bench.sh final7    # MDT-XL/2 without / with CUDA graphs, 250-step sampling (checked against the reference maths)
#   bash experiments/bench/gpu_bench.sh s2sweep   # attn_sweep.py at S/2 shapes (head dim 64), then the MDT-S/2 step with its BEST settings against the defaults, alternating
#   bash experiments/bench/gpu_bench.sh prof8     # session 8's MDT-XL/2 step: its GPU time by kernel kind, then with CUDA graphs
#   bash experiments/bench/gpu_bench.sh blocks    # one block's forward + backward kernel by kernel (block_parts.py) at XL/2 and S/2; DiT-XL/2 and MDT-XL/2 step profiles
#   bash experiments/bench/gpu_bench.sh blocks2   # block_parts.py variants (inductor's persistent rows at XL's width, multi-kernel), each in its own compile cache; the base block's generated code
#   bash experiments/bench/gpu_bench.sh packed    # attention kernels checked at XL/2 shapes; MDT-XL/2 and S/2 steps with the previous commit's code (OLD) / packed qkv, alternating; MDT-XL/2 with rows2048
#   bash experiments/bench/gpu_bench.sh packed2   # the packed kernels checked against the explicit maths at XL/2 shapes, then the MDT-S/2 step new / OLD / new
#   bash experiments/bench/gpu_bench.sh packed3   # the MDT-B/2 step, packed qkv / the previous commit's code (OLD)
#   bash experiments/bench/gpu_bench.sh norm      # the fused gated residual + LayerNorm kernels (models/triton_norm.py): one XL block torch / triton, then DiT-XL/2 and MDT-XL/2 steps alternating (each checked first); MDT-XL/2 with the batch-sum kernel (sum_kernel=true)
#   bash experiments/bench/gpu_bench.sh normhost  # one DiT-XL/2 block's host time per call and its cProfile, torch / triton norm; both DiT-XL/2 step profiles
#   bash experiments/bench/gpu_bench.sh ops       # the kernels as triton_ops checked compiled at XL/2 shapes; a DiT-XL/2 block's host time (triton norm); XL/2 steps torch / triton norm, MDT-XL/2 with opaque custom ops
#   bash experiments/bench/gpu_bench.sh ops2      # ops after the float64 fix: triton attention checked compiled at XL/2; MDT-XL/2 triton norm / custom ops / torch norm; MDT-S/2 triton norm / custom ops
#   bash experiments/bench/gpu_bench.sh normsweep # experiments/bench/norm_sweep.py at XL/2 and S/2 shapes: the fused norm kernels' launch settings, checked, fastest first
#   bash experiments/bench/gpu_bench.sh norm3     # norm_sweep.py at XL/2 and S/2 shapes, then MDT-XL/2 and S/2 with the defaults / the sweep's BEST settings
#   bash experiments/bench/gpu_bench.sh norm4     # session 11's norm settings / session 10's, alternating: MDT-S/2, MDT-B/2; MDT-XL/2
#   bash experiments/bench/gpu_bench.sh final8    # 250-step sampling (checked), the DiT-XL/2 and DiT-S/2 steps
#   bash experiments/bench/gpu_bench.sh norm5     # norm_sweep.py on a smaller grid at B/2's and S/2's widths
#   bash experiments/bench/gpu_bench.sh final9    # MDT-S/2: per-block regions / stacks as regions / CUDA graphs; MDT-B/2
#   bash experiments/bench/gpu_bench.sh final10   # MDT-B/2 with stacks; MDT-XL/2, DiT-XL/2, DiT-S/2 (with final9: the table)
#   bash experiments/bench/gpu_bench.sh final11   # MDT-XL/2 and DiT-XL/2 with stacks
#   bash experiments/bench/gpu_bench.sh final12   # the table's XL and DiT-S/2 steps, then attn_sweep.py at XL/2 shapes
#   bash experiments/bench/gpu_bench.sh offsets   # the masked pass's bias by grid offset against the previous code (OLD): kernels, MDT-S/2 and XL/2 steps
#   bash experiments/bench/gpu_bench.sh final13   # the table's five steps (session 12's code)
#   bash experiments/bench/gpu_bench.sh ddp3      # 2-GPU host: MDT-XL/2 on 1 GPU, then DDP on 2 (session 12's code)
#   bash experiments/bench/gpu_bench.sh offsets2  # the offset table's index math per token, not per element, against OLD: kernels, steps
#   bash experiments/bench/gpu_bench.sh mlp       # the GELU backward fused into fc2's input-gradient matmul (models/triton_mlp.py): mlp_parts.py, then XL steps torch / triton alternating
#   bash experiments/bench/gpu_bench.sh window    # the table's five steps, per step (synced) and in back-to-back windows
#   bash experiments/bench/gpu_bench.sh trainer   # the trainer's img/s and per-step syncs, this code / OLD (MDT-S/2, DiT-S/2)
#   bash experiments/bench/gpu_bench.sh trainer2  # trainer's A/B alternating, 80 steps: MDT-S/2 new/old twice, DiT-S/2 new/old
#   bash experiments/bench/gpu_bench.sh final14   # the trainer's waits counted (MDT-S/2), then the table's five steps with --windows 3
#   bash experiments/bench/gpu_bench.sh start14   # the trainer's waits counted, then the XL/2 profiles by kernel kind
#   bash experiments/bench/gpu_bench.sh graph     # the step as one CUDA graph against the eager step
#   bash experiments/bench/gpu_bench.sh graph2    # its smoke test, then the captured step against the eager one
#   bash experiments/bench/gpu_bench.sh graph4a   # the captured XL/2 steps against the eager ones (graph4b: S/2, B/2)
#   bash experiments/bench/gpu_bench.sh start15   # GPU tests of train.graph_step, then the trainer eager / graph step
#   bash experiments/bench/gpu_bench.sh final16a  # the XL/2 steps eager and captured, memory as reserved (16b: S/2, B/2)
#   bash experiments/bench/gpu_bench.sh final16c  # GPU tests, then the table's steps captured with bf16 weights (16d: float32 weights, the trainer)
#   bash experiments/bench/gpu_bench.sh bf16wa    # GPU tests, then MDT-XL/2 captured with / without bf16 weights (wb: DiT-XL/2, MDT-S/2)
#   bash experiments/bench/gpu_bench.sh cppwrap   # inductor's C++ wrapper against the default at XL/2 (long compiles)
#   bash experiments/bench/gpu_bench.sh norm2     # norm's comparison at S/2 and B/2 (host-bound at S/2: the custom ops' launches), alternating
#   bash experiments/bench/gpu_bench.sh autotune  # max-autotune (Triton matmul templates, epilogue fusion) vs default
#   bash experiments/bench/gpu_bench.sh lt17a     # the cuBLASLt GELU-epilogue MLP: GPU tests, lt_parts.py, DiT-XL/2 captured with / without it
#   bash experiments/bench/gpu_bench.sh lt17b     # the same at MDT-S/2 (with / without) and MDT-XL/2 (with), after lt17a
#   bash experiments/bench/gpu_bench.sh lt17e     # the cuBLASLt MLP's bias gradients in its weight-gradient matmuls (BGRADB): tests, parts, MDT-S/2 with / without
#   bash experiments/bench/gpu_bench.sh s18a      # GPU tests of the cuBLASLt ops; MDT-S/2: OLD / compiled glue / + linear_impl cublaslt, alternating
#   bash experiments/bench/gpu_bench.sh s18b      # the trainer at MDT-S/2 (captured, bf16 weights, cuBLASLt MLP), then the S/2 and MDT-XL/2 steps
#   bash experiments/bench/gpu_bench.sh s18c      # tune the cuBLASLt MLP's algorithms at S/2 (lt_tune.py), MDT-S/2 with / without the table, the trainer
#   bash experiments/bench/gpu_bench.sh s2next    # (prepared) the GPU tests, then MDT-S/2 with the attention forward in 3 stages, alternating
# Every kernel is checked against the explicit reference before it is timed (bench attention /
# sample --check); a run that fails or times out leaves an error line, the rest go on.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: old_step runs from $OLD
group=${1:-train}
py=${PYTHON:-python3}
run() {  # run NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
  timeout "$limit" "$py" -m mdtzoo "$@" > "$OUT/$name.log" 2>&1 || echo "!! $name failed or timed out (rc $?)" >&2
  tail -n 2 "$OUT/$name.log" >&2
}
optim_parts() {  # optim_parts LIMIT: the optimizer parts and the bias-table gradient paths, checked, then timed
  echo "== optim_parts" >&2
  timeout "$1" "$py" experiments/bench/optim_parts.py --model mdt_xl2 > "$OUT/optim_parts.log" 2>&1 \
    || echo "!! optim_parts failed (rc $?)" >&2
  grep "^|\|^Fused" "$OUT/optim_parts.log" >&2
}
step() {  # step NAME LIMIT MODEL BATCH ARGS...: one bf16 training-step benchmark, JSON in $OUT/NAME.json
  local name=$1 limit=$2 model=$3 batch=$4; shift 4
  run "$name" "$limit" bench train-step --model "$model" --batch "$batch" --precision bf16 "$@" --json "$OUT/$name.json"
}
profile() {  # profile MODEL BATCH [LIMIT] [LINES] [ARGS...]: the compiled step with --profile (and ARGS), then
  # its GPU time by kernel kind
  step "profile_$1" "${3:-120}" "$1" "$2" --compile --profile "${@:5}"
  sed -n '/device time per step/,$p' "$OUT/profile_$1.log" | head -n "${4:-80}" >&2
}
table_steps() {  # the table's five compiled steps, one JSON each
  for spec in "dit_s2 256" "mdt_s2 256" "dit_xl2 64" "mdt_xl2 64" "mdt_b2 256"; do
    set -- $spec
    step "step_$1_b$2" 100 "$1" "$2" --compile
  done
}
attention_vs_old() {  # our attention kernels (masked_bias.py) with this code / $OLD's, each in its own process,
  # then the MDT-S/2 and XL/2 steps, this code's and $OLD's in turn
  for tree in new old; do
    echo "== masked_bias $tree" >&2
    root=$PWD; [ $tree = old ] && root=${OLD:-/nonexistent}
    (cd "$root/experiments/bench" && PYTHONPATH="$root:${PYTHONPATH:-}" timeout 60 "$py" masked_bias.py) \
      > "$OUT/masked_bias_$tree.log" 2>&1 || echo "!! masked_bias $tree failed" >&2
    cat "$OUT/masked_bias_$tree.log" >&2
  done
  step step_mdt_s2_new 80 mdt_s2 256 --steps 20 --compile
  old_step step_mdt_s2_old 80 mdt_s2 256 --steps 20 --compile
  step step_mdt_xl2_new 110 mdt_xl2 64 --compile
  old_step step_mdt_xl2_old 110 mdt_xl2 64 --compile
}
sample_xl2() {  # sample_xl2 LIMIT: 250-step DDPM + CFG sampling of MDT-XL/2 at batch 256, checked first
  run sample_mdt_xl2 "$1" bench sample --model mdt_xl2 --batch 256 --compile --check 8 --repeats 1 \
    --json "$OUT/sample_mdt_xl2.json"
}
old_step() {  # old_step NAME LIMIT MODEL BATCH ARGS...: `step` with the code in $OLD (a copy of an earlier
  # commit's mdtzoo/; nothing without OLD), in its own compile cache: a cache shared with this code can
  # replay graphs compiled for an op's earlier output layout
  [ -n "${OLD:-}" ] || return 0
  (cd "$OLD" && TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_old step "$@")
}
old_new_steps() {  # old_new_steps "MODEL BATCH STEPS"...: each compiled step with $OLD's code, then this code's
  for spec in "$@"; do
    set -- $spec
    old_step "step_$1_old" 110 "$1" "$2" --steps "$3" --compile
    step "step_$1_new" 110 "$1" "$2" --steps "$3" --compile
  done
}
block() {  # block NAME LIMIT ARGS...: experiments/bench/block_parts.py ARGS; its table in $OUT/NAME.log,
  # its stderr (inductor's generated code under TORCH_LOGS=output_code) in $OUT/NAME.err
  local name=$1 limit=$2; shift 2
  echo "== $name: block_parts.py $*" >&2
  timeout "$limit" "$py" experiments/bench/block_parts.py "$@" > "$OUT/$name.log" 2> "$OUT/$name.err" \
    || echo "!! $name failed (rc $?)" >&2
  grep "checked\|block (" "$OUT/$name.log" >&2
}
window_steps() {  # the table's five compiled steps, step by step and in 3 windows back to back (--windows 3)
  for spec in "mdt_xl2 64 10 110" "dit_xl2 64 10 100" "mdt_s2 256 20 90" "dit_s2 256 20 80" "mdt_b2 256 10 100"; do
    set -- $spec
    step "step_$1_b$2" "$4" "$1" "$2" --steps "$3" --compile --windows 3
  done
}
trainer_runs() {  # trainer_runs STEPS "MODEL TREE [BATCH]"...: trainer_syncs.py with this code (new), $OLD's
  # (old), this code with train.graph_step (graph), with it and train.bf16_weights (graph16), or with both and
  # the cuBLASLt MLP (lt17)
  local steps=$1 i=0; shift
  for spec in "$@"; do
    set -- $spec
    i=$((i + 1))
    root=$PWD; [ "$2" = old ] && root=${OLD:-/nonexistent}
    echo "== trainer $1 $2" >&2
    cache=/tmp/inductor_old; [ "$2" != old ] && cache=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(id -un)}  # (this
    # code's compiles shared with its bench steps; $OLD's apart)
    PYTHONPATH="$root:${PYTHONPATH:-}" TORCHINDUCTOR_CACHE_DIR=$cache timeout "${TRAINER_LIMIT:-140}" "$py" \
      experiments/bench/trainer_syncs.py --model "$1" --steps "$steps" --batch "${3:-256}" \
      $(case $2 in graph) echo --graph-step ;; graph16) echo --graph-step --bf16-weights ;;
        lt17) echo --graph-step --bf16-weights --mlp-impl cublaslt ;; esac) \
      > "$OUT/trainer_${i}_$1_$2.log" 2>&1 \
      || echo "!! failed (rc $?)" >&2
    grep "img/s per\|synchronising\|RESULT\|Error" "$OUT/trainer_${i}_$1_$2.log" | cut -c1-300 >&2
  done
}
gpu_tests() {  # the GPU-only tests of bf16 weights, the captured step, the trainer and the cuBLASLt MLP (-k on_cuda)
  echo "== GPU tests" >&2
  timeout 260 "$py" -m pytest -q -p no:cacheprovider tests/test_bf16_weights.py tests/test_graph_step.py \
    tests/test_training.py tests/test_lt_mlp.py -k "on_cuda" > "$OUT/pytest.log" 2>&1 || echo "!! GPU tests failed (rc $?)" >&2
  tail -n 3 "$OUT/pytest.log" >&2
}
captured_steps() {  # captured_steps LIMIT MODEL:BATCH:STEPS:KIND...: compiled steps with --graph-step, KIND
  # graph16 also with --bf16-weights (graph: float32 weights), lt17 with --bf16-weights --mlp-impl cublaslt,
  # lt17w0 the same with MDTZOO_LT_WGRAD=0 (the bias sums by torch), each timed step by step and in 2 windows
  local limit=$1 spec m b n kind; shift
  for spec in "$@"; do
    IFS=: read -r m b n kind <<< "$spec"
    MDTZOO_LT_WGRAD=$([ "$kind" = lt17w0 ] && echo 0 || echo 1) \
      step "step_${m}_$kind" "$limit" "$m" "$b" --steps "$n" --compile --windows 2 --graph-step \
      $(case $kind in graph16) echo --bf16-weights ;; lt17*) echo --bf16-weights --mlp-impl cublaslt ;; esac)
  done
}
lt_tests() {  # lt_tests LIMIT ARGS...: the GPU tests of the cuBLASLt MLP, then its parts timed against inductor's
  # (lt_parts.py ARGS, at most LIMIT seconds)
  local limit=$1; shift
  echo "== cuBLASLt MLP tests" >&2
  timeout 200 "$py" -m pytest -q -p no:cacheprovider tests/test_lt_mlp.py -k "on_cuda" > "$OUT/pytest_lt.log" 2>&1 \
    || echo "!! cuBLASLt MLP tests failed (rc $?)" >&2
  tail -n 3 "$OUT/pytest_lt.log" >&2
  echo "== lt_parts" >&2
  timeout "$limit" "$py" experiments/bench/lt_parts.py "$@" > "$OUT/lt_parts.log" 2>&1 \
    || echo "!! lt_parts failed (rc $?)" >&2
  grep -v "^ " "$OUT/lt_parts.log" | tail -n 90 >&2
}
variant() {  # variant FLAG VALUE: "FLAG VALUE" as two arguments, nothing for the value '-' (the default)
  [ "$2" != - ] && printf '%s\n%s\n' "$1" "$2"
}
mdt_profiles() {  # MDT-XL/2 and MDT-S/2 steps with --profile: GPU time per step by kernel kind
  profile mdt_xl2 64
  profile mdt_s2 256
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2
"$py" -c "import torch; print('torch', torch.__version__)" >&2
case $group in
train)
  run attention 150 bench attention --json "$OUT/attention.json"
  for spec in "dit_s2 256" "dit_xl2 64" "mdt_s2 256" "mdt_b2 256" "mdt_xl2 64"; do
    set -- $spec
    run "step_$1_b$2" 170 bench train-step --model "$1" --batch "$2" --compile --precision bf16 \
      --steps 10 --warmup 3 --json "$OUT/step_$1_b$2.json"
  done
  ;;
sample)
  run sample_mdt_xl2 420 bench sample --model mdt_xl2 --batch 256 --compile --check 8 --json "$OUT/sample_mdt_xl2.json"
  run step_mdt_s2_b256_eager 120 bench train-step --model mdt_s2 --batch 256 --precision bf16 \
    --json "$OUT/step_mdt_s2_b256_eager.json"
  ;;
tune)
  run attention_flex 200 bench attention --impl explicit,flex:m64n64,flex:m128n64,flex:m64n64w8,flex:m64n64s2,flex:bwd64 \
    --json "$OUT/attention_flex.json"
  for m in "mdt_s2 256" "dit_s2 256"; do
    set -- $m
    run "profile_$1" 170 bench train-step --model "$1" --batch "$2" --compile --precision bf16 --profile \
      --json "$OUT/step_$1_b$2.json"
  done
  ;;
kernels)
  run attention_kernels 200 bench attention \
    --impl explicit,flex,triton:64x64,triton:f128,triton:w8,triton:s3,triton:b32,triton:b128 \
    --json "$OUT/attention_kernels.json"
  for spec in "mdt_s2 256" "mdt_xl2 64"; do
    set -- $spec
    run "step_$1_b$2_triton" 170 bench train-step --model "$1" --batch "$2" --compile --precision bf16 \
      --attn triton --json "$OUT/step_$1_b$2_triton.json"
  done
  [ -n "${SKIP_SAMPLE:-}" ] || run sample_mdt_xl2 230 bench sample --model mdt_xl2 --batch 128 --compile --check 8 --json "$OUT/sample_mdt_xl2.json"
  ;;
attn)
  run attention_s2 170 bench attention --impl flex,flex:g16,triton --json "$OUT/attention_s2.json"
  for attn in flex triton; do
    run "step_mdt_s2_b256_$attn" 110 bench train-step --model mdt_s2 --batch 256 --compile --precision bf16 \
      --attn "$attn" --json "$OUT/step_mdt_s2_b256_$attn.json"
  done
  run attention_xl2 170 bench attention --impl triton,flex --batch 64 --heads 16 --dim 72 \
    --json "$OUT/attention_xl2.json"
  ;;
overhead)
  for mode in default reduce-overhead; do
    run "step_mdt_xs2_b128_$mode" 90 bench train-step --model mdt_xs2 --batch 128 --compile-mode "$mode" \
      --precision bf16 --json "$OUT/step_mdt_xs2_b128_$mode.json"
  done
  run step_dit_xl2_b64_profile 110 bench train-step --model dit_xl2 --batch 64 --compile --precision bf16 --profile \
    --json "$OUT/step_dit_xl2_b64_profile.json"
  ;;
final)
  for spec in "mdt_s2 256 default" "mdt_s2 256 reduce-overhead" "mdt_xl2 64 default" "dit_s2 256 reduce-overhead" \
              "dit_s2 256 default" "mdt_b2 256 default"; do
    set -- $spec
    run "step_$1_b$2_$3" 100 bench train-step --model "$1" --batch "$2" --compile-mode "$3" --precision bf16 \
      --steps 10 --warmup 3 --json "$OUT/step_$1_b$2_$3.json"
  done
  ;;
diag)
  run attention_s2 120 bench attention --impl triton,flex --json "$OUT/attention_s2.json"
  run sample_profile 200 bench sample --model mdt_xl2 --batch 256 --steps 50 --check 0 --compile --profile \
    --json "$OUT/sample_profile.json"
  run sample_sdpa 150 bench sample --model mdt_xl2 --batch 256 --steps 50 --check 0 --compile --attn sdpa \
    --json "$OUT/sample_sdpa.json"
  run step_dit_xl2_b64_default 100 bench train-step --model dit_xl2 --batch 64 --compile --precision bf16 \
    --json "$OUT/step_dit_xl2_b64_default.json"
  ;;
paths)
  run sample_flex 170 bench sample --model mdt_xl2 --batch 256 --steps 50 --check 0 --compile --attn flex --profile \
    --json "$OUT/sample_flex.json"
  run sample_triton 150 bench sample --model mdt_xl2 --batch 256 --steps 50 --check 0 --compile --attn triton \
    --json "$OUT/sample_triton.json"
  for spec in "mdt_xl2 64 flex" "mdt_xl2 64 triton" "mdt_s2 256 flex" "mdt_s2 256 triton"; do
    set -- $spec
    run "step_$1_b$2_$3" 100 bench train-step --model "$1" --batch "$2" --compile --precision bf16 --attn "$3" \
      --json "$OUT/step_$1_b$2_$3.json"
  done
  ;;
final2)
  run sample_mdt_xl2 270 bench sample --model mdt_xl2 --batch 256 --compile --check 8 --repeats 1 \
    --json "$OUT/sample_mdt_xl2.json"
  for spec in "mdt_s2 256 flex" "mdt_s2 256 triton" "dit_s2 256 auto" "mdt_b2 256 flex" "mdt_b2 256 triton"; do
    set -- $spec
    run "step_$1_b$2_$3" 100 bench train-step --model "$1" --batch "$2" --compile --precision bf16 --attn "$3" \
      --json "$OUT/step_$1_b$2_$3.json"
  done
  run step_mdt_xl2_b64_profile 110 bench train-step --model mdt_xl2 --batch 64 --compile --precision bf16 --profile \
    --json "$OUT/step_mdt_xl2_b64_auto.json"
  ;;
tune2)
  run step_mdt_xl2_b64_profile 120 bench train-step --model mdt_xl2 --batch 64 --compile --precision bf16 --profile \
    --json "$OUT/step_mdt_xl2_b64_profile.json"
  run step_mdt_s2_b256_profile 100 bench train-step --model mdt_s2 --batch 256 --compile --precision bf16 --profile \
    --json "$OUT/step_mdt_s2_b256_profile.json"
  for variant in m128n64 m64n64w8 bwd64; do
    run "step_mdt_s2_b256_$variant" 100 bench train-step --model mdt_s2 --batch 256 --compile --precision bf16 \
      --flex-options "$variant" --json "$OUT/step_mdt_s2_b256_$variant.json"
  done
  for variant in default m128n64; do
    run "sample_$variant" 150 bench sample --model mdt_xl2 --batch 256 --steps 50 --check 0 --compile \
      $([ "$variant" = default ] || echo --flex-options "$variant") --json "$OUT/sample_$variant.json"
  done
  ;;
f32)
  run attention_s2 150 bench attention --impl flex,flex:f32 --json "$OUT/attention_s2.json"
  for spec in "mdt_s2 256" "mdt_xl2 64"; do
    set -- $spec
    for variant in default f32; do
      run "step_$1_b$2_$variant" 110 bench train-step --model "$1" --batch "$2" --compile --precision bf16 \
        $([ "$variant" = default ] || echo --flex-options "$variant") --json "$OUT/step_$1_b$2_$variant.json"
    done
  done
  run attention_xl2 150 bench attention --impl flex,flex:f32 --batch 64 --heads 16 --dim 72 --json "$OUT/attention_xl2.json"
  ;;
table)
  table_steps
  sample_xl2 200
  ;;
where)
  for spec in ${WHERE_SPECS:-"dit_xl2 64 auto" "mdt_xl2 64 auto" "dit_s2 256 auto" "mdt_s2 256 auto" "mdt_s2 256 triton"}; do
    set -- $spec
    run "step_$1_b$2_$3" 170 bench train-step --model "$1" --batch "$2" --compile --precision bf16 --attn "$3" \
      --profile --json "$OUT/step_$1_b$2_$3.json"
    sed -n '/device time per step/,$p' "$OUT/step_$1_b$2_$3.log" >&2
  done
  ;;
tri)
  run attention_s2 150 bench attention --impl flex,triton,triton:dq128 --json "$OUT/attention_s2.json"
  run attention_xl2 150 bench attention --impl flex,triton,triton:pad --batch 64 --heads 16 --dim 72 \
    --json "$OUT/attention_xl2.json"
  for spec in "mdt_s2 256" "mdt_xl2 64"; do
    set -- $spec
    for impl in flex triton; do
      run "step_$1_b$2_$impl" 120 bench train-step --model "$1" --batch "$2" --compile --precision bf16 \
        --attn "$impl" --json "$OUT/step_$1_b$2_$impl.json"
    done
  done
  ;;
graphs)
  for spec in "dit_s2 256 flex default" "dit_s2 256 flex reduce-overhead" "mdt_s2 256 flex reduce-overhead" \
              "mdt_s2 256 triton default" "mdt_s2 256 triton reduce-overhead" "mdt_b2 256 flex default" \
              "mdt_b2 256 triton default"; do
    set -- $spec
    run "step_$1_b$2_$3_$4" 120 bench train-step --model "$1" --batch "$2" --compile-mode "$4" --precision bf16 \
      --attn "$3" --json "$OUT/step_$1_b$2_$3_$4.json"
  done
  ;;
masked)
  run attention_s2 120 bench attention --impl flex,triton,triton:gather --json "$OUT/attention_s2.json"
  for spec in "mdt_s2 256 triton -" "mdt_s2 256 triton gather" "mdt_b2 256 triton -" "mdt_b2 256 flex -"; do
    set -- $spec
    run "step_$1_b$2_$3_$4" 100 bench train-step --model "$1" --batch "$2" --compile --precision bf16 --attn "$3" \
      $([ "$4" = - ] || echo --triton-options "$4") --json "$OUT/step_$1_b$2_$3_$4.json"
  done
  for impl in triton flex; do
    run "sample_mdt_xl2_$impl" 100 bench sample --model mdt_xl2 --batch 256 --steps 50 --compile --attn "$impl" \
      --check $([ "$impl" = triton ] && echo 8 || echo 0) --repeats 1 --json "$OUT/sample_mdt_xl2_$impl.json"
  done
  run step_mdt_s2_b256_triton_graphs 100 bench train-step --model mdt_s2 --batch 256 --compile-mode reduce-overhead \
    --precision bf16 --attn triton --json "$OUT/step_mdt_s2_b256_triton_graphs.json"
  ;;
after)
  for m in mdt_s2 dit_s2; do  # the launch-bound S/2 steps with CUDA graphs (reduce-overhead)
    run "graphs_$m" 100 bench train-step --model "$m" --batch 256 --compile-mode reduce-overhead --precision bf16 \
      --json "$OUT/graphs_$m.json"
  done
  mdt_profiles
  ;;
next)
  optim_parts 90
  mdt_profiles
  profile dit_xl2 64 100
  ;;
held)
  run attention_xl 160 bench attention --impl "${ATTN_IMPLS:-triton,triton:f128,triton:f128s3,triton:fn128,triton:s3,triton:w8,triton:b128}" \
    --batch 64 --heads 16 --dim 72 --json "$OUT/attention_xl.json"
  grep -i "triton\|no-bias" "$OUT/attention_xl.log" >&2
  old_new_steps "mdt_xl2 64 10" "mdt_s2 256 20"
  step step_mdt_xl2_nohold 110 mdt_xl2 64 --compile --no-hold-grads
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  profile mdt_xl2 64 110 30
  ;;
codegen)
  optim_parts 100
  profile mdt_xl2 64 110
  for spec in ${CODEGEN_SPECS:-"dit_xl2 64 -" "dit_xl2 64 cdt" "mdt_xl2 64 cdt" "dit_xl2 64 agg"}; do
    set -- $spec
    step "step_$1_$3" 110 "$1" "$2" --compile $(variant --inductor-options "$3")
  done
  "$py" -m mdtzoo bench table "$OUT"/step_*.json "$OUT"/profile_*.json >&2
  ;;
fused)
  optim_parts 110
  for spec in ${FUSED_SPECS:-"dit_xl2 64" "mdt_xl2 64" "mdt_s2 256"}; do
    set -- $spec
    for update in op_by_op fused; do
      step "step_$1_$update" 100 "$1" "$2" --compile --update "$update"
    done
  done
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  ;;
hostbound)
  for spec in ${HOST_SPECS:-"mdt_xl2 64 - auto" "mdt_xl2 64 reduce-overhead auto" "dit_xl2 64 - auto" \
      "dit_xl2 64 reduce-overhead auto" "mdt_xl2 64 - op_by_op" "mdt_xl2 64 cpp auto"}; do
    set -- $spec
    opts=(--compile)
    [ "$3" = reduce-overhead ] && opts=(--compile-mode reduce-overhead)
    [ "$3" = cpp ] && opts=(--compile --inductor-options cpp)
    step "step_$1_$3_$4" 110 "$1" "$2" "${opts[@]}" --update "$4"
  done
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  optim_parts 100
  ;;
final3)
  optim_parts 90
  table_steps
  step graphs_mdt_xl2 100 mdt_xl2 64 --compile-mode reduce-overhead
  sample_xl2 200
  ;;
final4)
  table_steps
  step graphs_mdt_xl2 100 mdt_xl2 64 --compile-mode reduce-overhead
  step graphs_mdt_s2 100 mdt_s2 256 --compile-mode reduce-overhead
  "$py" -m mdtzoo bench table "$OUT"/step_*.json "$OUT"/graphs_*.json >&2
  sample_xl2 200
  ;;
autotune)
  for spec in ${AUTOTUNE_SPECS:-"dit_xl2 64 default" "dit_xl2 64 max-autotune-no-cudagraphs" "dit_s2 256 max-autotune-no-cudagraphs"}; do
    set -- $spec
    run "step_$1_b$2_$3" ${AUTOTUNE_LIMIT:-280} bench train-step --model "$1" --batch "$2" --compile-mode "$3" \
      --precision bf16 --verbose --json "$OUT/step_$1_b$2_$3.json"
  done
  ;;
keptgrad)  # kept_grad with the batch split over programs (default) against one program per tile and head (g1)
  run attention_s2 120 bench attention --impl triton,triton:g1 --json "$OUT/attention_s2.json"
  grep -i "triton" "$OUT/attention_s2.log" | grep -v checking >&2
  for opt in - g1; do
    step "step_mdt_s2_$opt" 110 mdt_s2 256 --steps 20 --compile $(variant --triton-options "$opt")
  done
  run attention_xl 120 bench attention --impl triton,triton:g1 --batch 64 --heads 16 --dim 72 --json "$OUT/attention_xl.json"
  grep -i "triton" "$OUT/attention_xl.log" | grep -v checking >&2
  ;;
align)  # session 8: strides in units of their alignment (16-byte loads at head dim 72), dS rows padded; OLD = the code before
  for shape in "xl --batch 64 --heads 16 --dim 72" "s2"; do
    set -- $shape
    name=$1; shift
    if [ -n "${OLD:-}" ]; then
      (cd "$OLD" && run "attention_${name}_old" 100 bench attention --impl triton "$@" --json "$OUT/attention_${name}_old.json")
      grep -i "triton\|no-bias" "$OUT/attention_${name}_old.log" | grep -v checking >&2
    fi
    run "attention_${name}_new" 100 bench attention --impl triton "$@" --json "$OUT/attention_${name}_new.json"
    grep -i "triton\|no-bias" "$OUT/attention_${name}_new.log" | grep -v checking >&2
  done
  old_new_steps "mdt_xl2 64 10" "mdt_s2 256 20"
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  ;;
kern)  # why our attention kernels are slower than flash attention: hardware counters, then launch settings
  echo "== ncu" >&2
  timeout 150 ncu --clock-control none -k regex:"_fwd_kernel|_bwd_kernel|_dq_kernel|_delta_kernel|_kept_grad" \
    --launch-count 10 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis "$py" experiments/bench/attn_sweep.py --shape "${SWEEP_SHAPE:-xl}" --ncu \
    > "$OUT/ncu.txt" 2>&1 || echo "!! ncu failed (rc $?)" >&2
  grep -E "^  _|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit (Reg|Shared)|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" \
    "$OUT/ncu.txt" | head -n 120 >&2
  echo "== sweep" >&2
  timeout "${SWEEP_LIMIT:-280}" "$py" experiments/bench/attn_sweep.py --shape "${SWEEP_SHAPE:-xl}" > "$OUT/sweep.log" 2>&1 \
    || echo "!! sweep failed (rc $?)" >&2
  cat "$OUT/sweep.log" >&2
  step step_mdt_s2_new 110 mdt_s2 256 --steps 20 --compile
  ;;
steps8)  # is the aligned code slower in the MDT-S/2 step (call (s2) said 1,988 against (s1)'s 2,572)? old / new / sw8 in turn
  i=0
  for spec in ${STEPS8_SPECS:-"mdt_s2 256 old" "mdt_s2 256 -" "mdt_s2 256 sw8" "mdt_s2 256 old" "mdt_s2 256 -" "mdt_xl2 64 sw8" "mdt_xl2 64 old"}; do
    set -- $spec
    i=$((i + 1))
    if [ "$3" = old ]; then
      old_step "step_${i}_$1_old" 100 "$1" "$2" --steps 20 --compile
    else
      step "step_${i}_$1_$3" 100 "$1" "$2" --steps 20 --compile $(variant --triton-options "$3")
    fi
  done
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  ;;
final5)
  table_steps
  old_step step_old_mdt_xl2 150 mdt_xl2 64 --compile
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  ;;
final6)  # session 10's defaults (triton_op kernels, fused norm): the table's five steps, then MDT-S/2 with CUDA graphs
  table_steps
  step step_graphs_mdt_s2 100 mdt_s2 256 --steps 20 --compile-mode reduce-overhead
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  ;;
final7)  # MDT-XL/2 with CUDA graphs (its host time is now about its GPU time), then 250-step sampling checked
  # against the reference maths (bench.unoptimised) -- the fused norm's first sampling run
  step step_mdt_xl2_b64 110 mdt_xl2 64 --compile
  step step_graphs_mdt_xl2 150 mdt_xl2 64 --compile-mode reduce-overhead
  sample_xl2 220
  ;;
s2sweep)
  echo "== sweep s2" >&2
  timeout 260 "$py" experiments/bench/attn_sweep.py --shape s2 --top 3 > "$OUT/sweep_s2.log" 2>&1 || echo "!! sweep failed (rc $?)" >&2
  best=$(sed -n 's/^BEST //p' "$OUT/sweep_s2.log")
  echo "best at S/2 shapes: ${best:-none}" >&2
  for opt in - "${best:--}" - "${best:--}"; do
    i=$(( ${i:-0} + 1 ))
    step "step_${i}_mdt_s2" 100 mdt_s2 256 --steps 20 --compile $(variant --triton-options "$opt")
  done
  "$py" -m mdtzoo bench table "$OUT"/step_*.json >&2
  ;;
prof8)
  profile mdt_xl2 64 110 30
  step graphs_mdt_xl2 100 mdt_xl2 64 --compile-mode reduce-overhead
  ;;
keptgrad2)  # the MDT-S/2 step with split and unsplit kept_grad, alternating (g1 first), twice
  for opt in g1 - g1 -; do
    step "step_mdt_s2_$opt" 100 mdt_s2 256 --steps 30 --compile $(variant --triton-options "$opt")
  done
  ;;
blocks)  # where one block's time goes, kernel by kernel, then whole-step profiles
  block block_dit_xl2 150 --model dit_xl2 --batch 64
  block block_dit_s2 150 --model dit_s2 --batch 256
  profile dit_xl2 64 150 40
  profile mdt_xl2 64 170 40
  ;;
blocks2)  # one block's forward + backward under inductor code-generation variants, own caches
  i=0
  for spec in "dit_xl2 64 base" "dit_xl2 64 persist" "dit_xl2 64 multikernel" "dit_s2 256 multikernel" "dit_xl2 64 base"; do
    set -- $spec
    i=$((i + 1))
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$3 TORCH_LOGS=output_code block "block${i}_$1_$3" 150 \
      --model "$1" --batch "$2" --variant "$3"
  done
  ;;
packed)  # q, k, v read packed and the gradient written packed, against the previous code (OLD)
  run attention_xl2 120 bench attention --impl explicit,triton --batch 64 --heads 16 --dim 72 --json "$OUT/attention_xl2.json"
  for i in 1 2; do
    step "step_mdt_xl2_new$i" 110 mdt_xl2 64 --compile
    old_step "step_mdt_xl2_old$i" 110 mdt_xl2 64 --compile
  done
  old_step step_mdt_s2_old 100 mdt_s2 256 --steps 30 --compile
  step step_mdt_s2_new 100 mdt_s2 256 --steps 30 --compile
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_rows step step_mdt_xl2_rows 120 mdt_xl2 64 --compile --inductor-options rows2048
  ;;
packed2)  # packed's check (longer limit: compiling the timed paths) and its S/2 steps
  run attention_xl2 200 bench attention --impl triton --batch 64 --heads 16 --dim 72 --json "$OUT/attention_xl2.json"
  step step_mdt_s2_new1 90 mdt_s2 256 --steps 30 --compile
  old_step step_mdt_s2_old 90 mdt_s2 256 --steps 30 --compile
  step step_mdt_s2_new2 90 mdt_s2 256 --steps 30 --compile
  ;;
packed3)
  step step_mdt_b2_new 110 mdt_b2 256 --compile
  old_step step_mdt_b2_old 110 mdt_b2 256 --compile
  ;;
norm)  # --norm-impl triton against inductor's kernels: block, then steps, alternating
  for impl in torch triton; do
    block "block_dit_xl2_$impl" 120 --model dit_xl2 --batch 64 --norm-impl "$impl"
  done
  for spec in "dit_xl2 torch" "dit_xl2 triton" "mdt_xl2 triton" "mdt_xl2 torch"; do
    set -- $spec
    step "step_$1_$2" 110 "$1" 64 --compile --norm-impl "$2"
  done
  step step_mdt_xl2_sum 110 mdt_xl2 64 --compile --triton-options sum_kernel=true  # the batch-sum kernel too
  ;;
normhost)  # why --norm-impl triton lost in (u1): each block's host time and cProfile, then both DiT-XL/2 step profiles
  for impl in torch triton; do
    block "host_dit_xl2_$impl" 150 --model dit_xl2 --batch 64 --norm-impl "$impl" --host
    grep "host time" "$OUT/host_dit_xl2_$impl.log" >&2
  done
  for impl in triton torch; do
    step "profile_dit_xl2_$impl" 130 dit_xl2 64 --compile --profile --norm-impl "$impl"
    sed -n '/device time per step/,$p' "$OUT/profile_dit_xl2_$impl.log" | head -n 30 >&2
  done
  ;;
ops)  # session 10: the kernels as torch.library.triton_op (inductor launches them), checked compiled first;
  # the block's host time; steps alternating, MDT-XL/2 also with the ops opaque as before (MDTZOO_KERNEL_OPS=custom)
  run attention_xl 150 bench attention --impl triton --batch 64 --heads 16 --dim 72 --json "$OUT/attention_xl.json"
  block host_dit_xl2_triton 150 --model dit_xl2 --batch 64 --norm-impl triton --host
  grep "host time" "$OUT/host_dit_xl2_triton.log" >&2
  step step_mdt_xl2_triton 110 mdt_xl2 64 --compile --norm-impl triton
  MDTZOO_KERNEL_OPS=custom step step_mdt_xl2_custom 110 mdt_xl2 64 --compile
  step step_dit_xl2_triton 100 dit_xl2 64 --compile --norm-impl triton
  step step_dit_xl2_torch 100 dit_xl2 64 --compile
  step step_mdt_xl2_torch 110 mdt_xl2 64 --compile
  ;;
ops2)  # ops after the float64-scalar fix: triton attention checked compiled at XL/2 shapes; MDT steps triton_op / custom ops
  run attention_xl 150 bench attention --impl triton --batch 64 --heads 16 --dim 72 --repeats 10 --json "$OUT/attention_xl.json"
  step step_mdt_xl2_triton 110 mdt_xl2 64 --compile --norm-impl triton
  MDTZOO_KERNEL_OPS=custom step step_mdt_xl2_custom 110 mdt_xl2 64 --compile
  step step_mdt_xl2_torch 110 mdt_xl2 64 --compile
  step step_mdt_s2_triton 90 mdt_s2 256 --steps 20 --compile --norm-impl triton
  MDTZOO_KERNEL_OPS=custom step step_mdt_s2_custom 90 mdt_s2 256 --steps 20 --compile
  ;;
normsweep)  # the fused norm kernels' launch settings at XL/2 and S/2 widths (each checked first), then the steps
  echo "== norm_sweep xl" >&2
  timeout 200 "$py" experiments/bench/norm_sweep.py > "$OUT/norm_sweep_xl.log" 2>&1 || echo "!! norm_sweep xl failed (rc $?)" >&2
  tail -n 1 "$OUT/norm_sweep_xl.log" >&2
  echo "== norm_sweep s2" >&2
  timeout 150 "$py" experiments/bench/norm_sweep.py --batch 256 --dim 384 > "$OUT/norm_sweep_s2.log" 2>&1 \
    || echo "!! norm_sweep s2 failed (rc $?)" >&2
  tail -n 1 "$OUT/norm_sweep_s2.log" >&2
  ;;
norm3)  # session 11: norm_sweep.py at XL/2 and S/2 shapes (kernels timed as CUDA-graph replays), then the MDT-XL/2
  # and MDT-S/2 steps with the defaults / the sweep's BEST settings at their width
  for spec in "xl 150" "s2 110 --batch 256 --dim 384"; do
    set -- $spec
    echo "== norm_sweep $1" >&2
    timeout "$2" "$py" experiments/bench/norm_sweep.py "${@:3}" > "$OUT/norm_sweep_$1.log" 2>&1 \
      || echo "!! norm_sweep $1 failed (rc $?)" >&2
    grep "^|\|^best\|^!!" "$OUT/norm_sweep_$1.log" | head -n 16 >&2
  done
  best_xl=$(sed -n 's/^BEST //p' "$OUT/norm_sweep_xl.log")
  best_s2=$(sed -n 's/^BEST //p' "$OUT/norm_sweep_s2.log")
  step step_mdt_xl2_default 110 mdt_xl2 64 --compile
  [ -n "$best_xl" ] && step step_mdt_xl2_best 110 mdt_xl2 64 --compile --triton-options "$best_xl"
  step step_mdt_s2_default 90 mdt_s2 256 --steps 20 --compile
  [ -n "$best_s2" ] && step step_mdt_s2_best 90 mdt_s2 256 --steps 20 --compile --triton-options "$best_s2"
  ;;
norm4)  # session 11's norm settings (by row width) against session 10's (OLD_NORM), alternating: MDT-S/2, MDT-B/2, then MDT-XL/2
  old_norm=norm.fwd_rows=2,norm.fwd_warps=8,norm.bwd_rows=2,norm.bwd_warps=8,norm.bwd_chunk=16
  step step_mdt_s2_new 90 mdt_s2 256 --steps 20 --compile
  step step_mdt_s2_old 90 mdt_s2 256 --steps 20 --compile --triton-options "$old_norm"
  step step_mdt_b2_new 110 mdt_b2 256 --compile
  step step_mdt_b2_old 110 mdt_b2 256 --compile --triton-options "$old_norm"
  step step_mdt_xl2_new 110 mdt_xl2 64 --compile
  ;;
final8)  # after norm4 on the same machine: 250-step sampling checked (the fused norm's first sampling run), the DiT steps
  sample_xl2 220
  step step_dit_xl2_b64 100 dit_xl2 64 --compile
  step step_dit_s2_b256 100 dit_s2 256 --compile
  ;;
norm5)  # norm_sweep.py on a smaller grid (64-row chunks) at B/2's width, the width norm4's rule had not been timed at, and S/2's
  for spec in "b2 80 --batch 256 --dim 768" "s2 80 --batch 256 --dim 384"; do
    set -- $spec
    echo "== norm_sweep $1" >&2
    timeout "$2" "$py" experiments/bench/norm_sweep.py "${@:3}" --rows 1,2,4 --warps 4,8 --chunks 64 \
      > "$OUT/norm_sweep_$1.log" 2>&1 || echo "!! norm_sweep $1 failed (rc $?)" >&2
    grep "^|\|^best\|^!!" "$OUT/norm_sweep_$1.log" >&2
  done
  ;;
final9)  # session 12, first call: the S/2 steps with each block a compiled region / the encoder's and decoder's stacks as
  # regions (--compile-scope stacks; a longer compile: 3x per-block regions' on the CPU at S/2) / CUDA graphs; MDT-B/2
  step step_mdt_s2_b256 90 mdt_s2 256 --steps 20 --compile
  step stacks_mdt_s2 200 mdt_s2 256 --steps 20 --compile --compile-scope stacks
  step graphs_mdt_s2 90 mdt_s2 256 --steps 20 --compile-mode reduce-overhead
  step step_mdt_b2_b256 110 mdt_b2 256 --compile
  ;;
final10)  # session 12, second call: MDT-B/2 with stacks, then the table's XL and DiT-S/2 steps
  step stacks_mdt_b2 220 mdt_b2 256 --compile --compile-scope stacks
  step step_mdt_xl2_b64 110 mdt_xl2 64 --compile
  step step_dit_xl2_b64 100 dit_xl2 64 --compile
  step step_dit_s2_b256 80 dit_s2 256 --compile
  ;;
final11)  # session 12, third call: the XL steps with stacks (26 and 28 blocks in one region: the longest compiles)
  step stacks_mdt_xl2 300 mdt_xl2 64 --compile --compile-scope stacks
  step stacks_dit_xl2 260 dit_xl2 64 --compile --compile-scope stacks
  ;;
final12)  # session 12, second call: the table's XL and DiT-S/2 steps (stacks lost at S/2 in final9, so none here),
  # then the attention kernels' launch settings swept at XL/2 shapes (never timed there), ending with a BEST line
  step step_mdt_xl2_b64 110 mdt_xl2 64 --compile
  step step_dit_xl2_b64 100 dit_xl2 64 --compile
  step step_dit_s2_b256 80 dit_s2 256 --steps 20 --compile
  echo "== sweep xl" >&2
  timeout 260 "$py" experiments/bench/attn_sweep.py --shape xl --top 3 > "$OUT/sweep_xl.log" 2>&1 || echo "!! sweep failed (rc $?)" >&2
  grep -v "^ " "$OUT/sweep_xl.log" | tail -n 40 >&2
  ;;
offsets)  # session 12: the masked pass's bias read from the (H, 31, 31) table by grid offset (L1) instead of gathered
  # from the (H, 256, 256) full-grid bias (L2); OLD = the code before. Checked against the explicit maths first
  run attention 150 bench attention --impl explicit,triton --repeats 10  # (w4): 100 s printed the checked table, then timed out
  attention_vs_old
  ;;
final13)  # session 12: the table's five compiled steps with the masked pass's bias by grid offset
  table_steps
  ;;
ddp3)  # session 12 on a 2-GPU host: MDT-XL/2 on 1 GPU, then DDP on 2 (the fused norm and the offset-table bias's first DDP run)
  step ddp1_mdt_xl2 120 mdt_xl2 64 --compile
  echo "== ddp2_mdt_xl2" >&2
  timeout 220 "$py" -m torch.distributed.run --standalone --nproc_per_node 2 -m mdtzoo bench train-step \
    --model mdt_xl2 --batch 64 --compile --precision bf16 --json "$OUT/ddp2_mdt_xl2.json" \
    > "$OUT/ddp2_mdt_xl2.log" 2>&1 || echo "!! ddp2_mdt_xl2 failed (rc $?)" >&2
  grep -v warn_once "$OUT/ddp2_mdt_xl2.log" | tail -n 3 >&2
  ;;
offsets2)  # session 12: the offset table read with one subtraction per element (grid indices precomputed per
  # token) against the previous commit's code (OLD): kernels, then the MDT-S/2 and XL/2 steps, alternating
  attention_vs_old
  ;;
mlp)  # session 13: the MLP's GELU backward inside fc2's input-gradient matmul (models/triton_mlp.py): the kernel's launch
  # settings against cuBLAS + inductor's GELU backward and bias sum (mlp_parts.py, each checked), then the XL steps
  echo "== mlp_parts" >&2
  timeout 150 "$py" experiments/bench/mlp_parts.py > "$OUT/mlp_parts.log" 2>&1 || echo "!! mlp_parts failed (rc $?)" >&2
  grep -v "^ " "$OUT/mlp_parts.log" | tail -n 50 >&2
  for spec in "dit_xl2 torch 100" "dit_xl2 triton 100" "mdt_xl2 torch 110" "mdt_xl2 triton 110"; do
    set -- $spec
    step "step_$1_$2" "$3" "$1" 64 --compile --mlp-impl "$2"
  done
  ;;
mlp2)  # session 13: mlp_parts.py again (check_mlp now without TF32), then where MDT-XL/2's step with the fused MLP
  # spends its time (it ran 14% slower than without in call (x1))
  echo "== mlp_parts" >&2
  timeout 150 "$py" experiments/bench/mlp_parts.py > "$OUT/mlp_parts.log" 2>&1 || echo "!! mlp_parts failed (rc $?)" >&2
  grep -v "^ " "$OUT/mlp_parts.log" | tail -n 50 >&2
  step profile_mdt_xl2_triton 150 mdt_xl2 64 --compile --profile --mlp-impl triton
  grep -v "warn\|^  \|^This call\|^\s*$" "$OUT/profile_mdt_xl2_triton.log" | cut -c1-160 | tail -n 60 >&2
  ;;
window)  # session 13: the table's five steps timed step by step (a sync after each) and in windows of steps
  # enqueued back to back (one sync per window, --windows 3)
  window_steps
  ;;
trainer)  # session 13: the trainer's own img/s and its synchronisations per step (trainer_syncs.py, random latents in
  # memory): this code, which reads each step's loss one step later, / OLD's, which waited for it every step
  trainer_runs 60 "mdt_s2 new" "mdt_s2 old" "dit_s2 new" "dit_s2 old"
  ;;
trainer2)  # session 13: trainer's A/B again, alternating and longer (80 steps), after the pinned ring buffer
  trainer_runs 80 "mdt_s2 new" "mdt_s2 old" "mdt_s2 new" "mdt_s2 old" "dit_s2 new" "dit_s2 old"
  ;;
final14)  # for session 14: the trainer's waits per step counted after the slice fix (zero expected, MDT-S/2), then
  # the table's five steps, step by step and back to back (--windows 3), the way the trainer now runs
  trainer_runs 60 "mdt_s2 new"
  window_steps
  ;;
start14)  # session 14's first call: the trainer's waits per step counted (zero expected, MDT-S/2), then the
  # XL/2 steps' GPU time by kernel kind with the norm kernels counted apart
  trainer_runs 60 "mdt_s2 new"
  profile mdt_xl2 64 120 60
  profile dit_xl2 64 120 60
  ;;
graph)  # session 14: the whole step as one CUDA graph (--graph-step, checked against the eager step first)
  # against the eager step, both also timed back to back, in one call
  for spec in "mdt_s2 256 20 graph" "mdt_s2 256 20 eager" "mdt_xl2 64 10 graph" "mdt_xl2 64 10 eager" \
              "dit_xl2 64 10 graph" "dit_xl2 64 10 eager"; do
    set -- $spec
    step "step_$1_$4" 110 "$1" "$2" --steps "$3" --compile --windows 2 $([ "$4" = graph ] && echo --graph-step) --verbose
  done
  ;;
graph2)  # session 14, after (y2)'s crash: the captured step's smoke test (graph_parts.py, DiT-S/2), then the
  # captured step (--graph-step) against the eager step, both also back to back, alternating order
  echo "== graph_parts step (MDT-S/2, b16, eager blocks)" >&2
  (cd experiments/bench && timeout 90 "$py" graph_parts.py --stage step --model mdt_s2) > "$OUT/graph_parts.log" 2>&1
  grep -v "^  \|warn" "$OUT/graph_parts.log" | tail -n 3 >&2
  if ! grep -q "step: ok" "$OUT/graph_parts.log"; then  # what fails, then the sanitizer's first errors
    for stage in fb update; do
      (cd experiments/bench && timeout 90 "$py" graph_parts.py --stage $stage --model mdt_s2 2>&1 | tail -n 2) >&2
    done
    (cd experiments/bench && timeout 240 compute-sanitizer --tool memcheck --print-limit 20 "$py" graph_parts.py \
      --stage step --model mdt_s2 --batch 4) > "$OUT/sanitizer.log" 2>&1
    grep -v "Host Frame\|^=========\s*$" "$OUT/sanitizer.log" | grep -A6 "=====" | head -n 60 >&2
    exit 1
  fi
  for spec in "dit_xl2 64 10 eager" "dit_xl2 64 10 graph" "mdt_xl2 64 10 graph" "mdt_xl2 64 10 eager" \
              "mdt_s2 256 20 eager" "mdt_s2 256 20 graph"; do
    set -- $spec
    step "step_$1_$4" 150 "$1" "$2" --steps "$3" --compile --windows 2 $([ "$4" = graph ] && echo --graph-step) --verbose
    grep "graph check" "$OUT/step_$1_$4.log" >&2
  done
  ;;
graph3)  # (y5) on the same warm machine, after graph_check's fix: the captured steps alone
  for spec in "mdt_xl2 64 10" "dit_xl2 64 10" "mdt_s2 256 20"; do
    set -- $spec
    step "step_$1_graph" 150 "$1" "$2" --steps "$3" --compile --windows 2 --graph-step --verbose
    grep "graph check" "$OUT/step_$1_graph.log" >&2
  done
  ;;
graph4a|graph4b)  # for session 15: the captured step against the eager one after the copy fix and the
  # new graph_check, each also back to back, alternating order; 4a the XL/2 steps, 4b the S/2 and B/2 steps
  if [ "$group" = graph4a ]; then specs="dit_xl2:64:10:eager dit_xl2:64:10:graph mdt_xl2:64:10:graph mdt_xl2:64:10:eager"
  else specs="mdt_s2:256:20:eager mdt_s2:256:20:graph dit_s2:256:20:graph dit_s2:256:20:eager mdt_b2:256:10:graph"; fi
  for spec in $specs; do
    IFS=: read -r m b n kind <<< "$spec"
    step "step_${m}_$kind" 150 "$m" "$b" --steps "$n" --compile --windows 2 $([ "$kind" = graph ] && echo --graph-step) --verbose
    grep "graph check" "$OUT/step_${m}_$kind.log" | cut -c1-600 >&2
  done
  ;;
start15)  # session 15's last call: the GPU tests (the captured step against the eager one, the trainer with
  # train.graph_step against the eager trainer and through a resume), then the trainer's own img/s, eager
  # and with train.graph_step, alternating
  echo "== GPU tests" >&2
  timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_graph_step.py tests/test_training.py \
    -k "on_cuda" > "$OUT/pytest.log" 2>&1 || echo "!! GPU tests failed (rc $?)" >&2
  tail -n 3 "$OUT/pytest.log" >&2
  trainer_runs 60 "mdt_s2 new" "mdt_s2 graph" "dit_s2 graph" "dit_s2 new"
  ;;
final16a|final16b)  # for session 16: the table's steps eager and captured (--graph-step), alternating, each also
  # back to back; the captured step's memory is what was reserved (the check's eager blocks released
  # first). 16a: the XL/2 steps (MDT-XL/2's captured step needed more than 120 s in (z5)); 16b: S/2, B/2
  if [ "$group" = final16a ]; then specs="mdt_xl2:64:10:graph mdt_xl2:64:10:eager dit_xl2:64:10:eager dit_xl2:64:10:graph"
  else specs="mdt_s2:256:20:eager mdt_s2:256:20:graph dit_s2:256:20:graph dit_s2:256:20:eager mdt_b2:256:10:graph mdt_b2:256:10:eager"; fi
  for spec in $specs; do
    IFS=: read -r m b n kind <<< "$spec"
    step "step_${m}_$kind" 170 "$m" "$b" --steps "$n" --compile --windows 2 $([ "$kind" = graph ] && echo --graph-step)
  done
  ;;
final16c|final16d)  # session 16, after bf16 weights went into the trainer: 16c the GPU tests, then every table
  # step captured with bf16 weights; 16d (the same machine, next) the captured steps with float32 weights,
  # then the trainer itself with both (train.graph_step, train.bf16_weights) at S/2
  if [ "$group" = final16c ]; then
    gpu_tests
    captured_steps 170 mdt_xl2:64:10:graph16 dit_xl2:64:10:graph16 mdt_s2:256:20:graph16 mdt_b2:256:10:graph16
  else
    captured_steps 170 mdt_xl2:64:10:graph dit_xl2:64:10:graph mdt_s2:256:20:graph mdt_b2:256:10:graph
    trainer_runs 60 "mdt_s2 graph16" "mdt_s2 graph"
  fi
  ;;
lt17a)  # session 17: the MLP's GELU in cuBLASLt's epilogues (--mlp-impl cublaslt): its GPU tests and parts, then
  # DiT-XL/2 captured with bf16 weights, cuBLASLt MLP / inductor's
  lt_tests 200 --sweep
  captured_steps 170 dit_xl2:64:10:lt17 dit_xl2:64:10:graph16
  ;;
lt17b)  # session 17, after lt17a on the same machine: MDT-S/2 and MDT-XL/2 captured with bf16 weights, cuBLASLt
  # MLP / inductor's
  captured_steps 240 mdt_s2:256:20:lt17 mdt_s2:256:20:graph16 mdt_xl2:64:10:lt17
  ;;
lt17d)  # session 17: the GPU tests (now with the cuBLASLt MLP in the trainer's), then the trainer at MDT-XL/2 b64,
  # captured with bf16 weights and the cuBLASLt MLP
  gpu_tests
  TRAINER_LIMIT=250 trainer_runs 60 "mdt_xl2 lt17 64"
  ;;
lt17e)  # session 17: the cuBLASLt MLP with the bias gradients in the weight-gradient matmuls (BGRADB): GPU tests,
  # parts, then MDT-S/2 captured with / without them (MDTZOO_LT_WGRAD=0: torch's sums, as in lt17a-d)
  lt_tests 150 --shapes xl,s,s_masked
  captured_steps 150 mdt_s2:256:20:lt17 mdt_s2:256:20:lt17w0
  ;;
lt17f)  # session 17, after lt17e on the same machine: DiT-XL/2 captured with / without the BGRADB weight gradients
  captured_steps 170 dit_xl2:64:10:lt17 dit_xl2:64:10:lt17w0
  ;;
s2next)  # prepared for session 18, not run: the GPU tests (the trainer's with the cuBLASLt MLP's BGRADB weight
  # gradients, not yet run on a GPU), then MDT-S/2 captured with bf16 weights and the cuBLASLt MLP, the biased
  # attention's forward in 3 stages (0.141 against 0.164 ms per full-pass call in session 8's sweep) against the
  # default, alternating, with the eager step's profile (bf16 weights, cuBLASLt MLP) between the pairs
  gpu_tests
  for spec in "- 1" "fwd_stages=3 1" "profile" "- 2" "fwd_stages=3 2"; do
    set -- $spec
    if [ "$1" = profile ]; then profile mdt_s2 256 150 60 --bf16-weights --mlp-impl cublaslt; continue; fi
    step "step_mdt_s2_lt17_${1//[=,]/_}_$2" 150 mdt_s2 256 --steps 20 --compile --windows 2 --graph-step \
      --bf16-weights --mlp-impl cublaslt $(variant --triton-options "$1")
  done
  ;;
s18a)  # session 18, ran at 8a64923 (call c2): the GPU tests of the cuBLASLt ops (linear_impl's among them), then
  # MDT-S/2 captured with bf16 weights and the cuBLASLt MLP: the code before the compiled input embedding and
  # interpolator pieces (OLD=dir holding that commit's mdtzoo/), this code, and this code with --linear-impl
  # cublaslt, alternating. linear_impl measured slower and was removed after, so this code no longer takes it.
  echo "== cuBLASLt tests" >&2
  timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_lt_mlp.py -k "on_cuda" > "$OUT/pytest_lt.log" 2>&1 \
    || echo "!! cuBLASLt tests failed (rc $?)" >&2
  tail -n 3 "$OUT/pytest_lt.log" >&2
  for round in 1 2; do
    old_step "step_mdt_s2_old_$round" 150 mdt_s2 256 --steps 20 --compile --windows 2 --graph-step --bf16-weights \
      --mlp-impl cublaslt
    for lin in torch cublaslt; do
      step "step_mdt_s2_glue_${lin}_$round" 150 mdt_s2 256 --steps 20 --compile --windows 2 --graph-step \
        --bf16-weights --mlp-impl cublaslt --linear-impl "$lin"
    done
  done
  ;;
s18b)  # session 18: the trainer at MDT-S/2 b256 captured with bf16 weights and the cuBLASLt MLP (the compiled input
  # embedding and interpolator pieces in), then the same step benchmarked, then MDT-XL/2's step, on one machine
  TRAINER_LIMIT=200 trainer_runs 60 "mdt_s2 lt17"
  captured_steps 150 mdt_s2:256:20:lt17
  captured_steps 230 mdt_xl2:64:10:lt17
  ;;
s18c)  # session 18: tune the cuBLASLt MLP's algorithms at MDT-S/2's shapes (lt_tune.py --write: the table in this
  # tree, copied to $OUT), then MDT-S/2 captured with bf16 weights and the cuBLASLt MLP with the table / without
  # (MDTZOO_LT_TUNED=0), the trainer with it, and the GPU test of a tuned algorithm
  echo "== lt_tune" >&2
  timeout 90 "$py" experiments/bench/lt_tune.py --shapes s,s_masked --write > "$OUT/lt_tune.log" 2>&1 \
    || echo "!! lt_tune failed (rc $?)" >&2
  cat "$OUT/lt_tune.log" >&2
  cp mdtzoo/models/cublaslt_algos.json "$OUT/"
  for tuned in 1 0; do
    MDTZOO_LT_TUNED=$tuned step "step_mdt_s2_tuned$tuned" 110 mdt_s2 256 --steps 20 --compile --windows 2 \
      --graph-step --bf16-weights --mlp-impl cublaslt
  done
  TRAINER_LIMIT=130 trainer_runs 60 "mdt_s2 lt17"
  timeout 40 "$py" -m pytest -q -p no:cacheprovider tests/test_lt_mlp.py -k "tuned_algorithm" > "$OUT/pytest_tuned.log" 2>&1 \
    || echo "!! tuned test failed (rc $?)" >&2
  tail -n 1 "$OUT/pytest_tuned.log" >&2
  ;;
lt17c)  # session 17, after lt17b on the same machine: DiT-XL/2 again, inductor's MLP first this time
  captured_steps 170 dit_xl2:64:10:graph16 dit_xl2:64:10:lt17
  ;;
prof16)  # session 16: where the GPU time of the steps short of their targets goes with bf16 weights (eager
  # steps: the profile's GPU time per kernel kind is the captured step's work too)
  profile dit_xl2 64 150 40 --bf16-weights
  profile mdt_s2 256 120 40 --bf16-weights
  ;;
final16f)  # session 16, after final16e on the same machine: the trainer at MDT-XL/2 b64, captured, with bf16
  # weights and without
  TRAINER_LIMIT=250 trainer_runs 60 "mdt_xl2 graph16 64" "mdt_xl2 graph 64"
  ;;
final16e)  # session 16: after final16c on the same machine, the steps it did not reach (MDT-XL/2's capture
  # with bf16 weights needed more than 170 s on a fresh machine), bf16 against float32 weights, then the trainer
  captured_steps 240 mdt_xl2:64:10:graph16 mdt_xl2:64:10:graph mdt_b2:256:10:graph16 mdt_b2:256:10:graph
  trainer_runs 60 "mdt_s2 graph16"
  ;;
bf16wa|bf16wb)  # for session 16: bf16 Linear weights (--bf16-weights) against float32 weights, both captured
  # (--graph-step), alternating; 16a first runs the GPU tests (bf16 weights against the autocast step bit
  # for bit, the captured step, train.graph_step); 16a: MDT-XL/2, 16b: DiT-XL/2 and MDT-S/2
  if [ "$group" = bf16wa ]; then
    gpu_tests
    captured_steps 170 mdt_xl2:64:10:graph16 mdt_xl2:64:10:graph
  else captured_steps 170 dit_xl2:64:10:graph dit_xl2:64:10:graph16 mdt_s2:256:20:graph16 mdt_s2:256:20:graph; fi
  ;;
cppwrap)  # inductor's C++ wrapper (--inductor-options cpp: kernels launched from generated C++, not Python)
  # against the default, DiT-XL/2 and MDT-XL/2; session 6 gave it 110 s and it did not finish compiling
  for spec in "dit_xl2 -" "dit_xl2 cpp" "mdt_xl2 cpp" "mdt_xl2 -"; do
    set -- $spec
    step "step_$1_${2/-/default}" 280 "$1" 64 --compile --windows 2 $(variant --inductor-options "$2")
  done
  ;;
norm2)  # --norm-impl triton against inductor's kernels on the smaller MDT steps
  for spec in "mdt_s2 triton" "mdt_s2 torch" "mdt_s2 triton" "mdt_s2 torch" "mdt_b2 triton" "mdt_b2 torch"; do
    set -- $spec
    step "step_$1_$2" 90 "$1" 256 --steps 20 --compile --norm-impl "$2"
  done
  ;;
s2prof)  # where the S/2 steps' time goes now: GPU time by kind and the idle line
  profile mdt_s2 256 110 24
  profile dit_s2 256 110 24
  ;;
ddp2)  # session 7 on a 2-GPU host: 1 vs 2 GPUs for MDT-XL/2, CUDA graphs under DDP, then 250-step sampling
  step ddp1_mdt_xl2 150 mdt_xl2 64 --compile
  for mode in default reduce-overhead; do
    echo "== ddp2_mdt_xl2_$mode" >&2
    timeout 200 "$py" -m torch.distributed.run --standalone --nproc_per_node 2 -m mdtzoo bench train-step \
      --model mdt_xl2 --batch 64 --compile-mode "$mode" --precision bf16 --json "$OUT/ddp2_mdt_xl2_$mode.json" \
      > "$OUT/ddp2_mdt_xl2_$mode.log" 2>&1 || echo "!! ddp2_mdt_xl2_$mode failed (rc $?)" >&2
    grep -v warn_once "$OUT/ddp2_mdt_xl2_$mode.log" | tail -n 3 >&2
  done
  sample_xl2 220
  ;;
ddp)
  run step_mdt_s2_b256_triton 170 bench train-step --model mdt_s2 --batch 256 --compile --precision bf16 \
    --attn triton --json "$OUT/step_mdt_s2_b256_triton.json"
  for m in ${DDP_MODELS:-mdt_xl2 dit_xl2}; do
    set -- "$m" 64
    run "ddp1_$1" 150 bench train-step --model "$1" --batch "$2" --compile --precision bf16 --json "$OUT/ddp1_$1.json"
    echo "== ddp2_$1" >&2
    timeout 200 "$py" -m torch.distributed.run --standalone --nproc_per_node 2 -m mdtzoo bench train-step \
      --model "$1" --batch "$2" --compile --precision bf16 --json "$OUT/ddp2_$1.json" > "$OUT/ddp2_$1.log" 2>&1 \
      || echo "!! ddp2_$1 failed (rc $?)" >&2
    tail -n 2 "$OUT/ddp2_$1.log" >&2
  done
  ;;
esac
ls "$OUT"/*.json >/dev/null 2>&1 && "$py" -m mdtzoo bench table $(ls "$OUT"/step_*.json "$OUT"/ddp*.json "$OUT"/graphs_*.json "$OUT"/stacks_*.json "$OUT"/profile_*.json 2>/dev/null)
for f in "$OUT"/attention*.log; do [ -f "$f" ] && grep "^|" "$f"; done
for f in "$OUT"/sample*.log; do [ -f "$f" ] && tail -n 1 "$f"; done
exit 0
