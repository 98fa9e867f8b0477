"""Tiny random Hugging Face checkpoints (fixed seeds, float32) with a small trained tokenizer, and the
checks every model family shares: greedy tokens and logits against a reference, a two-stage pipeline
split of the checkpoint, and engine rank files that join back to it.

Each family test module (tests/models/test_<family>.py) exposes `RECIPES: dict[variant, Recipe]`; a
`Checkpoints` getter makes each recipe once per test session, so the family tests and the builder's
tests (tests/builder/test_build_families.py) share checkpoints and references."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from shardserve.models.arch import ArchConfig

VOCAB = 320
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "How do I count to nine in French? un deux trois quatre cinq six sept huit neuf",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "hello world, hello shardserve: paged attention and in-flight batching",
]

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3": (
        "llama",
        {
            "num_key_value_heads": 1,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
}


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(path)
    )


def make_checkpoint(path: Path, family: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """Save a tiny random Llama-family model (and tokenizer) under `path`; returns (path, HF model)."""
    model_type, extra = FAMILIES[family]
    return make_model_checkpoint(path, model_type, seed, **{**BASE, **extra, **overrides})


def make_model_checkpoint(path: Path, model_type: str, seed: int = 0, **config_kwargs: Any) -> tuple[Path, Any]:
    """Save a tiny random transformers `model_type` model with `config_kwargs` and the test tokenizer
    (vocab_size must be >= VOCAB); returns (path, HF model in eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random weights large enough that logits are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path, model


Made = tuple[Path, Any]  # (checkpoint dir, reference model: transformers' or a test-local one)
Recipe = Callable[[Path], Made]  # writes one tiny checkpoint under an empty dir
_MADE: dict[Recipe, Made] = {}


# The Llama family's variants (tests/models/test_llama.py; the `tiny_checkpoint` fixture's families).
LLAMA_RECIPES: dict[str, Recipe] = {family: partial(make_checkpoint, family=family) for family in FAMILIES}


def hf_recipe(model_type: str, seed: int = 0, **config_kwargs: Any) -> Recipe:
    """A recipe for `make_model_checkpoint(dir, model_type, seed, **config_kwargs)`."""
    return partial(make_model_checkpoint, model_type=model_type, seed=seed, **config_kwargs)


class Checkpoints:
    """`get(variant)` -> (dir, reference) of one family's recipes, each made once per test session
    (so every test module using the same `RECIPES` shares the checkpoint and its reference)."""

    def __init__(self, factory: pytest.TempPathFactory, family: str, recipes: dict[str, Recipe]) -> None:
        self.factory, self.family, self.recipes = factory, family, recipes

    def __call__(self, variant: str) -> Made:
        recipe = self.recipes[variant]
        if recipe not in _MADE:
            _MADE[recipe] = recipe(self.factory.mktemp(f"{self.family}_{variant}"))
        return _MADE[recipe]


_GREEDY: dict[tuple[Any, tuple[int, ...], int], list[int]] = {}


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt alone (never stops early, may produce EOS).
    Memoised per (model, prompt): the references are never modified after they are made."""
    key = (model, tuple(prompt), max_new_tokens)
    if key in _GREEDY:
        return _GREEDY[key]
    if hasattr(model, "generation_config"):  # test-local references have none
        model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    _GREEDY[key] = out[0, len(prompt) :].tolist()
    return _GREEDY[key]


def staggered_prompts(vocab: int, lengths: tuple[int, ...] = (3, 17, 5, 40, 9, 26, 1, 12, 33)) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, min(vocab, VOCAB), (n,), generator=g).tolist() for n in lengths]


def run_staggered(engine: Any, prompt_list: list[list[int]], params: Any) -> dict[str, list[int]]:
    """Three requests at the start, then one more at every step; returns output tokens per request id."""
    pending = list(enumerate(prompt_list))
    for _ in range(3):
        i, p = pending.pop(0)
        engine.add_request(p, params, request_id=str(i))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests() or pending:
        if pending:
            i, p = pending.pop(0)
            engine.add_request(p, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
    return tokens


def assert_greedy_matches(path: Path, hf: Any, max_tokens: int = 12, **engine_sections: Any) -> None:
    """Greedy tokens of staggered requests through LLMEngine equal transformers on each prompt alone."""
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    # 48 blocks of 8 hold every prompt and its output at once (35 blocks); the 1 GiB default costs seconds
    sections = {"cache": {"block_size": 8, "num_blocks": 48}, "scheduler": {"max_num_tokens": 48}, **engine_sections}
    engine = LLMEngine.from_model(path, **sections)
    prompt_list = staggered_prompts(engine.arch.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    got = run_staggered(engine, prompt_list, params)
    for i, prompt in enumerate(prompt_list):
        assert got[str(i)] == hf_greedy(hf, prompt, max_tokens), f"prompt {i} (len {len(prompt)})"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def engine_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    """Our logits [len(prompt), vocab] for every prompt position, the KV in scattered cache blocks."""
    from shardserve.engine.engine import LLMEngine
    from shardserve.workers.attention import AttentionMetadata, ForwardContext, SeqSpan

    engine = LLMEngine.from_model(path, cache={"block_size": 8, "num_blocks": 16})
    runner = engine.executor.worker.runner
    n = len(prompt)
    table = [15, 3, 9, 0, 7, 12, 1, 5][: -(-n // 8)]
    meta = AttentionMetadata.build([SeqSpan(0, n, n, table)], 8, torch.device("cpu"))
    ctx = ForwardContext(meta, runner.kv_caches, runner.backend)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(torch.tensor(prompt), torch.arange(n), ctx)).float()


def prompt_logits_error(path: Path, hf: Any, prompt_len: int = 40) -> float:
    """Max |ours − transformers| / max |transformers| over every position of one prompt."""
    prompt = staggered_prompts(hf.config.vocab_size, (prompt_len,))[0]
    ours = engine_logits(path, prompt)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0]
    return float((ours - ref).abs().max() / ref.abs().max())


def arch_of(path: Path) -> ArchConfig:
    """The `ArchConfig` of a checkpoint dir (its family's parser, from the registry)."""
    from shardserve.builder.checkpoint import open_checkpoint
    from shardserve.models.registry import parse_arch

    return parse_arch(open_checkpoint(path).config)


def _nan_filled(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def _assert_all_filled(model: torch.nn.Module, what: str) -> None:
    """After loading into a `_nan_filled` model: every element of every parameter was written."""
    unfilled = [name for name, p in model.named_parameters() if p.isnan().any()]
    assert not unfilled, f"{what}: parameters not (fully) filled: {unfilled}"


def _loaded_by_no_stage(name: str, tied_head_source: str | None) -> bool:
    """A tied checkpoint's own lm_head.weight (the head loads the embedding) and saved rotary inv_freq."""
    return (name == "lm_head.weight" and tied_head_source is not None) or "rotary_emb.inv_freq" in name


def assert_two_stages_split_checkpoint(path: Path) -> None:
    """Stage(0, 1, 2) and Stage(1, 2, 2) of the checkpoint in `path` split it exactly:
    - its canonical tensors converted on the meta device (as the builder plans) have the names and
      shapes of the real ones;
    - each is used by exactly one stage and has a parameter only there, except the tied head source
      (the first stage's embedding is also the last stage's lm_head), a tied checkpoint's own
      lm_head.weight and saved rotary inv_freq buffers (no stage loads those);
    - the stages' parameters are disjoint, none empty, and together the whole model's parameters;
    - the meta canonical tensors name exactly each stage's parameters, and loading the real
      checkpoint into each stage writes every element of every parameter."""
    from shardserve.builder.checkpoint import open_checkpoint
    from shardserve.models.base import Stage
    from shardserve.models.registry import model_class

    checkpoint = open_checkpoint(path)
    arch = arch_of(path)
    cls = model_class(arch)
    with torch.device("meta"):
        whole = cls(arch)
        meta_stages = [cls(arch, stage=Stage(0, 1, 2)), cls(arch, stage=Stage(1, 2, 2))]
    meta = [(name, tuple(t.shape)) for name, t in whole.canonical_tensors(checkpoint.iter_tensor_specs())]
    real = [(name, tuple(t.shape)) for name, t in whole.canonical_tensors(checkpoint.iter_tensors())]
    assert meta == real
    names = [name for name, _ in meta]
    assert len(set(names)) == len(names), "a canonical tensor comes twice"
    tied = whole.tied_head_source()
    for name in names:
        users = [s for s in meta_stages if s.uses(name)]
        holders = [s for s in meta_stages if s.weight_target(name) is not None]
        assert len(users) == 1, f"{name} is used by {len(users)} stages"
        if name == tied:
            assert holders == meta_stages, f"tied head source {name} must be in both stages"
        elif _loaded_by_no_stage(name, tied):
            assert not holders, f"{name} should be skipped"
        else:
            assert holders == users, f"{name}: used by stage {users[0].stage}, held by {[s.stage for s in holders]}"
    params = [set(dict(s.named_parameters(remove_duplicate=False))) for s in meta_stages]
    assert params[0] and params[1] and not params[0] & params[1]
    assert params[0] | params[1] == set(dict(whole.named_parameters(remove_duplicate=False)))
    for model, own in zip(meta_stages, params, strict=True):
        targets = {t[0] for name in names if (t := model.weight_target(name)) is not None}
        assert targets == own, f"stage {model.stage}: unfilled {own - targets}, unknown {targets - own}"
    for stage in (Stage(0, 1, 2), Stage(1, 2, 2)):
        model = _nan_filled(cls(arch, stage=stage))
        assert model.load_weights(checkpoint.iter_tensors()) == set(dict(model.named_parameters()))
        _assert_all_filled(model, f"stage {stage}")


def joined(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The tp parts of one tensor from a stage's rank files, joined: replicas dropped (groups of g
    equal neighbours, g dividing the number of parts; zero biases give equal parts that are still
    slices), then concatenated on a dim. The join equal to `like` if there is one, else one of its
    shape (or the parts on dim 0), so that `torch.equal(joined(parts, like), like)` fails."""
    n, joins = len(parts), []
    for g in (g for g in range(1, n + 1) if n % g == 0):
        if not all(torch.equal(p, parts[i - i % g]) for i, p in enumerate(parts)):
            continue
        unique = parts[::g]
        if len(unique) == 1:
            joins.append(unique[0])  # replicated whole
        for d in range(like.dim()):
            if all(p.dim() == like.dim() and p.shape[:d] + p.shape[d + 1 :] == like.shape[:d] + like.shape[d + 1 :]
                   for p in unique):
                joins.append(torch.cat(unique, dim=d))
    joins = [j for j in joins if j.shape == like.shape]
    return next((j for j in joins if torch.equal(j, like)), joins[0] if joins else torch.cat(parts))


def assert_rank_files_split_checkpoint(source: Path, engine: Path) -> None:
    """The rank files of `engine` (built from `source`):
    (a) in every pipeline stage that holds a canonical source tensor, each tp rank has a part and
        the parts join to the tensor exactly; every canonical tensor is in some stage (but a tied
        lm_head.weight and rotary inv_freq buffers); no file holds anything else;
    (b) each file's tensors map onto exactly its rank model's parameters (`rank_model`, on meta),
        with their element counts, and loading the file (presharded) into the same model on the CPU
        writes every element of every parameter."""
    from shardserve.builder.build import rank_model
    from shardserve.builder.checkpoint import open_checkpoint
    from shardserve.builder.engine_dir import rank_file, read_engine_info
    from shardserve.builder.plan import ShardPlan
    from shardserve.builder.safetensors_io import iter_tensors
    from shardserve.comm.base import ShapeOnlyCommunicator
    from shardserve.models.layers import VocabParallelEmbedding
    from shardserve.models.registry import model_class

    info = read_engine_info(engine)
    arch = arch_of(source)
    plan = ShardPlan.make(arch, info.tp, info.pp)
    assert [[s.start, s.end] for s in plan.stages] == info.stages
    files = [dict(iter_tensors(engine / rank_file(r))) for r in range(plan.world_size)]
    models = [rank_model(arch, plan, r, "none") for r in range(plan.world_size)]
    canonical = dict(models[0].canonical_tensors(open_checkpoint(source).iter_tensors()))
    tied = models[0].tied_head_source()
    for name, tensor in canonical.items():
        stages = 0
        for s in range(plan.pp):
            ranks = range(s * plan.tp, (s + 1) * plan.tp)
            parts = [files[r][name] for r in ranks if name in files[r]]
            if not parts:
                continue
            stages += 1
            assert len(parts) == plan.tp, f"{name}: only {len(parts)} of stage {s}'s {plan.tp} ranks hold a part"
            assert torch.equal(joined(parts, tensor), tensor), f"{name}: stage {s}'s parts do not join to it"
        if _loaded_by_no_stage(name, tied):
            assert stages == 0, f"{name} should be skipped"
        else:
            want = 2 if name == tied and plan.pp > 1 else 1  # embedding in the first stage, head in the last
            assert stages == want, f"{name} is in {stages} stages, not {want}"
    for rank, (model, file) in enumerate(zip(models, files, strict=True)):
        assert set(file) <= set(canonical), f"rank {rank}: unknown tensors {set(file) - set(canonical)}"
        params = dict(model.named_parameters())  # a tied lm_head is the embedding's parameter
        targets = {n: model.weight_target(n) for n in file}
        skipped = [n for n, t in targets.items() if t is None]
        assert not skipped, f"rank {rank}: holds tensors its model skips: {skipped}"
        got = {t[0] for t in targets.values()}  # type: ignore[index]
        assert got == set(params), f"rank {rank}: extra {got - set(params)}, missing {set(params) - got}"
        for pname, param in params.items():
            numel = sum(file[n].numel() for n, t in targets.items() if t[0] == pname)  # type: ignore[index]
            padded = getattr(param, "place_fn", None) is VocabParallelEmbedding.place_vocab  # last block short
            assert numel == param.numel() or (padded and numel < param.numel()), (
                f"rank {rank}: {pname} gets {numel} elements for {param.numel()}"
            )
        stage, tp_rank = plan.rank_coords(rank)  # the same rank model on the CPU, to load for real
        real = model_class(arch)(arch, ShapeOnlyCommunicator(tp_rank, plan.tp), 2, plan.stages[stage])
        assert {n: p.shape for n, p in real.named_parameters()} == {n: p.shape for n, p in params.items()}
        _nan_filled(real)
        assert real.load_weights(file.items(), presharded=True) == set(params)
        _assert_all_filled(real, f"rank {rank}")
