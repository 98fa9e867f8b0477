"""The GPU memory a step needs beyond the weights, measured before the KV cache takes the rest.

`cache.kv_cache_free_gpu_mem_fraction` is a share of the memory left free once the weights are
loaded and the largest step's activations are set aside, as TensorRT-LLM's
`free_gpu_memory_fraction` is of the memory its engines leave (they hold their activation buffers
before the cache is sized). To know the activations, the worker runs the largest step the
scheduler may send (`profile_plan`: `max_num_tokens` tokens over `max_num_sequences` requests, each
sampled with every sampling option that holds [rows, vocab] tensors) through a runner over a
one-block cache, as vLLM's profile run does, and takes the peak of torch's allocator plus what was
allocated outside it meanwhile (`step_peak_bytes`). What the fraction leaves covers the CUDA graphs
of the decode steps and fragmentation.
"""

from __future__ import annotations

import torch

from shardserve.engine.request import SamplingParams
from shardserve.engine.step import NewRequestData, StepPlan
from shardserve.workers.model_runner import ModelRunner

PROFILE_STEP_ID = -1
# The heaviest sampling a request may ask for: temperature, top-k / top-p (a sort of the logits),
# min-p, a repetition penalty and log-probabilities each hold [rows, vocab] tensors.
PROFILE_PARAMS = SamplingParams(
    max_tokens=1, temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, logprobs=5, ignore_eos=True
)


def profile_plan(max_tokens: int, max_seqs: int, max_len: int, block_size: int) -> StepPlan:
    """The largest step: `max_tokens` prompt tokens (token 0) over min(`max_seqs`, `max_tokens`)
    new requests, none longer than `max_len`, each sampled (`PROFILE_PARAMS`); every block is block 0."""
    count = max(1, min(max_seqs, max_tokens))
    lengths: list[int] = []
    left = max_tokens
    for i in range(count):
        n = max(1, min(max_len, left - (count - i - 1)))  # leave a token for each request still to come
        lengths.append(n)
        left -= n
    new = [
        NewRequestData(f"profile-{i}", [0] * n, n, PROFILE_PARAMS, frozenset(), (), [0] * -(-n // block_size), 0)
        for i, n in enumerate(lengths)
    ]
    return StepPlan(PROFILE_STEP_ID, new, [], {r.request_id: r.num_prompt_tokens for r in new})


def step_peak_bytes(runner: ModelRunner, plan: StepPlan) -> int:
    """Bytes `plan` takes on the runner's CUDA device at its peak beyond what is allocated now:
    torch's peak allocation, plus what was allocated outside torch meanwhile (NCCL's buffers,
    kernel modules loaded on first use)."""
    device = runner.device
    torch.cuda.synchronize(device)
    before, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    free = torch.cuda.mem_get_info(device)[0]
    torch.cuda.reset_peak_memory_stats(device)
    runner.execute(plan)
    runner.flush()  # a pipeline stage's send of its hidden states
    runner.synchronize()  # the tp collectives, under the rank board's deadline
    outside = (free - torch.cuda.mem_get_info(device)[0]) - (torch.cuda.memory_reserved(device) - reserved)
    return max(0, torch.cuda.max_memory_allocated(device) - before) + max(0, outside)
