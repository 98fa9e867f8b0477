"""Model families on shared tensor-parallel layers.

In: an `ArchConfig` (from config.json), a communicator and a pipeline stage. Out: a `CausalLM`
(models/base.py) with `forward(ids, positions, ctx) -> hidden`, `compute_logits(hidden)` and
`load_weights(iter)`. One file per family; `registry.py` maps architecture names to them.
"""

from shardserve.models.registry import ARCHITECTURES, model_class, parse_arch

__all__ = ["ARCHITECTURES", "model_class", "parse_arch"]
