"""Rewriting a recorded trace into what one rank of a strategy allocates: DDP's gradient buckets, FSDP's
CPU offload (host-resident state leaves the device trace); :mod:`memguard.estimation.deepspeed_zero` builds
on the same :class:`Rewriter`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from memguard.categories import Category
from memguard.estimation.strategy_options import DDPOptions
from memguard.trace import Trace

# ---------------------------------------------------------------------------------------------------------
# Trace rewriting (DDP buckets, host offload, DeepSpeed)


class Rewriter:
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


def setup_allocations(trace: Trace) -> set[int]:
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
    out = Rewriter(trace)
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
    setup = setup_allocations(trace)
    out = Rewriter(trace)
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


__all__ = ["Rewriter", "ddp_trace", "host_resident_trace", "setup_allocations"]
