"""``estimate()``: model + batch + training settings -> the peak memory of the first training steps.

The flow is spec -> trace (trace.py) -> device model (device.py) -> :class:`Estimate`. Nothing here
prints, touches a GPU or imports Lightning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memguard import checkpointing, fake_rules
from memguard.categories import ALLOCATED_CATEGORIES, Category
from memguard.device import DeviceModel, device_model
from memguard.errors import InvalidArgumentError, TraceError
from memguard.optimizers import ShapeOnlyOptimizer, adam_like_bound, make_factory
from memguard.precision import Precision
from memguard.quantization import QuantScheme, quantize_linears, replace_bnb_layers
from memguard.quiet import quiet
from memguard.trace import TRACED_MICRO_BATCHES, StepProgram, Trace, TraceCache, default_loss_fn, trace_training

TIMELINE_POINTS = 400
"""How many points the timeline keeps: enough for a plot, small enough to ship in JSON."""


@dataclass(frozen=True)
class TimelinePoint:
    index: int
    """Position in the traced event sequence."""
    phase: str
    allocated_bytes: int


@dataclass(frozen=True)
class Holder:
    """Memory one group of allocations holds at the peak: the same module pattern, kind and category.

    ``module`` is a module path with repeated block indices collapsed to ``*`` (``"model.layers.*.mlp"``
    stands for every layer's ``mlp``), or a bracketed label (:data:`memguard.trace.ROOT` and friends);
    ``repeats`` counts the distinct indices behind each ``*``, so identical blocks add up in one line.
    ``kind`` is finer than ``category``: the operator that made the tensor (``"aten.mm"``, ``"... (saved
    for backward)"``), ``"parameter"``, ``"gradient"``, an optimizer state key (``"exp_avg"``)...
    """

    module: str
    kind: str
    category: Category
    bytes: int
    repeats: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        """How many concrete modules ``module`` stands for (1 without ``*``)."""
        return math.prod(self.repeats)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "category": str(self.category), "bytes": self.bytes,
                "count": self.count}


@dataclass(frozen=True)
class HolderGroup:
    """Holders summed under one name (a module pattern at some depth, a kind, or a category), with the
    largest contributions inside it (kinds of a module, modules of a kind), largest first."""

    name: str
    bytes: int
    count: int = 1
    category: Category | None = None
    parts: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "count": self.count,
                "category": None if self.category is None else str(self.category),
                "parts": [{"name": n, "bytes": b} for n, b in self.parts]}


HOLDER_BY = ("module", "kind", "category")


@dataclass
class Estimate:
    """What the first training steps will hold in memory on the target device.

    ``peak_bytes`` predicts ``torch.cuda.max_memory_allocated`` (device "cuda") or the peak of live tensor
    bytes (device "cpu"); ``reserved_bytes`` what the caching allocator holds at that moment;
    ``device_bytes`` what NVML / nvidia-smi would show (reserved plus the CUDA context). ``breakdown`` is
    the allocated peak split by :class:`Category`, plus ``allocator`` and ``context`` for the device
    view; ``phase_peaks`` / ``phase_breakdowns`` give the same per phase ("step2.backward"...). ``per_rank`` lists each rank's peak under a distributed strategy (one entry otherwise).
    """

    peak_bytes: int
    reserved_bytes: int
    device_bytes: int
    breakdown: dict[Category, int]
    timeline: list[TimelinePoint]
    peak_phase: str
    phase_peaks: dict[str, int]
    phase_breakdowns: dict[str, dict[Category, int]]
    device: str
    precision: str
    optimizer: str
    per_rank: list[int] = field(default_factory=list)
    unified_bytes: int = 0
    """Optimizer state in CUDA unified memory (bitsandbytes' paged optimizers): outside torch's allocator
    counters, so not in ``peak_bytes`` / ``reserved_bytes``; counted in ``device_bytes`` as resident."""
    approximate: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    holders: list[Holder] = field(default_factory=list)
    """Everything allocated at the peak, grouped by :class:`Holder` (module pattern, kind, category),
    largest first; the bytes add up to ``peak_bytes``. :meth:`top_holders` rolls them up."""
    phases: list[tuple[int, str]] = field(default_factory=list)
    """Where each traced phase (``"step1.forward"``...) starts, in the event indices of ``timeline``."""
    step_order: str = ""
    """The order of the traced training step (see :func:`step_order`): where ``zero_grad`` runs decides
    whether the previous step's gradients are alive during the forward, which can move the peak by the
    size of the gradients."""
    bound_bytes: int = 0
    """An upper bound on ``peak_bytes`` under every routing the model could take: equal to ``peak_bytes``
    unless routing decisions computed from the weights were assumed (mixture-of-experts), when
    ``peak_bytes`` is the balanced routing's figure and this the larger of it and the skewed routing's
    (see :mod:`memguard.fake_rules`); decide whether a run fits on this figure."""

    def top_holders(self, n: int | None = 8, *, by: str = "module", depth: int | None = None,
                    parts: int = 3) -> list[HolderGroup]:
        """The ``n`` largest holders at the peak (all with ``n=None``), by ``"module"`` (patterns cut to
        their first ``depth`` components: ``depth=3`` folds ``model.layers.*.mlp.up_proj`` into
        ``model.layers.*``), by ``"kind"`` (within its category) or by ``"category"``. Each group lists its
        ``parts`` largest contributions: kinds of a module, modules of a kind, kinds of a category."""
        if by not in HOLDER_BY:
            raise InvalidArgumentError(f"by must be one of {', '.join(HOLDER_BY)}, got {by!r}")
        if depth is not None and depth < 1:
            raise InvalidArgumentError(f"depth must be >= 1, got {depth}")
        groups = _roll_up(self.holders, by, depth, parts)
        top = sorted(groups, key=lambda g: (-g.bytes, g.name))
        return top if n is None else top[:n]

    def __repr__(self) -> str:
        from memguard.report import format_bytes

        return (f"Estimate(peak={format_bytes(self.peak_bytes)}, device={self.device}, "
                f"precision={self.precision or '?'}, optimizer={self.optimizer or '?'})")

    def __str__(self) -> str:
        from memguard.report import render_estimate

        return render_estimate(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "reserved_bytes": self.reserved_bytes,
            "device_bytes": self.device_bytes,
            "breakdown": {str(k): v for k, v in self.breakdown.items()},
            "peak_phase": self.peak_phase,
            "phase_peaks": dict(self.phase_peaks),
            "device": self.device,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "per_rank": list(self.per_rank),
            "unified_bytes": self.unified_bytes,
            "approximate": self.approximate,
            "notes": list(self.notes),
            "holders": [h.to_dict() for h in self.holders],
            "step_order": self.step_order,
            "bound_bytes": self.bound_bytes,
        }


# ---------------------------------------------------------------------------------------------------------


@quiet()
def estimate(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    optimizer: str | type | Callable | None = "adamw",
    optimizer_kwargs: dict[str, Any] | None = None,
    optimizer_impl: str | None = None,
    precision: str | Precision = "32-true",
    device: str | DeviceModel = "cuda",
    gpu: str | Any | None = None,
    gradient_checkpointing: bool | None = None,
    zero_grad_before_backward: bool = False,
    steps: int = 2,
    on_untraceable: str = "raise",
    quantization: str | None = None,
    accumulate_grad_batches: int = 1,
    optimizer_offload: bool = False,
    prepare_model: Callable[[nn.Module], None] | None = None,
    shared: tuple = (),
    strategy: Any = None,
    world_size: int = 1,
    num_nodes: int = 1,
    trace_cache: TraceCache | None = None,
    _tracer: Callable[..., Trace] | None = None,
) -> Estimate:
    """Predict the peak memory of training ``model`` on ``batch``.

    The model may live on any device, ``meta`` included; it is never modified or materialized: memguard
    traces a fake copy. ``optimizer`` is a catalog name (see :mod:`memguard.optimizers`), an optimizer
    class, or a factory ``params -> optimizer``; ``optimizer_impl`` overrides the device's default
    implementation ("for-loop" on the CPU, "foreach" on CUDA, or "fused"). ``gradient_checkpointing``:
    None keeps what the model does, True turns it on (transformers' switch, else repeated blocks are
    wrapped), False turns transformers' switch off. ``zero_grad_before_backward`` follows Lightning's
    automatic optimization, where the previous step's gradients live through the next forward.
    ``quantization`` ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8", as Lightning's BitsandbytesPrecision)
    stores the frozen linear layers' weights as bitsandbytes does; bitsandbytes layers already in the model
    are recognised without it.
    ``accumulate_grad_batches``: micro-batches per optimizer step (the gradients of the first live through
    the others). ``optimizer_offload``: the optimizer's state and step live in host memory (as with
    torchao's CPUOffloadOptimizer or DeepSpeed's offload), so the device keeps none of it.
    ``gpu``: a GPU catalog name ("A100-80GB", "H100") or entry, for its attention kernels, cuBLAS workspace
    and CUDA context size (default: an sm80-class GPU).
    ``prepare_model`` runs on memguard's copy of the model before tracing (to silence logging, say);
    ``shared`` lists objects the model refers to that must not be copied (a Lightning Trainer).
    ``strategy`` / ``world_size`` / ``num_nodes``: a Lightning strategy name ("ddp", "fsdp", "fsdp2",
    "deepspeed_stage_2", ...) or object and the number of ranks: each rank's peak is predicted
    (:mod:`memguard.distributed`); ``peak_bytes`` is the largest, ``per_rank`` lists them all.
    ``on_untraceable="bound"``: when only the optimizer cannot be traced, return a conservative bound
    (Adam-sized state, foreach-sized step scratch) marked ``approximate`` instead of raising.
    ``trace_cache``: a :class:`memguard.trace.TraceCache` shared by estimates of the same ``model``; those
    that differ only in ``optimizer``, ``optimizer_kwargs`` or ``optimizer_offload`` replay the model's
    forward and backward from the first instead of tracing them again (the planner's optimizer candidates).
    ``_tracer`` (private, for :mod:`memguard.distributed`): called instead of
    :func:`memguard.trace.trace_training`, with its arguments, to trace the step another way (one rank of a
    sharded run); everything else is as for one process.
    """
    if on_untraceable not in ("raise", "bound"):
        raise InvalidArgumentError(f"on_untraceable must be 'raise' or 'bound', got {on_untraceable!r}")
    if strategy is not None and not (isinstance(strategy, str) and strategy == "auto" and world_size == 1):
        from memguard.distributed import estimate_distributed

        return estimate_distributed(
            model, batch, strategy=strategy, world_size=world_size, num_nodes=num_nodes, loss_fn=loss_fn,
            optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, optimizer_impl=optimizer_impl,
            precision=precision, device=device, gpu=gpu, gradient_checkpointing=gradient_checkpointing,
            zero_grad_before_backward=zero_grad_before_backward, steps=steps, on_untraceable=on_untraceable,
            quantization=quantization, accumulate_grad_batches=accumulate_grad_batches,
            optimizer_offload=optimizer_offload, prepare_model=prepare_model, shared=shared,
        )
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if steps < 1:
        raise InvalidArgumentError(f"steps must be >= 1, got {steps}")
    if accumulate_grad_batches < 1:
        raise InvalidArgumentError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
    prec = Precision.parse(precision)
    dev = device_model(device, gpu).fresh()
    impl = optimizer_impl or dev.optimizer_impl
    target = "cpu" if dev.name == "cpu" else "cuda"
    factory, opt_label = make_factory(optimizer, impl, optimizer_kwargs, device=target)
    if optimizer_offload and factory is not None:
        factory, opt_label = host_offloaded, f"{opt_label}, offloaded to host"
    program = StepProgram(
        loss_fn=loss_fn or default_loss_fn,
        autocast_dtype=prec.autocast_dtype,
        steps=steps,
        zero_grad_before_backward=zero_grad_before_backward,
        accumulate=accumulate_grad_batches,
    )
    notes: list[str] = []
    compute = prec.param_dtype or prec.autocast_dtype or torch.bfloat16
    scheme = QuantScheme.parse(quantization, compute) if quantization else None

    def prepare(twin: nn.Module) -> None:
        if prepare_model is not None:
            prepare_model(twin)
        replaced = replace_bnb_layers(twin)
        if replaced:
            notes.append(f"{replaced} bitsandbytes layers traced with their storage and dequantization buffers")
        if scheme is not None:
            count = quantize_linears(twin, scheme)
            notes.append(f"{count} linear layers quantized to {quantization}")
        if gradient_checkpointing:
            try:
                notes.append(f"activation checkpointing: {checkpointing.enable(twin)}")
            except ValueError as exc:
                raise InvalidArgumentError(str(exc)) from exc
        elif gradient_checkpointing is False:
            checkpointing.disable(twin)

    approximate = False
    reuse: dict[str, Any] = {}
    if trace_cache is not None:
        key = (id(model), _batch_key(batch), str(prec), gradient_checkpointing, quantization, _device_key(dev),
               loss_fn, prepare_model, zero_grad_before_backward, min(accumulate_grad_batches, TRACED_MICRO_BATCHES),
               tuple(id(obj) for obj in shared))
        reuse["reuse"] = trace_cache.slot(key)
    tracer = _tracer or trace_training
    try:
        trace = tracer(model, batch, factory, program, param_dtype=prec.param_dtype, prepare=prepare,
                       device=dev, shared=shared, **reuse)
    except TraceError as exc:
        in_optimizer = (exc.phase or "").endswith(("optimizer", "optimizer.init"))
        if on_untraceable != "bound" or not in_optimizer:
            raise
        notes.append(f"approximate: the optimizer could not be traced ({exc.operation}); bounded by Adam-sized "
                     "state and a foreach-sized step transient")
        approximate = True
        dev = device_model(device, gpu).fresh()
        trace = tracer(model, batch, adam_like_bound, program, param_dtype=prec.param_dtype,
                       prepare=prepare, device=dev, shared=shared, **reuse)
    result = summarize(trace, dev)
    result.approximate = approximate
    if trace.assumed_routing:
        traced_factory = adam_like_bound if approximate else factory
        result.bound_bytes = max(result.peak_bytes, _skewed_peak(tracer, model, batch, traced_factory, program,
                                                                 prec, prepare, device, gpu, shared))
        trace.notes.append("bound_bytes is the larger of the balanced and the skewed routing's peaks; decide on it")
    if trace.unified_bytes:
        result.unified_bytes = trace.unified_bytes
        result.device_bytes += trace.unified_bytes
        notes.append("paged optimizer state lives in CUDA unified memory: counted in device_bytes, not in the "
                     "allocator's peak")
    result.precision = str(prec)
    result.optimizer = (opt_label if optimizer_offload else f"{opt_label} ({impl})") if factory is not None else "none"
    result.notes = list(dict.fromkeys(notes + trace.notes + dev.notes()))
    result.step_order = step_order(zero_grad_before_backward, accumulate_grad_batches)
    result.seconds = time.perf_counter() - started
    return result


def _skewed_peak(tracer: Callable[..., Trace], model: nn.Module, batch: Any, factory: Any, program: StepProgram,
                 prec: Precision, prepare: Callable, device: Any, gpu: Any, shared: tuple) -> int:
    """The peak with every token routed to the expert a loop runs last, every expert still used: the worst
    balance for the per-expert memory of an expert loop (see :mod:`memguard.fake_rules`)."""
    dev = device_model(device, gpu).fresh()
    with fake_rules.routing(fake_rules.SKEWED):
        trace = tracer(model, batch, factory, program, param_dtype=prec.param_dtype, prepare=prepare,
                       device=dev, shared=shared)
    return summarize(trace, dev).peak_bytes


def step_order(zero_grad_before_backward: bool, accumulate_grad_batches: int = 1) -> str:
    """The traced step order in words, for every report: the Lightning order keeps the previous step's
    gradients alive through the forward, a plain loop frees them before it, so the two predict different
    peaks for the same model."""
    if zero_grad_before_backward:
        order = ("forward, zero_grad, backward, optimizer step (Lightning's automatic optimization: the "
                 "previous step's gradients are alive during the forward)")
    else:
        order = ("forward, backward, optimizer step, zero_grad(set_to_none=True) (a plain PyTorch loop: "
                 "gradients are freed before the next forward)")
    if accumulate_grad_batches > 1:
        order += f"; {accumulate_grad_batches} micro-batches per optimizer step"
    return order


def _batch_key(batch: Any) -> tuple:
    """What of a batch shapes the traced program: its structure, each tensor's shape, strides and dtype,
    and the values the trace reads (masks and lengths: see :func:`memguard.fake_rules.value_key`); other
    leaves are compared by value."""
    leaves, spec = tree_flatten(batch)
    return (str(spec), tuple(
        (tuple(x.shape), tuple(x.stride()), x.dtype, fake_rules.value_key(x)) if isinstance(x, torch.Tensor)
        else (type(x).__name__, repr(x))
        for x in leaves
    ))


def _device_key(dev: DeviceModel) -> tuple:
    return (type(dev).__name__, dev.name, getattr(dev, "attention", None), getattr(dev, "compute_capability", None))


def host_offloaded(params: list[nn.Parameter]) -> ShapeOnlyOptimizer:
    """The device side of an optimizer whose state and step live in host memory: nothing is kept."""
    return ShapeOnlyOptimizer(params, state_bytes=lambda p: 0)


def summarize(trace: Trace, dev: DeviceModel) -> Estimate:
    """Walk the trace once with the device's rounding: peak, where it happens, and what is live there,
    overall and at each phase's own peak (the planner's what-ifs start from the phase breakdowns)."""
    sizes = [dev.round_up(n) for n in trace.sizes]
    events = trace.events
    live = 0
    curve: list[int] = []
    for ev in events:
        live += sizes[ev - 1] if ev > 0 else -sizes[-ev - 1]
        curve.append(live)

    phase_peaks: dict[str, int] = {}
    phase_breakdowns: dict[str, dict[Category, int]] = {}
    phase_index: dict[str, int] = {}
    bounds = [start for start, _ in trace.phases] + [len(events)]
    for (start, name), end in zip(trace.phases, bounds[1:]):
        if end > start and name != "end":
            index = max(range(start, end), key=curve.__getitem__)
            if curve[index] >= phase_peaks.get(name, -1):
                phase_peaks[name] = curve[index]
                phase_breakdowns[name] = _breakdown(trace, sizes, index)
                phase_index[name] = index
    holders: list[Holder] = []
    if phase_peaks:
        peak_phase = max(phase_peaks, key=phase_peaks.__getitem__)
        best, breakdown = phase_peaks[peak_phase], dict(phase_breakdowns[peak_phase])
        holders = _holders(trace, sizes, phase_index[peak_phase])
    else:
        peak_phase, best, breakdown = "setup", 0, {c: 0 for c in ALLOCATED_CATEGORIES}

    reserved = dev.reserved(sizes, events, best)
    breakdown[Category.ALLOCATOR] = reserved - best
    context = dev.context_bytes()
    breakdown[Category.CONTEXT] = context
    return Estimate(
        peak_bytes=best,
        reserved_bytes=reserved,
        device_bytes=reserved + context,
        breakdown=breakdown,
        timeline=_downsample(curve, trace),
        peak_phase=peak_phase,
        phase_peaks=phase_peaks,
        phase_breakdowns=phase_breakdowns,
        device=dev.name,
        precision="",
        optimizer="",
        per_rank=[best],
        holders=holders,
        bound_bytes=best,
        phases=[(start, name) for start, name in trace.phases if name != "end"],
    )


def _breakdown(trace: Trace, sizes: list[int], index: int) -> dict[Category, int]:
    out = {c: 0 for c in ALLOCATED_CATEGORIES}
    for aid in trace.live_at(index):
        out[trace.categories[aid]] += sizes[aid]
    return out


def _pattern(path: str) -> tuple[str, tuple[str, ...]]:
    """``"model.layers.3.mlp"`` -> ``("model.layers.*.mlp", ("3",))``: numbered children (ModuleList,
    Sequential) are the repeated blocks, so their index is what identical blocks differ in."""
    if path.startswith("(") or not any(c.isdigit() for c in path):
        return path, ()
    parts = path.split(".")
    return ".".join("*" if p.isdigit() else p for p in parts), tuple(p for p in parts if p.isdigit())


def _holders(trace: Trace, sizes: list[int], index: int) -> list[Holder]:
    """What is live just after event ``index``, summed by (module pattern, kind, category)."""
    sums: dict[tuple[str, str, Category], int] = {}
    indices: dict[tuple[str, str, Category], list[set[str]]] = {}
    patterns: dict[str, tuple[str, tuple[str, ...]]] = {}
    for aid in trace.live_at(index):
        if not sizes[aid]:
            continue
        owner, kind = trace.holder_of(aid)
        pattern = patterns.get(owner)
        if pattern is None:
            pattern = patterns[owner] = _pattern(owner)
        key = (pattern[0], kind, trace.categories[aid])
        sums[key] = sums.get(key, 0) + sizes[aid]
        if pattern[1]:
            for seen, i in zip(indices.setdefault(key, [set() for _ in pattern[1]]), pattern[1]):
                seen.add(i)
    holders = [Holder(module, kind, cat, n, tuple(len(s) for s in indices.get((module, kind, cat), ())))
               for (module, kind, cat), n in sums.items()]
    return sorted(holders, key=lambda h: (-h.bytes, h.module, h.kind))


def _cut(holder: Holder, depth: int | None) -> tuple[str, int]:
    """The holder's module pattern cut to ``depth`` components, and how many modules that stands for."""
    module = holder.module
    if depth is None or module.startswith("("):
        return module, holder.count
    kept = module.split(".")[:depth]
    return ".".join(kept), math.prod(holder.repeats[: kept.count("*")])


def _roll_up(holders: list[Holder], by: str, depth: int | None, parts: int) -> list[HolderGroup]:
    sums: dict[Any, int] = {}
    counts: dict[Any, int] = {}
    inner: dict[Any, dict[str, int]] = {}
    for h in holders:
        module, count = _cut(h, depth)
        if by == "module":
            key, part = module, h.kind
        elif by == "kind":
            key, part = (h.kind, h.category), module
        else:
            key, part = h.category, h.kind
        sums[key] = sums.get(key, 0) + h.bytes
        counts[key] = max(counts.get(key, 1), count if by == "module" else 1)
        split = inner.setdefault(key, {})
        split[part] = split.get(part, 0) + h.bytes
    groups = []
    for key, total in sums.items():
        top = sorted(inner[key].items(), key=lambda kv: (-kv[1], kv[0]))[:parts]
        if by == "module":
            name, cat = key, None
        elif by == "kind":
            name, cat = key
        else:
            name, cat = str(key), key
        groups.append(HolderGroup(name, total, counts[key], cat, tuple(top)))
    return groups


def _downsample(curve: list[int], trace: Trace) -> list[TimelinePoint]:
    """Keep each bucket's maximum so the plotted curve never hides a peak."""
    if not curve:
        return []
    bucket = max(1, -(-len(curve) // TIMELINE_POINTS))
    points = []
    for start in range(0, len(curve), bucket):
        chunk = curve[start : start + bucket]
        offset = max(range(len(chunk)), key=chunk.__getitem__)
        index = start + offset
        points.append(TimelinePoint(index, trace.phase_of(index), chunk[offset]))
    return points


__all__ = ["Estimate", "Holder", "HolderGroup", "TimelinePoint", "estimate", "summarize", "TraceError"]
