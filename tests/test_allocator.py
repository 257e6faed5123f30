"""The CUDA caching allocator model: hand-worked sequences, configuration parsing, invariants, speed.

Every expected number below is worked out by hand from the rules of c10/cuda/CUDACachingAllocator.cpp
(round_size, get_allocation_size, get_free_block, should_split, free_block, release_cached_blocks,
map_block / unmap_block); the comments show the arithmetic. MiB = 2**20 bytes.
"""

from __future__ import annotations

import random

import pytest

from memguard.device.allocator import (
    VALID_KEYS,
    AllocatorConfig,
    CachingAllocator,
    roundup_power2_next_division,
    simulate,
)
from memguard.errors import InvalidArgumentError

MiB = 2**20
KiB = 2**10
EXPANDABLE = AllocatorConfig(expandable_segments=True)


def _allocs(*ids: int) -> list[int]:
    return [aid + 1 for aid in ids]


def _frees(*ids: int) -> list[int]:
    return [-(aid + 1) for aid in ids]


# ---------------------------------------------------------------------------------------------------------
# Rounding and segment sizes


def test_one_tiny_request_takes_a_small_segment():
    # 100 B -> round_size 512 B; small pool (<= 1 MiB) -> a new 2 MiB segment (kSmallBuffer), split 512 + rest
    result = simulate([100], _allocs(0))
    assert result.peak_allocated == 512
    assert result.peak_reserved == 2 * MiB
    assert result.num_allocs == 1 and result.num_segments == 1
    assert result.fragmentation_bytes == 2 * MiB - 512
    assert not result.oom and result.oom_at_event is None


def test_small_requests_share_a_2mib_segment():
    # 600 KiB = 614400 B (a multiple of 512). Segment 1 (2 MiB = 2097152 B):
    #   A: 2097152 - 614400 = 1482752 left;  B: 1482752 - 614400 = 868352 left;  C: 868352 - 614400 = 253952 left
    #   D: 253952 < 614400 -> a second 2 MiB segment. Reserved 4 MiB, allocated 4 * 600 KiB.
    result = simulate([600 * KiB] * 4, _allocs(0, 1, 2, 3))
    assert result.peak_reserved == 4 * MiB
    assert result.peak_allocated == 4 * 600 * KiB
    assert result.num_allocs == 2
    # the first three alone fit in one segment
    assert simulate([600 * KiB] * 3, _allocs(0, 1, 2)).peak_reserved == 2 * MiB


def test_mid_size_requests_share_a_20mib_segment():
    # 5 MiB is in (1 MiB, 10 MiB) -> a 20 MiB segment (kLargeBuffer). Remainders 15, 10, 5 MiB are > 1 MiB: split.
    # The 4th 5 MiB takes the last 5 MiB whole (remainder 0); the 5th needs a second 20 MiB segment.
    assert simulate([5 * MiB] * 2, _allocs(0, 1)).peak_reserved == 20 * MiB
    four = simulate([5 * MiB] * 4, _allocs(0, 1, 2, 3))
    assert (four.peak_reserved, four.peak_allocated, four.num_allocs) == (20 * MiB, 20 * MiB, 1)
    five = simulate([5 * MiB] * 5, _allocs(0, 1, 2, 3, 4))
    assert (five.peak_reserved, five.num_allocs) == (40 * MiB, 2)


def test_large_request_gets_its_own_segment_rounded_to_2mib():
    # 15 MiB >= 10 MiB (kMinLargeAlloc) -> segment rounded up to 2 MiB (kRoundLarge): 16 MiB.
    # The 1 MiB remainder is not > kSmallSize, so it is not split: the whole 16 MiB block counts as allocated.
    result = simulate([15 * MiB], _allocs(0))
    assert result.peak_reserved == 16 * MiB
    assert result.peak_allocated == 16 * MiB
    assert result.fragmentation_bytes == 0


def test_free_then_same_size_reuses_the_cached_block():
    # A 12 MiB -> 12 MiB segment; free keeps it cached; B 12 MiB takes it: no new cudaMalloc.
    result = simulate([12 * MiB, 12 * MiB], _allocs(0) + _frees(0) + _allocs(1))
    assert result.peak_reserved == 12 * MiB
    assert result.num_allocs == 1
    assert result.end_reserved == 12 * MiB and result.end_allocated == 12 * MiB


def test_reused_block_is_split_only_when_more_than_1mib_remains():
    # A 12 MiB, free A, B 8 MiB: best fit is the cached 12 MiB block; 4 MiB remain (> 1 MiB) -> split.
    split = simulate([12 * MiB, 8 * MiB], _allocs(0) + _frees(0) + _allocs(1))
    assert (split.peak_reserved, split.end_allocated) == (12 * MiB, 8 * MiB)
    # B 11.5 MiB: 0.5 MiB remain (not > 1 MiB) -> the whole 12 MiB block is handed out and counted.
    whole = simulate([12 * MiB, 23 * MiB // 2], _allocs(0) + _frees(0) + _allocs(1))
    assert (whole.peak_reserved, whole.end_allocated) == (12 * MiB, 12 * MiB)


def test_best_fit_takes_the_smallest_block_that_fits():
    # Cached: 12, 16 and 24 MiB segments. A 14 MiB request takes the 16 MiB one (2 MiB left: split).
    sizes = [12 * MiB, 16 * MiB, 24 * MiB, 14 * MiB, 22 * MiB]
    events = _allocs(0, 1, 2) + _frees(0, 1, 2) + _allocs(3)
    result = simulate(sizes, events)
    assert (result.peak_reserved, result.end_allocated) == (52 * MiB, 14 * MiB)
    # then a 22 MiB request still finds the untouched 24 MiB block: no new segment
    both = simulate(sizes, events + _allocs(4))
    assert (both.peak_reserved, both.num_allocs) == (52 * MiB, 3)


def test_freed_neighbours_merge_back_into_one_block():
    # Four 5 MiB blocks fill one 20 MiB segment. Freeing all of them merges them into one 20 MiB block,
    # which then serves a 15 MiB request (>= 10 MiB, would otherwise get its own 16 MiB segment).
    sizes = [5 * MiB] * 4 + [15 * MiB]
    result = simulate(sizes, _allocs(0, 1, 2, 3) + _frees(1, 3, 0, 2) + _allocs(4))
    assert result.peak_reserved == 20 * MiB and result.num_allocs == 1


def test_zero_byte_allocations_take_no_memory():
    result = simulate([0, 100], _allocs(0, 1) + _frees(0, 1))
    assert result.peak_allocated == 512 and result.end_allocated == 0


def test_peaks_and_reserved_at_peak_allocated():
    # A 5 MiB: 20 MiB segment, 15 MiB remainder free. B 17 MiB: no free block fits -> 18 MiB segment whose
    # 1 MiB rest is not split: counted 18 MiB. Allocated 23 MiB, reserved 38 MiB (fragmentation 15 MiB).
    # Free B, then C 6 MiB: best fit is the 15 MiB remainder (smaller than the cached 18 MiB): split 6 + 9.
    result = simulate([5 * MiB, 17 * MiB, 6 * MiB], _allocs(0, 1) + _frees(1) + _allocs(2))
    assert result.peak_allocated == 23 * MiB
    assert result.reserved_at_peak_allocated == 38 * MiB
    assert result.peak_reserved == 38 * MiB
    assert result.fragmentation_bytes == 15 * MiB
    assert (result.end_allocated, result.end_reserved) == (11 * MiB, 38 * MiB)
    # a 15 MiB request instead of B fits the 15 MiB remainder exactly: one segment
    exact = simulate([5 * MiB, 15 * MiB], _allocs(0, 1))
    assert (exact.peak_reserved, exact.peak_allocated) == (20 * MiB, 20 * MiB)


# ---------------------------------------------------------------------------------------------------------
# max_split_size_mb


def test_max_split_size_keeps_oversize_blocks_whole():
    config = AllocatorConfig(max_split_size_mb=100)
    # A 200 MiB (oversize), free A, B 150 MiB: a cached oversize block is reused only if it is less than
    # 20 MiB (max_non_split_rounding) larger than the request: 200 >= 150 + 20 -> new 150 MiB segment.
    fresh = simulate([200 * MiB, 150 * MiB], _allocs(0) + _frees(0) + _allocs(1), config)
    assert fresh.peak_reserved == 350 * MiB
    # B 190 MiB: 200 < 190 + 20 -> reuse, not split: the whole 200 MiB counts as allocated
    reused = simulate([200 * MiB, 190 * MiB], _allocs(0) + _frees(0) + _allocs(1), config)
    assert (reused.peak_reserved, reused.end_allocated) == (200 * MiB, 200 * MiB)
    # B 50 MiB (< max_split): never served from an oversize block -> own 50 MiB segment (250 in all) ...
    small = simulate([200 * MiB, 50 * MiB], _allocs(0) + _frees(0) + _allocs(1), config)
    assert small.peak_reserved == 250 * MiB
    # ... whereas without the option it splits the cached 200 MiB block
    assert simulate([200 * MiB, 50 * MiB], _allocs(0) + _frees(0) + _allocs(1)).peak_reserved == 200 * MiB


def test_max_non_split_rounding_widens_oversize_reuse():
    # 200 MiB cached, 150 MiB request: with max_non_split_rounding_mb 64, 200 < 150 + 64 -> reused.
    config = AllocatorConfig.parse("max_split_size_mb:100,max_non_split_rounding_mb:64")
    result = simulate([200 * MiB, 150 * MiB], _allocs(0) + _frees(0) + _allocs(1), config)
    assert result.peak_reserved == 200 * MiB


def test_oversize_blocks_are_released_first_when_memory_runs_out():
    # capacity 300 MiB. A 200 MiB cached; B 150 MiB cannot reuse it (see above) and 200 + 150 > 300:
    # release_available_cached_blocks frees the 200 MiB segment, then B gets its own 150 MiB.
    config = AllocatorConfig(max_split_size_mb=100)
    result = simulate([200 * MiB, 150 * MiB], _allocs(0) + _frees(0) + _allocs(1), config, capacity=300 * MiB)
    assert not result.oom
    assert (result.peak_reserved, result.end_reserved) == (200 * MiB, 150 * MiB)
    assert result.num_frees == 1 and result.num_alloc_retries == 0


# ---------------------------------------------------------------------------------------------------------
# roundup_power2_divisions


def test_roundup_power2_divisions_rounds_to_the_next_division():
    # 1200 MiB lies in [1024, 2048) MiB; 4 divisions: 1024, 1280, 1536, 1792 -> 1280 MiB
    assert roundup_power2_next_division(1200 * MiB, 4) == 1280 * MiB
    assert roundup_power2_next_division(1200, 4) == 1280
    assert roundup_power2_next_division(1024 * MiB, 4) == 1024 * MiB  # powers of two stay
    config = AllocatorConfig.parse("roundup_power2_divisions:4")
    result = simulate([1200 * MiB], _allocs(0), config)
    assert result.peak_allocated == 1280 * MiB and result.peak_reserved == 1280 * MiB
    assert simulate([1200 * MiB], _allocs(0)).peak_reserved == 1200 * MiB
    # small sizes: 3000 B > 512 * 4 -> steps of 512 above 2048 -> 3072; 1000 B <= 2048 -> plain 1024
    assert config.round_size(3000) == 3072 and config.round_size(1000) == 1024


def test_roundup_power2_divisions_per_size_range():
    # A boundary of N MiB sets sizes in [N, 2N) MiB; the first one also covers every smaller size and
    # ">" every range after the last boundary (parseRoundUpPower2Divisions).
    config = AllocatorConfig.parse("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]")
    assert config.divisions_for(100 * MiB) == 1
    assert config.divisions_for(300 * MiB) == 1
    assert config.divisions_for(600 * MiB) == 2
    assert config.divisions_for(1200 * MiB) == 4
    assert config.divisions_for(3000 * MiB) == 8
    assert config.divisions_for(100 * 1024 * MiB) == 8  # beyond 64 GiB: the last range
    # 600 MiB in [512, 1024) with 2 divisions -> 768 MiB
    assert simulate([600 * MiB], _allocs(0), config).peak_reserved == 768 * MiB


def test_roundup_can_move_a_request_into_the_large_pool():
    # 1,000,000 B with 8 divisions: [512 KiB, 1 MiB) in steps of 64 KiB -> 1,048,576 B = 1 MiB: still small.
    config = AllocatorConfig(roundup_power2_divisions=8)
    assert config.round_size(1_000_000) == MiB
    assert simulate([1_000_000], _allocs(0), config).peak_reserved == 2 * MiB


# ---------------------------------------------------------------------------------------------------------
# expandable_segments


def test_expandable_segments_map_pages():
    # small pool pages are 2 MiB, large pool pages 20 MiB: 100 B -> 2 MiB; 30 MiB -> 2 pages = 40 MiB
    assert simulate([100], _allocs(0), EXPANDABLE).peak_reserved == 2 * MiB
    result = simulate([30 * MiB], _allocs(0), EXPANDABLE)
    assert result.peak_reserved == 40 * MiB
    assert result.peak_allocated == 30 * MiB  # the 10 MiB rest is split off (>= 512 B with expandable)


def test_expandable_segments_reduce_fragmentation_when_sizes_grow():
    # Step 1 allocates ten 11 MiB tensors and frees them, step 2 ten 13 MiB tensors.
    sizes = [11 * MiB] * 10 + [13 * MiB] * 10
    events = _allocs(*range(10)) + _frees(*range(10)) + _allocs(*range(10, 20)) + _frees(*range(10, 20))
    # Segments: ten 12 MiB segments in step 1; the cached 12 MiB blocks are too small for 13 MiB requests,
    # so step 2 adds ten 14 MiB segments: 120 + 140 = 260 MiB.
    plain = simulate(sizes, events)
    assert plain.peak_reserved == 260 * MiB
    assert plain.num_allocs == 20
    # Expandable: step 1 packs 110 MiB into 6 pages of 20 MiB (120 MiB). Freed, it merges into one
    # 120 MiB block; step 2 fits nine 13 MiB tensors (117 MiB) in it and maps one more page for the
    # tenth (3 + 20 = 23 MiB free at the end): 140 MiB.
    expandable = simulate(sizes, events, EXPANDABLE)
    assert expandable.peak_reserved == 140 * MiB
    assert expandable.num_segments == 1


def test_expandable_segments_unmap_free_pages_under_pressure():
    # A 30 MiB maps pages 0-1 ([0, 40) MiB), B 5 MiB takes [30, 35); free A -> free [0, 30) and [35, 40).
    # C 35 MiB: no free block fits; the lowest room is [35, 40) + unmapped space: map 30 MiB more -> 2 pages.
    sizes = [30 * MiB, 5 * MiB, 35 * MiB]
    events = _allocs(0, 1) + _frees(0) + _allocs(2)
    assert simulate(sizes, events, EXPANDABLE).peak_reserved == 80 * MiB
    # With capacity 60 MiB the 2 pages do not fit (40 + 40): release_cached_blocks unmaps the one page
    # wholly inside the free [0, 30) (page 0), reserved 20 MiB; then the 2 pages fit: 60 MiB.
    result = simulate(sizes, events, EXPANDABLE, capacity=60 * MiB)
    assert not result.oom
    assert result.peak_reserved == 60 * MiB
    assert (result.num_frees, result.num_alloc_retries) == (1, 1)


# ---------------------------------------------------------------------------------------------------------
# capacity: releasing the cache, and out of memory


def test_capacity_releases_cached_segments_before_failing():
    # capacity 40 MiB. A 12 MiB cached after its free; B 30 MiB: 12 + 30 > 40 -> release_cached_blocks frees
    # the unsplit 12 MiB segment, retry: 30 MiB fits. Peak reserved 30 MiB.
    result = simulate([12 * MiB, 30 * MiB], _allocs(0) + _frees(0) + _allocs(1), capacity=40 * MiB)
    assert not result.oom
    assert result.peak_reserved == 30 * MiB
    assert (result.num_frees, result.num_alloc_retries, result.num_allocs) == (1, 1, 2)
    # without a capacity the cache is kept: 12 + 30 = 42 MiB
    assert simulate([12 * MiB, 30 * MiB], _allocs(0) + _frees(0) + _allocs(1)).peak_reserved == 42 * MiB


def test_true_out_of_memory():
    # A 30 MiB live, B 12 MiB: 30 + 12 > 40 and nothing is cached -> out of memory at event 1
    result = simulate([30 * MiB, 12 * MiB, 1], _allocs(0, 1, 2), capacity=40 * MiB)
    assert result.oom and result.oom_at_event == 1
    assert result.oom_request_bytes == 12 * MiB
    assert result.end_allocated == 30 * MiB  # the replay stops at the failing request


def test_partly_used_segments_are_not_released():
    # A, B 5 MiB share a 20 MiB segment; free A. C 25 MiB (-> 26 MiB segment): 20 + 26 > 40 MiB, and the
    # only cached memory is split (B still lives in it), so release_cached_blocks frees nothing: OOM.
    result = simulate([5 * MiB, 5 * MiB, 25 * MiB], _allocs(0, 1) + _frees(0) + _allocs(2), capacity=40 * MiB)
    assert result.oom and result.oom_at_event == 3
    assert result.num_frees == 0


def test_empty_cache_returns_whole_free_segments():
    model = CachingAllocator()
    a, b = model.malloc(5 * MiB), model.malloc(15 * MiB)
    assert a is not None and b is not None
    model.free(b)
    model.empty_cache()  # the 16 MiB segment is whole and free: released; the 20 MiB one holds A
    assert (model.reserved, model.allocated, model.segments) == (20 * MiB, 5 * MiB, 1)
    model.free(a)
    model.empty_cache()
    assert (model.reserved, model.segments) == (0, 0)


# ---------------------------------------------------------------------------------------------------------
# Configuration


def test_parse_defaults_and_values():
    assert AllocatorConfig.parse(None) == AllocatorConfig() == AllocatorConfig.parse("  ")
    config = AllocatorConfig.parse(
        " max_split_size_mb:128, expandable_segments:True,garbage_collection_threshold:0.6,"
        "roundup_power2_divisions:[64:8,>:2],pinned_use_cuda_host_register:True,backend:native,"
    )
    assert config.max_split_size_mb == 128 and config.max_split_size == 128 * MiB
    assert config.expandable_segments is True
    assert config.garbage_collection_threshold == 0.6
    assert config.roundup_power2_divisions == (8,) * 7 + (2,) * 9
    assert AllocatorConfig.parse("expandable_segments:False").expandable_segments is False


def test_parse_round_trips_through_to_text():
    for text in ("", "max_split_size_mb:512", "expandable_segments:True,roundup_power2_divisions:4",
                 "roundup_power2_divisions:[256:1,512:2,1024:4,>:8],garbage_collection_threshold:0.8"):
        config = AllocatorConfig.parse(text)
        assert AllocatorConfig.parse(config.to_text()) == config


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(InvalidArgumentError, match=r"unknown PYTORCH_CUDA_ALLOC_CONF option 'max_split_size'"):
        AllocatorConfig.parse("max_split_size:128")
    with pytest.raises(InvalidArgumentError, match=r"Did you mean 'max_split_size_mb'.*Valid: .*expandable_segments"):
        AllocatorConfig.parse("max_split_size:128")
    assert "roundup_power2_divisions" in VALID_KEYS and "garbage_collection_threshold" in VALID_KEYS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_split_size_mb:10", r"max_split_size_mb must be >= 20"),
        ("max_split_size_mb:big", r"max_split_size_mb needs a whole number"),
        ("expandable_segments:true", r"must be True or False"),
        ("garbage_collection_threshold:1.5", r"garbage_collection_threshold must be in \(0.0, 1.0\)"),
        ("roundup_power2_divisions:3", r"power of 2"),
        ("roundup_power2_divisions:[100:2]", r"boundaries must be powers of 2"),
        ("roundup_power2_divisions:[64:8", r"missing '\]'"),
        ("max_split_size_mb", r"needs a value"),
        ("max_split_size_mb:200;expandable_segments:True", r"expected ',' after max_split_size_mb"),
        ("backend:cudaMallocAsync", r"does not model"),
        ("large_segment_size_mb:8", r"large_segment_size_mb must be > 10"),
    ],
)
def test_invalid_values_are_rejected(text: str, message: str):
    with pytest.raises(InvalidArgumentError, match=message):
        AllocatorConfig.parse(text)


def test_config_accepts_an_int_for_every_size_range():
    assert AllocatorConfig(roundup_power2_divisions=4) == AllocatorConfig.parse("roundup_power2_divisions:4")
    with pytest.raises(InvalidArgumentError, match=r"powers of 2 or 0"):
        AllocatorConfig(roundup_power2_divisions=6)


def test_large_segment_size_changes_mid_size_segments():
    config = AllocatorConfig.parse("large_segment_size_mb:32")
    assert simulate([5 * MiB], _allocs(0), config).peak_reserved == 32 * MiB


# ---------------------------------------------------------------------------------------------------------
# Trace validation


@pytest.mark.parametrize(
    ("events", "message"),
    [(_frees(0), r"frees allocation 0, which is not live"), (_allocs(0, 0), r"already live"), ([0], r"is 0")],
)
def test_inconsistent_events_are_rejected(events: list[int], message: str):
    with pytest.raises(InvalidArgumentError, match=message):
        simulate([100], events)


def test_negative_capacity_is_rejected():
    with pytest.raises(InvalidArgumentError, match=r"capacity must be >= 0"):
        simulate([100], _allocs(0), capacity=-1)


# ---------------------------------------------------------------------------------------------------------
# Invariants on random traces


def _check(model: CachingAllocator) -> None:
    """Reserved covers allocated; the snapshot adds up to the counters; free neighbours are always merged."""
    assert model.reserved >= model.allocated >= 0
    if model.capacity is not None:
        assert model.reserved <= model.capacity
    mapped = allocated = 0
    for segment in model.snapshot():
        for left, right in zip(segment, segment[1:]):
            assert left.address + left.size == right.address
            assert left.allocated or right.allocated or left.mapped != right.mapped, "unmerged free neighbours"
        mapped += sum(b.size for b in segment if b.mapped)
        allocated += sum(b.size for b in segment if b.allocated)
        assert all(b.size % 512 == 0 for b in segment)
    assert (mapped, allocated) == (model.reserved, model.allocated)


CONFIGS = [
    AllocatorConfig(),
    EXPANDABLE,
    AllocatorConfig.parse("max_split_size_mb:64,roundup_power2_divisions:4"),
    AllocatorConfig.parse("expandable_segments:True,roundup_power2_divisions:[2:2,64:8,>:1]"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.to_text() or "default")
@pytest.mark.parametrize("capacity", [None, 400 * MiB])
def test_random_traces_keep_the_invariants(config: AllocatorConfig, capacity: int | None):
    rng = random.Random(f"{config.to_text()}|{capacity}")
    model = CachingAllocator(config, capacity)
    live = []
    for step in range(1500):
        if live and rng.random() < 0.45:
            model.free(live.pop(rng.randrange(len(live))))
        else:
            kind = rng.random()
            nbytes = rng.randint(1, 1 << 20) if kind < 0.5 else rng.randint(1, 40 << 20) if kind < 0.97 else (
                rng.randint(60, 200) << 20
            )
            block = model.malloc(nbytes)
            if block is None:
                assert capacity is not None
            else:
                live.append(block)
        if step % 25 == 0:
            _check(model)
    _check(model)
    peak = model.peak_reserved
    for block in live:
        model.free(block)
    assert model.allocated == 0
    _check(model)
    model.empty_cache()
    assert model.reserved == 0
    # An expandable segment whose first mapping failed holds no memory and is never released (release_blocks
    # only visits mapped free blocks, in PyTorch too); every other segment is gone.
    assert all(not block.mapped for segment in model.snapshot() for block in segment)
    assert model.segments == len(model.snapshot())
    assert model.peak_reserved == peak


def test_replay_agrees_with_stepping():
    rng = random.Random(7)
    sizes = [rng.randint(1, 30 << 20) for _ in range(300)]
    events, live = [], []
    for aid in range(len(sizes)):
        events.append(aid + 1)
        live.append(aid)
        while live and rng.random() < 0.5:
            events.append(-(live.pop(rng.randrange(len(live))) + 1))
    result = simulate(sizes, events, EXPANDABLE)
    model = CachingAllocator(EXPANDABLE)
    blocks = {}
    for event in events:
        if event > 0:
            blocks[event] = model.malloc(sizes[event - 1])
        else:
            model.free(blocks.pop(-event))
    assert (result.peak_reserved, result.peak_allocated) == (model.peak_reserved, model.peak_allocated)
    assert (result.end_reserved, result.end_allocated) == (model.reserved, model.allocated)
