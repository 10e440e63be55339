#!/usr/bin/env bash
# Create .venv with the CPU build of torch first, then unmask and its dev tools.
# Installing torch 2.13.0 first matters: a dependency asking for "torch" alone would pull the
# newest CUDA build and gigabytes of nvidia-* wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "setup: $*" >&2; }  # each step says what it does: the installs take minutes
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
else
  step "using the existing .venv"
fi
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
step "installing torch 2.13.0, CPU build (first time: about 200 MB, a few minutes)"
.venv/bin/python -m pip install -q "torch==2.13.0"
step "installing unmask and its dependencies (transformers, accelerate, datasets, ...)"
.venv/bin/python -m pip install -q -e ".[dev]"
step "checking the optional tools (bubblewrap for the code sandbox)"
# Code tasks run model-written programs under bubblewrap when it is installed (docs/sandbox.md).
# Best effort: without it they use a weaker fallback, so setup never fails here.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
      && apt-get install -y -q bubblewrap >/dev/null 2>&1; then
    echo "installed bubblewrap for the code sandbox"
  else
    echo "note: bwrap not found; code tasks will use the weaker fallback sandbox" \
      "(apt-get install bubblewrap, see docs/sandbox.md)" >&2
  fi
fi
if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "error: CUDA wheels (nvidia-*) were installed; check dependency ranges" >&2
  exit 1
fi
# The trace viewer's browser test drives Debian's chromium with chromium-driver. Installed
# once, when apt-get is here and we are root; never fatal: without them that test is skipped.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ] && [ -z "${UNMASK_NO_BROWSER:-}" ]; then
  { timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
      apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "note: chromium/chromium-driver not installed; the browser test will be skipped" >&2
fi
