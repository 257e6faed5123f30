"""Tracing FSDP's own code in-process: a fake process group of the right world size and rank (torch's
``"fake"`` backend, isolated from any group the process already has), memguard's recorder taught what
distributed code does (DTensor local shards, functional collectives, gloo's scratch, in-place storage
resizes), and :func:`trace_wrapped`, which wraps a fake copy of the model and traces its training steps.

What wrapping allocates and drops is left out; what it keeps (the shards, FSDP's padded buffers) is where
the trace starts. The wrapping itself is given by the caller (:mod:`memguard.estimation.fsdp_wrap`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

from memguard.categories import Category
from memguard.device.models import DeviceModel, start_profiler_here
from memguard.errors import TraceError
from memguard.trace import StepProgram, Trace
from memguard.trace.recording import _Recorder, _RecordingMode
from memguard.trace.steps import _counted_rng_states, _no_gc, run_steps
from memguard.trace.twin import recorded_twin

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

    Operations whose tensors are all real (a ``DeviceMesh`` slicing its rank table, made outside the fake
    mode) run for real, unrecorded: the model's tensors are all fake here, so these are host bookkeeping.
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
        if _only_real_tensors(args, kwargs):  # a device mesh's rank tables: host bookkeeping, not this rank's memory
            with unset_fake_temporarily():
                return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.device.host_is_device and not self.recorder.is_paused:
            self.recorder.transient(gloo_scratch_bytes(func, args), Category.TEMPORARIES)
        return out

    def _other_fake_mode(self) -> bool:
        from torch._guards import active_fake_mode

        active = active_fake_mode()
        return active is not None and active is not self.fake_mode


def _only_real_tensors(args: tuple, kwargs: dict | None) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    leaves = [x for x in tree_leaves((args, kwargs or {})) if isinstance(x, torch.Tensor)]
    return bool(leaves) and not any(isinstance(x, FakeTensor) or x.device.type == "meta" for x in leaves)


def gloo_scratch_bytes(func: Any, args: tuple) -> int:
    """Scratch the gloo backend allocates through PyTorch's CPU allocator inside a collective, measured on
    torch 2.13 with torch.profiler's allocator events (2 and 4 ranks): ``all_gather_into_tensor`` stages the
    output twice, one block after the other, so one output-sized block at a time; ``reduce_scatter_tensor``
    copies its input once; ``all_reduce`` and ``broadcast`` work in place. This is what a CPU target (gloo)
    adds; NCCL on a GPU writes into the caller's buffers and keeps its own memory outside PyTorch's
    allocator (see :data:`memguard.estimation.distributed.NCCL_DEVICE_BYTES`)."""
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
def _global_shapes_apart() -> Iterator[None]:
    """DTensor infers an operation's global output shape by running it on global-shape fake tensors, in the
    fake mode it detects (``detect_fake_mode() or FakeTensorMode()``): here that would be memguard's own, and
    those tensors would be recorded as this rank's memory. Sharding propagation gets a fake mode of its own,
    as in a real run, whose operations the recording mode leaves out."""
    from torch.distributed.tensor import _sharding_prop

    saved = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = saved


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
    steps_context: Callable[[], Any] = contextlib.nullcontext,
) -> Trace:
    """Trace ``program`` on a fake copy of ``model`` wrapped by ``wrap`` (FSDP's own code) on rank ``rank``
    of a fake process group of ``world_size`` ranks; arguments otherwise as ``trace.trace_training``. The
    trace starts once wrapping is done. ``steps_context()`` is entered around the training steps (DTensor's
    ``loss_parallel``).

    It runs on a thread of its own. DTensor caches its sharding decisions per thread, keyed by meshes that
    compare equal whenever their ranks, shape, names and device type do: a fake mesh used on the caller's
    thread would stand in, in that cache, for the real mesh of a run in progress (a Lightning callback on
    the CPU), whose collectives would then name a fake group."""
    if device is not None and device.host_is_device:  # the CPU kernel probes profile on the tracing thread
        start_profiler_here()

    def traced() -> Trace:
        return _trace_on_fake_world(model, batch, make_optimizer, program, wrap, world_size, rank, param_dtype,
                                    prepare, device or DeviceModel(), shared, steps_context)

    return _on_own_thread(traced)


def _on_own_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread, waited for; its exception is raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            out["error"] = exc

    thread = threading.Thread(target=target, name="memguard-fake-world")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _trace_on_fake_world(model: nn.Module, batch: Any, make_optimizer: Callable | None, program: StepProgram,
                         wrap: Callable[[nn.Module], nn.Module], world_size: int, rank: int,
                         param_dtype: torch.dtype | None, prepare: Callable[[nn.Module], None] | None,
                         device: DeviceModel, shared: tuple, steps_context: Callable[[], Any]) -> Trace:
    """:func:`trace_wrapped`'s work, on the calling thread."""
    with fake_world(world_size, rank), _fsdp1_storage_checks(), warnings.catch_warnings():
        # FSDP1 reads data_ptr() of fake tensors in a check it tolerates; torch warns about each read
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        # DTensor makes small real constants of its own (the 0 a vocabulary-sharded embedding masks ids with)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        twin, fbatch, recorder, _ = recorded_twin(model, batch, fake_mode, param_dtype, shared, prepare)
        mode = _ShardedRecordingMode(recorder, device, fake_mode)
        rng_states = _counted_rng_states(recorder) if device.host_is_device else contextlib.nullcontext()
        with fake_mode, mode, _tracking_resizes(recorder), _global_shapes_apart(), device.kernel_mode(), rng_states, \
                _no_gc():
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
            with steps_context():
                run_steps(wrapped, fbatch, make_optimizer, program, recorder, mode, local=_local)
        trace = recorder.finish()
        del wrapped, fbatch
    return _starting_from(trace, start, "wrap")


__all__ = ["fake_world", "gloo_scratch_bytes", "trace_wrapped"]
