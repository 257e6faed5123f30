"""A model of PyTorch's CUDA caching allocator: what turns allocated bytes into reserved bytes.

One module on purpose (over 600 lines): it follows one algorithm, CUDACachingAllocator.cpp's pools,
block splitting, rounding and segment growth, whose parts only make sense read together.

``torch.cuda.max_memory_allocated`` counts the blocks handed to tensors; ``max_memory_reserved`` counts
the segments the allocator obtained from the driver (cudaMalloc, or pages mapped into an expandable
segment). The difference is rounding, segment granularity and fragmentation, and on a nearly full GPU
it decides whether a run fits. This module replays an allocation trace through the rules of the native
allocator, ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``; the newest sources also
carry the same logic as ``CachingDeviceAllocatorImpl`` in ``c10/core/CachingDeviceAllocator.h``), and the
option parser (``AcceleratorAllocatorConfig::parseArgs`` in ``c10/core/AllocatorConfig.cpp``, formerly
``CUDAAllocatorConfig::parseArgs`` in ``c10/cuda/CUDAAllocatorConfig.cpp``). The rules below read the same
in the PyTorch 2.x versions of those files that were compared. The options ``max_non_split_rounding_mb``
and ``large_segment_size_mb`` exist only in recent versions (both are in PyTorch 2.13's
``c10/core/AllocatorConfig.h``); their defaults reproduce the older fixed behaviour.

Modelled, with the source function each rule comes from:

- ``round_size`` / ``roundup_power2_next_division``: every request rounds up to 512 bytes
  (``kMinBlockSize``), or to the next of ``roundup_power2_divisions`` steps between two powers of two;
  the per-size-range list form (``[256:1,512:2,>:8]``) is parsed exactly as ``parseRoundUpPower2Divisions``
  does (a boundary of N MiB sets the divisions of sizes in [N, 2N) MiB, and the first entry also covers
  every smaller size).
- ``get_pool``: rounded requests <= 1 MiB (``kSmallSize``) use the small pool, larger ones the large pool.
- ``get_allocation_size``: a new small segment is 2 MiB (``kSmallBuffer``); a large request under 10 MiB
  (``kMinLargeAlloc``) gets a 20 MiB segment (``kLargeBuffer``, or ``large_segment_size_mb``); a larger
  one gets its own segment rounded up to 2 MiB (``kRoundLarge``).
- ``get_free_block``: best fit in the request's pool, the smallest free block whose size is >= the
  request, ties broken by address (``BlockComparatorSize``); with ``max_split_size_mb`` a request below
  it never takes an oversize block, and a request at or above it takes a cached block only if the block
  is smaller than request + ``max_non_split_rounding_mb`` (20 MiB by default, ``kLargeBuffer`` before
  that option existed). With expandable segments the search walks on to larger blocks while their
  "expandable size" (size plus the unmapped space behind them) is smaller, as the source does.
- ``should_split`` / ``alloc_found_block``: the remainder of a block is split off when it is >= 512 bytes
  in the small pool (or with expandable segments), and in the large pool only when it is > 1 MiB and the
  request is below ``max_split_size``; otherwise the whole block is handed out and counted as allocated.
- ``free_block`` / ``try_merge_blocks``: a freed block merges with free neighbours of its segment and
  stays cached: reserved does not drop.
- ``alloc_block`` failing (only when a ``capacity`` is given: reserved + new segment > capacity) runs the
  retry chain of ``malloc``: ``release_available_cached_blocks`` (oversize cached blocks, only when
  ``max_split_size_mb`` is set), then ``release_cached_blocks`` / ``release_blocks`` (every cached
  segment that is one whole free block; expandable segments unmap their fully free pages,
  ``unmap_block``), then one last attempt; if that fails the request is an out-of-memory error.
- Expandable segments (``find_expandable_block``, ``try_allocate_expandable_block``, ``map_block``,
  ``unmap_block``, ``ExpandableSegment::map/unmap``): one growing segment per pool, mapped in pages of
  2 MiB (small pool) or 20 MiB (large pool: ``kLargeBuffer`` in the sources; memguard uses
  ``large_segment_size_mb``, 20 by default); a request that does not fit a free block
  maps just enough pages at the lowest address that has room (usually extending the free block at the
  end), and reserved is the number of mapped pages times the page size.

Not modelled (documented limits of the replay):

- Streams: everything runs on one stream, so ``recordStream`` / cross-stream events never delay a free.
- CUDA graphs and ``torch.cuda.MemPool`` private pools, ``use_on_oom`` pools, free-memory callbacks.
- ``garbage_collection_threshold`` and ``per_process_memory_fraction``: parsed and stored, not replayed.
  The threshold only acts after ``torch.cuda.set_per_process_memory_fraction``; pass the limit you want
  as ``capacity`` instead.
- ``backend:cudaMallocAsync`` (a different allocator): rejected by :meth:`AllocatorConfig.parse`.
- Device addresses: segments get increasing addresses in creation order, so equal-size ties in the best
  fit prefer older segments; real cudaMalloc addresses are up to the driver.
- Memory outside the allocator (CUDA context, library workspaces created outside it, other processes),
  the driver's own allocation granularity, and ``torch.cuda.empty_cache`` calls the program makes (call
  :meth:`CachingAllocator.empty_cache` to replay one).
- Expandable segments switched on or off in the middle of a run.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import cast

from memguard.errors import InvalidArgumentError, unknown_name

MiB = 1 << 20

K_MIN_BLOCK_SIZE = 512
"""``kMinBlockSize``: every block is a multiple of 512 bytes."""
K_SMALL_SIZE = 1 << 20
"""``kSmallSize``: the largest request the small pool serves (1 MiB)."""
K_SMALL_BUFFER = 2 << 20
"""``kSmallBuffer``: the size of a small-pool segment, and the page of a small expandable segment."""
K_LARGE_BUFFER = 20 << 20
"""``kLargeBuffer``: the segment for 1-10 MiB requests, and the page of a large expandable segment."""
K_MIN_LARGE_ALLOC = 10 << 20
"""``kMinLargeAlloc``: from this size on a request gets a segment of its own size."""
K_ROUND_LARGE = 2 << 20
"""``kRoundLarge``: segments of 10 MiB and more are rounded up to a multiple of 2 MiB."""

_SIZE_MAX = (1 << 64) - 1
"""``std::numeric_limits<size_t>::max()``: ``max_split_size`` when the option is unset."""
_ROUNDUP_INTERVALS = 16
"""``kRoundUpPowerOfTwoIntervals``: one divisions entry per power of two from 1 MiB to 64 GiB."""
_ROUNDUP_FIRST_LOG2 = 20
"""log2 of ``kRoundUpPowerOfTwoStart`` (1 MiB)."""
_UNBOUNDED_ADDRESS_SPACE = 1 << 50
"""Virtual size of an expandable segment when no capacity is given: never the limiting factor."""


# ---------------------------------------------------------------------------------------------------------
# Configuration (PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF)

_MODELLED_KEYS = (
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "roundup_power2_divisions",
    "expandable_segments",
    "garbage_collection_threshold",
    "large_segment_size_mb",
    "per_process_memory_fraction",
    "backend",
)
# Keys PyTorch accepts that change nothing this model replays (host/pinned memory, locking, the error path).
_IGNORED_KEYS = (
    "release_lock_on_cudamalloc",
    "release_lock_on_hipmalloc",
    "pinned_use_cuda_host_register",
    "pinned_use_hip_host_register",
    "pinned_num_register_threads",
    "pinned_use_background_threads",
    "pinned_reserve_segment_size_mb",
    "pinned_free_catch_all",
    "graph_capture_record_stream_reuse",
    "throw_on_cudamalloc_oom",
)
VALID_KEYS: tuple[str, ...] = _MODELLED_KEYS + _IGNORED_KEYS
"""Every option name :meth:`AllocatorConfig.parse` accepts."""

_SEPARATORS = frozenset(",:[]")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _tokenize(text: str) -> list[str]:
    """Split like ``ConfigTokenizer``: ``, : [ ]`` are tokens of their own and whitespace is dropped."""
    tokens: list[str] = []
    buffer = ""
    for ch in text:
        if ch in _SEPARATORS:
            if buffer:
                tokens.append(buffer)
                buffer = ""
            tokens.append(ch)
        elif not ch.isspace():
            buffer += ch
    if buffer:
        tokens.append(buffer)
    return tokens


def _to_int(key: str, token: str) -> int:
    if not token.isdigit():
        raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF option {key} needs a whole number, got {token!r}.")
    return int(token)


def _to_float(key: str, token: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF option {key} needs a number, got {token!r}.") from None


def _to_bool(key: str, token: str) -> bool:
    # ConfigTokenizer::toBool accepts exactly these two spellings; anything else makes PyTorch raise.
    if token == "True":
        return True
    if token == "False":
        return False
    raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF option {key} must be True or False, got {token!r}.")


def _parse_divisions(value: list[str]) -> tuple[int, ...]:
    """``parseRoundUpPower2Divisions``: a single power of two for every size, or ``[MiB:divisions,...,>:d]``.

    A boundary of N MiB sets the entry of sizes in [N, 2N) MiB; the first boundary also fills every entry
    below it, and ``>`` fills every entry after the last boundary given.
    """
    key = "roundup_power2_divisions"
    if len(value) == 1:
        single = _to_int(key, value[0])
        if not _is_power_of_two(single):
            raise InvalidArgumentError(f"{key}: the divisions must be a power of 2, got {single}.")
        return (single,) * _ROUNDUP_INTERVALS
    divisions = [0] * _ROUNDUP_INTERVALS
    items = value[1:-1]
    pairs = [items[i : i + 3] for i in range(0, len(items), 4)]
    separators = items[3::4]
    if any(len(p) != 3 or p[1] != ":" for p in pairs) or any(s != "," for s in separators):
        raise InvalidArgumentError(f"{key}: expected [MiB:divisions,...,>:divisions], got {''.join(value)!r}.")
    first, last_index = True, 0
    for bound, _, count_token in pairs:
        count = _to_int(key, count_token)
        if count != 0 and not _is_power_of_two(count):
            raise InvalidArgumentError(f"{key}: divisions must be a power of 2 or 0, got {count}.")
        if bound == ">":
            divisions[last_index + 1 :] = [count] * (_ROUNDUP_INTERVALS - last_index - 1)
            continue
        boundary = _to_int(key, bound)
        if not _is_power_of_two(boundary):
            raise InvalidArgumentError(f"{key}: size boundaries must be powers of 2 (in MiB), got {boundary}.")
        index = min(boundary.bit_length() - 1, _ROUNDUP_INTERVALS - 1)
        if first:
            divisions[:index] = [count] * index
            first = False
        divisions[index] = count
        last_index = index
    return tuple(divisions)


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocator options that change how much memory a run reserves.

    Build one from the environment variable's text with :meth:`parse`, or directly. Sizes are in MiB as
    in ``PYTORCH_CUDA_ALLOC_CONF``; the byte values the model uses are properties.
    """

    max_split_size_mb: int | None = None
    """Blocks of this size or more are never split (None: no limit). PyTorch requires >= 20."""
    max_non_split_rounding_mb: int = K_LARGE_BUFFER // MiB
    """A request >= max_split_size reuses a cached block only if the block is less than this much larger."""
    roundup_power2_divisions: tuple[int, ...] = (0,) * _ROUNDUP_INTERVALS
    """Divisions per power-of-two size range, one entry per range from 1 MiB ([1, 2) MiB, and everything
    below) to 32 GiB and up. An int applies to every range. 0 or 1: plain 512-byte rounding."""
    expandable_segments: bool = False
    """One growing segment per pool mapped in pages instead of one cudaMalloc per segment."""
    garbage_collection_threshold: float | None = None
    """Stored, not replayed: it only acts together with ``set_per_process_memory_fraction``."""
    large_segment_size_mb: int = K_LARGE_BUFFER // MiB
    """Segment for 1-10 MiB requests and page of large expandable segments (an option of recent PyTorch;
    older versions always use 20)."""
    per_process_memory_fraction: float | None = None
    """Stored, not replayed: give the limit to :func:`simulate` as ``capacity``."""

    def __post_init__(self) -> None:
        divisions = self.roundup_power2_divisions
        if isinstance(divisions, int):
            divisions = (divisions,) * _ROUNDUP_INTERVALS
        divisions = tuple(int(d) for d in divisions)
        if len(divisions) != _ROUNDUP_INTERVALS:
            raise InvalidArgumentError(
                f"roundup_power2_divisions needs one entry per size range ({_ROUNDUP_INTERVALS}), got {len(divisions)}."
            )
        if any(d != 0 and not _is_power_of_two(d) for d in divisions):
            raise InvalidArgumentError(f"roundup_power2_divisions must be powers of 2 or 0, got {divisions}.")
        object.__setattr__(self, "roundup_power2_divisions", divisions)
        if self.max_split_size_mb is not None and self.max_split_size_mb < K_LARGE_BUFFER // MiB:
            raise InvalidArgumentError(
                f"max_split_size_mb must be >= {K_LARGE_BUFFER // MiB} (PyTorch rejects smaller values), "
                f"got {self.max_split_size_mb}."
            )
        if self.max_non_split_rounding_mb < K_LARGE_BUFFER // MiB:
            raise InvalidArgumentError(
                f"max_non_split_rounding_mb must be >= {K_LARGE_BUFFER // MiB}, got {self.max_non_split_rounding_mb}."
            )
        if self.large_segment_size_mb <= K_MIN_LARGE_ALLOC // MiB:
            raise InvalidArgumentError(
                f"large_segment_size_mb must be > {K_MIN_LARGE_ALLOC // MiB}, got {self.large_segment_size_mb}."
            )
        threshold = self.garbage_collection_threshold
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise InvalidArgumentError(f"garbage_collection_threshold must be in (0.0, 1.0), got {threshold}.")
        fraction = self.per_process_memory_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise InvalidArgumentError(f"per_process_memory_fraction must be in [0.0, 1.0], got {fraction}.")

    # parsing ---------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | None) -> AllocatorConfig:
        """The configuration a ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) value selects.

        Follows ``AcceleratorAllocatorConfig::parseArgs``: ``key:value`` pairs separated by commas, list
        values in brackets. Options that do not affect device memory on one stream (pinned host memory,
        lock release) are accepted and ignored; an unknown option or a value PyTorch would reject raises
        :class:`~memguard.errors.InvalidArgumentError`.
        """
        if text is None or not text.strip():
            return cls()
        return cls(**_config_fields(_options(text)))

    def to_text(self) -> str:
        """The ``PYTORCH_CUDA_ALLOC_CONF`` value that selects this configuration (empty for the defaults)."""
        parts = []
        if self.max_split_size_mb is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size_mb}")
        if self.max_non_split_rounding_mb != K_LARGE_BUFFER // MiB:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding_mb}")
        divisions = self.roundup_power2_divisions
        if any(divisions):
            if len(set(divisions)) == 1:
                parts.append(f"roundup_power2_divisions:{divisions[0]}")
            else:
                listed = ",".join(f"{1 << i}:{d}" for i, d in enumerate(divisions))
                parts.append(f"roundup_power2_divisions:[{listed}]")
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.garbage_collection_threshold is not None:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold}")
        if self.large_segment_size_mb != K_LARGE_BUFFER // MiB:
            parts.append(f"large_segment_size_mb:{self.large_segment_size_mb}")
        if self.per_process_memory_fraction is not None:
            parts.append(f"per_process_memory_fraction:{self.per_process_memory_fraction}")
        return ",".join(parts)

    # byte values -----------------------------------------------------------------------------------------
    @property
    def max_split_size(self) -> int:
        """``max_split_size()`` in bytes (SIZE_MAX when unset, as in PyTorch)."""
        return _SIZE_MAX if self.max_split_size_mb is None else self.max_split_size_mb * MiB

    @property
    def max_non_split_rounding_size(self) -> int:
        return self.max_non_split_rounding_mb * MiB

    @property
    def large_segment_size(self) -> int:
        return self.large_segment_size_mb * MiB

    def divisions_for(self, size: int) -> int:
        """``roundup_power2_divisions(size)``: the divisions entry of ``size``'s power-of-two range."""
        index = size.bit_length() - 1 - _ROUNDUP_FIRST_LOG2
        return self.roundup_power2_divisions[min(max(index, 0), _ROUNDUP_INTERVALS - 1)]

    def round_size(self, size: int) -> int:
        """``round_size``: the block size the allocator hands out for a request of ``size`` bytes."""
        if size < K_MIN_BLOCK_SIZE:
            return K_MIN_BLOCK_SIZE
        divisions = self.divisions_for(size)
        if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
            return roundup_power2_next_division(size, divisions)
        return (size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE * K_MIN_BLOCK_SIZE

    def allocation_size(self, size: int) -> int:
        """``get_allocation_size``: the segment a new cudaMalloc gets for a rounded request."""
        if size <= K_SMALL_SIZE:
            return K_SMALL_BUFFER
        if size < K_MIN_LARGE_ALLOC:
            return self.large_segment_size
        return (size + K_ROUND_LARGE - 1) // K_ROUND_LARGE * K_ROUND_LARGE


def _options(text: str) -> dict[str, list[str]]:
    """The value tokens of each ``key:value`` option, checked for shape and known names (a list value keeps
    its brackets). A repeated option keeps its last value, as PyTorch applies them in order."""
    tokens = _tokenize(text)
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key in _SEPARATORS:
            raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF: unexpected {key!r} in {text!r}.")
        if key not in VALID_KEYS:
            raise unknown_name("PYTORCH_CUDA_ALLOC_CONF option", key, VALID_KEYS)
        if i + 2 >= len(tokens) or tokens[i + 1] != ":" or tokens[i + 2] in ",:]":
            raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF option {key} needs a value ({key}:VALUE).")
        end = i + 2
        if tokens[end] == "[":
            while end < len(tokens) and tokens[end] != "]":
                end += 1
            if end == len(tokens):
                raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF option {key}: missing ']'.")
        values[key] = tokens[i + 2 : end + 1]
        i = end + 1
        if i < len(tokens):
            if tokens[i] != ",":
                raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF: expected ',' after {key}, got {tokens[i]!r}.")
            i += 1
    return values


def _config_fields(values: dict[str, list[str]]) -> dict[str, object]:
    """Typed dataclass fields from the raw value tokens of each option."""
    fields: dict[str, object] = {}
    for key, value in values.items():
        if key in _IGNORED_KEYS:
            continue
        if key != "roundup_power2_divisions" and len(value) != 1:
            raise InvalidArgumentError(f"PYTORCH_CUDA_ALLOC_CONF option {key} takes a single value, got a list.")
        token = value[0]
        if key in ("max_split_size_mb", "max_non_split_rounding_mb", "large_segment_size_mb"):
            fields[key] = _to_int(key, token)
        elif key in ("garbage_collection_threshold", "per_process_memory_fraction"):
            fields[key] = _to_float(key, token)
        elif key == "expandable_segments":
            fields[key] = _to_bool(key, token)
        elif key == "roundup_power2_divisions":
            fields[key] = _parse_divisions(value)
        elif key == "backend" and token != "native":
            if token == "cudaMallocAsync":
                raise InvalidArgumentError(
                    "backend:cudaMallocAsync uses CUDA's own stream-ordered allocator, which memguard does not "
                    "model; only the native caching allocator (backend:native) is supported."
                )
            raise unknown_name("allocator backend", token, ["native", "cudaMallocAsync"])
    return fields


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: round ``size`` up to the next of ``divisions`` equal steps between
    the powers of two around it (1200 with 4 divisions: steps 1024, 1280, 1536, 1792 -> 1280)."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


# ---------------------------------------------------------------------------------------------------------
# The allocator model


class _Segment:
    """An expandable segment: a virtual address range mapped page by page (``ExpandableSegment``)."""

    __slots__ = ("base", "page", "size")

    def __init__(self, base: int, page: int, size: int) -> None:
        self.base = base
        self.page = page
        self.size = size


class Block:
    """A contiguous piece of a segment (``Block``): handed out, cached free, or (expandable) unmapped."""

    __slots__ = ("size", "addr", "prev", "next", "allocated", "mapped", "small", "segment")

    def __init__(self, size: int, addr: int, small: bool, segment: _Segment | None = None, mapped: bool = True):
        self.size = size
        self.addr = addr
        self.prev: Block | None = None
        self.next: Block | None = None
        self.allocated = False
        self.mapped = mapped
        self.small = small
        self.segment = segment

    def splice(self, before: Block | None, after: Block | None) -> None:
        """Insert between two neighbours (``Block::splice``)."""
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after

    def __repr__(self) -> str:
        state = "allocated" if self.allocated else ("free" if self.mapped else "unmapped")
        return f"Block({self.size} bytes at {self.addr:#x}, {state})"


@dataclass(frozen=True)
class BlockInfo:
    """One block of :meth:`CachingAllocator.snapshot`, like ``torch.cuda.memory_snapshot()`` reports."""

    address: int
    size: int
    allocated: bool
    mapped: bool


class _Pool:
    """A ``BlockPool``: its free mapped blocks sorted by (size, address), its unmapped ones by address."""

    __slots__ = ("small", "free", "unmapped")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.free: list[tuple[int, int, Block]] = []
        self.unmapped: list[tuple[int, Block]] = []


class CachingAllocator:
    """A step-by-step replay of ``DeviceCachingAllocator`` on one stream.

    :meth:`malloc` and :meth:`free` mirror the real entry points; the counters mirror
    ``torch.cuda.memory_stats()``. ``capacity`` is the device memory the allocator may reserve (the GPU's
    total minus what the CUDA context and other processes hold); without it cudaMalloc never fails.
    """

    def __init__(self, config: AllocatorConfig | None = None, capacity: int | None = None) -> None:
        self.config = config = config if config is not None else AllocatorConfig()
        if capacity is not None and capacity < 0:
            raise InvalidArgumentError(f"capacity must be >= 0 bytes, got {capacity}.")
        self.capacity = capacity
        self.allocated = 0
        """Bytes of blocks handed out (``allocated_bytes.all.current``, rounded sizes)."""
        self.reserved = 0
        """Bytes of segments / mapped pages held (``reserved_bytes.all.current``)."""
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.reserved_at_peak_allocated = 0
        self.segments = 0
        """Segments held now (cudaMalloc segments, plus expandable segments counted once each)."""
        self.peak_segments = 0
        self.num_device_alloc = 0
        """cudaMalloc calls, or page-mapping calls with expandable segments (``num_device_alloc``)."""
        self.num_device_free = 0
        """cudaFree calls, or unmapping calls with expandable segments (``num_device_free``)."""
        self.num_alloc_retries = 0
        """Requests that had to release cached memory and retry (``num_alloc_retries``)."""
        self._small = _Pool(small=True)
        self._large = _Pool(small=False)
        self._next_address = 1 << 32
        self._active: set[Block] = set()
        self._max_split = config.max_split_size
        self._max_non_split_rounding = config.max_non_split_rounding_size
        self._expandable = config.expandable_segments
        self._plain_rounding = not any(d > 1 for d in config.roundup_power2_divisions)

    # public entry points ---------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> Block | None:
        """``DeviceCachingAllocator::malloc`` for a request of ``nbytes`` (> 0): the block handed out, or
        None when the request is out of memory even after releasing the cache."""
        if self._plain_rounding:
            size = K_MIN_BLOCK_SIZE if nbytes < K_MIN_BLOCK_SIZE else (nbytes + 511) & ~511
        else:
            size = self.config.round_size(nbytes)
        pool = self._small if size <= K_SMALL_SIZE else self._large
        block = self._get_free_block(pool, size)
        if block is None:
            block = self._new_block(pool, size)
            if block is None:
                return None
        if self._should_split(block, size):
            block = self._split(block, size)
        block.allocated = True
        self._active.add(block)
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
            self.reserved_at_peak_allocated = self.reserved
        return block

    def free(self, block: Block) -> None:
        """``DeviceCachingAllocator::free`` / ``free_block``: return the block to its pool's cache, merged
        with free neighbours. Reserved memory stays."""
        if not block.allocated:
            raise InvalidArgumentError(f"{block!r} is not allocated: it cannot be freed.")
        block.allocated = False
        self._active.discard(block)
        self.allocated -= block.size
        if block.prev is not None:
            self._try_merge(block, block.prev)
        if block.next is not None:
            self._try_merge(block, block.next)
        pool = self._small if block.small else self._large
        insort(pool.free, (block.size, block.addr, block))

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()`` (``release_cached_blocks``): give back every whole free segment."""
        self._release_blocks(self._large)
        self._release_blocks(self._small)

    def snapshot(self) -> list[list[BlockInfo]]:
        """Every segment's blocks in address order (expandable segments include their unmapped rest)."""
        heads: dict[int, Block] = {}
        blocks = list(self._active)
        for pool in (self._small, self._large):
            blocks += [b for _, _, b in pool.free] + [b for _, b in pool.unmapped]
        for block in blocks:
            while block.prev is not None:
                block = block.prev
            heads[block.addr] = block
        segments = []
        for addr in sorted(heads):
            cursor: Block | None = heads[addr]
            infos = []
            while cursor is not None:
                infos.append(BlockInfo(cursor.addr, cursor.size, cursor.allocated, cursor.mapped))
                cursor = cursor.next
            segments.append(infos)
        return segments

    # finding a block -------------------------------------------------------------------------------------
    def _get_free_block(self, pool: _Pool, size: int) -> Block | None:
        """``get_free_block``: best fit among the pool's cached blocks, within the max_split_size rules."""
        free = pool.free
        i = bisect_left(free, (size,))
        if i == len(free):
            return None
        block = free[i][2]
        if block.segment is not None:
            # Best fit by the size a block can grow to: a block followed by unmapped space is "larger".
            j = i + 1
            while block.segment is not None and j < len(free):
                candidate = free[j][2]
                if _expandable_size(candidate) >= _expandable_size(block):
                    break
                i, block, j = j, candidate, j + 1
        max_split = self._max_split
        if size < max_split and block.size >= max_split:
            return None  # do not hand out an oversize block for a request that could split a smaller one
        if size >= max_split and block.size >= size + self._max_non_split_rounding:
            return None  # an oversize block is reused only if it wastes less than max_non_split_rounding
        del free[i]
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        """``should_split``: keep the remainder as a free block, or hand out the whole block."""
        remaining = block.size - size
        if block.small or self._expandable:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self._max_split and remaining > K_SMALL_SIZE

    def _split(self, block: Block, size: int) -> Block:
        """``alloc_found_block`` with a split: the front ``size`` bytes are handed out, the rest is cached."""
        head = Block(size, block.addr, block.small, block.segment)
        head.splice(block.prev, block)
        block.addr += size
        block.size -= size
        pool = self._small if block.small else self._large
        insort(pool.free, (block.size, block.addr, block))
        return head

    # getting memory from the device ----------------------------------------------------------------------
    def _new_block(self, pool: _Pool, size: int) -> Block | None:
        """The retry chain of ``malloc`` after the cache had nothing: allocate, release oversize blocks,
        release everything cached, allocate once more."""
        block = self._alloc_block(pool, size)
        if block is None and self._release_available_cached_blocks(pool, size):
            block = self._alloc_block(pool, size)
        if block is None:
            self.num_alloc_retries += 1
            self.empty_cache()
            block = self._alloc_block(pool, size)
        return block

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _grew(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.num_device_alloc += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _alloc_block(self, pool: _Pool, size: int) -> Block | None:
        """``alloc_block``: a new segment from cudaMalloc (or pages mapped into an expandable segment)."""
        if self._expandable:
            return self._try_allocate_expandable_block(pool, size)
        alloc_size = self.config.allocation_size(size)
        if not self._fits(alloc_size):
            return None
        block = Block(alloc_size, self._next_address, pool.small)
        self._next_address += alloc_size
        self._grew(alloc_size)
        self.segments += 1
        if self.segments > self.peak_segments:
            self.peak_segments = self.segments
        return block

    def _release_block(self, block: Block) -> None:
        """``release_block``: cudaFree a whole cached segment."""
        pool = self._small if block.small else self._large
        _remove(pool.free, block)
        self.reserved -= block.size
        self.segments -= 1
        self.num_device_free += 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """``release_available_cached_blocks``: with max_split_size set, free the smallest oversize cached
        block that covers the request, or else the largest ones until their total does."""
        max_split = self._max_split
        if max_split == _SIZE_MAX:
            return False
        target = max(size, max_split)
        free = pool.free
        i = bisect_left(free, (target,))
        if i < len(free) and free[i][2].segment is None:
            if not _is_whole_segment(free[i][2]):
                return False
            self._release_block(free[i][2])
            return True
        released = 0
        j = i - 1
        while j >= 0 and released < target and free[j][0] >= max_split:
            block = free[j][2]
            if block.segment is None and _is_whole_segment(block):
                self._release_block(block)
                released += block.size
            j -= 1
        return released >= target

    def _release_blocks(self, pool: _Pool) -> None:
        """``release_blocks``: free every cached block that is a whole segment; unmap the fully free pages
        of expandable segments, and drop an expandable segment that is left with nothing mapped."""
        to_unmap = []
        for _, _, block in list(pool.free):
            if block.segment is not None:
                to_unmap.append(block)
            elif block.prev is None and block.next is None:
                self._release_block(block)
        for block in to_unmap:
            self._unmap_block(block)
            if block.prev is None and block.next is None and not block.mapped:
                _remove_unmapped(pool.unmapped, block)
                self.segments -= 1

    # expandable segments ---------------------------------------------------------------------------------
    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> Block | None:
        """``try_allocate_expandable_block``: map pages at the lowest address with room for ``size``,
        merging them with the free block in front when there is one."""
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map_block(pool, candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            # find_expandable_block guarantees free -> unmapped -> ... with room: the next one is unmapped
            following = cast(Block, candidate.next)
            if not self._map_block(pool, following, min(size - candidate.size, following.size)):
                return None
            candidate = following
        _remove(pool.free, candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int) -> Block:
        """``find_expandable_block``: the lowest-address run of free and unmapped blocks of ``size`` bytes,
        in a new expandable segment if none has room."""
        for _, block in pool.unmapped:
            start = block.prev if block.prev is not None and not block.prev.allocated else block
            room, cursor = 0, start
            while room < size and cursor is not None and not cursor.allocated:
                room += cursor.size
                cursor = cursor.next
            if room >= size:
                return start
        page = K_SMALL_BUFFER if pool.small else self.config.large_segment_size
        if self.capacity is None:
            address_space = _UNBOUNDED_ADDRESS_SPACE
        else:  # PyTorch reserves 9/8 of the GPU's memory as address space for each expandable segment
            address_space = max(page, -(-(self.capacity + self.capacity // 8) // page) * page)
        segment = _Segment(self._next_address, page, address_space)
        self._next_address += address_space
        self.segments += 1
        if self.segments > self.peak_segments:
            self.peak_segments = self.segments
        block = Block(address_space, segment.base, pool.small, segment, mapped=False)
        insort(pool.unmapped, (block.addr, block))
        return block

    def _map_block(self, pool: _Pool, block: Block, size: int) -> bool:
        """``map_block``: back the first ``size`` bytes of an unmapped block with whole pages (all or none,
        as ``ExpandableSegment::map`` releases what it created when a page fails)."""
        segment = cast(_Segment, block.segment)
        page = segment.page
        offset = block.addr - segment.base
        mapped = (-(-(offset + size) // page) - offset // page) * page
        if not self._fits(mapped):
            return False
        _remove_unmapped(pool.unmapped, block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.size - mapped, block.addr + mapped, block.small, segment, mapped=False)
            rest.splice(block, block.next)
            insort(pool.unmapped, (rest.addr, rest))
            block.size = mapped
        if block.prev is not None:
            self._try_merge(block, block.prev)
        if block.next is not None:
            self._try_merge(block, block.next)
        insort(pool.free, (block.size, block.addr, block))
        self._grew(mapped)
        return True

    def _unmap_block(self, block: Block) -> None:
        """``unmap_block``: give back the pages lying wholly inside a free block; the partial pages at
        either end stay mapped as free blocks."""
        segment = cast(_Segment, block.segment)
        page, base = segment.page, segment.base
        first = -(-(block.addr - base) // page)
        last = (block.addr + block.size - base) // page
        if first >= last:
            return
        pool = self._small if block.small else self._large
        _remove(pool.free, block)
        start, length = base + first * page, (last - first) * page
        before = start - block.addr
        if before > 0:
            head = Block(before, block.addr, block.small, segment)
            head.splice(block.prev, block)
            insort(pool.free, (head.size, head.addr, head))
        after = block.size - before - length
        if after > 0:
            tail = Block(after, start + length, block.small, segment)
            tail.splice(block, block.next)
            insort(pool.free, (tail.size, tail.addr, tail))
        block.addr, block.size, block.mapped = start, length, False
        if block.prev is not None:
            self._try_merge(block, block.prev)
        if block.next is not None:
            self._try_merge(block, block.next)
        insort(pool.unmapped, (block.addr, block))
        self.reserved -= length
        self.num_device_free += 1

    # merging ---------------------------------------------------------------------------------------------
    def _try_merge(self, dst: Block, src: Block) -> None:
        """``try_merge_blocks``: absorb a free neighbour in the same mapping state into ``dst`` (which is in
        no sorted set while its size changes)."""
        if src.allocated or src.mapped != dst.mapped:
            return
        pool = self._small if src.small else self._large
        if src.mapped:
            _remove(pool.free, src)
        else:
            _remove_unmapped(pool.unmapped, src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size


def _expandable_size(block: Block) -> int:
    """The size ``get_free_block`` ranks an expandable block by: its own plus the unmapped space after it."""
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)


def _is_whole_segment(block: Block) -> bool:
    return block.prev is None and block.next is None


def _remove(free: list[tuple[int, int, Block]], block: Block) -> None:
    del free[bisect_left(free, (block.size, block.addr))]


def _remove_unmapped(unmapped: list[tuple[int, Block]], block: Block) -> None:
    del unmapped[bisect_left(unmapped, (block.addr,))]


# ---------------------------------------------------------------------------------------------------------
# Replaying a trace


@dataclass(frozen=True)
class AllocatorResult:
    """What the replay of a trace reports, in the terms of ``torch.cuda.memory_stats()``."""

    peak_reserved: int
    """``max_memory_reserved()``: the most bytes of segments held at once."""
    peak_allocated: int
    """``max_memory_allocated()``: the most bytes of handed-out blocks at once (rounded block sizes)."""
    reserved_at_peak_allocated: int
    """Reserved bytes when allocated first reached its peak."""
    num_segments: int
    """The most segments held at once (``segment.all.peak``). PyTorch does not count expandable segments
    there; memguard counts each one once, from its creation (an address range) to its release."""
    num_allocs: int
    """cudaMalloc calls (page-mapping calls with expandable segments)."""
    oom: bool
    """True when a request failed even after releasing the cache (needs ``capacity``)."""
    oom_at_event: int | None
    """Index in ``events`` of the request that ran out of memory; the replay stops there."""
    fragmentation_bytes: int
    """Reserved minus allocated right after the event at which reserved was highest."""
    num_frees: int = 0
    """cudaFree (or unmapping) calls the retry path made to make room."""
    num_alloc_retries: int = 0
    """Requests that released cached memory and retried."""
    oom_request_bytes: int | None = None
    """Raw size of the request that ran out of memory."""
    end_allocated: int = 0
    """Allocated bytes after the last replayed event."""
    end_reserved: int = 0
    """Reserved bytes after the last replayed event."""


def simulate(
    sizes: list[int],
    events: list[int],
    config: AllocatorConfig = AllocatorConfig(),
    capacity: int | None = None,
) -> AllocatorResult:
    """Replay a trace (``sizes[aid]`` raw bytes; ``events``: ``+(aid+1)`` allocates, ``-(aid+1)`` frees)
    through the caching allocator and report its peaks.

    A zero-byte allocation takes no memory (PyTorch hands out a null pointer without calling the
    allocator). With ``capacity`` (bytes the allocator may reserve) the replay stops at the first request
    that does not fit even after the cache is released, and reports it as ``oom_at_event``.
    """
    model = CachingAllocator(config, capacity)
    malloc, free = model.malloc, model.free
    live: list[Block | None] = [None] * len(sizes)
    empty = _EMPTY
    best_reserved, fragmentation = -1, 0
    oom_at: int | None = None
    oom_bytes: int | None = None
    for index, event in enumerate(events):
        if event > 0:
            aid = event - 1
            if live[aid] is not None:
                raise InvalidArgumentError(f"event {index} allocates allocation {aid}, which is already live.")
            nbytes = sizes[aid]
            if nbytes <= 0:
                live[aid] = empty
                continue
            block = malloc(nbytes)
            if block is None:
                oom_at, oom_bytes = index, nbytes
                break
            live[aid] = block
            if model.reserved > best_reserved:
                best_reserved = model.reserved
                fragmentation = model.reserved - model.allocated
        elif event < 0:
            aid = -event - 1
            block = live[aid]
            if block is None:
                raise InvalidArgumentError(f"event {index} frees allocation {aid}, which is not live.")
            live[aid] = None
            if block is not empty:
                free(block)
        else:
            raise InvalidArgumentError(f"event {index} is 0; events are +(aid + 1) or -(aid + 1).")
    return AllocatorResult(
        peak_reserved=model.peak_reserved,
        peak_allocated=model.peak_allocated,
        reserved_at_peak_allocated=model.reserved_at_peak_allocated,
        num_segments=model.peak_segments,
        num_allocs=model.num_device_alloc,
        oom=oom_at is not None,
        oom_at_event=oom_at,
        fragmentation_bytes=fragmentation,
        num_frees=model.num_device_free,
        num_alloc_retries=model.num_alloc_retries,
        oom_request_bytes=oom_bytes,
        end_allocated=model.allocated,
        end_reserved=model.reserved,
    )


_EMPTY = Block(0, 0, small=True)
"""Stands for a zero-byte allocation, which holds no block."""
