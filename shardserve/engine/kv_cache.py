"""Paged KV cache bookkeeping: a block pool with ref counts and a prefix cache.

Plain Python (no torch). The tensors live with the rank workers; this module only decides
which block ids a request uses. A full block is keyed by the hash chain of its tokens
(hash of the parent block's key and the block's tokens), so requests with a common prefix
share blocks. Free blocks keep their key until reused: the free queue is least recently
used first, so the blocks evicted first are the ones freed longest ago.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shardserve.engine.request import Request


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate` when the pool cannot hold the request's tokens (check `can_allocate`)."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """Blocks of a request's leading tokens already in the cache."""

    block_ids: tuple[int, ...] = ()
    block_size: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * self.block_size


class BlockPool:
    """Fixed set of blocks, a least-recently-freed queue and a hash → block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached content
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: tuple[int, ...] | list[int]) -> None:
        """Take a reference on cached blocks (prefix hits), pulling free ones out of the queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free(self, block_ids: list[int]) -> None:
        # Tail blocks first: they are the least likely to be shared, so evict them first.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        """Key a full block by its hash chain (the first block with a given key wins)."""
        if block_hash in self._cached:
            return
        self.blocks[block_id].block_hash = block_hash
        self._cached[block_hash] = block_id

    def uncache(self, block_id: int) -> None:
        """Drop a block's prefix-cache key (its contents were never computed)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None

    def num_free_among(self, block_ids: tuple[int, ...]) -> int:
        return sum(1 for b in block_ids if self.blocks[b].ref_cnt == 0)


@dataclass(slots=True)
class CacheStats:
    queries: int = 0  # prompt tokens looked up in the prefix cache
    hits: int = 0  # of those, tokens found


class KVCacheManager:
    """Per-request block tables over one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = CacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, req: Request) -> CachedPrefix:
        """The longest run of cached full blocks at the start of `req` (at least one token is left to compute)."""
        if not self.enable_prefix_caching or req.num_computed_tokens > 0:
            return CachedPrefix(block_size=self.block_size)
        self._extend_hashes(req, (req.num_tokens - 1) // self.block_size)
        hits: list[int] = []
        for block_hash in req.block_hashes[: (req.num_tokens - 1) // self.block_size]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return CachedPrefix(tuple(hits), self.block_size)

    def num_new_blocks(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> int:
        """Blocks that must come from the free queue to hold `num_new_tokens` more tokens of `req`."""
        if prefix is None:  # the common case (a running request), kept cheap
            return max(0, -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(req.block_ids))
        total = req.num_computed_tokens + prefix.num_tokens + num_new_tokens
        have = len(req.block_ids) + len(prefix.block_ids)
        return max(0, self.blocks_needed(total) - have) + self.pool.num_free_among(prefix.block_ids)

    def can_allocate(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        return self.num_new_blocks(req, num_new_tokens, prefix) <= self.pool.num_free

    def allocate(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> list[int]:
        """Give `req` room for `num_new_tokens` more tokens after its computed ones (and the prefix hit).

        Returns the block ids appended to `req.block_ids`. Registers the blocks that these
        tokens fill completely in the prefix cache (their contents are fixed by the tokens), as far
        as the tokens are known (a request scheduled ahead has one the host has not seen yet).
        """
        if prefix is None and req.block_ids and not self.num_new_blocks(req, num_new_tokens):
            new_ids: list[int] = []  # a running request's common step (a decode needs a block every block_size)
        else:
            new_ids = self._add_blocks(req, num_new_tokens, prefix)
        if self.enable_prefix_caching:
            total = req.num_computed_tokens + num_new_tokens  # (the prefix hit included)
            self._cache_full_blocks(req, min(total, req.num_tokens) // self.block_size)
        return new_ids

    def _add_blocks(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None) -> list[int]:
        """Append the prefix hit's blocks and free ones for `num_new_tokens` more tokens; returns them."""
        if not self.can_allocate(req, num_new_tokens, prefix):
            raise NoFreeBlocksError(f"request {req.request_id}: no room for {num_new_tokens} tokens")
        new_ids: list[int] = []
        if self.enable_prefix_caching and req.num_computed_tokens == 0 and not req.block_ids:
            self.stats.queries += req.num_tokens
            self.stats.hits += prefix.num_tokens if prefix is not None else 0
        if prefix is not None and prefix.block_ids:
            self.pool.touch(prefix.block_ids)
            new_ids.extend(prefix.block_ids)
            req.num_computed_tokens += prefix.num_tokens
        missing = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids) - len(new_ids)
        if missing > 0:
            new_ids.extend(self.pool.allocate(missing))
        req.block_ids.extend(new_ids)
        return new_ids

    def free(self, req: Request) -> None:
        # Blocks keyed for tokens scheduled but never computed (the request was preempted in the
        # step that scheduled them) must not serve prefix hits.
        for block_id in req.block_ids[req.num_computed_tokens // self.block_size :]:
            if self.pool.blocks[block_id].ref_cnt == 1:
                self.pool.uncache(block_id)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_registered_blocks = 0

    def _cache_full_blocks(self, req: Request, num_full: int) -> None:
        """Register the full blocks not registered yet (earlier ones were, when they filled)."""
        if num_full <= req.num_registered_blocks:
            return
        self._extend_hashes(req, num_full)
        for i in range(req.num_registered_blocks, num_full):
            self.pool.cache(req.block_ids[i], req.block_hashes[i])
        req.num_registered_blocks = num_full

    def _extend_hashes(self, req: Request, num_full: int) -> None:
        tokens = req.token_ids
        bs = self.block_size
        for i in range(len(req.block_hashes), num_full):
            parent = req.block_hashes[i - 1] if i else 0
            req.block_hashes.append(hash((parent, tuple(tokens[i * bs : (i + 1) * bs]))))
