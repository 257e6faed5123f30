"""What memguard answers: :class:`Estimate` (with its holders and timeline), and ``memguard check``'s
:class:`CheckResult` per target with its exit code.

Plain data, below everything that makes or reads it (the estimation, the planner, the report, the guard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memguard.categories import Category
from memguard.errors import InvalidArgumentError
from memguard.text import render_estimate
from memguard.units import format_bytes

if TYPE_CHECKING:
    from memguard.spec.check_spec import CheckSpec
    from memguard.device.catalog import CatalogGPU
    from memguard.plan import Plan

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
    compiled: str = ""
    """Which parts of the model were predicted compiled, and with which backend
    (``"compiled (inductor): whole model"``); "" for eager execution."""
    bound_bytes: int = 0
    """An upper bound on ``peak_bytes`` under every routing the model could take: equal to ``peak_bytes``
    unless routing decisions computed from the weights were assumed (mixture-of-experts), when
    ``peak_bytes`` is the balanced routing's figure and this the larger of it and the skewed routing's
    (see :mod:`memguard.trace.fake_rules`); decide whether a run fits on this figure."""

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
        return (f"Estimate(peak={format_bytes(self.peak_bytes)}, device={self.device}, "
                f"precision={self.precision or '?'}, optimizer={self.optimizer or '?'})")

    def __str__(self) -> str:
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
            "compiled": self.compiled,
        }



# ---------------------------------------------------------------------------------------------------------
# Rolling holders up


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


# ---------------------------------------------------------------------------------------------------------
# What `memguard check` answers


EXIT_FITS = 0
EXIT_NO_FIT = 1
EXIT_PLAN = 3
"""``memguard check``'s exit codes for a check that ran (2, invalid input, is the command line's)."""
EXIT_MEANINGS = {
    EXIT_FITS: "fits as configured",
    EXIT_NO_FIT: "does not fit, even with the allowed fallbacks",
    EXIT_PLAN: "fits only with the plan's changes",
}
_SEVERITY = {EXIT_FITS: 0, EXIT_PLAN: 1, EXIT_NO_FIT: 2}


@dataclass(frozen=True)
class Target:
    """A device to check against: a catalog model, or a GPU of this machine with its free memory."""

    name: str
    capacity_bytes: int
    source: str
    """Where the capacity comes from, in words."""
    catalog: CatalogGPU | None = None
    """The :class:`memguard.device.catalog.CatalogGPU` entry (kernels, context size); None when unknown."""
    bf16: bool = True
    index: int | None = None
    """The local CUDA index, for a discovered GPU."""


def size_knob_name(knob: str) -> str:
    """``"batch_size"`` -> "batch size", ``"seq_len"`` -> "sequence length": the knob in a sentence."""
    return {"seq_len": "sequence length"}.get(knob, knob.replace("_", " "))


@dataclass
class SizeResult:
    """The largest size that fits. ``estimate`` is the estimate at that size (at the smallest size tried
    when not even that fits: ``value`` is then 0)."""

    knob: str
    """``"batch_size"`` or ``"seq_len"``."""
    value: int
    estimate: Estimate
    required_bytes: int
    budget_bytes: int
    margin: float
    tried: list[tuple[int, int]] = field(default_factory=list)
    """Every size estimated, in order, with the bytes it needs (margin included)."""
    limited: bool = False
    """``value`` is the search's upper limit, or the largest size the run can take: larger sizes are not
    ruled out by memory."""
    refused: str = ""
    """Why the next size cannot be run at all (the model's positions), when that is what stopped the search."""
    guessed: int = 0
    """How many other sizes were guessed from the real estimates' traces (an allocator replay each, no trace)."""

    @property
    def batch_size(self) -> int:
        return self.value

    @property
    def seq_len(self) -> int:
        return self.value

    def __str__(self) -> str:
        name = size_knob_name(self.knob)
        limit = f" (the largest the run takes: {self.refused})" if self.refused else " (the search limit; larger may fit)"
        what = (f"{self.value}" + (limit if self.limited else "")
                if self.value else "0 (not even the smallest size fits)")
        return (f"largest {name} that fits {format_bytes(self.budget_bytes)} with a {self.margin:.0%} margin: "
                f"{what}; needs {format_bytes(self.required_bytes)}; {len(self.tried)} estimates")

    def to_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "value": self.value, "required_bytes": self.required_bytes,
                "budget_bytes": self.budget_bytes, "margin": self.margin, "limited": self.limited,
                "refused": self.refused, "guessed": self.guessed,
                "tried": [{"size": s, "required_bytes": r} for s, r in self.tried]}


@dataclass
class SizeAnswer:
    """One target's answer to ``--max-batch-size`` / ``--max-seq-len``: as configured, and after each
    change of the plan in turn (``("bf16-mixed", ...)``, ``("bf16-mixed + adamw8bit", ...)``)."""

    configured: SizeResult
    with_changes: list[tuple[str, SizeResult]] = field(default_factory=list)

    @property
    def knob(self) -> str:
        return self.configured.knob

    def to_dict(self) -> dict[str, Any]:
        return {"as_configured": self.configured.value,
                "with_plan": [{"changes": label, "value": r.value} for label, r in self.with_changes],
                "search": self.configured.to_dict()}


@dataclass(frozen=True)
class GpuCount:
    """The fewest GPUs of one strategy that fit: ``devices`` per node times ``num_nodes``."""

    strategy: str
    devices: int
    num_nodes: int
    required_bytes: int
    """What each GPU needs at that count, margin included."""

    @property
    def count(self) -> int:
        return self.devices * self.num_nodes

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "strategy": self.strategy, "devices": self.devices,
                "num_nodes": self.num_nodes, "required_bytes": self.required_bytes}


@dataclass
class MinGpus:
    """``memguard check --min-gpus``: per strategy, the fewest GPUs that fit (None: none up to the limit)."""

    per_strategy: dict[str, GpuCount | None]
    per_node: int
    max_nodes: int

    @property
    def best(self) -> GpuCount | None:
        """The fewest GPUs over all strategies; on a tie the strategy listed first (the cheaper one)."""
        found = [c for c in self.per_strategy.values() if c is not None]
        return min(found, key=lambda c: c.count) if found else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {**(best.to_dict() if best else {"count": None, "strategy": None}),
                "per_node": self.per_node, "max_nodes": self.max_nodes,
                "per_strategy": {k: (v.to_dict() if v else None) for k, v in self.per_strategy.items()}}


@dataclass
class TargetResult:
    """The answer for one target: as configured, and the plan when it does not fit."""

    target: Target
    estimate: Estimate
    required_bytes: int
    fits: bool
    """Fits as configured, margin included."""
    plan: Plan | None = None
    """The planner's answer, when it was asked (the configuration does not fit and fallbacks are allowed)."""
    notes: list[str] = field(default_factory=list)
    sizing: list[SizeAnswer] = field(default_factory=list)
    """Answers to sizing questions (``memguard check --max-batch-size``), when asked."""
    min_gpus: MinGpus | None = None
    """The fewest GPUs per strategy (``memguard check --min-gpus``), when asked."""

    @property
    def exit_code(self) -> int:
        """0 fits as configured, 3 fits with the plan, 1 nothing allowed fits."""
        if self.fits:
            return EXIT_FITS
        return EXIT_PLAN if self.plan is not None and self.plan.fits else EXIT_NO_FIT


@dataclass
class CheckResult:
    """Every target's answer, and the notes that hold for all of them."""

    spec: CheckSpec
    targets: list[TargetResult]
    notes: list[str]
    parameters: int = 0
    """Parameters of the model as built (tied weights once), adapters included."""
    trainable: int = 0

    @property
    def exit_code(self) -> int:
        """The worst target's: 1 if any fits nothing allowed, else 3 if any needs its plan, else 0."""
        return max((t.exit_code for t in self.targets), key=_SEVERITY.__getitem__, default=EXIT_FITS)

    @property
    def deciding(self) -> TargetResult:
        """The first target with the worst exit code (the one the exit code reports on)."""
        code = self.exit_code
        return next(t for t in self.targets if t.exit_code == code)

    @property
    def fits(self) -> bool:
        """Fits as configured on every target."""
        return all(t.fits for t in self.targets)
