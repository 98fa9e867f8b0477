"""Decode steps replayed from CUDA graphs.

At start-up the runner captures one graph per batch size of a ladder (1, 2, 4, 8, every 16 up
to 256, every 64 beyond, up to the largest): the model's forward over one token per sequence,
reading its inputs from static buffers and writing its final hidden states into one buffer all the
graphs share. A decode step of n sequences copies its ids, positions, cache slots and block
tables into the first n rows of those buffers, replays the smallest graph that holds n, and
computes the logits of its n rows outside the graph (a [batch, vocab] output held by each graph
took 9 GiB for a ladder up to 2048 in Llama-3-8B). The padded rows write no KV (slot −1) and read
one cached position, so they stay finite and are dropped. Only the Triton backend's metadata is
tensors alone, so only it can be captured. Tensor-parallel ranks (pp = 1) capture too: their
all-reduces are NCCL kernels queued on the capturing stream (the logits' gather runs after the
replay), every rank captures the same ladder in the same order at start-up (the warm-up forward is
a collective), and each step every rank replays the graph of the same size, since all follow the
same plan. Pipeline stages (their send/recv) run eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from shardserve.workers.attention import ForwardContext
from shardserve.workers.triton_attention import TritonAttentionBackend, TritonMetadata, tile_rows


def batch_ladder(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, every 16 up to 256, every 64 beyond, and `max_batch`."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(320, max_batch, 64)]
    return sorted({b for b in sizes if b < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: TritonAttentionBackend,
        block_size: int,
        max_len: int,
        max_batch: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.sizes = batch_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        width = -(-max_len // block_size)
        n = self.max_batch
        with torch.device(device):
            self.ids = torch.zeros(n, dtype=torch.long)
            self.positions = torch.zeros(n, dtype=torch.long)
            self.slots = torch.full((n,), -1, dtype=torch.long)
            self.tables = torch.zeros(n, width, dtype=torch.int32)
            self.context_lens = torch.ones(n, dtype=torch.int32)
            self.query_starts = torch.arange(n + 1, dtype=torch.int32)
            self.tile_seqs = torch.arange(n, dtype=torch.int32)
            self.tile_starts = torch.zeros(n, dtype=torch.int32)
        self.block_q, _ = tile_rows(backend.group, decode_only=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.hidden = torch.empty(0)  # [max_batch, hidden] the final hidden states of every graph
        self._capture_all()

    def _meta(self, n: int) -> TritonMetadata:
        return TritonMetadata(
            slot_mapping=self.slots[:n],
            seqs=[],
            block_size=self.block_size,
            block_tables=self.tables[:n],
            context_lens=self.context_lens[:n],
            query_starts=self.query_starts[: n + 1],
            tile_seqs=self.tile_seqs[:n],
            tile_starts=self.tile_starts[:n],
            block_q=self.block_q,
            decode_only=True,
        )

    def _forward(self, n: int) -> torch.Tensor:
        ctx = ForwardContext(self._meta(n), self.kv_caches, self.backend)
        return self.model(self.ids[:n], self.positions[:n], ctx)  # [n, hidden]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        hidden = self._forward(self.max_batch)  # warm up: compile the kernels, let cuBLAS pick its algorithms
        self.model.compute_logits(hidden)
        self.hidden = torch.empty_like(hidden)
        del hidden
        torch.cuda.synchronize()
        for n in reversed(self.sizes):  # the largest first, so the smaller ones reuse its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[:n].copy_(self._forward(n))
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: TritonMetadata) -> torch.Tensor:
        """Logits [n, vocab] of a decode step of n sequences (one token each, in batch order)."""
        assert meta.block_tables is not None and meta.context_lens is not None
        n = ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:size].fill_(-1)
        self.tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.context_lens[:n].copy_(meta.context_lens)
        self.context_lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.model.compute_logits(self.hidden[:n])
