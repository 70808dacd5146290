#!/usr/bin/env bash
# One command that proves and times fastkd on a GPU machine:
#   bash bench/gpu_check.sh            # build the CUDA extension, run the tests on CUDA, time the headline cases
#   bash bench/gpu_check.sh --dry-run  # list the steps, check the imports and the benchmark plan (CPU is fine)
#
# Needs only what a lent GPU machine has: python3 with torch, triton and pytest, nvcc (and ninja, which
# torch's just-in-time build uses); no network, no installs, no virtual environment: it runs from the source
# tree (PYTHONPATH = repository root). PYTHON=... picks another interpreter.
#
# Results go to $FASTKD_RESULTS_DIR (default bench/results/), named <gpu>-<date>:
#   .csv (benchmark rows), .md (their report), -build.log, -pytest.log, -bench.log, -steps.txt, -summary.txt
#
# Time limits, each step under `timeout` (+5 s to stop one that ignores it): 470 s = 7 min 50 s in all:
#   0 preflight 25 s | 1 build 105 s | 2 tests 170 s | 3 benchmarks 140 s | 4 report 15 s | 5 summary 15 s
set -u

PREFLIGHT_S=25  # a cold machine's first `import torch` and CUDA start-up
BUILD_S=105
TESTS_S=170
BENCH_S=140
REPORT_S=15
SUMMARY_S=15

# The headline cases, one `python -m bench` run each (rows are appended to one CSV after every case, so a run
# stopped by the time limit keeps what it measured), in order of importance.
BENCH_PEERS="--passes fwd+bwd --peers eager,compile,liger,triton,cuda"
BENCH_RUNS=(
  "--losses kd,kl_forward,jsd --shapes 8192x128256 --dtypes bfloat16"  # LLM logits, N x V = 1.05e9
  "--losses rkd --shapes 1024x512,4096x2048 --dtypes float32"           # RKD at B = 1024 and 4096
  "--losses at --shapes resnet --dtypes bfloat16"                       # attention transfer, ResNet-50 maps
)

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RESULTS=${FASTKD_RESULTS_DIR:-bench/results}
FAILED=0
START=$SECONDS

header() { echo; echo "=== step $1: $2 (limit $3 s)"; }
record() { echo "$1" >> "$STEPS"; echo "--- $1"; }

# Runs a step's command under its time limit, its output to the screen and to a log; records the outcome.
run_step() {  # run_step <name> <limit_s> <log> <command...>
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    record "$name: ok ($((SECONDS - t0)) s of $limit s)"
  else
    [ "$rc" = 124 ] && rc="timed out"
    record "$name: FAILED (exit $rc, $((SECONDS - t0)) s of $limit s)"
    FAILED=1
  fi
}

header 0 "preflight: imports, versions, GPU, nvcc" "$PREFLIGHT_S"
echo "$PY -m bench.gpu_check preflight $([ $DRY = 1 ] && echo --dry-run)"
PRE=$(timeout -k 5 "$PREFLIGHT_S" "$PY" -m bench.gpu_check preflight $([ $DRY = 1 ] && echo --dry-run) 2>&1)
rc=$?
echo "$PRE"
if [ "$rc" != 0 ]; then
  echo "preflight failed (exit $rc): nothing else runs" >&2
  exit 2
fi
GPU=$(echo "$PRE" | sed -n 's/^slug: //p')
STEM="$RESULTS/$GPU-$(date -u +%Y%m%d-%H%M%S)"
STEPS="$STEM-steps.txt"
echo "results: $STEM.csv .md -build.log -pytest.log -bench.log -steps.txt -summary.txt"

if [ $DRY = 1 ]; then
  header 1 "build the CUDA extension for this GPU" "$BUILD_S"
  echo "$PY -m fastkd build-cuda    (log: $STEM-build.log)"

  header 2 "the whole test suite on CUDA tensors, large cases included" "$TESTS_S"
  echo "$PY -m pytest -q tests    (log: $STEM-pytest.log)"
  echo "dry run: collecting only"
  out=$(timeout -k 5 60 "$PY" -m pytest -q --collect-only -p no:cacheprovider tests 2>&1)
  rc=$?
  echo "$out" | tail -n 1
  [ "$rc" = 0 ] || { echo "$out" | tail -n 20; echo "test collection FAILED (exit $rc)"; FAILED=1; }

  header 3 "headline benchmarks vs eager, torch.compile, Liger-Kernel" "$BENCH_S"
  for args in "${BENCH_RUNS[@]}"; do
    echo "$PY -m bench $args $BENCH_PEERS --budget-min <time left> --out $STEM.csv"
    out=$(timeout -k 5 30 "$PY" -m bench $args $BENCH_PEERS --list 2>&1)
    rc=$?
    echo "$out" | sed 's/^/    case: /'
    if [ "$rc" != 0 ] || [ -z "$out" ]; then echo "benchmark plan FAILED (exit $rc)"; FAILED=1; fi
  done

  header 4 "benchmark report" "$REPORT_S"
  echo "$PY -m bench report --csv $STEM.csv --md $STEM.md --no-plots"

  header 5 "summary: test counts, headline ratios, copy bandwidth, peak memory" "$SUMMARY_S"
  echo "$PY -m bench.gpu_check summary --csv $STEM.csv --pytest-log $STEM-pytest.log --steps $STEPS"

  echo
  echo "dry run $([ $FAILED = 0 ] && echo ok || echo FAILED) in $((SECONDS - START)) s;" \
       "the steps' limits sum to $((PREFLIGHT_S + BUILD_S + TESTS_S + BENCH_S + REPORT_S + SUMMARY_S)) s"
  exit $FAILED
fi

mkdir -p "$RESULTS" || exit 2
: > "$STEPS"
unset TRITON_INTERPRET  # compiled Triton kernels on the GPU, not the interpreter

header 1 "build the CUDA extension for this GPU" "$BUILD_S"
run_step "1 build" "$BUILD_S" "$STEM-build.log" "$PY" -m fastkd build-cuda

header 2 "the whole test suite on CUDA tensors, large cases included" "$TESTS_S"
run_step "2 tests" "$TESTS_S" "$STEM-pytest.log" "$PY" -m pytest -q tests

header 3 "headline benchmarks vs eager, torch.compile, Liger-Kernel" "$BENCH_S"
deadline=$((SECONDS + BENCH_S))
for args in "${BENCH_RUNS[@]}"; do
  left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    record "3 bench $args: not run (benchmark time spent)"
    FAILED=1
    continue
  fi
  budget=$(printf "%d.%02d" $(((left - 10) / 60)) $(((left - 10) % 60 * 100 / 60)))  # start no case after it
  echo "$PY -m bench $args $BENCH_PEERS --budget-min $budget --out $STEM.csv"
  # shellcheck disable=SC2086  # the arguments are words without spaces
  run_step "3 bench $args" "$left" "$STEM-bench.log" "$PY" -m bench $args $BENCH_PEERS --budget-min "$budget" \
    --out "$STEM.csv"
done

header 4 "benchmark report" "$REPORT_S"
run_step "4 report" "$REPORT_S" "$STEM-bench.log" "$PY" -m bench report --csv "$STEM.csv" --md "$STEM.md" --no-plots

header 5 "summary: test counts, headline ratios, copy bandwidth, peak memory" "$SUMMARY_S"
record "steps 0-4: $((SECONDS - START)) s of wall time"
timeout -k 5 "$SUMMARY_S" "$PY" -m bench.gpu_check summary --csv "$STEM.csv" --pytest-log "$STEM-pytest.log" --steps "$STEPS" \
  | tee "$STEM-summary.txt"
echo "results in $RESULTS/: $(basename "$STEM").csv .md -build.log -pytest.log -bench.log -steps.txt -summary.txt"
exit $FAILED
