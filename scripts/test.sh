#!/usr/bin/env bash
# Every test that runs without a GPU (the `cuda` ones are skipped with that reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not cuda" -q "$@"
