#!/usr/bin/env bash
# Create .venv with the CPU build of torch first, then unmask and its dev tools.
# Installing torch 2.13.0 first matters: a dependency asking for "torch" alone would pull the
# newest CUDA build and gigabytes of nvidia-* wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "error: CUDA wheels (nvidia-*) were installed; check dependency ranges" >&2
  exit 1
fi
