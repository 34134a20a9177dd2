#!/usr/bin/env bash
# Create (or reuse) .venv and install autoseqpar with what its demo and tests need.
# torch is pinned to the CPU wheel here only; the package itself asks for torch>=2.7.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
