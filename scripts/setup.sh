#!/usr/bin/env bash
# Sets up everything moe-serve needs on a fresh machine, in ./.venv.
# torch is installed first and pinned (the local CPU build) so that no later requirement pulls the
# CUDA wheels; everything else follows from pyproject.toml. Safe to run again: it only adds what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "setup: CUDA packages (nvidia-*) were pulled in; torch must be the local CPU build" >&2
  exit 1
fi
