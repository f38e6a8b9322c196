#!/usr/bin/env bash
# Create .venv (if missing) and install the engine with its test and plot extras.
# Idempotent: a second call on a ready environment takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.entk-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch/torchvision are pinned in pyproject.toml; they install from local files here (~1 min).
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,plot,dev]'
  touch "$stamp"
fi
