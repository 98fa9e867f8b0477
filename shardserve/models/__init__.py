"""Model families on shared tensor-parallel layers.

In: an `ArchConfig` (from config.json) and a communicator. Out: an `nn.Module` with
`forward(ids, positions, ctx) -> hidden`, `compute_logits(hidden)` and `load_weights(iter)`.
"""

from shardserve.models.registry import ARCHITECTURES, model_class

__all__ = ["ARCHITECTURES", "model_class"]
