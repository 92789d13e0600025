#!/usr/bin/env bash
# Every GPU measurement of the course in one command, on a machine with 2 NVLink GPUs:
#
#     OUT=/tmp/results bash benchmarks/run_gpu.sh      # JSON files land in $OUT
#     bash benchmarks/run_gpu.sh                       # default OUT: benchmarks/results
#
# First the GPU tests (pytest -m gpu), then every benchmark script present in benchmarks/
# (collectives, tp_mlp, tp_layer, overlap, pipeline, alltoall), each writing $OUT/<name>.json
# with its provenance. Each step has its own time limit and the whole run stays within
# RUN_GPU_BUDGET_S seconds (default 510): a step that fails or times out is reported and the
# next one runs. The full console output goes to $OUT/run_gpu.log (one file beside the JSON:
# a lent device machine returns at most 8 files).
#
# RUN_GPU_STEPS picks and orders the steps (for example RUN_GPU_STEPS="tp_layer overlap").
# BENCH_ARGS is appended to every benchmark's command: BENCH_ARGS=--cpu runs the whole
# sequence on mock devices in about a minute, to check the script itself without GPUs.
set -u -o pipefail

cd "$(dirname "$0")/.."
# NVLink multicast stays off: on shared hosts a program using it can take the GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT="${OUT:-$PWD/benchmarks/results}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${RUN_GPU_BUDGET_S:-510}"
LOG="$OUT/run_gpu.log"

START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY=()

# name, own limit (s); the steps after it keep RESERVE s each of the remaining budget.
STEPS=(
  "pytest-gpu 90"
  "collectives 150"
  "tp_mlp 90"
  "tp_layer 150"
  "overlap 75"
  "pipeline 60"
  "alltoall 60"
)
RESERVE=25
# RUN_GPU_STEPS="tp_layer overlap" runs only those steps, in that order (names as above).
if [[ -n ${RUN_GPU_STEPS:-} ]]; then
  CHOSEN=()
  for want in $RUN_GPU_STEPS; do
    found=
    for step in "${STEPS[@]}"; do
      [[ ${step%% *} == "$want" ]] && CHOSEN+=("$step") && found=1
    done
    [[ -n $found ]] || { echo "run_gpu.sh: unknown step '$want' in RUN_GPU_STEPS" >&2; exit 2; }
  done
  STEPS=("${CHOSEN[@]}")
fi

: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

echo "== run_gpu.sh $(date -u +%FT%TZ): OUT=$OUT budget=${BUDGET}s"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
nvidia-smi topo -m || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' || true

command_for() {  # prints the command of a step, or nothing if its script is absent
  local name=$1
  if [[ $name == pytest-gpu ]]; then
    echo "$PY -m pytest -m gpu tests -q -p no:cacheprovider --continue-on-collection-errors"
    return
  fi
  local script="benchmarks/$name.py"
  [[ -f $script ]] || return 0
  # Convention: scripts take --out PATH. One that does not is given OUT in its environment.
  if "$PY" "$script" --help 2>/dev/null | grep -q -- "--out"; then
    echo "$PY $script --out $OUT/$name.json ${BENCH_ARGS:-}"
  else
    echo "$PY $script ${BENCH_ARGS:-}"
  fi
}

# Resolve every step's command first, so that only present steps keep a reserve.
CMDS=()
for step in "${STEPS[@]}"; do
  read -r name cap <<<"$step"
  CMDS+=("$(command_for "$name")")
done

for i in "${!STEPS[@]}"; do
  read -r name cap <<<"${STEPS[$i]}"
  cmd=${CMDS[$i]}
  if [[ -z $cmd ]]; then
    SUMMARY+=("$(printf '%-12s %-8s %s' "$name" absent "benchmarks/$name.py does not exist")")
    continue
  fi
  later=0
  for ((j = i + 1; j < ${#STEPS[@]}; j++)); do
    [[ -n ${CMDS[$j]} ]] && later=$((later + 1))
  done
  left=$((DEADLINE - $(date +%s) - RESERVE * later))
  limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    SUMMARY+=("$(printf '%-12s %-8s %s' "$name" skipped "no time left in the ${BUDGET}s budget")")
    continue
  fi
  echo
  echo "== $name (limit ${limit}s): $cmd"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" $cmd
  rc=$?
  dt=$(($(date +%s) - t0))
  case $rc in
    0) state=ok ;;
    124 | 137) state=TIMEOUT ;;
    *) state="rc=$rc" ;;
  esac
  SUMMARY+=("$(printf '%-12s %-8s %4ss' "$name" "$state" "$dt")")
done

echo
echo "== summary ($(($(date +%s) - START))s of ${BUDGET}s)"
printf '%s\n' "${SUMMARY[@]}"
ls -l "$OUT"
