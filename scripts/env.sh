#!/usr/bin/env bash
# Create .venv (if missing) and install the engine with its test and plot extras.
# Idempotent: a second call on a ready environment takes a fraction of a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "entk: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.entk-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch/torchvision are pinned in pyproject.toml; they install from local files here (~1 min).
  echo "entk: installing the engine and its dependencies into .venv (log: .venv/install.log)" >&2
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e '.[test,plot,dev]'; } >.venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2
    echo "entk: installation failed; full log in .venv/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
# The GPU machine's Triton (3.6; it cannot install anything), beside the venv's own, so that
# tests/test_triton_build.py compiles every kernel against both versions ahead of time.
gpu_triton=.venv/triton-gpu-image
if [ ! -d "$gpu_triton/triton" ]; then
  if ! .venv/bin/python -m pip install --quiet --no-deps --target "$gpu_triton" "triton==3.6.0" \
       >>.venv/install.log 2>&1; then
    rm -rf "$gpu_triton"
    echo "entk: could not install triton 3.6.0; the compile check against the GPU image's Triton will skip" >&2
  fi
fi
