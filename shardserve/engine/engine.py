"""The leader loop: `LLMEngine` (add_request / step / abort) and the offline `LLM`.

A step reads in three lines: the scheduler plans, the executor runs the plan on the ranks,
the scheduler takes the results of the plans that completed (with pipeline parallelism a plan's
result comes back a step or more later). Outputs are then detokenized (stop strings end requests).
"""

from __future__ import annotations

import gc
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardserve.builder.checkpoint import Checkpoint, open_checkpoint
from shardserve.config import DeploymentConfig
from shardserve.engine.kv_cache import KVCacheManager
from shardserve.engine.output import IncrementalDetokenizer
from shardserve.engine.request import (
    FinishReason,
    InvalidRequestError,
    Request,
    RequestOutput,
    SamplingParams,
)
from shardserve.engine.scheduler import Scheduler
from shardserve.models.arch import ArchConfig
from shardserve.models.registry import parse_arch
from shardserve.workers.executor import Executor
from shardserve.workers.launch import start_executor

if TYPE_CHECKING:
    from shardserve.comm.world import World

Prompt = str | list[int]


@dataclass(slots=True)
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    """The leader. `world`: this process is already rank 0 of a started world (e.g. under
    mpiexec); otherwise the executor starts the engine's ranks itself (see workers/launch.py)."""

    def __init__(self, config: DeploymentConfig, world: World | None = None) -> None:
        self.config = config
        checkpoint = open_model(config)
        self.arch = parse_arch(checkpoint.config)  # unsupported architectures fail before any weight is read
        self.tokenizer = checkpoint.load_tokenizer()
        self.max_model_len = max_model_len(checkpoint, self.arch, config)
        self.executor: Executor = start_executor(checkpoint, self.arch, config, self.max_model_len, world)
        self.kv_cache = KVCacheManager(
            self.executor.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        executor = self.executor
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, executor.max_in_flight, executor.run_ahead)
        self.eos_token_ids = _eos_token_ids(checkpoint, self.arch, self.tokenizer)
        self._tracked: dict[str, _Tracked] = {}
        self._aborted: list[RequestOutput] = []
        self._ids = itertools.count()
        freeze_startup_heap(config.scheduler.gc_gen0_threshold)

    @classmethod
    def from_model(cls, path: str | Path | None = None, **sections: dict[str, Any]) -> LLMEngine:
        """`LLMEngine.from_model(path, cache={"block_size": 16}, scheduler={...}, model={...})`."""
        data = {name: dict(value) for name, value in sections.items()}
        data.setdefault("model", {})["path"] = str(path) if path is not None else None
        return cls(DeploymentConfig.from_dict(data))

    # -- requests ----------------------------------------------------------------------
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; raises InvalidRequestError (nothing queued) if it cannot be served."""
        params = params or SamplingParams()
        token_ids, text = self._tokenize(prompt)
        self._check_length(token_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._tracked:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        end = frozenset() if params.ignore_eos else self._end_ids(params)
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            eos_token_ids=end,
            max_total_tokens=self.max_model_len,
            bad_words_ids=self._bad_words(params),
            priority=priority,
            arrival=next(self._ids),
            prompt=text,
        )
        self.scheduler.add(req)
        self._tracked[request_id] = _Tracked(req, IncrementalDetokenizer(self.tokenizer, token_ids, params))
        return request_id

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        if req is None:
            return False
        self._aborted.append(self._output(self._tracked.pop(request_id), []))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        completed = self.executor.run(plan)
        updated = [req for done, result in completed for req in self.scheduler.update(done, result)]
        outputs, self._aborted = self._aborted, []
        for req in updated:
            outputs.append(self._on_token(req))
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()

    # -- internals ---------------------------------------------------------------------
    def _on_token(self, req: Request) -> RequestOutput:
        tracked = self._tracked[req.request_id]
        new = req.output_token_ids[-1:]
        stop = tracked.detokenizer.update(new)
        if stop is not None and not req.is_finished:
            self.scheduler.finish(req, FinishReason.STOP)
        output = self._output(tracked, new, stop)
        if output.finished:
            del self._tracked[req.request_id]
        return output

    def _output(self, tracked: _Tracked, new: list[int], stop: str | None = None) -> RequestOutput:
        req, detok = tracked.request, tracked.detokenizer
        finished = req.is_finished
        if finished:
            detok.flush()
        stop_reason: str | int | None = stop
        if stop is None and req.finish_reason is FinishReason.STOP:
            stop_reason = req.output_token_ids[-1]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            new_token_ids=new,
            token_ids=list(req.output_token_ids),
            text_delta=detok.delta(finished),
            text=detok.text,
            finished=finished,
            finish_reason=req.finish_reason,
            stop_reason=stop_reason,
            logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
            num_cached_tokens=max(0, req.num_cached_tokens),
        )

    def _tokenize(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids")
            return list(self.tokenizer.encode(prompt)), prompt
        token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids out of the vocabulary [0, {self.arch.vocab_size}): {bad[:5]}")
        return token_ids, None

    def _check_length(self, token_ids: list[int], params: SamplingParams) -> None:
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the model's max length is {self.max_model_len} "
                "(prompt + at least one output token)"
            )
        final = min(len(token_ids) + params.max_tokens, self.max_model_len)
        needed, have = self.kv_cache.blocks_needed(final), self.kv_cache.num_blocks
        if needed > have:
            raise InvalidRequestError(
                f"prompt + max_tokens = {final} tokens need {needed} KV-cache blocks; the cache holds {have}"
            )

    def _end_ids(self, params: SamplingParams) -> frozenset[int]:
        return frozenset([params.end_id]) if params.end_id is not None else self.eos_token_ids

    def _bad_words(self, params: SamplingParams) -> tuple[tuple[int, ...], ...]:
        seqs = list(params.bad_words_token_ids)
        if params.bad_words and self.tokenizer is None:
            raise InvalidRequestError("bad_words need a tokenizer: send bad_words_token_ids")
        for word in params.bad_words:
            for variant in (word, " " + word):
                ids = tuple(self.tokenizer.encode(variant, add_special_tokens=False))
                if ids and ids not in seqs:
                    seqs.append(ids)
        return tuple(seqs)


class LLM:
    """Offline batch generation: `LLM(path, dtype=..., cache={...}).generate(prompts, params)`."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        cache: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        **model_options: Any,
    ) -> None:
        self.engine = LLMEngine.from_model(model, model=model_options, cache=cache or {}, scheduler=scheduler or {})

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        return llm

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]


def freeze_startup_heap(gen0_threshold: int | None = None) -> None:
    """Take what start-up left alive (model, CUDA graphs, block pool, tokenizer) out of the cyclic
    garbage collector's scans: a full collection walked all of it, 0.28 s at a time on the host loop
    of 2,048 requests (benchmarks/README.md), while the GPU waited. These objects are still freed
    by reference counting (an engine holds no cycles), as vLLM's engine core does after start-up.
    `gen0_threshold` (`scheduler.gc_gen0_threshold`): a step's plan objects live two steps, long
    enough to be promoted, so at Python's 700 they set off ~3,400 collections in a 9 s run of 2,048
    requests (2.2 s of it on an H100's host; thresholds (50,000, 20, 10): 54 against ~150 ms of GPU
    idle before decode steps, benchmarks/README.md session 10)."""
    gc.collect()
    gc.freeze()
    if gen0_threshold is not None:
        gc.set_threshold(gen0_threshold, *gc.get_threshold()[1:])


def _eos_token_ids(checkpoint: Checkpoint, arch: ArchConfig, tokenizer: Any) -> frozenset[int]:
    """End ids as HF `generate` uses them: generation_config.json, else config.json, else the tokenizer's."""
    gen_file = checkpoint.path / "generation_config.json" if not checkpoint.is_gguf else None
    if gen_file is not None and gen_file.is_file():
        value = json.loads(gen_file.read_text()).get("eos_token_id")
        if value is not None:
            return frozenset(value if isinstance(value, list) else [value])
    if arch.eos_token_ids:
        return frozenset(arch.eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset([eos]) if eos is not None else frozenset()


def open_model(config: DeploymentConfig) -> Checkpoint:
    """The checkpoint `model` names (the bundled demo model by default); weightless when the ranks
    make dummy weights. Every rank opens it so."""
    from shardserve.demo import default_model_path

    model = config.model
    return open_checkpoint(model.path or default_model_path(), model.tokenizer, model.load_format != "dummy")


def max_model_len(checkpoint: Checkpoint, arch: ArchConfig, config: DeploymentConfig) -> int:
    """Prompt + output cap: the model's positions, the config's limit and the engine's, whichever is least."""
    engine_limit = checkpoint.engine.max_seq_len if checkpoint.engine is not None else None
    return min(n for n in (arch.max_position_embeddings, config.model.max_model_len, engine_limit) if n)
