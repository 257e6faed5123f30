"""Per-rank memory of data-parallel training: DDP, FSDP (FSDP1 and FSDP2 ``fully_shard``) and DeepSpeed ZeRO.

Each strategy is predicted the most exact way it can be without a cluster:

- **FSDP1 and FSDP2 are traced.** A fake process group (torch's ``"fake"`` backend, the one
  ``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`` is tested with) of the right world size and
  rank is set up in-process, a fake copy of the model is wrapped by the real FSDP code, and the training
  steps run under memguard's recorder. FSDP frees and re-allocates unsharded parameters by resizing
  storages in place (``UntypedStorage.resize_``), which no dispatch mode sees, so the recorder also
  follows storage resizes, as ``torch.distributed._tools.mem_tracker.MemTracker._track_resize`` does.
  What FSDP allocates while wrapping (flattening, sharding) is dropped; what it keeps (the shards, its
  padded buffers) is where the trace starts. Ranks differ (uneven shards: the last ranks of FSDP2 hold
  shorter dim-0 chunks; with ``use_orig_params`` each FSDP1 rank owns different parameter slices, so its
  optimizer state and step scratch differ), so every distinct shard layout is traced on its own rank.
- **DDP is the single-process trace plus the reducer's buckets** (``torch/csrc/distributed/c10d/reducer.cpp``,
  ``Reducer::initialize_buckets``): the buckets hold one flat copy of every gradient, allocated when DDP
  wraps the model and kept for the whole run. With ``gradient_as_bucket_view=False`` they are memory on
  top of the gradients; with ``True`` each gradient becomes a view into its bucket (``mark_variable_ready_dense``
  copies the freshly computed gradient in and points ``.grad`` at the bucket), so the gradients themselves
  cost nothing beyond the buckets and the freshly computed tensor lives only until its hook runs.
- **DeepSpeed ZeRO is modelled**, since DeepSpeed needs CUDA to train: model states by the formulas of
  ``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py`` (which reduce exactly to DeepSpeed's own
  ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``), activations and
  step temporaries from a single-process trace of the 16-bit model, plus the reduce buckets.

Nothing here changes global state for good: the fake process group lives in an isolated copy of
``torch.distributed``'s bookkeeping, and an existing default process group (a Lightning run already set
up) is put back untouched afterwards. Not thread-safe: one distributed estimate at a time per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from memguard import checkpointing, strategies
from memguard.categories import Category
from memguard.device import DeviceModel, device_model
from memguard.errors import InvalidArgumentError, TraceError
from memguard.estimation.request import EstimateRequest
from memguard.estimation.single import estimate_one
from memguard.precision import Precision
from memguard.quiet import quiet
from memguard.results import Estimate
from memguard.strategies import Kind
from memguard.trace import (
    StepProgram,
    Trace,
    _counted_rng_states,
    _phase,
    _Recorder,
    _RecordingMode,
    _Shadows,
    _tag_optimizer_state,
    fake_batch,
    fake_model_copy,
    trace_training,
    track_model_and_batch,
)

# ---------------------------------------------------------------------------------------------------------
# Constants that stand for what the libraries do by default (each says where it comes from)

NCCL_DEVICE_BYTES = 1 << 30
"""Device memory budgeted per rank for NCCL, which allocates outside PyTorch's caching allocator.

NCCL sizes its buffers from ``NCCL_BUFFSIZE`` (4 MiB by default) per channel and peer, times the channels
it opens (more on NVLink/NVSwitch systems), plus proxy and work FIFOs, NVLS buffers and, in recent
versions, a memory pool of its own; what that comes to depends on topology, NCCL version and settings and
is invisible to PyTorch, so this is an allowance, not a measurement: 1 GiB for one communicator. It is
added to ``device_bytes`` of CUDA targets with more than one rank (never to ``peak_bytes``, which is
``torch.cuda.max_memory_allocated`` and does not see it). This is the single place to change the figure."""

DDP_BUCKET_CAP_MB = 25
"""``DistributedDataParallel(bucket_cap_mb=None)`` -> 25 MiB buckets (``torch/nn/parallel/distributed.py``)."""

DDP_FIRST_BUCKET_BYTES = 1024 * 1024
"""``dist._DEFAULT_FIRST_BUCKET_BYTES``: the first bucket is capped at 1 MiB so communication starts early."""

LIGHTNING_DS_BUCKET = 200_000_000
"""Lightning's ``DeepSpeedStrategy`` sets ``allgather_bucket_size`` and ``reduce_bucket_size`` to 2e8 elements
(DeepSpeed's own default is 5e8)."""

DS_DEFAULTS = {
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000_000,  # Lightning's default (DeepSpeed's is 1e9)
}
"""DeepSpeed's ``DeepSpeedZeroConfig`` defaults in elements (``deepspeed/runtime/zero/config.py``)."""

MAX_TRACED_RANKS = 8
"""At most this many distinct shard layouts are traced; the others are bounded by the largest traced rank."""


# ---------------------------------------------------------------------------------------------------------
# What the user asked for, as one value


@dataclass(frozen=True)
class DDPOptions:
    """The ``DistributedDataParallel`` arguments that change memory."""

    gradient_as_bucket_view: bool = False
    find_unused_parameters: bool = False
    static_graph: bool = False
    bucket_cap_mb: float = DDP_BUCKET_CAP_MB
    broadcast_buffers: bool = True


@dataclass(frozen=True)
class FSDPOptions:
    """The ``FullyShardedDataParallel`` arguments (as Lightning's ``FSDPStrategy`` passes them) that change memory.

    ``auto_wrap_policy``: a set of module classes (Lightning's shorthand for ``ModuleWrapPolicy``) or any
    torch wrap policy; None wraps only the root, so the whole model is one unit. ``mixed_precision``: a
    torch ``MixedPrecision`` or None (then derived from ``precision`` as Lightning's ``FSDPPrecision`` does).
    ``activation_checkpointing``: module classes, a torch wrap policy, a ``check_fn(module) -> bool`` or a
    dict of ``apply_activation_checkpointing`` keywords; applied after wrapping, as Lightning does.
    """

    sharding_strategy: str = "FULL_SHARD"
    auto_wrap_policy: Any = None
    mixed_precision: Any = None
    cpu_offload: bool = False
    activation_checkpointing: Any = None
    use_orig_params: bool = True
    limit_all_gathers: bool = True
    forward_prefetch: bool = False
    backward_prefetch: Any = "BACKWARD_PRE"


@dataclass(frozen=True)
class FSDP2Options:
    """``fully_shard`` the torchtitan way: each repeated block (or each module of ``block_classes``), then the
    root. ``param_dtype`` / ``reduce_dtype``: ``MixedPrecisionPolicy``; ``cpu_offload``: ``CPUOffloadPolicy``."""

    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cpu_offload: bool = False
    block_classes: tuple[type, ...] = ()


@dataclass(frozen=True)
class DeepSpeedOptions:
    """The ZeRO settings that change device memory (names as in DeepSpeed's ``zero_optimization`` config)."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket_size: int = LIGHTNING_DS_BUCKET
    allgather_bucket_size: int = LIGHTNING_DS_BUCKET
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    stage3_max_live_parameters: int = DS_DEFAULTS["stage3_max_live_parameters"]
    stage3_prefetch_bucket_size: int = DS_DEFAULTS["stage3_prefetch_bucket_size"]
    stage3_param_persistence_threshold: int = DS_DEFAULTS["stage3_param_persistence_threshold"]
    sub_group_size: int = DS_DEFAULTS["sub_group_size"]


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: its kind, the options that matter for memory, and the name to report."""

    kind: Kind
    name: str
    options: Any = None


STRATEGY_NAMES = strategies.names()
"""Every strategy name :func:`parse_strategy` and :func:`estimate_distributed` accept (memguard.strategies)."""


def parse_strategy(strategy: str | Strategy | Any) -> Strategy:
    """A Lightning strategy name or object (``DDPStrategy``, ``FSDPStrategy``, ``DeepSpeedStrategy``) as a
    :class:`Strategy`. Objects are read, never called: memguard only needs their settings."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        row = strategies.lookup(strategy)
        if row.kind is Kind.DDP:
            return Strategy(Kind.DDP, row.name, DDPOptions(find_unused_parameters=row.find_unused_parameters))
        if row.kind is Kind.FSDP:
            return Strategy(Kind.FSDP, row.name, FSDPOptions(cpu_offload=row.cpu_offload))
        if row.kind is Kind.FSDP2:
            return Strategy(Kind.FSDP2, row.name, FSDP2Options())
        if row.kind is Kind.DEEPSPEED:
            return Strategy(Kind.DEEPSPEED, row.name, DeepSpeedOptions(
                stage=row.stage, offload_optimizer=row.offload_optimizer, offload_parameters=row.offload_parameters))
        raise InvalidArgumentError(f"strategy {row.name!r} is not a data-parallel strategy; estimate_distributed() "
                                   "handles it itself (one process for one rank)")
    cls = type(strategy).__name__
    if cls == "DDPStrategy":
        return _from_ddp_strategy(strategy)
    if cls == "FSDPStrategy":
        return _from_fsdp_strategy(strategy)
    if cls == "DeepSpeedStrategy" or isinstance(getattr(strategy, "config", None), dict):
        return _from_deepspeed_config(getattr(strategy, "config", None) or {}, "deepspeed")
    raise InvalidArgumentError(
        f"strategy must be one of {', '.join(STRATEGY_NAMES)} or a Lightning DDPStrategy, FSDPStrategy or "
        f"DeepSpeedStrategy; got {cls}"
    )


def _from_ddp_strategy(s: Any) -> Strategy:
    kw = dict(getattr(s, "_ddp_kwargs", {}) or {})
    opts = DDPOptions(
        gradient_as_bucket_view=bool(kw.get("gradient_as_bucket_view", False)),
        find_unused_parameters=bool(kw.get("find_unused_parameters", False)),
        static_graph=bool(kw.get("static_graph", False)),
        bucket_cap_mb=float(kw.get("bucket_cap_mb") or DDP_BUCKET_CAP_MB),
        broadcast_buffers=bool(kw.get("broadcast_buffers", True)),
    )
    return Strategy(Kind.DDP, "DDPStrategy", opts)


def _from_fsdp_strategy(s: Any) -> Strategy:
    kw = dict(getattr(s, "kwargs", {}) or {})
    sharding = getattr(s, "sharding_strategy", "FULL_SHARD")
    sharding = getattr(sharding, "name", str(sharding)).upper()
    offload = getattr(s, "cpu_offload", None)
    ac = getattr(s, "_activation_checkpointing_kwargs", {}) or {}
    mixed = getattr(s, "mixed_precision", None)  # else derived from ``precision=`` as FSDPPrecision does
    bp = kw.get("backward_prefetch", "BACKWARD_PRE")
    opts = FSDPOptions(
        sharding_strategy=sharding,
        auto_wrap_policy=kw.get("auto_wrap_policy"),
        mixed_precision=mixed,
        cpu_offload=bool(getattr(offload, "offload_params", offload) or False),
        activation_checkpointing=dict(ac) or None,
        use_orig_params=bool(kw.get("use_orig_params", True)),
        limit_all_gathers=bool(kw.get("limit_all_gathers", True)),
        forward_prefetch=bool(kw.get("forward_prefetch", False)),
        backward_prefetch=getattr(bp, "name", bp),
    )
    return Strategy(Kind.FSDP, "FSDPStrategy", opts)


def _from_deepspeed_config(config: dict, name: str) -> Strategy:
    zero = dict(config.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        value = zero.get(key)
        return isinstance(value, dict) and str(value.get("device", "none")).lower() not in ("none", "")

    def number(key: str, default: int) -> int:
        return int(float(zero.get(key, default)))

    opts = DeepSpeedOptions(
        stage=stage,
        offload_optimizer=offloaded("offload_optimizer"),
        offload_parameters=offloaded("offload_param"),
        reduce_bucket_size=number("reduce_bucket_size", 500_000_000),
        allgather_bucket_size=number("allgather_bucket_size", 500_000_000),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        stage3_max_live_parameters=number("stage3_max_live_parameters", DS_DEFAULTS["stage3_max_live_parameters"]),
        stage3_prefetch_bucket_size=number("stage3_prefetch_bucket_size", DS_DEFAULTS["stage3_prefetch_bucket_size"]),
        stage3_param_persistence_threshold=number("stage3_param_persistence_threshold",
                                                  DS_DEFAULTS["stage3_param_persistence_threshold"]),
        sub_group_size=number("sub_group_size", 1_000_000_000),
    )
    return Strategy(Kind.DEEPSPEED, f"{name} (stage {stage})", opts)


# ---------------------------------------------------------------------------------------------------------
# A fake process group, isolated from whatever the process already has


_C10D_TABLES = ("_pg_map", "_pg_names", "_pg_group_ranks", "_pg_backend_config", "_tags_to_pg", "_pg_to_tag")


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """A default process group of torch's ``"fake"`` backend (collectives do nothing, shapes are right) with
    ``world_size`` ranks, as rank ``rank``, for the duration of the block.

    ``torch.distributed`` keeps its groups in module-level tables of ``distributed_c10d``; they are swapped for
    empty ones here and put back afterwards, so a default group the process already has (a Lightning run
    that calls memguard from a callback) is neither seen nor disturbed. Group names continue the process's
    counter, so the C++ registry of group names never sees a duplicate; ours are unregistered on exit.
    ``destroy_process_group()`` is not used: on the default group it unregisters every group in the process.
    ``sys.excepthook``, which ``init_process_group`` wraps to prefix tracebacks with the rank, is restored.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    world = c10d._world
    saved_hook = sys.excepthook  # init_process_group wraps it to prefix tracebacks with "[rank N]:"
    saved_tables = {name: getattr(c10d, name) for name in _C10D_TABLES}
    saved_default = world._default_pg
    saved_coalesce = world._pg_coalesce_state
    saved_count = c10d._group_count
    saved_misc = {name: getattr(c10d, name) for name in ("_default_pg_init_method", "_backend") if hasattr(c10d, name)}
    for name, table in saved_tables.items():
        setattr(c10d, name, type(table)())
    world._default_pg = None
    world._pg_coalesce_state = {}
    try:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        yield
    finally:
        for name in list(c10d._pg_names.values()):
            with contextlib.suppress(Exception):
                c10d._unregister_process_group(name)
        for name, table in saved_tables.items():
            setattr(c10d, name, table)
        for name, value in saved_misc.items():
            setattr(c10d, name, value)
        world._pg_coalesce_state = saved_coalesce
        c10d._group_count = saved_count
        c10d._update_default_pg(saved_default)
        sys.excepthook = saved_hook


# ---------------------------------------------------------------------------------------------------------
# Recording what FSDP does


class _ShardedRecordingMode(_RecordingMode):
    """memguard's recording mode, taught three things about distributed code.

    DTensor operations are let through (``NotImplemented``) so DTensor desugars them into local operations,
    which come back here and are recorded at their local (sharded) size. ``wait_tensor`` of functional
    collectives returns its input in eager mode, so it allocates nothing (its meta kernel makes a new tensor).
    Operations run under another fake mode (DTensor's sharding propagation makes global-shape tensors to
    infer metadata) are not memory of this rank and are not recorded.
    """

    def __init__(self, recorder: _Recorder, device: DeviceModel, fake_mode: FakeTensorMode) -> None:
        super().__init__(recorder, device)
        self.fake_mode = fake_mode
        from torch.distributed.tensor import DTensor

        self._dtensor = DTensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if any(issubclass(t, self._dtensor) for t in types):
            return NotImplemented
        if func is torch.ops._c10d_functional.wait_tensor.default:
            return args[0]
        if self._other_fake_mode():
            return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.device.host_is_device and not self.recorder.is_paused:
            self.recorder.transient(gloo_scratch_bytes(func, args), Category.TEMPORARIES)
        return out

    def _other_fake_mode(self) -> bool:
        from torch._guards import active_fake_mode

        active = active_fake_mode()
        return active is not None and active is not self.fake_mode


def gloo_scratch_bytes(func: Any, args: tuple) -> int:
    """Scratch the gloo backend allocates through PyTorch's CPU allocator inside a collective, measured on
    torch 2.13 with torch.profiler's allocator events (2 and 4 ranks): ``all_gather_into_tensor`` stages the
    output twice, one block after the other, so one output-sized block at a time; ``reduce_scatter_tensor``
    copies its input once; ``all_reduce`` and ``broadcast`` work in place. This is what a CPU target (gloo)
    adds; NCCL on a GPU writes into the caller's buffers and keeps its own memory outside PyTorch's
    allocator (see :data:`NCCL_DEVICE_BYTES`)."""
    gathers, scatters = _collectives()
    if func in gathers:
        tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
    elif func in scatters:
        tensors = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    else:
        return 0
    return max((t.numel() * t.element_size() for t in tensors), default=0)


@functools.lru_cache(maxsize=1)
def _collectives() -> tuple[frozenset, frozenset]:
    """(all-gather ops, reduce-scatter ops) as FSDP1 and FSDP2 issue them through ``torch.distributed``."""
    c10d = torch.ops.c10d
    gathers = frozenset({c10d._allgather_base_.default, c10d.allgather_into_tensor_coalesced_.default})
    scatters = frozenset({c10d._reduce_scatter_base_.default, c10d.reduce_scatter_tensor_coalesced_.default})
    return gathers, scatters


def _storage_resized(recorder: _Recorder, storage: Any, nbytes: int) -> None:
    """Record an in-place storage resize: the old allocation is freed, a new one of ``nbytes`` made."""
    if recorder.is_paused or recorder.closed:
        return
    aid = recorder._ids.get(id(storage))
    if aid is not None:
        recorder.unbind(storage)
        if aid in recorder._live:
            recorder._live.discard(aid)
            recorder.trace.events.append(-(aid + 1))
    if nbytes > 0:
        # FSDP grows storages only for unsharded (all-gathered) parameters
        recorder.bind(storage, recorder._new(nbytes, Category.PARAMETERS))


@contextlib.contextmanager
def _tracking_resizes(recorder: _Recorder) -> Iterator[None]:
    """FSDP frees and re-allocates unsharded parameters with ``UntypedStorage.resize_``, which reaches no
    dispatch mode; follow it the way ``torch.distributed._tools.mem_tracker.MemTracker._track_resize`` does."""
    original = torch.UntypedStorage.resize_

    def resize_(storage: torch.UntypedStorage, size: int) -> Any:
        before = storage.nbytes()
        out = original(storage, size)
        if storage.nbytes() != before:
            _storage_resized(recorder, storage, int(storage.nbytes()))
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _fsdp1_storage_checks() -> Iterator[None]:
    """FSDP1 compares ``data_ptr()`` to tell whether two tensors share storage and whether a storage is
    allocated; every fake storage has data pointer 0, so those checks would all answer "same" and "not
    allocated". Compare storage identity and size instead while tracing."""
    from torch.distributed.fsdp import _flat_param

    saved = (_flat_param._same_storage, _flat_param._data_ptr_allocated)

    def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
        a, b = getattr(a, "_local_tensor", a), getattr(b, "_local_tensor", b)
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata

    def allocated(t: torch.Tensor) -> bool:
        return t.untyped_storage().nbytes() > 0

    _flat_param._same_storage, _flat_param._data_ptr_allocated = same_storage, allocated
    try:
        yield
    finally:
        _flat_param._same_storage, _flat_param._data_ptr_allocated = saved


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that really holds a rank's memory: a DTensor's local shard, else the tensor itself."""
    return getattr(t, "_local_tensor", t)


def _run_sharded_steps(model: nn.Module, batch: Any, make_optimizer: Callable | None, program: StepProgram,
                       recorder: _Recorder, mode: _RecordingMode) -> None:
    """The training steps of ``trace.run_steps`` on a wrapped model: every step traced (FSDP frees storages
    it allocated in earlier phases, so nothing is replayed), the optimizer on local-size shadows (a DTensor
    parameter's state is the size of its local shard; FSDP1 flat parameters are already local)."""
    params = [p for p in model.parameters() if p.requires_grad]
    shadows = _Shadows(params, recorder, local=_local) if make_optimizer is not None and params else None
    optimizer = None
    if shadows is not None:
        with _phase(recorder, mode, "optimizer.init"), unset_fake_temporarily(), mode.optimizer_running():
            optimizer = make_optimizer(shadows.params)
            _tag_optimizer_state(recorder, optimizer, mode)
    for step in range(1, program.steps + 1):
        for micro in range(program.accumulate):
            label = f"step{step}" if program.accumulate == 1 else f"step{step}.micro{micro + 1}"
            with _phase(recorder, mode, f"{label}.forward"):
                autocast = (torch.autocast("cpu", dtype=program.autocast_dtype) if program.autocast_dtype
                            else contextlib.nullcontext())
                with autocast:
                    loss = program.loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor):
                    raise TraceError(f"loss_fn returned {type(loss).__name__}; it must return a scalar tensor.")
                recorder.tag_live_from_current_phase(Category.ACTIVATIONS)
            if program.zero_grad_before_backward and micro == 0 and optimizer is not None:
                with _phase(recorder, mode, f"{label}.zero_grad"):
                    optimizer.zero_grad(set_to_none=True)
            with _phase(recorder, mode, f"{label}.backward"):
                if loss.requires_grad:
                    loss.backward()
                del loss
                for p in params:
                    if p.grad is not None:
                        recorder.tag(_local(p.grad), Category.GRADIENTS)
        if optimizer is not None:
            shadows.take_grads()
            with _phase(recorder, mode, f"step{step}.optimizer"), unset_fake_temporarily(), mode.optimizer_running():
                optimizer.step()
                _tag_optimizer_state(recorder, optimizer, mode)
            paged = int(getattr(optimizer, "unified_bytes", 0))
            recorder.trace.unified_bytes = max(recorder.trace.unified_bytes, paged)
            if not program.zero_grad_before_backward:
                with _phase(recorder, mode, f"step{step}.zero_grad"):
                    optimizer.zero_grad(set_to_none=True)
    recorder.phase("end")


def _starting_from(trace: Trace, start: int, label: str) -> Trace:
    """The trace as if it began at event ``start``: what was live then is allocated up front (in "setup",
    what a wrapper built becomes parameters) and what came and went before is dropped."""
    live: dict[int, None] = {}
    for ev in trace.events[:start]:
        if ev > 0:
            live[ev - 1] = None
        else:
            live.pop(-ev - 1, None)
    head = [aid + 1 for aid in sorted(live)]
    categories = list(trace.categories)
    for aid in live:
        if categories[aid] in (Category.OTHER, Category.TEMPORARIES):
            categories[aid] = Category.PARAMETERS
    shift = len(head) - start
    phases = [(0, "setup")] + [(s + shift, name) for s, name in trace.phases if s >= start and name != label]
    return dataclasses.replace(trace, categories=categories, events=head + trace.events[start:], phases=phases)


def trace_wrapped(
    model: nn.Module,
    batch: Any,
    make_optimizer: Callable | None,
    program: StepProgram,
    *,
    wrap: Callable[[nn.Module], nn.Module],
    world_size: int,
    rank: int,
    param_dtype: torch.dtype | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    device: DeviceModel | None = None,
    shared: tuple = (),
) -> Trace:
    """Trace ``program`` on a fake copy of ``model`` wrapped by ``wrap`` (FSDP's own code) on rank ``rank``
    of a fake process group of ``world_size`` ranks; arguments otherwise as ``trace.trace_training``. The
    trace starts once wrapping is done."""
    device = device or DeviceModel()
    with fake_world(world_size, rank), _fsdp1_storage_checks(), warnings.catch_warnings():
        # FSDP1 reads data_ptr() of fake tensors in a check it tolerates; torch warns about each read
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
        twin = fake_model_copy(model, fake_mode, param_dtype, *((shared,) if shared else ()))
        twin.train()
        if prepare is not None:
            with fake_mode:
                prepare(twin)
        fbatch = fake_batch(batch, fake_mode, param_dtype)
        recorder = _Recorder()
        recorder.phase("setup")
        recorder.watch(twin)
        track_model_and_batch(recorder, twin, fbatch)
        mode = _ShardedRecordingMode(recorder, device, fake_mode)
        rng_states = _counted_rng_states(recorder) if device.host_is_device else contextlib.nullcontext()
        with fake_mode, mode, _tracking_resizes(recorder), device.kernel_mode(), rng_states:
            recorder.phase("wrap")
            try:
                wrapped = wrap(twin)
            except Exception as exc:  # noqa: BLE001 - FSDP raises many types; all become one clear message
                raise TraceError(
                    f"memguard could not wrap its copy of the model the way the strategy does "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). The same wrapping "
                    "would fail in the real run; check the wrap policy and that each wrapped unit's parameters "
                    "share one dtype.",
                    operation="wrap", phase="wrap",
                ) from exc
            del twin
            start = len(recorder.trace.events)
            _run_sharded_steps(wrapped, fbatch, make_optimizer, program, recorder, mode)
        trace = recorder.finish()
        del wrapped, fbatch
    return _starting_from(trace, start, "wrap")


# ---------------------------------------------------------------------------------------------------------
# Wrapping the fake copy as the strategy does


_HALF_DTYPES = {Precision.FP16_MIXED: torch.float16, Precision.FP16_TRUE: torch.float16,
                Precision.BF16_MIXED: torch.bfloat16, Precision.BF16_TRUE: torch.bfloat16}


def _lightning_mixed_precision(precision: Precision) -> Any:
    """``FSDPPrecision.mixed_precision_config`` of Lightning: param, reduce and buffer dtype all the half
    dtype for "16-*" / "bf16-*" (mixed or true), none for "32-true"."""
    from torch.distributed.fsdp import MixedPrecision

    half = _HALF_DTYPES.get(precision)
    return MixedPrecision(param_dtype=half, reduce_dtype=half, buffer_dtype=half) if half is not None else None


def _module_policy(policy: Any) -> Any:
    """Lightning accepts a set (or list) of module classes where torch wants a ``ModuleWrapPolicy``."""
    if isinstance(policy, (set, frozenset, list, tuple)):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return ModuleWrapPolicy(set(policy))
    if isinstance(policy, type) and issubclass(policy, nn.Module):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return ModuleWrapPolicy({policy})
    return policy


def _checkpointing_kwargs(policy: Any) -> dict:
    """``apply_activation_checkpointing`` keywords from what Lightning or the user gave: a dict of them
    (Lightning's ``_activation_checkpointing_kwargs``), module classes or a torch wrap policy (which modules
    to checkpoint), or a ``check_fn(module) -> bool``."""
    from torch.distributed.fsdp.wrap import _Policy

    if isinstance(policy, dict):
        out = dict(policy)
        if "auto_wrap_policy" in out:
            out["auto_wrap_policy"] = _module_policy(out["auto_wrap_policy"])
        return out
    if isinstance(policy, (_Policy, set, frozenset, list, tuple, type)):
        return {"auto_wrap_policy": _module_policy(policy)}
    return {"check_fn": policy}


def _fsdp1_wrapper(opts: FSDPOptions, precision: Precision,
                   layout: dict | None = None) -> Callable[[nn.Module], nn.Module]:
    """``FullyShardedDataParallel(model, ...)`` as Lightning's ``FSDPStrategy._setup_model`` calls it, then
    activation checkpointing as ``_setup_activation_checkpointing`` applies it (after wrapping). HYBRID
    strategies are wrapped as their single-group counterpart: the trace's world is the shard group, and
    the replication across nodes is an in-place all-reduce of the gradient shard."""
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    sharding = {"HYBRID_SHARD": "FULL_SHARD", "_HYBRID_SHARD_ZERO2": "SHARD_GRAD_OP"}.get(
        opts.sharding_strategy, opts.sharding_strategy)
    mixed = opts.mixed_precision if opts.mixed_precision is not None else _lightning_mixed_precision(precision)
    prefetch = opts.backward_prefetch
    if isinstance(prefetch, str):
        prefetch = BackwardPrefetch[prefetch]

    def wrap(module: nn.Module) -> nn.Module:
        wrapped = FSDP(
            module,
            auto_wrap_policy=_module_policy(opts.auto_wrap_policy),
            sharding_strategy=ShardingStrategy[sharding],
            mixed_precision=mixed,
            use_orig_params=opts.use_orig_params,
            limit_all_gathers=opts.limit_all_gathers,
            forward_prefetch=opts.forward_prefetch,
            backward_prefetch=prefetch,
            device_id=torch.device("cpu"),
        )
        if opts.activation_checkpointing is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
                checkpoint_wrapper,
            )

            apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                           **_checkpointing_kwargs(opts.activation_checkpointing))
        if layout is not None:
            layout["flat"] = [
                (tuple(h.flat_param._numels_with_padding), tuple(h.flat_param._is_padding_mask),
                 int(h.flat_param._sharded_size.numel()) * h.world_size)
                for h in (m._handle for m in FSDP.fsdp_modules(wrapped)) if h is not None
            ]
        return wrapped

    return wrap


def _fsdp2_blocks(model: nn.Module, opts: FSDP2Options) -> list[nn.Module]:
    if opts.block_classes:
        return [m for m in model.modules() if isinstance(m, opts.block_classes) and m is not model]
    return checkpointing.repeated_blocks(model)


def _fsdp2_wrapper(opts: FSDP2Options, precision: Precision, world_size: int,
                   layout: dict | None = None) -> Callable[[nn.Module], nn.Module]:
    """``fully_shard`` on each repeated block, then on the root (torchtitan's ``apply_fsdp``), on a 1-D
    "cpu" mesh of the trace's world. Mixed precision follows ``precision`` unless given: half parameters
    for the compute, gradients reduced in float32 (torchtitan's default ``reduce_dtype``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    half = _HALF_DTYPES.get(precision) if precision in (Precision.FP16_MIXED, Precision.BF16_MIXED) else None
    param_dtype = opts.param_dtype or half
    reduce_dtype = opts.reduce_dtype or (torch.float32 if param_dtype is not None else None)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def wrap(module: nn.Module) -> nn.Module:
        with unset_fake_temporarily():
            mesh = init_device_mesh("cpu", (world_size,))
        blocks = _fsdp2_blocks(module, opts)
        for i, block in enumerate(blocks):
            # torchtitan does not reshard the last block after forward: backward needs it first
            last = i == len(blocks) - 1
            fully_shard(block, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=opts.reshard_after_forward and not last)
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=opts.reshard_after_forward)
        if layout is not None:
            layout["dims"] = [int(p.shape[0]) if p.dim() else 1 for p in module.parameters()]
        return module

    return wrap


# ---------------------------------------------------------------------------------------------------------
# Which ranks differ


def fsdp1_rank_layout(layout: list[tuple[tuple[int, ...], tuple[bool, ...], int]], rank: int, world_size: int,
                      use_orig_params: bool) -> tuple[int, ...]:
    """What sets one FSDP1 rank apart: with ``use_orig_params`` the number of elements of each original
    parameter that fall inside the rank's shard (``FlatParamHandle._get_shard_metadata``: the padded flat
    parameter is cut into ``world_size`` equal shards), since the optimizer keeps state per original
    parameter view. Without it every rank holds one equal, padded shard per flat parameter."""
    if not use_orig_params:
        return ()
    out: list[int] = []
    for numels, padding, padded in layout:
        shard = padded // world_size
        lo, hi, offset = rank * shard, (rank + 1) * shard, 0
        for numel, is_padding in zip(numels, padding):
            if not is_padding:
                out.append(max(0, min(hi, offset + numel) - max(lo, offset)))
            offset += numel
    return tuple(out)


def fsdp2_rank_layout(dims: list[int], rank: int, world_size: int) -> tuple[int, ...]:
    """What sets one FSDP2 rank apart: the dim-0 rows of each parameter it holds. ``fully_shard`` cuts dim 0
    with ``torch.chunk`` (``FSDPParam._init_sharded_param``): chunks of ceil(rows / world) rows, so the last
    ranks get fewer rows or none (a (1, 256, d) position table lives on rank 0 alone)."""
    out = []
    for rows in dims:
        chunk = -(-rows // world_size)
        out.append(max(0, min(chunk, rows - rank * chunk)))
    return tuple(out)


def _representatives(layouts: list[tuple]) -> tuple[dict[tuple, list[int]], list[tuple]]:
    """Ranks grouped by layout, and the layouts to trace: all of them up to :data:`MAX_TRACED_RANKS`, else
    rank 0's, the last rank's and those holding the most elements or the largest single slice."""
    groups: dict[tuple, list[int]] = {}
    for rank, key in enumerate(layouts):
        groups.setdefault(key, []).append(rank)
    keys = list(groups)
    if len(keys) <= MAX_TRACED_RANKS:
        return groups, keys
    chosen = dict.fromkeys([layouts[0], layouts[-1]])
    for key in sorted(keys, key=lambda k: (sum(k), max(k, default=0)), reverse=True):
        if len(chosen) >= MAX_TRACED_RANKS:
            break
        chosen.setdefault(key)
    return groups, list(chosen)


# ---------------------------------------------------------------------------------------------------------
# Trace rewriting (DDP buckets, host offload, DeepSpeed)


class _Rewriter:
    """Builds a new event list from a trace, keeping phase marks and the allocation table in step."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.sizes = list(trace.sizes)
        self.categories = list(trace.categories)
        self.events: list[int] = []
        self.phases: list[tuple[int, str]] = []

    def phase(self, name: str) -> None:
        self.phases.append((len(self.events), name))

    def new(self, nbytes: int, category: Category) -> int:
        self.sizes.append(int(nbytes))
        self.categories.append(category)
        return len(self.sizes) - 1

    def alloc(self, aid: int) -> None:
        self.events.append(aid + 1)

    def free(self, aid: int) -> None:
        self.events.append(-(aid + 1))

    def transient(self, nbytes: int, category: Category) -> None:
        if nbytes > 0:
            aid = self.new(nbytes, category)
            self.alloc(aid)
            self.free(aid)

    def build(self) -> Trace:
        return dataclasses.replace(self.trace, sizes=self.sizes, categories=self.categories, events=self.events,
                                   phases=self.phases)

    def segments(self) -> Iterator[tuple[str, list[int]]]:
        """Each phase of the source trace with its events."""
        bounds = [start for start, _ in self.trace.phases] + [len(self.trace.events)]
        for (start, name), end in zip(self.trace.phases, bounds[1:]):
            yield name, self.trace.events[start:end]


def _setup_allocations(trace: Trace) -> set[int]:
    """Allocation ids made before the first training phase (the model and the batch)."""
    end = trace.phases[1][0] if len(trace.phases) > 1 else len(trace.events)
    return {ev - 1 for ev in trace.events[:end] if ev > 0}


def ddp_trace(trace: Trace, bucket_bytes: int, opts: DDPOptions, buffer_bytes: int = 0) -> Trace:
    """The single-process trace as one DDP rank runs it.

    ``Reducer::initialize_buckets`` (torch/csrc/distributed/c10d/reducer.cpp) allocates, when DDP wraps the
    model, one flat tensor per bucket holding every gradient of the bucket (``bucket_cap_mb`` 25 MiB, the
    first one 1 MiB; their sum is every trainable parameter's bytes whatever the split), and keeps them:
    ``bucket_bytes`` is allocated before the first step. With ``gradient_as_bucket_view=False`` the
    gradients are separate tensors, copied into the buckets by the autograd hooks and back after the
    all-reduce, so they stay as traced. With ``True``, ``mark_variable_ready_dense`` copies the gradient
    autograd just produced into its bucket view and makes ``.grad`` that view: the produced tensor is freed
    at once, and the gradient's memory is the bucket's. All-reduce works in place on the buckets.
    ``find_unused_parameters`` and ``static_graph`` keep per-parameter bookkeeping of a few bytes (a used-map
    of one int32 per parameter), which is below what this trace resolves. With ``broadcast_buffers`` (the
    default) every forward starts by broadcasting the module's buffers from rank 0
    (``DistributedDataParallel._sync_buffers``), which flattens them into one staging tensor first:
    ``buffer_bytes`` held for the moment of the broadcast.
    """
    out = _Rewriter(trace)
    grads = {aid for aid, cat in enumerate(trace.categories) if cat == Category.GRADIENTS}
    buckets = out.new(bucket_bytes, Category.GRADIENTS)
    first = True
    for name, events in out.segments():
        out.phase(name)
        if first:
            out.alloc(buckets)
            first = False
        if name.endswith(".forward") and opts.broadcast_buffers:
            out.transient(buffer_bytes, Category.TEMPORARIES)
        for ev in events:
            aid = abs(ev) - 1
            if not opts.gradient_as_bucket_view or aid not in grads:
                out.events.append(ev)
            elif ev > 0:
                out.alloc(aid)
                out.free(aid)
    return out.build()


def host_resident_trace(trace: Trace) -> Trace:
    """FSDP CPU offload on a GPU target: sharded parameters, sharded gradients, optimizer state and the
    optimizer step live in host memory (``CPUOffload(offload_params=True)`` / ``CPUOffloadPolicy``), so
    they leave the device trace; a sharded gradient exists on the device only between its reduce-scatter
    and its copy to the host (modelled as freed at once). All-gathered parameters and activations stay."""
    setup = _setup_allocations(trace)
    out = _Rewriter(trace)
    host = {aid for aid, cat in enumerate(trace.categories)
            if cat == Category.OPTIMIZER_STATE or (aid in setup and cat == Category.PARAMETERS)}
    grads = {aid for aid, cat in enumerate(trace.categories) if cat == Category.GRADIENTS}
    for name, events in out.segments():
        out.phase(name)
        on_host = name.endswith(".optimizer")
        for ev in events:
            aid = abs(ev) - 1
            if aid in host or (on_host and ev > 0):
                host.add(aid)
                continue
            if aid in grads:
                if ev > 0:
                    out.alloc(aid)
                    out.free(aid)
                continue
            out.events.append(ev)
    return out.build()


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (modelled: DeepSpeed needs CUDA to train)


@dataclass(frozen=True)
class ZeroModelStates:
    """What one rank keeps of the model under ZeRO, in bytes, on the device and on the host.

    Formulas from ``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py`` (DeepSpeed 0.19), for P
    parameters of ``h`` bytes in the training dtype (2 for fp16/bf16), N ranks, an optimizer keeping ``s``
    bytes of fp32 state per parameter (8 for Adam) and L parameters in the largest layer:

    - stage 1: 16-bit parameters h*P and gradients h*P in full; fp32 master partition 4P/N; optimizer
      state s*P/N; the fp32 gradient partition made for the step 4P/N.
    - stage 2: as stage 1, but gradients reduced into a partition of h*P/N (``grads_in_partition``).
    - stage 3: 16-bit parameter partitions h*P/N (``ds_tensor``); fp32 gradient partitions 4P/N
      (``grad_partitions_flat_buffer``, float32 ``gradient_accumulation_dtype``); master 4P/N; state s*P/N;
      plus the gathered largest layer, its parameters and gradients: 2*h*L.
    - ``offload_optimizer`` moves master, state and fp32 gradients (and in stage 2 the reduced gradients)
      to the host; stage 3 ``offload_parameters`` moves the parameter partitions too.

    With h=2, s=8 these are DeepSpeed's own estimators exactly: ``estimate_zero2_model_states_mem_needs``
    gives 2P + 18P/N (2P with offload), ``estimate_zero3_model_states_mem_needs`` 4L + 18P/N (4L + 2P/N
    with optimizer offload, 4L with both).
    """

    parameters: int
    gradients: int
    master_parameters: int
    optimizer_state: int
    fp32_gradients: int
    gathered: int
    host: int

    @property
    def device(self) -> int:
        return (self.parameters + self.gradients + self.master_parameters + self.optimizer_state
                + self.fp32_gradients + self.gathered)


def zero_model_states(
    total_params: int,
    largest_layer_params: int,
    *,
    stage: int,
    world_size: int,
    param_bytes: int = 2,
    state_bytes_per_param: float = 8.0,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
) -> ZeroModelStates:
    """Model-state bytes of one ZeRO rank; see :class:`ZeroModelStates` for the formulas and sources."""
    if stage not in (1, 2, 3):
        raise InvalidArgumentError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise InvalidArgumentError(f"world_size must be >= 1, got {world_size}")
    p, n, h = int(total_params), int(world_size), int(param_bytes)
    part = p / n
    master = int(4 * part)
    state = int(state_bytes_per_param * part)
    fp32_grads = int(4 * part)
    if stage == 3:
        params = int(h * part)
        grads = int(4 * part)  # fp32 partitions: the step works on them directly
        fp32_grads = 0
        gathered = 2 * h * int(largest_layer_params)
    else:
        params = h * p
        grads = h * p if stage == 1 else int(h * part)
        gathered = 0
    host = 0
    if offload_optimizer:
        host += master + state + fp32_grads
        master = state = fp32_grads = 0
        if stage >= 2:
            host += grads
            grads = 0
    if offload_parameters and stage == 3:
        host += params
        params = 0
    return ZeroModelStates(params, grads, master, state, fp32_grads, gathered, host)


def largest_layer_params(model: nn.Module) -> int:
    """The most parameters any single module owns directly (DeepSpeed's ``model_to_params`` in stage3.py:
    ZeRO-3 gathers parameters module by module)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]


def deepspeed_trace(
    act: Trace,
    model: nn.Module,
    opts: DeepSpeedOptions,
    *,
    world_size: int,
    param_bytes: int,
    state_bytes_per_param: float,
    step_scratch: int,
) -> Trace:
    """One ZeRO rank's allocations, built around a single-process trace of the 16-bit model's forward and
    backward (``act``, no optimizer): what DeepSpeed holds (:func:`zero_model_states`) replaces the traced
    parameters and gradients, activations and temporaries stay as traced.

    - Optimizer state and master weights exist from the start (``initialize_optimizer_states`` runs a
      zero-gradient step at init).
    - Stage 1 keeps the traced full gradients until the step; stages 2 and 3 reduce each gradient into
      the partition as soon as it is produced (the traced tensor is freed at once), stage 2's partition
      appearing at the first backward (``grads_in_partition`` is allocated lazily), stage 3's at init.
    - The reduce buckets (``contiguous_gradients``: ``reduce_bucket_size`` elements of the training dtype,
      stages 1-2 two of them with ``overlap_comm``) are allocated at each backward and released after the
      step (``setup_buckets`` / ``_release_ipg_buffers``; stage 3's ``ipg_buckets``).
    - Stage 3 gathers parameters module by module: at most ``stage3_max_live_parameters``, the largest
      layer plus ``stage3_prefetch_bucket_size`` prefetched elements, live during forward and backward;
      parameters under ``stage3_param_persistence_threshold`` elements stay gathered for good.
    - The step: the fp32 gradient partition (stages 1-2: a flattened 16-bit copy first), then the
      optimizer's own scratch (``step_scratch``), then the fp32 gradients are freed. The all-gather of
      the updated partitions (``allgather_bucket_size`` at a time) writes into the 16-bit flat buffer in
      place and adds nothing.
    """
    params = _unique_trainable(model)
    total = sum(p.numel() for p in params)
    largest = largest_layer_params(model)
    states = zero_model_states(total, largest, stage=opts.stage, world_size=world_size, param_bytes=param_bytes,
                               state_bytes_per_param=state_bytes_per_param, offload_optimizer=opts.offload_optimizer,
                               offload_parameters=opts.offload_parameters)
    part = total / world_size
    out = _Rewriter(act)
    setup = _setup_allocations(act)
    grads = {aid for aid, cat in enumerate(act.categories) if cat == Category.GRADIENTS}
    drop = {aid for aid in setup if act.categories[aid] == Category.PARAMETERS}

    persistent_small = sum(p.numel() for p in params if p.numel() < opts.stage3_param_persistence_threshold)
    live_limit = opts.stage3_max_live_parameters
    gathered_elems = min(live_limit, largest + min(opts.stage3_prefetch_bucket_size, max(0, total - largest)))
    # stages 1-2: ``setup_buckets`` allocates one ipg buffer, two with overlap_comm; stage 3 one per dtype
    copies = 2 if opts.overlap_comm and opts.stage < 3 else 1
    buckets = opts.reduce_bucket_size * param_bytes * copies if opts.contiguous_gradients else 0

    lazily_partitioned = opts.stage == 2 and states.gradients > 0
    stage1_grads: list[int] = []
    gathered_aid = bucket_aid = None
    partition_made = False
    for name, events in out.segments():
        out.phase(name)
        if name == "setup":
            for ev in events:
                if abs(ev) - 1 not in drop:
                    out.events.append(ev)
            up_front = [(states.parameters, Category.PARAMETERS),
                        (states.master_parameters, Category.OPTIMIZER_STATE),
                        (states.optimizer_state, Category.OPTIMIZER_STATE)]
            if opts.stage == 3:
                up_front += [(states.gradients, Category.GRADIENTS),
                             (persistent_small * param_bytes, Category.PARAMETERS)]
            for nbytes, category in up_front:
                if nbytes > 0:
                    out.alloc(out.new(nbytes, category))
            continue
        if name.endswith(".forward") and opts.stage == 3 and gathered_aid is None:
            gathered_aid = out.new(gathered_elems * param_bytes, Category.PARAMETERS)
            out.alloc(gathered_aid)
        if name.endswith(".backward"):
            if lazily_partitioned and not partition_made:
                out.alloc(out.new(states.gradients, Category.GRADIENTS))
                partition_made = True
            if bucket_aid is None and buckets:
                bucket_aid = out.new(buckets, Category.GRADIENTS)
                out.alloc(bucket_aid)
        for ev in events:
            aid = abs(ev) - 1
            if aid in grads and opts.stage >= 2:
                if ev > 0:
                    out.alloc(aid)
                    out.free(aid)
                continue
            if aid in grads and ev > 0:
                stage1_grads.append(aid)
            out.events.append(ev)
        if name.endswith(".backward"):
            step = name[: -len(".backward")].split(".micro")[0]
            last_micro = ".micro" not in name or _is_last_micro(name, act)
            if not last_micro:
                continue
            if gathered_aid is not None:
                out.free(gathered_aid)
                gathered_aid = None
            out.phase(f"{step}.optimizer")
            if not opts.offload_optimizer:
                if opts.stage < 3:
                    out.transient(int(param_bytes * part), Category.TEMPORARIES)  # flatten before .float()
                fp32 = out.new(int(4 * part), Category.GRADIENTS)
                out.alloc(fp32)
                out.transient(step_scratch, Category.TEMPORARIES)
                out.free(fp32)
            for aid in stage1_grads:
                out.free(aid)
            stage1_grads.clear()
            if bucket_aid is not None:
                out.free(bucket_aid)
                bucket_aid = None
    return out.build()


def _is_last_micro(name: str, trace: Trace) -> bool:
    """Whether ``stepN.microK.backward`` is the last micro-batch of its step."""
    step, _, rest = name.partition(".micro")
    k = int(rest.split(".")[0])
    return not any(n == f"{step}.micro{k + 1}.forward" for _, n in trace.phases)


def optimizer_cost(make_optimizer: Callable | None, numel: int) -> tuple[float, int]:
    """(state bytes per element, step scratch bytes) of the optimizer ``make_optimizer`` builds, stepping one
    flat fp32 partition of ``numel`` elements as DeepSpeed does (one partition per parameter group).
    Measured by running two steps on a meta tensor under memguard's recorder: the state is what the first
    step leaves in ``optimizer.state`` on the device, the scratch the second step's peak above it."""
    if make_optimizer is None or numel <= 0:
        return 0.0, 0
    recorder = _Recorder()
    mode = _RecordingMode(recorder, DeviceModel())
    p = nn.Parameter(torch.empty(numel, device="meta"))
    p.grad = torch.empty(numel, device="meta")
    with mode, mode.optimizer_running():
        optimizer = make_optimizer([p])
        optimizer.step()
        start = len(recorder.trace.events)
        optimizer.step()
    state = sum(t.numel() * t.element_size() for per_param in optimizer.state.values()
                for t in (per_param.values() if isinstance(per_param, dict) else [])
                if isinstance(t, torch.Tensor) and t.device.type == "meta")
    live = peak = 0
    for ev in recorder.trace.events[start:]:
        live += recorder.trace.sizes[ev - 1] if ev > 0 else -recorder.trace.sizes[-ev - 1]
        peak = max(peak, live)
    recorder.closed = True
    return state / numel, peak


# ---------------------------------------------------------------------------------------------------------
# The entry point


def _one_rank(model: nn.Module, batch: Any, tracer: Callable[..., Trace], req: EstimateRequest) -> Estimate:
    """One rank's estimate with ``tracer`` tracing the step: the request becomes the optimizer factory, step
    program, model preparation and device model exactly as for one process; only the tracing differs."""
    return estimate_one(model, batch, req, tracer)


def _first_step_gradient_bytes(trace: Trace) -> int:
    """Bytes of the gradients the first step creates: what DDP's buckets must hold."""
    first = {name for _, name in trace.phases if name.startswith("step1.")}
    bounds = [start for start, _ in trace.phases] + [len(trace.events)]
    made: set[int] = set()
    for (start, name), end in zip(trace.phases, bounds[1:]):
        if name in first:
            made.update(ev - 1 for ev in trace.events[start:end] if ev > 0)
    return sum(trace.sizes[aid] for aid in made if trace.categories[aid] == Category.GRADIENTS)


def _ddp(model: nn.Module, batch: Any, spec: Strategy, world_size: int, req: EstimateRequest) -> tuple[Estimate, list[str]]:
    opts: DDPOptions = spec.options
    seen: dict[str, int] = {}

    def tracer(model_: nn.Module, batch_: Any, make_optimizer: Callable | None, program: StepProgram,
               **kw: Any) -> Trace:
        trace = trace_training(model_, batch_, make_optimizer, program, **kw)
        seen["buckets"] = _first_step_gradient_bytes(trace)
        buffers = sum(b.numel() * b.element_size() for b in model_.buffers()) if world_size > 1 else 0
        return ddp_trace(trace, seen["buckets"], opts, buffers)

    est = _one_rank(model, batch, tracer, req)
    est.per_rank = [est.peak_bytes] * world_size
    view = ("gradients are views into the buckets" if opts.gradient_as_bucket_view
            else "on top of the gradients (gradient_as_bucket_view=False)")
    notes = [f"DDP: the single-process trace plus the reducer's gradient buckets, {seen.get('buckets', 0):,} bytes "
             f"allocated at wrap time and kept ({opts.bucket_cap_mb:g} MiB buckets, the first "
             f"{DDP_FIRST_BUCKET_BYTES >> 20} MiB), {view}; "
             "every rank holds the same"]
    if opts.find_unused_parameters or opts.static_graph:
        notes.append("find_unused_parameters / static_graph add per-parameter bookkeeping only (bytes)")
    return est, notes


def _sharded_tracer(spec: Strategy, precision: Precision, world: int, rank: int, layout: dict | None) -> Callable:
    if spec.kind is Kind.FSDP:
        wrap = _fsdp1_wrapper(spec.options, precision, layout)
        offload = spec.options.cpu_offload
        drop_autocast = False
    else:
        wrap = _fsdp2_wrapper(spec.options, precision, world, layout)
        offload = spec.options.cpu_offload
        drop_autocast = spec.options.param_dtype is not None or precision in (Precision.BF16_MIXED,
                                                                               Precision.FP16_MIXED)

    def tracer(model: nn.Module, batch: Any, make_optimizer: Callable | None, program: StepProgram, *,
               param_dtype: torch.dtype | None = None, prepare: Callable | None = None,
               device: DeviceModel | None = None, shared: tuple = (), **_: Any) -> Trace:
        if drop_autocast:  # FSDP2 casts parameters itself (MixedPrecisionPolicy); torchtitan runs no autocast
            program = dataclasses.replace(program, autocast_dtype=None)
        trace = trace_wrapped(model, batch, make_optimizer, program, wrap=wrap, world_size=world, rank=rank,
                              param_dtype=param_dtype, prepare=prepare, device=device, shared=shared)
        if offload and device is not None and not device.host_is_device:
            trace = host_resident_trace(trace)
        return trace

    return tracer


def _sharded(model: nn.Module, batch: Any, spec: Strategy, world_size: int, num_nodes: int, req: EstimateRequest,
             precision: Precision) -> tuple[Estimate, list[str]]:
    if not torch.distributed.is_available():
        raise InvalidArgumentError(
            f"{spec.name} is estimated by running FSDP's own code on a fake process group, which needs a torch "
            "build with torch.distributed (this one has none); DDP and DeepSpeed estimates do not need it")
    opts = spec.options
    hybrid = spec.kind is Kind.FSDP and "HYBRID" in opts.sharding_strategy
    group = world_size // num_nodes if hybrid else world_size
    layout: dict = {}
    first = _one_rank(model, batch, _sharded_tracer(spec, precision, group, 0, layout), req)
    if spec.kind is Kind.FSDP:
        keys = [fsdp1_rank_layout(layout.get("flat", []), r, group, opts.use_orig_params) for r in range(group)]
    else:
        keys = [fsdp2_rank_layout(layout.get("dims", []), r, group) for r in range(group)]
    groups, chosen = _representatives(keys)
    traced = {keys[0]: first}
    for key in chosen:
        if key not in traced:
            traced[key] = _one_rank(model, batch, _sharded_tracer(spec, precision, group, groups[key][0], None), req)
    bound = max(e.peak_bytes for e in traced.values())
    per_rank = [traced[keys[g % group]].peak_bytes if keys[g % group] in traced else bound for g in range(world_size)]
    worst = max(traced.values(), key=lambda e: e.peak_bytes)
    worst.per_rank = per_rank
    what = ("FSDP (FullyShardedDataParallel)" if spec.kind is Kind.FSDP else "FSDP2 (fully_shard per block, then root)")
    notes = [f"{what}: traced with the real FSDP code on a fake process group of {group} ranks; "
             f"{len(traced)} distinct shard layout(s) traced, one per group of identical ranks"]
    if hybrid:
        notes.append(f"{opts.sharding_strategy}: sharded within each of {num_nodes} nodes ({group} ranks), "
                     "replicated across nodes (in-place all-reduce of the gradient shard)")
    if len(traced) < len(groups):
        notes.append(f"{len(groups) - len(traced)} further shard layouts not traced: bounded by the largest traced "
                     "rank")
        worst.approximate = True
    if opts.cpu_offload:
        notes.append("CPU offload: sharded parameters, gradients, optimizer state and step in host memory"
                     if req.device.host_is_device is False else
                     "CPU offload has no effect on a CPU target: host memory is the target's memory")
    if spec.kind is Kind.FSDP and opts.auto_wrap_policy is None:
        notes.append("no auto_wrap_policy: FSDP wraps only the root, so the whole model is gathered at once; "
                     "pass FSDPStrategy(auto_wrap_policy={Block}) to shard block by block")
    return worst, notes


def _deepspeed(model: nn.Module, batch: Any, spec: Strategy, world_size: int, req: EstimateRequest,
               precision: Precision) -> tuple[Estimate, list[str]]:
    opts: DeepSpeedOptions = spec.options
    half = _HALF_DTYPES.get(precision)
    param_bytes = half.itemsize if half is not None else 4
    seen: dict[str, Any] = {}

    def tracer(model_: nn.Module, batch_: Any, make_optimizer: Callable | None, program: StepProgram, *,
               param_dtype: torch.dtype | None = None, **kw: Any) -> Trace:
        # DeepSpeed casts the module to the 16-bit dtype (fp16 / bf16 config) and runs no autocast; its
        # optimizer state exists from initialization, so one step shows every later step.
        single = dataclasses.replace(program, steps=1, autocast_dtype=None, zero_grad_before_backward=False)
        # A trace cache slot (estimate(trace_cache=...)) is keyed by the user's program; this trace runs
        # another one (16-bit, no autocast, no optimizer), so it neither reads nor fills the slot.
        kw.pop("reuse", None)
        act = trace_training(model_, batch_, None, single, param_dtype=half or param_dtype, **kw)
        total = sum(p.numel() for p in _unique_trainable(model_))
        per_elem, scratch = optimizer_cost(make_optimizer, -(-total // world_size))
        seen.update(total=total, per_elem=per_elem)
        return deepspeed_trace(act, model_, opts, world_size=world_size, param_bytes=param_bytes,
                               state_bytes_per_param=per_elem, step_scratch=0 if opts.offload_optimizer else scratch)

    est = _one_rank(model, batch, tracer, req)
    est.per_rank = [est.peak_bytes] * world_size
    states = zero_model_states(seen.get("total", 0), largest_layer_params(model), stage=opts.stage,
                               world_size=world_size, param_bytes=param_bytes,
                               state_bytes_per_param=seen.get("per_elem", 8.0),
                               offload_optimizer=opts.offload_optimizer, offload_parameters=opts.offload_parameters)
    offload = ", ".join(n for n, on in (("optimizer", opts.offload_optimizer), ("parameters", opts.offload_parameters))
                        if on) or "nothing"
    notes = [f"DeepSpeed ZeRO stage {opts.stage} (offloading {offload}), modelled: model states "
             f"{states.device:,} bytes on each rank's device, {states.host:,} in host memory (DeepSpeed's "
             "estimate_zero*_model_states_mem_needs formulas), activations from the single-process trace of the "
             f"{'16-bit' if half is not None else '32-bit'} model, reduce buckets of "
             f"{opts.reduce_bucket_size:,} elements"]
    if opts.stage == 3:
        notes.append(f"ZeRO-3 gathers up to {opts.stage3_max_live_parameters:,} parameters at once (largest layer plus "
                     f"{opts.stage3_prefetch_bucket_size:,} prefetched); parameters under "
                     f"{opts.stage3_param_persistence_threshold:,} elements stay gathered")
    return est, notes


@quiet()
def estimate_distributed(
    model: nn.Module,
    batch: Any,
    *,
    strategy: str | Strategy | Any,
    world_size: int,
    num_nodes: int = 1,
    **estimate_kwargs: Any,
) -> Estimate:
    """Predict each rank's peak memory of training ``model`` on ``batch`` (the batch one rank sees) under a
    data-parallel ``strategy`` over ``world_size`` ranks (all nodes together; ``num_nodes`` matters for
    HYBRID sharding).

    ``strategy`` is a Lightning strategy name ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true",
    "fsdp", "fsdp_cpu_offload", "fsdp2", "deepspeed_stage_1", "deepspeed_stage_2",
    "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload"; "auto" is one process
    for one rank and DDP for several, as Lightning chooses) or a Lightning ``DDPStrategy`` /
    ``FSDPStrategy`` / ``DeepSpeedStrategy`` object, whose settings are read. The model
    is the unwrapped one; it is never wrapped, moved or modified, and nothing is distributed: FSDP runs on
    a copy against a fake process group inside this process. Other keywords are :func:`memguard.estimate`'s.

    Returns an :class:`~memguard.results.Estimate` whose ``peak_bytes`` (and breakdown, timeline, phases)
    are those of the rank with the largest peak and ``per_rank`` lists every rank's; ``notes`` say what
    was traced and what modelled. On a CUDA target ``device_bytes`` includes NCCL's own buffers
    (:data:`NCCL_DEVICE_BYTES`).
    """
    return estimate_ranks(model, batch, EstimateRequest(strategy=strategy, world_size=world_size,
                                                        num_nodes=num_nodes, **estimate_kwargs))


def estimate_ranks(model: nn.Module, batch: Any, req: EstimateRequest) -> Estimate:
    """:func:`estimate_distributed` for a request (``req.strategy``, ``req.world_size``, ``req.num_nodes``)."""
    strategy, world_size, num_nodes = req.strategy, req.world_size, req.num_nodes
    started = time.perf_counter()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgumentError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1 or world_size % num_nodes:
        raise InvalidArgumentError(
            f"num_nodes must be a positive int dividing world_size={world_size}, got {num_nodes!r}")
    req = dataclasses.replace(req, trace_cache=None)  # each rank traces its own step
    row = strategies.find(strategy) if isinstance(strategy, str) else None
    if row is not None and row.kind is None:
        if world_size == 1:  # one process: the plain estimate
            return estimate_one(model, batch, dataclasses.replace(req, strategy=None))
        if row.several is None:
            raise InvalidArgumentError(f"strategy {row.name!r} runs one process; got world_size={world_size}")
        strategy = row.several  # Lightning's "auto" picks DDP for several devices
    spec = parse_strategy(strategy)
    dev = device_model(req.device, req.gpu)
    req = dataclasses.replace(req, device=dev, gpu=None)  # one instance for every rank: kernel measurements are shared
    precision = Precision.parse(req.precision)
    if spec.kind is Kind.DDP:
        result, notes = _ddp(model, batch, spec, world_size, req)
    elif spec.kind is Kind.DEEPSPEED:
        result, notes = _deepspeed(model, batch, spec, world_size, req, precision)
    else:
        result, notes = _sharded(model, batch, spec, world_size, num_nodes, req, precision)
    if not dev.host_is_device and world_size > 1:
        result.device_bytes += NCCL_DEVICE_BYTES
        result.breakdown[Category.CONTEXT] = result.breakdown.get(Category.CONTEXT, 0) + NCCL_DEVICE_BYTES
        notes.append(f"NCCL buffers outside PyTorch's allocator: {NCCL_DEVICE_BYTES:,} bytes per rank in device_bytes")
    result.notes = notes + list(result.notes)
    result.seconds = time.perf_counter() - started
    return result


__all__ = [
    "NCCL_DEVICE_BYTES",
    "STRATEGY_NAMES",
    "DDPOptions",
    "DeepSpeedOptions",
    "FSDP2Options",
    "FSDPOptions",
    "Kind",
    "Strategy",
    "ZeroModelStates",
    "estimate_distributed",
    "estimate_ranks",
    "fake_world",
    "largest_layer_params",
    "parse_strategy",
    "zero_model_states",
]
