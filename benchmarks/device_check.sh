#!/usr/bin/env bash
# The one device check: everything that needs a GPU, in one call of at most 9 minutes on an H200.
#
#   bash benchmarks/device_check.sh [--data CIFAR10] [--only STEP,...] [--tune] [--dry-run]
#
# Steps, in order, each under its own timeout (and all under one budget, ENTK_DEVICE_BUDGET_S,
# default 540 s), so that one hang cannot eat the others' time:
#   info     the hardware: nvidia-smi and torch.cuda.get_device_name (names the results)
#   ext      build the CUDA extension (entk ext build --device cuda; timed)
#   tests    every CUDA-marked test (pytest -m cuda tests/)
#   ops      benchmarks/bench_ops.py: fused ops with measured ceilings (copy, torch.mm)
#   ntk      benchmarks/bench_ntk.py: Jacobians, Gram, pairwise distances (eNTK);
#            benchmarks/bench_ntk_entk.py: the full, cross and pNTK kernels against the recipe; and
#            benchmarks/bench_ntk_contraction.py: per-layer contraction (pairs vs materialise)
#   train    benchmarks/bench_train.py: training steps and sampling
#   twins    benchmarks/bench_twins.py: fleet vs sequential, CUDA graph vs eager
#   study    a shortened gpu-paper study (entk reproduce --preset gpu-paper --steps 400 ...)
# --tune runs info, ext and the launch-configuration sweep (benchmarks/tune_ops.py) instead.
# --dry-run (any machine, no GPU): prints every step and checks that every file, test and
# benchmark it names exists and collects, and that the CLI still takes the flags used here.
#
# The GPU machine (torch, Python 3.12, h5py, pytest, pytest-benchmark, triton) installs
# nothing and has no venv: this runs the system python3 (or $PYTHON) with PYTHONPATH=. .
#
# Results: under $OUT when the device tool runs it (it returns at most 8 files: the whole
# results folder comes back as one device-<hardware>.tar.gz, refreshed after every step, plus
# summary.txt), else in benchmarks/results/device-<hardware>-<date>/. Copy what is worth
# keeping into benchmarks/results/ and describe it in benchmarks/results/README.md.
#
# Real CIFAR-10 for the study: copy the archive into the git-ignored folder .device-data/ and
# name that folder in the device tool's carry (it travels with the working tree, 19 MB):
#   mkdir -p .device-data && cp ../shared/data/cifar10-jpeg.tar.gz .device-data/
#   run(command="bash benchmarks/device_check.sh --data .device-data/cifar10-jpeg.tar.gz",
#       carry=[".device-data"], timeout_s=600)
# Without --data the study runs on the synthetic data (the GPU path, not the paper's numbers).
# Exit status: 0 when every step passed, 1 when any failed or timed out, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
export ENTK_EXT_DIR="${ENTK_EXT_DIR:-/tmp/entk-ext}" ENTK_CACHE_DIR="${ENTK_CACHE_DIR:-/tmp/entk-cache}"

DRY=0 TUNE=0 DATA="" ONLY=""
STUDY_STEPS="${ENTK_STUDY_STEPS:-400}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --tune) TUNE=1 ;;
    --data) DATA="${2:?--data needs a path}"; shift ;;
    --only) ONLY="${2:?--only needs a list of steps}"; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$DATA" ] && [ ! -e "$DATA" ]; then
  echo "device_check: --data $DATA does not exist (copy the archive into .device-data/ and carry it)" >&2
  exit 2
fi

# Step table: name, timeout (s), what it runs. Timeouts sum to about the budget; the budget
# is what bounds the whole call.
STEPS=(info ext tests ops ntk train twins study)
[ "$TUNE" = 1 ] && STEPS=(info ext tune)
declare -A LIMIT=([info]=20 [ext]=75 [tests]=180 [ops]=75 [ntk]=50 [train]=35 [twins]=35 [study]=100 [tune]=420)
BENCH_ARGS=(-p no:cacheprovider -s -q --benchmark-columns=median,iqr,rounds)
TEST_ARGS=(-p no:cacheprovider -q --maxfail=30 -m cuda tests/)
STUDY_FLAGS=(--preset gpu-paper --steps "$STUDY_STEPS" --probe 50 --eval-n 500 --device cuda --quiet)
if [ -n "$DATA" ]; then STUDY_FLAGS+=(--data cifar10 --data-root "$DATA"); fi
if [ -n "$ONLY" ]; then
  IFS=, read -r -a want <<<"$ONLY"
  for w in "${want[@]}"; do
    [ -n "${LIMIT[$w]:-}" ] || { echo "device_check: unknown step $w (steps: ${!LIMIT[*]})" >&2; exit 2; }
  done
  STEPS=("${want[@]}")
fi

hardware() {
  if [ "$DRY" = 1 ]; then echo "dry-run"; return; fi
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep . ||
    "$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')"
}
HW="$(hardware)"
SLUG="$(echo "$HW" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
if [ -n "${OUT:-}" ]; then
  WORK="/tmp/entk-device-check/device-$SLUG"
else
  WORK="$ROOT/benchmarks/results/device-$SLUG-$(date -u +%Y%m%d-%H%M)"
fi
[ "$DRY" = 1 ] && WORK="$(mktemp -d)/device-$SLUG"
mkdir -p "$WORK"
SUMMARY="$WORK/summary.txt"
echo "device check on $HW ($(date -u +%FT%TZ)), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'):" \
  "steps ${STEPS[*]}, budget ${ENTK_DEVICE_BUDGET_S:-540} s" | tee "$SUMMARY"

# The command of each step (an array per step, filled by cmd_<step>).
cmd_info() { CMD=(bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
--format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \
torch.cuda.get_device_name())'"); }
cmd_ext() { CMD=("$PY" -m engine ext build --device cuda); }
cmd_tests() { CMD=("$PY" -m pytest "${TEST_ARGS[@]}"); }
bench() { CMD=("$PY" -m pytest "benchmarks/bench_$1.py" "${BENCH_ARGS[@]}" "--benchmark-json=$WORK/$1-$SLUG.json"); }
cmd_ops() { bench ops; }
cmd_ntk() { bench ntk; CMD+=(benchmarks/bench_ntk_entk.py benchmarks/bench_ntk_contraction.py); }
cmd_train() { bench train; }
cmd_twins() { bench twins; }
cmd_study() { CMD=("$PY" -m engine reproduce "${STUDY_FLAGS[@]}" --out "$WORK/study"); }
cmd_tune() { CMD=("$PY" benchmarks/tune_ops.py --out "$WORK/tune-$SLUG.jsonl"); }

# --dry-run: what each step names must exist and collect here.
check_step() {
  case "$1" in
    info) command -v nvidia-smi >/dev/null || echo "  (nvidia-smi is not here; on the GPU machine it is)" ;;
    ext) "$PY" -c "from engine.ops import ext
missing = [s for k in ext.SOURCES for s in ext.SOURCES[k] if not (ext.CSRC / s).exists()]
assert not missing, missing" && "$PY" -m engine ext --help | grep -q -- "--device" ;;
    tests) [ "$TESTS_RC" = 0 ] && tail -n 1 "$WORK/collect-tests.txt" ;;
    ops|ntk|train|twins) local n
      n=$(grep -c "^benchmarks/bench_$1.py::" "$WORK/collect-benchmarks.txt")
      [ "$BENCH_RC" = 0 ] && [ "$n" -gt 0 ] && echo "$n benchmarks collected" ;;
    study) local help; help="$("$PY" -m engine reproduce --help)" || return 1
      for f in "${STUDY_FLAGS[@]}" --out; do
        case "$f" in --*) grep -q -- "$f" <<<"$help" || { echo "  entk reproduce no longer takes $f"; return 1; } ;; esac
      done
      grep -q "gpu-paper" <<<"$help" || { echo "  no gpu-paper preset"; return 1; } ;;
    tune) "$PY" -m py_compile benchmarks/tune_ops.py ;;
  esac
}

pack() {  # what comes back from the device tool: one archive (no HDF5 files) and the summary
  [ -n "${OUT:-}" ] && [ "$DRY" = 0 ] || return 0
  tar -czf "$OUT/device-$SLUG.tar.gz" --exclude='*.h5' -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
  cp "$SUMMARY" "$OUT/summary.txt"
}

if [ "$DRY" = 1 ]; then  # one collection of the tests and one of every benchmark file (each costs an import)
  "$PY" -m pytest --collect-only "${TEST_ARGS[@]}" >"$WORK/collect-tests.txt" 2>&1; TESTS_RC=$?
  "$PY" -m pytest --collect-only -q -p no:cacheprovider benchmarks/bench_{ops,ntk,ntk_entk,ntk_contraction,train,twins}.py \
    >"$WORK/collect-benchmarks.txt" 2>&1; BENCH_RC=$?
fi
T0=$(date +%s)
BUDGET="${ENTK_DEVICE_BUDGET_S:-540}"
FAILED=0
for s in "${STEPS[@]}"; do
  "cmd_$s"
  if [ "$DRY" = 1 ]; then
    printf '%-6s (timeout %3s s) %s\n' "$s" "${LIMIT[$s]}" "${CMD[*]}" | tee -a "$SUMMARY"
    if ! check_step "$s" >"$WORK/$s.check" 2>&1; then
      FAILED=1
      echo "  CHECK FAILED: $(tail -n 5 "$WORK/$s.check")" | tee -a "$SUMMARY"
    else
      sed 's/^/  /' "$WORK/$s.check" | tail -n 2
    fi
    continue
  fi
  left=$(( BUDGET - ($(date +%s) - T0) ))
  limit=${LIMIT[$s]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "$s: SKIPPED (budget of $BUDGET s spent)" | tee -a "$SUMMARY"; FAILED=1; continue
  fi
  echo "== $s (timeout $limit s): ${CMD[*]}"
  start=$(date +%s)
  timeout -k 10 "$limit" "${CMD[@]}" >"$WORK/$s.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after $limit s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  tail -n 15 "$WORK/$s.log"
  echo "$s: $status, $took s" | tee -a "$SUMMARY"
  pack
done
echo "total $(( $(date +%s) - T0 )) s; results in $WORK$([ -n "${OUT:-}" ] && echo " (and \$OUT)")" | tee -a "$SUMMARY"
pack
exit $FAILED
