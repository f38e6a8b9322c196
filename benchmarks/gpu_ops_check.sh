#!/usr/bin/env bash
# One prepared device check for the fused ops (engine.ops, csrc/): run on a GPU machine from the
# repository root, with nothing installed beyond torch/triton/h5py/pytest/pytest-benchmark.
#   1. build the CUDA extension (timed), 2. correctness of every backend on CUDA (the cuda-marked
#   tests of the ops, Gram and distance suites), 3. the benchmark table with measured ceilings,
#   4. the launch-configuration sweep (benchmarks/gpu_tune_ops.py; TUNE=0 skips it).
# Writes logs, the benchmark JSON and tune.jsonl under $OUT (default: benchmarks/results/gpu-run).
# ~5 min on an H200 without the sweep, ~8-9 with it (each step has its own timeout, so a slow
# step cannot eat the others' time, and everything written so far comes back).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=16
export ENTK_EXT_DIR="${ENTK_EXT_DIR:-/tmp/entk-ext}"
ROOT="$PWD"
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"  # absolute: the benchmark step runs from benchmarks/
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import time, torch
from engine.ops import ext
t = time.perf_counter()
try:
    ext.load("cuda", verbose=False)
    print(f"cuda extension built/loaded in {time.perf_counter() - t:.1f} s")
except Exception as e:
    print("CUDA EXTENSION FAILED:", e)
PY
echo "build: $(( $(date +%s) - start )) s"

start=$(date +%s)
timeout 240 python3 -m pytest -p no:cacheprovider -p no:xdist -q --maxfail=20 -m cuda \
  tests/test_ops_kernel_pairs.py tests/test_ops_triton_kernel_pairs.py tests/test_ops_gram_tile.py \
  tests/test_gram.py tests/test_distance.py 2>&1 | tee "$OUT/tests.log" | tail -n 25
echo "tests: $(( $(date +%s) - start )) s, exit ${PIPESTATUS[0]}"

start=$(date +%s)
cd benchmarks && timeout 240 python3 -m pytest -p no:cacheprovider -p no:xdist -q -s bench_ops.py \
  --benchmark-json="$OUT/ops-h200.json" --benchmark-columns=median,iqr,rounds 2>&1 \
  | tee "$OUT/bench.log" | grep -E "ceilings|ext backend|^\[|median|passed|failed|Error" | tail -n 40
echo "bench: $(( $(date +%s) - start )) s"

if [ "${TUNE:-1}" != "0" ]; then
  start=$(date +%s)
  cd "$ROOT"
  timeout 240 python3 benchmarks/gpu_tune_ops.py --out "$OUT/tune.jsonl" 2>&1 | tee "$OUT/tune.log" | tail -n 45
  echo "tune: $(( $(date +%s) - start )) s"
fi
