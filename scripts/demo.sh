#!/usr/bin/env bash
# The main job on embedded defaults: the bundled SmolLM2 answers a question through `shardserve generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shardserve generate --chat --input-text "${1:-What is the capital of France?}" --max-output-len 60
