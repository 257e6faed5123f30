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

The pieces: :mod:`memguard.strategies` (the strategy names), :mod:`~memguard.estimation.strategy_options`
(a strategy as one value), :mod:`~memguard.estimation.sharded_trace` (the fake process group and tracing
FSDP), :mod:`~memguard.estimation.fsdp_wrap` (FSDP1 / FSDP2 wrapping, rank layouts),
:mod:`~memguard.estimation.rewrites` (DDP buckets, CPU offload), :mod:`~memguard.estimation.deepspeed_zero`
(the ZeRO model). This module runs a strategy's ranks through them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memguard import strategies
from memguard.categories import Category
from memguard.device.models import DeviceModel, device_model
from memguard.errors import InvalidArgumentError
from memguard.estimation.deepspeed_zero import (
    ZeroModelStates,
    unique_trainable,
    deepspeed_trace,
    largest_layer_params,
    optimizer_cost,
    zero_model_states,
)
from memguard.estimation.fsdp_wrap import fsdp1_wrapper, fsdp2_wrapper, fsdp1_rank_layout, fsdp2_rank_layout
from memguard.estimation.request import EstimateRequest
from memguard.estimation.rewrites import ddp_trace, host_resident_trace
from memguard.estimation.sharded_trace import fake_world, trace_wrapped
from memguard.estimation.tensor_parallel import ROUTES, check_plan, memguard_shards_data, route, tp_wrapper
from memguard.estimation.single import estimate_one
from memguard.estimation.strategy_options import (
    DDP_FIRST_BUCKET_BYTES,
    HALF_DTYPES,
    STRATEGY_NAMES,
    DDPOptions,
    DeepSpeedOptions,
    FSDP2Options,
    FSDPOptions,
    Kind,
    Strategy,
    TPOptions,
    parse_strategy,
)
from memguard.precision import Precision
from memguard.quiet import quiet
from memguard.results import Estimate
from memguard.trace import StepProgram, Trace, trace_training

# ---------------------------------------------------------------------------------------------------------
# Constants of the orchestration

NCCL_DEVICE_BYTES = 1 << 30
"""Device memory budgeted per rank for NCCL, which allocates outside PyTorch's caching allocator.

NCCL sizes its buffers from ``NCCL_BUFFSIZE`` (4 MiB by default) per channel and peer, times the channels
it opens (more on NVLink/NVSwitch systems), plus proxy and work FIFOs, NVLS buffers and, in recent
versions, a memory pool of its own; what that comes to depends on topology, NCCL version and settings and
is invisible to PyTorch, so this is an allowance, not a measurement: 1 GiB for one communicator. It is
added to ``device_bytes`` of CUDA targets with more than one rank (never to ``peak_bytes``, which is
``torch.cuda.max_memory_allocated`` and does not see it). This is the single place to change the figure."""

MAX_TRACED_RANKS = 8
"""At most this many distinct shard layouts are traced; the others are bounded by the largest traced rank."""

MAX_TRACED_GROUP = 1024
"""The largest sharding group FSDP1's own code is run for. Its per-rank work grows with the group (it cuts
every flat parameter into one piece per rank), so a larger group (64,000 nodes of 8 GPUs, say) is traced as
this many ranks and bounded: each rank then holds no more of the sharded state than traced, and the padding
that grows with the group is added (:data:`PADDING_BUFFERS`)."""

PADDING_BUFFERS = 4
"""Gathered or padded buffers a rank may hold at once (the unit being computed, the one prefetched, a
gradient being reduce-scattered, its padded copy): each is padded to a multiple of the group size, so a
group larger than traced adds at most one element per extra rank to each, 4 bytes at most."""


# ---------------------------------------------------------------------------------------------------------
# Which ranks are traced


def _representatives(layouts: list[tuple], limit: int | None = None) -> tuple[dict[tuple, list[int]], list[tuple]]:
    """Ranks grouped by layout, and the layouts to trace: all of them up to ``limit`` (default
    :data:`MAX_TRACED_RANKS`), else rank 0's, the last rank's and those holding the most elements or the
    largest single slice."""
    limit = MAX_TRACED_RANKS if limit is None else limit
    groups: dict[tuple, list[int]] = {}
    for rank, key in enumerate(layouts):
        groups.setdefault(key, []).append(rank)
    keys = list(groups)
    if len(keys) <= limit:
        return groups, keys
    chosen = dict.fromkeys([layouts[0], layouts[-1]])
    for key in sorted(keys, key=lambda k: (sum(k), max(k, default=0)), reverse=True):
        if len(chosen) >= limit:
            break
        chosen.setdefault(key)
    return groups, list(chosen)


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
        wrap = fsdp1_wrapper(spec.options, precision, layout)
        offload = spec.options.cpu_offload
        drop_autocast = False
    else:
        wrap = fsdp2_wrapper(spec.options, precision, world, layout)
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
    full_group = world_size // num_nodes if hybrid else world_size
    # FSDP1 pads each flat parameter by fewer elements than the group has ranks, so a smaller trace bounds a
    # larger group; FSDP2 pads every parameter's rows to a multiple of the group, a cost that grows with it
    group = min(full_group, MAX_TRACED_GROUP) if spec.kind is Kind.FSDP else full_group
    if group > MAX_TRACED_GROUP:
        raise _group_too_large("FSDP2", group)
    layout: dict = {}
    first = _one_rank(model, batch, _sharded_tracer(spec, precision, group, 0, layout), req)
    if spec.kind is Kind.FSDP:
        keys = [fsdp1_rank_layout(layout.get("flat", []), r, group, opts.use_orig_params) for r in range(group)]
    else:
        keys = [fsdp2_rank_layout(layout.get("dims", []), r, group) for r in range(group)]
    groups, chosen = _representatives(keys, 2 if group < full_group else None)  # bounded anyway: the largest
    traced = {keys[0]: first}
    for key in chosen:
        if key not in traced:
            traced[key] = _one_rank(model, batch, _sharded_tracer(spec, precision, group, groups[key][0], None), req)
    bound = max(e.peak_bytes for e in traced.values())
    worst = max(traced.values(), key=lambda e: e.peak_bytes)
    extra = PADDING_BUFFERS * (full_group - group) * 4  # what a group larger than traced adds in padding
    if group < full_group:  # traced smaller: every rank bounded by the largest, plus the extra padding
        worst.peak_bytes += extra
        worst.reserved_bytes += extra
        worst.device_bytes += extra
        worst.breakdown[Category.PARAMETERS] = worst.breakdown.get(Category.PARAMETERS, 0) + extra
        per_rank = [worst.peak_bytes] * world_size
        worst.approximate = True
    else:
        per_rank = [traced[keys[g % group]].peak_bytes if keys[g % group] in traced else bound
                    for g in range(world_size)]
    worst.per_rank = per_rank
    what = ("FSDP (FullyShardedDataParallel)" if spec.kind is Kind.FSDP else "FSDP2 (fully_shard per block, then root)")
    notes = [f"{what}: traced with the real FSDP code on a fake process group of {group} ranks; "
             f"{len(traced)} distinct shard layout(s) traced, one per group of identical ranks"]
    if group < full_group:
        notes.append(f"the sharding group has {full_group:,} ranks: traced as {group:,} (each rank holds no more of "
                     f"the sharded state than that), plus {extra:,} bytes for "
                     "the padding a larger group adds; an upper bound")
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


def _tensor_parallel(model: nn.Module, batch: Any, spec: Strategy, world_size: int, num_nodes: int,
                     req: EstimateRequest, precision: Precision) -> tuple[Estimate, list[str]]:
    """Rank 0 traced with the run's own parallelisation (:mod:`~memguard.estimation.tensor_parallel`). Ranks
    hold equal shares when every sharded dimension divides by its mesh dimension; otherwise ``torch.chunk``
    gives the first ranks the larger shards, and rank 0 bounds the others."""
    opts: TPOptions = spec.options
    dp, tp = opts.sizes(world_size, num_nodes)
    if world_size > MAX_TRACED_GROUP:
        raise _group_too_large("tensor parallelism with FSDP2", world_size)
    check_plan(opts, model)
    layout: dict = {}
    wrap = tp_wrapper(opts, precision, world_size, num_nodes, layout)
    how = route(opts, model)
    drop_autocast = memguard_shards_data(how, dp) and precision in (Precision.BF16_MIXED, Precision.FP16_MIXED)
    loss_context = contextlib.nullcontext
    if opts.loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as loss_context

    def tracer(model_: nn.Module, batch_: Any, make_optimizer: Callable | None, program: StepProgram, *,
               param_dtype: torch.dtype | None = None, prepare: Callable | None = None,
               device: DeviceModel | None = None, shared: tuple = (), **_: Any) -> Trace:
        if drop_autocast:
            program = dataclasses.replace(program, autocast_dtype=None)
        return trace_wrapped(model_, batch_, make_optimizer, program, wrap=wrap, world_size=world_size, rank=0,
                             param_dtype=param_dtype, prepare=prepare, device=device, shared=shared,
                             steps_context=loss_context)

    est = _one_rank(model, batch, tracer, req)
    est.per_rank = [est.peak_bytes] * world_size
    notes = [f"tensor parallel: {tp} ranks per tensor-parallel group x {dp} data-parallel, traced on rank 0 with "
             f"DTensor's own code ({ROUTES[how]}) on a fake process group"]
    if not layout.get("even", True):
        notes.append("some sharded dimensions do not divide by the mesh: the first ranks hold the larger shards; "
                     "every rank is bounded by rank 0's peak")
        est.approximate = True
    return est, notes


def _group_too_large(what: str, ranks: int) -> InvalidArgumentError:
    """FSDP2 pads every parameter's rows to a multiple of its group, so what a rank gathers grows with the
    group, and so does the work of tracing it: beyond :data:`MAX_TRACED_GROUP` ranks memguard says so."""
    return InvalidArgumentError(
        f"{what} over {ranks:,} ranks: memguard traces groups of up to {MAX_TRACED_GROUP:,} ranks (FSDP2 pads "
        "each parameter to a multiple of the group, so a rank's gathered buffers and memguard's work grow with "
        "it); check fewer nodes, or shard within nodes (FSDP's HYBRID_SHARD)")


def _deepspeed(model: nn.Module, batch: Any, spec: Strategy, world_size: int, req: EstimateRequest,
               precision: Precision) -> tuple[Estimate, list[str]]:
    opts: DeepSpeedOptions = spec.options
    half = HALF_DTYPES.get(precision)
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
        total = sum(p.numel() for p in unique_trainable(model_))
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
    if spec.kind is Kind.TP and world_size == 1:  # a tensor-parallel group of one rank is one process
        return estimate_one(model, batch, dataclasses.replace(req, strategy=None))
    dev = device_model(req.device, req.gpu)
    req = dataclasses.replace(req, device=dev, gpu=None)  # one instance for every rank: kernel measurements are shared
    precision = req.precision
    if spec.kind is Kind.DDP:
        result, notes = _ddp(model, batch, spec, world_size, req)
    elif spec.kind is Kind.DEEPSPEED:
        result, notes = _deepspeed(model, batch, spec, world_size, req, precision)
    elif spec.kind is Kind.TP:
        result, notes = _tensor_parallel(model, batch, spec, world_size, num_nodes, req, precision)
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
    "TPOptions",
    "ZeroModelStates",
    "estimate_distributed",
    "estimate_ranks",
    "fake_world",
    "largest_layer_params",
    "parse_strategy",
    "zero_model_states",
]
