"""One process's estimate: request -> trace (memguard.trace) -> device model (memguard.device) -> Estimate.

Nothing here prints, touches a GPU or imports Lightning. Distributed runs
(:mod:`memguard.estimation.distributed`) call :func:`estimate_one` once per distinct rank with their own tracer.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memguard import checkpointing
from memguard.trace import fake_rules
from memguard.categories import ALLOCATED_CATEGORIES, Category
from memguard.device.models import DeviceModel, device_model
from memguard.errors import InvalidArgumentError, TraceError
from memguard.estimation.request import EstimateRequest
from memguard.estimation.sized_traces import traced
from memguard.optimizers import ShapeOnlyOptimizer, adam_like_bound, make_factory
from memguard.precision import Precision
from memguard.quantization import QuantScheme, quantize_linears, replace_bnb_layers
from memguard.results import TIMELINE_POINTS, Estimate, Holder, TimelinePoint
from memguard.trace.compiled import CompileSpec, find_compiled
from memguard.trace import TRACED_MICRO_BATCHES, StepProgram, Trace, default_loss_fn, trace_training


def estimate_one(model: nn.Module, batch: Any, req: EstimateRequest,
                 tracer: Callable[..., Trace] | None = None) -> Estimate:
    """The estimate of one process. ``tracer`` (for sharded runs) is called instead of
    :func:`memguard.trace.trace_training`, with its arguments, to trace the step another way (one rank of
    a sharded run); everything else is as for one process."""
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if req.steps < 1:
        raise InvalidArgumentError(f"steps must be >= 1, got {req.steps}")
    if req.accumulate_grad_batches < 1:
        raise InvalidArgumentError(f"accumulate_grad_batches must be >= 1, got {req.accumulate_grad_batches}")
    prec = req.precision
    dev = device_model(req.device, req.gpu).fresh()
    impl = req.optimizer_impl or dev.optimizer_impl
    target = "cpu" if dev.name == "cpu" else "cuda"
    factory, opt_label = make_factory(req.optimizer, impl, req.optimizer_kwargs, device=target)
    if req.optimizer_offload and factory is not None:
        factory, opt_label = host_offloaded, f"{opt_label}, offloaded to host"
    program = StepProgram(
        loss_fn=req.loss_fn or default_loss_fn,
        autocast_dtype=prec.autocast_dtype,
        steps=req.steps,
        zero_grad_before_backward=req.zero_grad_before_backward,
        accumulate=req.accumulate_grad_batches,
    )
    notes: list[str] = []
    compute = prec.param_dtype or prec.autocast_dtype or torch.bfloat16
    scheme = QuantScheme.parse(req.quantization, compute) if req.quantization else None

    def prepare(twin: nn.Module) -> None:
        if req.prepare_model is not None:
            req.prepare_model(twin)
        replaced = replace_bnb_layers(twin)
        if replaced:
            notes.append(f"{replaced} bitsandbytes layers traced with their storage and dequantization buffers")
        if scheme is not None:
            count = quantize_linears(twin, scheme)
            notes.append(f"{count} linear layers quantized to {req.quantization}")
        if req.gradient_checkpointing:
            try:
                notes.append(f"activation checkpointing: {checkpointing.enable(twin)}")
            except ValueError as exc:
                raise InvalidArgumentError(str(exc)) from exc
        elif req.gradient_checkpointing is False:
            checkpointing.disable(twin)

    approximate = False
    reuse: dict[str, Any] = {}
    if req.trace_cache is not None:
        key = (id(model), _batch_key(batch), str(prec), req.compile, req.gradient_checkpointing, req.quantization,
               _device_key(dev), req.loss_fn, req.prepare_model, req.zero_grad_before_backward,
               min(req.accumulate_grad_batches, TRACED_MICRO_BATCHES), tuple(id(obj) for obj in req.shared))
        reuse["reuse"] = req.trace_cache.slot(key)
    compiled_run = req.compile is not False and (isinstance(req.compile, CompileSpec) or bool(find_compiled(model)))
    if tracer is not None and compiled_run:
        notes.append("torch.compile under a distributed strategy is predicted as eager execution (the compiled "
                     "analysis covers one process)")
    tracer = tracer or trace_training
    kwargs = dict(reuse)
    compiling = tracer is trace_training and compiled_run
    if tracer is trace_training:
        kwargs["compile"] = req.compile if compiling else False
    while True:
        try:
            trace = traced(lambda: tracer(model, batch, factory, program, param_dtype=prec.param_dtype,
                                          prepare=prepare, device=dev, shared=req.shared, **kwargs), dev)
            break
        except Exception as exc:
            if compiling:  # any failure of the compiled analysis falls back to eager, and says so
                compiling, kwargs["compile"] = False, False
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                message = (f"memguard could not analyse the compiled step ({type(exc).__name__}: {text[:200]}); "
                           "the prediction is for eager execution")
                warnings.warn(message, stacklevel=3)
                notes.append(message)
                dev = device_model(req.device, req.gpu).fresh()
                continue
            in_optimizer = isinstance(exc, TraceError) and (exc.phase or "").endswith(("optimizer", "optimizer.init"))
            if req.on_untraceable != "bound" or not in_optimizer:
                raise
            notes.append(f"approximate: the optimizer could not be traced ({exc.operation}); bounded by Adam-sized "
                         "state and a foreach-sized step transient")
            approximate = True
            dev = device_model(req.device, req.gpu).fresh()
            trace = traced(lambda: tracer(model, batch, adam_like_bound, program, param_dtype=prec.param_dtype,
                                          prepare=prepare, device=dev, shared=req.shared, **kwargs), dev)
            break
    result = summarize(trace, dev)
    result.approximate = approximate
    if trace.assumed_routing:
        traced_factory = adam_like_bound if approximate else factory
        result.bound_bytes = max(result.peak_bytes, _skewed_peak(tracer, model, batch, traced_factory, program,
                                                                 prec, prepare, req.device, req.gpu, req.shared))
        trace.notes.append("bound_bytes is the larger of the balanced and the skewed routing's peaks; decide on it")
    if trace.unified_bytes:
        result.unified_bytes = trace.unified_bytes
        result.device_bytes += trace.unified_bytes
        notes.append("paged optimizer state lives in CUDA unified memory: counted in device_bytes, not in the "
                     "allocator's peak")
    result.precision = str(prec)
    offloaded = req.optimizer_offload
    result.optimizer = (opt_label if offloaded else f"{opt_label} ({impl})") if factory is not None else "none"
    result.notes = list(dict.fromkeys(notes + trace.notes + dev.notes()))
    result.compiled = trace.compiled
    result.step_order = step_order(req.zero_grad_before_backward, req.accumulate_grad_batches)
    result.seconds = time.perf_counter() - started
    return result


def _skewed_peak(tracer: Callable[..., Trace], model: nn.Module, batch: Any, factory: Any, program: StepProgram,
                 prec: Precision, prepare: Callable, device: Any, gpu: Any, shared: tuple) -> int:
    """The peak with every token routed to the expert a loop runs last, every expert still used: the worst
    balance for the per-expert memory of an expert loop (see :mod:`memguard.trace.fake_rules`)."""
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
    and the values the trace reads (masks and lengths: see :func:`memguard.trace.fake_rules.value_key`); other
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

