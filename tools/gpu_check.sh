#!/usr/bin/env bash
# tools/gpu_check.sh: everything a CUDA GPU can verify, as ONE prepared command.
#
#   bash tools/gpu_check.sh OUT_DIR             run every step; logs and a summary table go to OUT_DIR
#   bash tools/gpu_check.sh --dry-run [OUT_DIR] list the steps and exit 0
#
# Made for a device machine with no package index: Python with numpy, cupy (cuda12x or cuda13x), numba-cuda,
# pytest, hypothesis, safetensors, torch and transformers already installed. It runs from the source tree
# (PYTHONPATH=<repo>), never installs anything, and keeps the whole run under 8 minutes on one H200 (each step
# has its own time limit; a step that hits it is reported as "timeout" and the next one still runs).
# Without a GPU it says so in one line and exits 0. Exit status: 0 when every step passed, 1 otherwise.
#
# OUT_DIR/summary.md  one row per step: status, seconds, and the lines of its log that carry figures
# OUT_DIR/<step>.log  the full output of each step
# OUT_DIR/env.txt     the environment the results came from (device, driver, package versions)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "tools/gpu_check.sh: unknown option $arg (expected --dry-run or OUT_DIR)" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done

# name | time limit (s) | command (run in the repo root with PYTHONPATH set)
STEPS=(
  "env|20|$PY tools/gpu_env.py"
  "gpu_tests|230|$PY -m pytest -q -m gpu -p no:cacheprovider -o addopts= tests/test_backend_core.py tests/test_backend_quant.py tests/test_backend_contract.py tests/test_backend_mamba.py tests/test_backend_model.py tests/test_backend_numba_only.py tests/test_backend_cupy_only.py tests/test_parallel_gpu.py"
  "bench_mamba|40|$PY bench/kernels_mamba.py --quick --repeats 10"
  "bench_core|40|$PY bench/kernels_core.py --quick --iters 10"
  "pipeline_slice|100|$PY bench/pipeline_slice.py --backend cupy --preset ultra --pattern 'ME*' --recipe ultra --stages 3 --prompt-len 8 --decode-steps 2"
)

if [ "$DRY" = 1 ]; then
  echo "tools/gpu_check.sh would run, in $ROOT with PYTHONPATH=$ROOT (limit in seconds):"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    printf '  %-12s %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  exit 0
fi
if [ -z "$OUT" ]; then
  echo "usage: bash tools/gpu_check.sh OUT_DIR  (or --dry-run)" >&2
  exit 2
fi

cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM
if ! "$PY" -c "import sys; sys.path.insert(0, 'tests'); import gpu_harness; sys.exit(0 if gpu_harness.gpu_available() else 1)" 2>/dev/null; then
  echo "tools/gpu_check.sh: no CUDA GPU here (the CUDA driver reports no device); nothing was run"
  exit 0
fi

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
{
  echo "# tools/gpu_check.sh on $(hostname), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| step | status | seconds | figures |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  log="$OUT/$name.log"
  echo "== $name (limit ${limit}s): $cmd"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  case "$rc" in
    0) status="pass" ;;
    124|137) status="timeout"; failed=1 ;;
    *) status="fail (exit $rc)"; failed=1 ;;
  esac
  # the figures: pytest's summary line, bench rows with a ratio or GB/s, the device line
  figures=$(grep -E "passed|failed|error|GB/s|ratio|x memcpy|device:|tok/s|^GPU" "$log" | tail -n 12 \
            | sed 's/|/\\|/g' | tr '\n' ';' | sed 's/;$//; s/;/<br>/g')
  echo "| $name | $status | $seconds | $figures |" >>"$SUMMARY"
  echo "   $status in ${seconds}s (log: $log)"
  [ "$name" = "env" ] && cp "$log" "$OUT/env.txt"
done
echo
cat "$SUMMARY"
exit $failed
