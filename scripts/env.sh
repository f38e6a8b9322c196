#!/usr/bin/env bash
# Create .venv (if missing) and install the engine with its test and plot extras: the product
# and what its test suite needs, nothing else (lab tooling such as the GPU image's Triton for the
# ahead-of-time compile checks is installed by .ci/run, outside the venv).
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
