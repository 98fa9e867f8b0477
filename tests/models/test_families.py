"""Every family variant against its reference (transformers, or for ChatGLM / Baichuan the model the
checkpoint was converted from, or Baichuan-ALiBi's test-local dense reference): greedy tokens
identical with requests arriving at different steps; prompt logits within 1e-4 relative; a 2-stage
pipeline split holds every checkpoint tensor exactly once; pipeline stages chained with `hidden=`
(each with its own KV cache) give the whole model's logits; a stage refuses the wrong input."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

from shardserve.builder.checkpoint import open_checkpoint
from shardserve.models.base import CausalLM, Stage
from shardserve.models.registry import model_class
from shardserve.workers.attention import (
    AttentionMetadata,
    ForwardContext,
    SeqSpan,
    TorchAttentionBackend,
    kv_cache_shape,
)
from tests.checkpoints import (
    Checkpoints,
    arch_of,
    assert_greedy_matches,
    assert_two_stages_split_checkpoint,
    prompt_logits_error,
    staggered_prompts,
)
from tests.models.families import FAMILIES, GREEDY_VARIANTS, VARIANTS, ids

pytestmark = pytest.mark.timeout(300)

BLOCK_SIZE = 8
BLOCK_TABLE = [5, 2, 7]  # scattered cache blocks of the one sequence (21 tokens)
FIRST_VARIANTS = [(family, next(iter(recipes))) for family, recipes in FAMILIES.items()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoints]:
    return {family: Checkpoints(tmp_path_factory, family, recipes) for family, recipes in FAMILIES.items()}


@pytest.mark.parametrize(("family", "variant"), GREEDY_VARIANTS, ids=ids(GREEDY_VARIANTS))
def test_greedy_tokens_equal_reference(checkpoints: dict[str, Checkpoints], family: str, variant: str) -> None:
    assert_greedy_matches(*checkpoints[family](variant))


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=ids(VARIANTS))
def test_prompt_logits_within_1e_4(checkpoints: dict[str, Checkpoints], family: str, variant: str) -> None:
    assert prompt_logits_error(*checkpoints[family](variant)) < 1e-4


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=ids(VARIANTS))
def test_two_stage_split_covers_the_checkpoint(checkpoints: dict[str, Checkpoints], family: str, variant: str) -> None:
    assert_two_stages_split_checkpoint(checkpoints[family](variant)[0])


def load_stages(path: Path, bounds: tuple[int, ...]) -> list[CausalLM]:
    """The models of pipeline stages [bounds[i], bounds[i + 1]), each loaded from the whole checkpoint
    (as workers/worker.py `load_model` does)."""
    arch = arch_of(path)
    checkpoint, cls = open_checkpoint(path), model_class(arch)
    models = []
    for start, end in pairwise(bounds):
        model = cls(arch, stage=Stage(start, end, arch.num_layers))
        assert model.load_weights(checkpoint.iter_tensors()) == set(dict(model.named_parameters()))
        models.append(model.eval())
    return models


def pipeline_logits(path: Path, bounds: tuple[int, ...], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab]: all but the last token as one prompt, then a decode step of the last,
    each step through the stages of `bounds` in turn (`hidden=` the previous stage's output), every
    stage over its own paged KV cache. bounds (0, num_layers) is the whole model."""
    models = load_stages(path, bounds)
    arch = models[0].arch
    shape = kv_cache_shape(max(BLOCK_TABLE) + 1, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
    caches = [[torch.zeros(shape) for _ in range(m.stage.start, m.stage.end)] for m in models]
    backend, n, logits = TorchAttentionBackend(), len(tokens), []
    with torch.inference_mode():
        for start, end in ((0, n - 1), (n - 1, n)):  # prefill, decode
            meta = AttentionMetadata.build([SeqSpan(0, end - start, end, BLOCK_TABLE)], BLOCK_SIZE, torch.device("cpu"))
            step_ids, positions = torch.tensor(tokens[start:end]), torch.arange(start, end)
            hidden = None
            for model, kv_caches in zip(models, caches, strict=True):
                hidden = model(step_ids, positions, ForwardContext(meta, kv_caches, backend), hidden=hidden)
            logits.append(models[-1].compute_logits(hidden))  # [step tokens, vocab]
    return torch.cat(logits)


def stage_splits(num_layers: int) -> list[tuple[int, ...]]:
    """Stage bounds to try: two stages, and three when there are layers enough."""
    splits = [(0, num_layers // 2, num_layers)]
    if num_layers >= 3:
        splits.append((0, num_layers // 3, 2 * num_layers // 3, num_layers))
    return splits


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=ids(VARIANTS))
def test_pipeline_stages_chained_equal_the_whole_model(
    checkpoints: dict[str, Checkpoints], family: str, variant: str
) -> None:
    path, _ = checkpoints[family](variant)
    num_layers = arch_of(path).num_layers
    tokens = staggered_prompts(arch_of(path).vocab_size, (21,))[0]  # a 20-token prompt, then one decode
    whole = pipeline_logits(path, (0, num_layers), tokens)
    for bounds in stage_splits(num_layers):
        torch.testing.assert_close(pipeline_logits(path, bounds, tokens), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("family", "variant"), FIRST_VARIANTS, ids=ids(FIRST_VARIANTS))
def test_stage_refuses_the_wrong_input(checkpoints: dict[str, Checkpoints], family: str, variant: str) -> None:
    arch = arch_of(checkpoints[family](variant)[0])
    first, last = (model_class(arch)(arch, stage=Stage(a, b, 2)) for a, b in ((0, 1), (1, 2)))
    step_ids, positions = torch.tensor([3, 4, 5]), torch.arange(3)
    meta = AttentionMetadata.build([SeqSpan(0, 3, 3, [0])], BLOCK_SIZE, torch.device("cpu"))
    ctx = ForwardContext(meta, [], TorchAttentionBackend())  # refused before any layer runs
    with pytest.raises(ValueError, match="first pipeline stage .* takes no hidden states"):
        first(step_ids, positions, ctx, hidden=torch.zeros(3, arch.hidden_size))
    with pytest.raises(ValueError, match=r"stage of layers \[1, 2\) of 2 needs the previous stage's hidden"):
        last(step_ids, positions, ctx)
    with pytest.raises(ValueError, match=r"got hidden states \(2, \d+\) for 3 tokens"):
        last(step_ids, positions, ctx, hidden=torch.zeros(2, arch.hidden_size))
