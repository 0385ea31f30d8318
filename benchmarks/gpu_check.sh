#!/usr/bin/env bash
# The whole GPU benchmark in one go, within TOTAL_SECONDS on one GPU with no network. Most important first;
# every result is appended to the JSON the moment it is measured, and each stage has its own time guard
# (bench_ppo.py's --deadline stops starting steps, `timeout` kills a stage that still overruns).
#
# Prepare here:   bash benchmarks/make_wheels.sh            (.whl/; the GPU machine has no trl etc.)
# Dry run here:   DRY_RUN=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_check.sh   (same stages, tiny model, seconds)
# On the GPU:     OUT=<folder> bash benchmarks/gpu_check.sh   -> $OUT/gpu_bench.json, $OUT/gpu_check.log
# Then:           python benchmarks/render.py $OUT/gpu_bench.json   (Markdown tables for BENCHMARKS.md)
#
# Stages (seconds are the guards, not the expected times):
#   1. gpt-neo-125M size: ours, ours-plain and the study's loop interleaved (1 + 4 steps); evaluation (95 s)
#   2. gpt-j-6B size, bf16, batch 16, mini-batch 4, 20 shared blocks: ours, then ours-plain (trl's trainer
#      as it is, on a fresh setup of its own, so neither peak holds a second optimizer), then the memory
#      ladder (trl's full-copy reference at 20; 0/14/24 shared; gradient checkpointing on at 20/0/14/24;
#      trl's optimize_device_cache at 20)                                                            (240 s)
#   3. gpt-neo-2.7B size: ours, then trainer.step alone with the speed-ups added one by one         (60 s)
#   4. gpt-j-6B size: the study's loop (one step), if time is left
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${DRY_RUN:-0}"
OUT="${OUT:-results/gpu_check}"
TOTAL="${TOTAL_SECONDS:-400}"   # everything after the install of the wheels
JSON="$OUT/gpu_bench.json"
LOG="$OUT/gpu_check.log"
if [ "${PLAN_ONLY:-0}" != 1 ]; then
  mkdir -p "$OUT"
  rm -f "$JSON"
  exec > >(tee -a "$LOG") 2>&1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# evaluate copies the local measurement module under HF_HOME; keep everything this run writes inside /tmp
export HF_HOME="${HF_HOME:-/tmp/hf_home}"
PY="${PYTHON:-python3}"
[ "${PLAN_ONLY:-0}" = 1 ] || echo "gpu_check: $(date -u +%FT%TZ) DRY_RUN=$DRY_RUN OUT=$OUT"

if [ "${PLAN_ONLY:-0}" = 1 ]; then
  # Print each stage's bench_ppo.py arguments, one line per stage, and run nothing (tests check them).
  stage() { shift 2; printf '%s\n' "$*"; }
  PY=true
fi

if [ "$DRY_RUN" = 1 ]; then
  # Same stages and flags, tiny model; the packages are already installed here.
  CFG_SMALL=tiny; CFG_MID=tiny; CFG_BIG=tiny
  LADDER=(1 3)    # the tiny model has 4 blocks (default shared: 2)
  STEPS=(--warmup 1 --steps 1)
  PLAIN_STEPS=1
  # one torch thread: a shared 2-core machine makes multi-threaded CPU kernels crawl
  EXTRA=(--eval-samples 8 --device "${DEVICE:-auto}" --threads "${THREADS:-1}")
  TOTAL="${TOTAL_SECONDS:-240}"
elif [ "${PLAN_ONLY:-0}" = 1 ]; then
  CFG_SMALL=gpt-neo-125m; CFG_MID=gpt-neo-2.7b; CFG_BIG=gpt-j-6b; LADDER=(14 24); STEPS=(); EXTRA=()
else
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in .whl/; run 'bash benchmarks/make_wheels.sh' here and carry .whl"; exit 2
  fi
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "installed wheels in $(( $(date +%s) - t0 )) s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  CFG_SMALL=gpt-neo-125m; CFG_MID=gpt-neo-2.7b; CFG_BIG=gpt-j-6b
  LADDER=(14 24)  # with 0 and the default 20 of GPT-J's 28 blocks
  STEPS=()
  EXTRA=()
fi

[ "${PLAN_ONLY:-0}" = 1 ] || "$PY" - <<'EOF' || { echo "error: imports failed; see above"; exit 4; }
import importlib
for name in ("torch", "transformers", "tokenizers", "trl", "datasets", "evaluate", "accelerate", "tyro"):
    module = importlib.import_module(name)
    print(f"{name} {module.__version__} ({module.__file__})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

# stage NAME GUARD_SECONDS bench_ppo.py-args...: runs if enough time is left; never stops the script.
[ "${PLAN_ONLY:-0}" = 1 ] || stage() {
  local name=$1 guard=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 30 ]; then echo "== $name: skipped, ${remaining}s left"; return; fi
  [ "$guard" -gt "$remaining" ] && guard=$remaining
  echo "== $name (guard ${guard}s, ${remaining}s left) $(date -u +%T)"
  # bench_ppo stops starting steps 20 s before the guard; timeout kills it 10 s after the guard at the latest.
  timeout --kill-after=10 "$guard" "$PY" benchmarks/bench_ppo.py --json "$JSON" --append \
    --deadline $(( guard > 40 ? guard - 20 : guard / 2 )) "$@" "${EXTRA[@]}"
  local rc=$?
  [ $rc -ne 0 ] && echo "== $name: exit status $rc (results measured so far are in $JSON)"
  return 0
}

# 1. the headline: ours vs the study's loop at gpt-neo-125M size, plus evaluation throughput
stage "1 $CFG_SMALL ours/ours-plain/study + eval" 95 --size "$CFG_SMALL" --baseline --plain --eval \
  --warmup 1 --steps 4 --variant-budget 45 "${STEPS[@]}"

# 2. GPT-J-6B: default settings (20 of 28 blocks shared, gc off) with ours and ours-plain, then the ladder
stage "2 $CFG_BIG default + memory ladder" 240 --size "$CFG_BIG" --warmup 1 --steps 3 --variant-budget 45 "${STEPS[@]}" \
  --variant-warmup 1 --variant-steps 1 --variant "plain=1,steps=${PLAIN_STEPS:-3}" \
  --variant ref=trl --variant shared=0 --variant "shared=${LADDER[0]}" --variant "shared=${LADDER[1]}" \
  --variant gc=1 --variant shared=0,gc=1 --variant "shared=${LADDER[0]},gc=1" --variant "shared=${LADDER[1]},gc=1" \
  --variant cache=1

# 3. gpt-neo-2.7B size
stage "3 $CFG_MID ours + PPO-phase ablation" 60 --size "$CFG_MID" --warmup 1 --steps 2 "${STEPS[@]}" \
  --optimize-ablation 2

# 4. GPT-J-6B with the study's loop, one measured step, if time is left
stage "4 $CFG_BIG study loop" 70 --size "$CFG_BIG" --baseline --warmup 1 --steps 1

[ "${PLAN_ONLY:-0}" = 1 ] && exit 0
echo "gpu_check: done in $(( $(date +%s) - START )) s after the install; $JSON"
"$PY" benchmarks/render.py "$JSON" > "$OUT/gpu_tables.md" && echo "tables: $OUT/gpu_tables.md"
