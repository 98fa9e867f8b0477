"""Paged KV cache (no torch): block pool ref counts and LRU eviction, the prefix cache's hash
chain, and, through the scheduler, prefix hits that compute fewer tokens and a pool that is
full again after every request finished or was aborted."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from shardserve.config import SchedulerPolicy
from shardserve.engine.kv_cache import BlockPool, CachedPrefix, KVCacheManager, NoFreeBlocksError
from shardserve.engine.request import FinishReason, Request
from shardserve.engine.step import NewRequestData
from tests.engine.test_scheduler import BLOCK_SIZE, GC, MU, Driver, make_request

SHARED = list(range(100, 100 + 2 * BLOCK_SIZE))  # a two-block prefix


def compute(kv: KVCacheManager, req: Request, n: int, prefix: CachedPrefix | None = None) -> list[int]:
    """Allocate room for `n` more tokens of `req` and count them computed, as one step would."""
    new_ids = kv.allocate(req, n, prefix)
    req.num_computed_tokens += n
    return new_ids


def computed_request(kv: KVCacheManager, request_id: str, prompt: Sequence[int]) -> Request:
    req = make_request(request_id, prompt)
    compute(kv, req, len(prompt))
    return req


# -- block pool ------------------------------------------------------------------------------
def test_pool_and_manager_reject_empty_sizes() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)


def test_allocate_hands_out_free_blocks_with_one_reference() -> None:
    pool = BlockPool(5)
    assert pool.allocate(3) == [0, 1, 2]
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 0, 0]
    assert (pool.num_blocks, pool.num_free) == (5, 2)


def test_allocate_beyond_the_free_blocks_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1 and pool.allocate(1) == [2]


def test_touch_and_free_count_references() -> None:
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.touch([block])
    assert pool.blocks[block].ref_cnt == 2
    pool.free([block])
    assert pool.blocks[block].ref_cnt == 1 and pool.num_free == 1
    pool.free([block])
    assert pool.blocks[block].ref_cnt == 0 and pool.num_free == 2


def test_free_queues_a_table_tail_first_after_older_free_blocks() -> None:
    pool = BlockPool(6)
    table = pool.allocate(3)
    pool.free(table)
    assert pool.allocate(6) == [3, 4, 5, 2, 1, 0]


def test_freed_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(4)
    for block_id in pool.allocate(4):
        pool.cache(block_id, 100 + block_id)
    for block_id in (2, 0, 3, 1):
        pool.free([block_id])
    assert [pool.lookup(100 + i) for i in range(4)] == [0, 1, 2, 3]  # free blocks keep their key
    assert pool.allocate(1) == [2]
    assert pool.lookup(102) is None and pool.blocks[2].block_hash is None
    assert pool.allocate(2) == [0, 3]
    assert pool.lookup(101) == 1  # not evicted yet


def test_touch_takes_a_freed_cached_block_back_out_of_the_queue() -> None:
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.cache(block, 7)
    pool.free([block])
    assert pool.num_free == 2 and pool.num_free_among((block,)) == 1
    pool.touch([pool.lookup(7)])  # a prefix hit on it
    assert pool.num_free == 1 and pool.num_free_among((block,)) == 0
    assert pool.allocate(1) == [1 - block]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    assert pool.lookup(7) == block


def test_first_block_cached_under_a_key_keeps_it() -> None:
    pool = BlockPool(2)
    pool.allocate(2)
    pool.cache(0, 5)
    pool.cache(1, 5)
    assert pool.lookup(5) == 0 and pool.blocks[1].block_hash is None


# -- block tables ----------------------------------------------------------------------------
@pytest.mark.parametrize(("tokens", "blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed(tokens: int, blocks: int) -> None:
    assert KVCacheManager(4, BLOCK_SIZE).blocks_needed(tokens) == blocks


def test_block_table_grows_only_at_block_boundaries() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    req = make_request("a", range(6))
    assert len(compute(kv, req, 6)) == 2
    grown = []
    for token in (50, 51, 52):
        req.output_token_ids.append(token)
        grown.append(len(compute(kv, req, 1)))
    assert grown == [0, 0, 1]
    assert len(req.block_ids) == 3 and kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    kv.free(req)
    assert req.block_ids == [] and kv.num_free_blocks == 8 and kv.usage == 0.0


def test_a_decode_that_fills_its_block_registers_it_without_new_blocks() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    req = computed_request(kv, "a", range(BLOCK_SIZE + 2))  # a full block and half of one
    assert req.num_registered_blocks == 1
    for token in range(50, 50 + BLOCK_SIZE - 2):
        req.output_token_ids.append(token)
        assert compute(kv, req, 1) == []
    assert req.num_registered_blocks == 2 and kv.num_free_blocks == 6
    assert kv.pool.lookup(req.block_hashes[1]) == req.block_ids[1]


def test_allocate_without_room_raises_and_changes_nothing() -> None:
    kv = KVCacheManager(2, BLOCK_SIZE)
    req = make_request("a", range(9))
    assert kv.num_new_blocks(req, 9) == 3 and not kv.can_allocate(req, 9)
    with pytest.raises(NoFreeBlocksError, match="a"):
        kv.allocate(req, 9)
    assert req.block_ids == [] and kv.num_free_blocks == 2
    assert kv.can_allocate(req, 8)


# -- prefix cache ----------------------------------------------------------------------------
def test_full_blocks_are_found_by_a_request_with_the_same_prefix() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    a = computed_request(kv, "a", [*SHARED, 1, 2])
    b = make_request("b", [*SHARED, 3, 4, 5])
    prefix = kv.find_cached_prefix(b)
    assert prefix.block_ids == tuple(a.block_ids[:2]) and prefix.num_tokens == 2 * BLOCK_SIZE
    queries, hits = kv.stats.queries, kv.stats.hits
    kv.allocate(b, 3, prefix)  # counted once, at admission
    assert (kv.stats.queries - queries, kv.stats.hits - hits) == (11, 8)


def test_prefix_hit_shares_blocks_and_counts_as_computed() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    a = computed_request(kv, "a", [*SHARED, 1, 2])
    b = make_request("b", [*SHARED, 3, 4, 5])
    prefix = kv.find_cached_prefix(b)
    assert kv.num_new_blocks(b, 3, prefix) == 1
    new_ids = compute(kv, b, 3, prefix)
    assert b.block_ids[:2] == a.block_ids[:2] and new_ids == b.block_ids
    assert b.num_computed_tokens == 11 and b.block_ids[2] != a.block_ids[2]
    assert [kv.pool.blocks[i].ref_cnt for i in b.block_ids] == [2, 2, 1]
    assert kv.num_free_blocks == 8 - 4
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in b.block_ids] == [1, 1, 1] and kv.num_free_blocks == 5
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_hit_on_freed_blocks_takes_them_from_the_free_queue() -> None:
    kv = KVCacheManager(3, BLOCK_SIZE)
    a = computed_request(kv, "a", [*SHARED, 1])
    shared, tail = a.block_ids[:2], a.block_ids[2]
    kv.free(a)
    b = make_request("b", [*SHARED, 9])
    prefix = kv.find_cached_prefix(b)
    assert prefix.block_ids == tuple(shared)
    assert kv.num_new_blocks(b, 1, prefix) == 3  # one new block plus the two hit blocks, all free
    assert kv.can_allocate(b, 1, prefix)
    compute(kv, b, 1, prefix)
    assert b.block_ids == [*shared, tail]  # a's unshared tail block was evicted for b
    assert kv.num_free_blocks == 0
    assert kv.find_cached_prefix(make_request("c", [*SHARED, 1, 0])).num_tokens == 8


def test_only_blocks_the_scheduled_tokens_fill_are_cached() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    a = make_request("a", [*SHARED, 1, 2])
    compute(kv, a, 6)  # a chunk: block 0 full, block 1 half
    assert kv.find_cached_prefix(make_request("b", [*SHARED, 3])).num_tokens == BLOCK_SIZE
    compute(kv, a, 4)
    assert kv.find_cached_prefix(make_request("c", [*SHARED, 3])).num_tokens == 2 * BLOCK_SIZE


@pytest.mark.parametrize(("length", "hit_blocks"), [(1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3)])
def test_a_hit_never_covers_the_last_token(length: int, hit_blocks: int) -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    prompt = list(range(200, 216))
    computed_request(kv, "a", prompt)
    prefix = kv.find_cached_prefix(make_request("b", prompt[:length]))
    assert len(prefix.block_ids) == hit_blocks
    assert prefix.num_tokens < length


def test_hash_chain_needs_equal_earlier_blocks() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    computed_request(kv, "a", [*SHARED, 1])
    same_second_block = [0, 0, 0, 0, *SHARED[BLOCK_SIZE:], 1]
    assert kv.find_cached_prefix(make_request("b", same_second_block)).block_ids == ()
    assert kv.stats.hits == 0


def test_no_hit_once_the_request_has_computed_tokens() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE)
    computed_request(kv, "a", [*SHARED, 1])
    b = make_request("b", [*SHARED, 2])
    b.num_computed_tokens = 1
    assert kv.find_cached_prefix(b).block_ids == ()


def test_no_hit_when_prefix_caching_is_disabled() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    a = computed_request(kv, "a", [*SHARED, 1])
    assert a.block_hashes == [] and all(b.block_hash is None for b in kv.pool.blocks)
    assert kv.find_cached_prefix(make_request("b", [*SHARED, 2])).block_ids == ()
    assert (kv.stats.queries, kv.stats.hits) == (0, 0)


# -- prefix cache through the scheduler ------------------------------------------------------
def _run_two_sharing_a_prefix(prefix_caching: bool) -> Driver:
    d = Driver(prefix_caching=prefix_caching)
    d.add("a", [*SHARED, 1, 2, 3], max_tokens=3)
    d.run()
    d.add("b", [*SHARED, 4, 5], max_tokens=3)
    d.run()
    return d


def test_prefix_hit_schedules_fewer_tokens() -> None:
    cached, plain = _run_two_sharing_a_prefix(True), _run_two_sharing_a_prefix(False)
    a_new, b_new = cached.appearances("a")[0], cached.appearances("b")[0]
    assert isinstance(b_new, NewRequestData)
    assert cached.requests["a"].num_cached_tokens == 0
    assert cached.requests["b"].num_cached_tokens == 2 * BLOCK_SIZE == b_new.num_computed_tokens
    assert b_new.block_ids[:2] == a_new.block_ids[:2]
    b_first = next(p for p in cached.plans if "b" in p.num_scheduled_tokens)
    assert b_first.num_scheduled_tokens["b"] == 2
    assert plain.requests["b"].num_cached_tokens == 0
    assert plain.appearances("b")[0].num_computed_tokens == 0
    saved = plain.scheduler.stats.num_computed_tokens - cached.scheduler.stats.num_computed_tokens
    assert saved == 2 * BLOCK_SIZE
    assert cached.requests["b"].output_token_ids == plain.requests["b"].output_token_ids
    cached.assert_pool_full()


def test_prefix_hit_while_the_first_request_still_runs() -> None:
    d = Driver()
    d.add("a", [*SHARED, 1], max_tokens=6)
    d.step()
    d.add("b", [*SHARED, 2, 3], max_tokens=2)
    plan = d.step()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 2}
    a, b = d.requests["a"], d.requests["b"]
    assert b.block_ids[:2] == a.block_ids[:2]
    assert [d.kv.pool.blocks[i].ref_cnt for i in b.block_ids] == [2, 2, 1]
    d.run()
    d.assert_pool_full()


def test_identical_prompt_recomputes_its_last_token() -> None:
    d = Driver()
    d.add("a", SHARED, max_tokens=2)
    d.run()
    d.add("b", SHARED, max_tokens=2)
    plan = d.step()
    assert d.requests["b"].num_cached_tokens == BLOCK_SIZE  # not 8: the last token must be computed
    assert plan.num_scheduled_tokens == {"b": BLOCK_SIZE}
    assert d.requests["b"].output_token_ids == [1000]


def test_preempted_request_reuses_its_cached_blocks() -> None:
    computed, resumed_from = {}, {}
    for prefix_caching in (True, False):
        d = Driver(num_blocks=12, prefix_caching=prefix_caching)
        for i in range(4):
            d.add(f"r{i}", 9, max_tokens=12)
        d.run()
        assert d.scheduler.stats.num_preemptions > 0
        computed[prefix_caching] = d.scheduler.stats.num_computed_tokens
        comebacks = [s for r in d.requests for s in d.appearances(r)[1:] if isinstance(s, NewRequestData)]
        resumed_from[prefix_caching] = max(s.num_computed_tokens for s in comebacks)
        d.assert_pool_full()
    assert resumed_from == {True: 2 * BLOCK_SIZE, False: 0}
    assert computed[True] == computed[False] - 2 * BLOCK_SIZE


# -- the pool is full again -------------------------------------------------------------------
def _mixed_workload(d: Driver) -> None:
    for i in range(8):
        prompt = SHARED[: (i % 3) * BLOCK_SIZE] + [300 + 10 * i + k for k in range(1 + 2 * i % 7)]
        d.add(f"r{i}", prompt, max_tokens=2 + i % 5, outputs=[5, 6, 2][: i % 4], priority=i % 2)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("policy", [GC, MU])
def test_pool_is_full_again_after_all_finish(policy: SchedulerPolicy, prefix_caching: bool) -> None:
    d = Driver(num_blocks=8, max_num_tokens=12, policy=policy, prefix_caching=prefix_caching)
    _mixed_workload(d)
    d.run()
    assert all(r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for r in d.requests.values())
    d.assert_pool_full()


@pytest.mark.parametrize("steps_before_abort", [0, 1, 3, 6])
@pytest.mark.parametrize("policy", [GC, MU])
def test_pool_is_full_again_after_aborts(policy: SchedulerPolicy, steps_before_abort: int) -> None:
    d = Driver(num_blocks=8, max_num_tokens=12, policy=policy)
    _mixed_workload(d)
    for _ in range(steps_before_abort):
        d.step()
    for request_id in list(d.scheduler.requests)[::2]:
        d.abort(request_id)
    d.run()
    d.assert_pool_full()
    for request_id in list(d.scheduler.requests):
        d.abort(request_id)
    d.assert_pool_full()


# A request preempted in the step that scheduled it must not leave blocks keyed for tokens that
# were never computed: a later request would hit them and read stale KV.
def test_prefix_cache_never_serves_blocks_that_were_not_computed() -> None:
    d = Driver(num_blocks=14, block_size=2, max_num_tokens=10)
    d.add("x", 2, max_tokens=20, priority=2)
    d.add("v", 3, max_tokens=20, priority=0)
    d.step()
    d.add("r", 26, max_tokens=2, priority=1)  # admitted after v, so scheduled after it
    d.step()
    d.step()
    plan = d.schedule()
    # v (lowest priority) was scheduled for position 5, which fills its block 2 and keys it in the
    # prefix cache; then r could not grow, v was preempted, and r too: position 5 never computed.
    assert plan.num_scheduled_tokens == {"x": 1} and plan.finished_request_ids == ["v", "r"]
    d.complete(plan)
    v = d.requests["v"]
    w = d.add("w", [*v.token_ids, 7, 8], max_tokens=1, priority=3)
    d.run()  # the fake ranks fail the step if w reads KV that nobody wrote
    assert w.num_cached_tokens == 4
    d.assert_pool_full()
