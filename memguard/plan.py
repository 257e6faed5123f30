"""The planner: the cheapest change to a training configuration that makes it fit.

Pure: it gets a function that estimates a configuration and a capacity, and searches the allowed knobs
in order of expected cost. Nothing here touches a GPU, NVML or Lightning.

The cost model (stated here once, and printed with every plan) ranks changes by what they cost the user
in speed or numerics, not by how much memory they save:

===================  =====  ===========================================================================
knob                 cost   why
===================  =====  ===========================================================================
precision            1      bf16/fp16 mixed precision is usually faster; numerics change slightly
                            (bf16-true: 2, weights and optimizer state lose precision)
optimizer            2-4    8-bit AdamW (2) and 4-bit AdamW (3) quantize the moments; Adafactor (4)
                            changes the optimizer's behaviour
micro_batch          2/x2   each halving of the micro-batch (with doubled accumulation, same effective
                            batch) lowers GPU utilisation
checkpointing        3      recomputes the forward in backward: about a third more compute
sharding             3/4    over several GPUs: DeepSpeed ZeRO-2 (3) shards gradients and optimizer state
                            (reduce-scatter instead of all-reduce, one more all-gather of the weights);
                            FSDP full sharding (4) also all-gathers every layer's weights in forward and
                            backward, about 1.5x the communication of DDP
offload              6      optimizer state on the host: the step waits on PCIe transfers
===================  =====  ===========================================================================

Candidates are evaluated lazily in cost order: the first whose own estimate fits (with the margin) wins,
so a plan never relies on a scaled guess.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from memguard import strategies
from memguard.advice import how_to
from memguard.errors import InvalidArgumentError, unknown_name
from memguard.precision import Precision
from memguard.estimation import estimate
from memguard.estimation.sized_traces import supplying_now
from memguard.results import Estimate

KNOBS = ("precision", "optimizer", "micro_batch", "checkpointing", "sharding", "offload")
"""Every knob the planner can turn, in the default order of preference for equal cost."""

DEFAULT_MARGIN = 0.05
"""Safety margin on top of the prediction: a plan fits when prediction x (1 + margin) <= capacity.
Sized to the errors measured on the CPU ground truth and on published GPU runs (see README, "The safety
margin")."""

_ADAM_FAMILY = ("adam", "adamw")
_OPTIMIZER_COST = {"adamw8bit": 2.0, "ao_adamw8bit": 2.0, "ao_adamw4bit": 3.0, "adafactor": 4.0}
OPTIMIZER_CHOICES = tuple(_OPTIMIZER_COST)
"""The optimizers the optimizer knob may switch an Adam-family run to, cheapest first."""
_OPTIMIZER_WHY = {
    "adamw8bit": "8-bit AdamW (bitsandbytes) quantizes the moments; numerics change slightly",
    "ao_adamw8bit": "8-bit AdamW (torchao) quantizes the moments; numerics change slightly",
    "ao_adamw4bit": "4-bit AdamW (torchao) quantizes the moments more coarsely",
    "adafactor": "Adafactor factorizes the second moment; training dynamics change",
}


@dataclass(frozen=True)
class TrainingConfig:
    """The knobs of a run the planner may change. ``optimizer`` is a catalog name; anything the planner
    must not touch (model, data, strategy) stays with the caller's estimate function."""

    precision: Precision = Precision.FP32_TRUE
    """Parsed on construction: a Lightning string or alias ("bf16") becomes its :class:`Precision`."""
    optimizer: str = "adamw"
    micro_batch_size: int = 1
    accumulate_grad_batches: int = 1
    gradient_checkpointing: bool = False
    optimizer_offload: bool = False
    strategy: str | None = None
    """A Lightning strategy name the planner switched to (sharding); None: the run's own strategy."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the precision as its string): what a checkpoint, a log or JSON keeps."""
        return {**vars(self), "precision": str(self.precision)}

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulate_grad_batches


@dataclass(frozen=True)
class Change:
    """One change a plan makes, with how to make it by hand and what it costs."""

    knob: str
    before: str
    after: str
    how: str
    cost: float
    why: str

    def __post_init__(self) -> None:  # plain strings, as a checkpoint or JSON keeps them
        for name in ("before", "after"):
            if isinstance(getattr(self, name), Precision):
                object.__setattr__(self, name, str(getattr(self, name)))

    def __str__(self) -> str:
        return f"{self.knob}: {self.before} -> {self.after} ({self.how}; cost {self.cost:g}: {self.why})"


@dataclass
class Plan:
    """The planner's answer. ``fits`` False means nothing allowed fits; ``config`` / ``estimate`` are then
    the closest miss. ``tried`` lists every configuration estimated, with its required bytes."""

    fits: bool
    config: TrainingConfig
    changes: list[Change]
    estimate: Estimate
    capacity_bytes: int
    margin: float
    required_bytes: int
    tried: list[tuple[TrainingConfig, int]] = field(default_factory=list)

    @property
    def cost(self) -> float:
        return sum(c.cost for c in self.changes)

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.required_bytes

    def described_as(self, dialect: str) -> Plan:
        """The same plan with each change's ``how`` in the words of ``dialect`` (see memguard.advice)."""
        changes = [replace(c, how=how_to(c.knob, c.after, dialect)) for c in self.changes]
        return replace(self, changes=changes)


Evaluate = Callable[[TrainingConfig], Estimate]

QUICK_SLACK = 0.10
"""How far over capacity a what-if estimate (see :func:`optimizer_what_if`) must land before its candidate is
skipped untraced; what-ifs are only used to skip, never to accept."""


def required_bytes(est: Estimate, margin: float) -> int:
    """What a run needs on the device, margin included: NVML-level usage for CUDA, live bytes for the CPU.
    Where routing was assumed (mixture-of-experts), the routing bound's extra bytes count too: whether a
    run fits is decided on ``bound_bytes``, not on the balanced routing's peak."""
    over_bound = max(0, est.bound_bytes - est.peak_bytes)
    return int((est.device_bytes + over_bound) * (1.0 + margin))


@dataclass(frozen=True)
class Assessment:
    """A configuration against a capacity: its estimate, what it needs with the margin, whether that fits,
    and the plan when one was searched."""

    estimate: Estimate
    required_bytes: int
    fits: bool
    plan: Plan | None


def assess(config: TrainingConfig, evaluate: Evaluate, capacity_bytes: int, *, margin: float = DEFAULT_MARGIN,
           search: bool = True, more: Callable[[], Mapping[str, Any]] | None = None,
           **plan_kwargs: Any) -> Assessment:
    """The one decision every front end makes: estimate ``config``; when it does not fit and ``search``
    allows, plan the cheapest change that does (``plan_kwargs``, and ``more()`` asked only then, go to
    :func:`plan`)."""
    base = evaluate(config)
    need = required_bytes(base, margin)
    fits = need <= capacity_bytes
    found = None
    if not fits and search:
        extra = dict(more()) if more is not None else {}
        found = plan(config, evaluate, capacity_bytes, margin=margin, base_estimate=base, **plan_kwargs, **extra)
    return Assessment(base, need, fits, found)


def plan(
    base: TrainingConfig,
    evaluate: Evaluate,
    capacity_bytes: int,
    *,
    allow: Iterable[str] | None = None,
    bf16_supported: bool = True,
    allow_bf16_true: bool = False,
    optimizers_available: Iterable[str] = ("adamw8bit", "ao_adamw8bit", "ao_adamw4bit", "adafactor"),
    margin: float = DEFAULT_MARGIN,
    max_evaluations: int = 24,
    base_estimate: Estimate | None = None,
    world_size: int = 1,
    strategy: str | None = None,
    tensor_parallel: bool = False,
) -> Plan:
    """Search the allowed knobs for the cheapest configuration whose own estimate fits ``capacity_bytes``.

    ``allow`` restricts and orders the knobs (default: all of :data:`KNOBS`); an empty list means the
    configuration may not change. ``evaluate`` is called at most ``max_evaluations`` times, cheapest
    candidates first; identical configurations are estimated once. ``world_size`` and ``strategy`` describe
    the run's devices: with more than one and a replicating strategy (DDP, or none named) the sharding knob
    proposes ZeRO-2 and FSDP over the same devices; with ``tensor_parallel`` (the model has a tensor-parallel
    plan) also tensor parallelism (:data:`TENSOR_PARALLEL`), from any strategy but itself.
    """
    knobs = _knobs(allow)
    if capacity_bytes <= 0:
        raise InvalidArgumentError(f"capacity must be positive, got {capacity_bytes}")
    if margin < 0:
        raise InvalidArgumentError(f"margin must be >= 0, got {margin}")
    cache: dict[TrainingConfig, Estimate] = {}
    if base_estimate is not None:
        cache[base] = base_estimate
    tried: list[tuple[TrainingConfig, int]] = []

    def estimate_of(config: TrainingConfig) -> Estimate:
        if config not in cache:
            cache[config] = evaluate(config)
        return cache[config]

    quick = getattr(evaluate, "quick", None)
    best_miss: tuple[int, TrainingConfig, list[Change]] | None = None
    skipped: list[tuple[int, int, TrainingConfig, list[Change]]] = []
    candidates = _candidates(base, knobs, bf16_supported, allow_bf16_true, set(optimizers_available),
                             world_size, strategy, tensor_parallel)
    evaluations = 0
    for config, changes in candidates:
        if evaluations >= max_evaluations:
            break
        if quick is not None and config not in cache:
            guess = quick(config, cache)
            # a what-if that misses by more than its own slack is skipped without tracing; a candidate that
            # may fit is always traced in full before the plan says "fits"
            if guess is not None and int(guess * (1.0 + margin)) > capacity_bytes * (1.0 + QUICK_SLACK):
                skipped.append((int(guess * (1.0 + margin)), len(skipped), config, changes))
                continue
        evaluations += 1
        est = estimate_of(config)
        need = required_bytes(est, margin)
        tried.append((config, need))
        if need <= capacity_bytes:
            return Plan(True, config, changes, est, capacity_bytes, margin, need, tried)
        if best_miss is None or need < best_miss[0]:
            best_miss = (need, config, changes)
    assert best_miss is not None  # the base configuration is always the first candidate
    # The closest miss comes from full estimates. What-ifs err low, so a skipped candidate whose what-if is
    # already above the closest traced miss cannot be closer; the others are traced, most promising first.
    for guess, _, config, changes in sorted(skipped, key=lambda item: item[:2]):
        if guess >= best_miss[0] or evaluations >= max_evaluations:
            break
        evaluations += 1
        need = required_bytes(estimate_of(config), margin)
        tried.append((config, need))
        if need < best_miss[0]:
            best_miss = (need, config, changes)
    need, config, changes = best_miss
    return Plan(False, config, changes, cache[config], capacity_bytes, margin, need, tried)


def _knobs(allow: Iterable[str] | None) -> tuple[str, ...]:
    if allow is None:
        return KNOBS
    knobs = tuple(allow)
    for knob in knobs:
        if knob not in KNOBS:
            raise unknown_name("knob", knob, KNOBS)
    return knobs


def _candidates(
    base: TrainingConfig, knobs: tuple[str, ...], bf16: bool, bf16_true: bool, optimizers: set[str],
    world_size: int = 1, strategy: str | None = None, tensor_parallel: bool = False,
) -> list[tuple[TrainingConfig, list[Change]]]:
    """Every combination of knob settings, cheapest first (ties: fewer changes, then knob order)."""
    options: list[list[tuple[dict, Change | None]]] = []
    for knob in knobs:
        levels = [({}, None)] + _levels(knob, base, bf16, bf16_true, optimizers, world_size, strategy,
                                        tensor_parallel)
        options.append(levels)
    combos = []
    for picked in itertools.product(*options):
        fields: dict = {}
        changes = []
        for update, change in picked:
            fields.update(update)
            if change is not None:
                changes.append(change)
        rank = (sum(c.cost for c in changes), len(changes), [knobs.index(c.knob) for c in changes])
        combos.append((rank, replace(base, **fields), changes))
    combos.sort(key=lambda item: item[0])
    seen: set[TrainingConfig] = set()
    out = []
    for _, config, changes in combos:
        if config not in seen:
            seen.add(config)
            out.append((config, changes))
    return out


_SHARDING = {
    "deepspeed_stage_2": (3.0, "DeepSpeed ZeRO-2 shards gradients and optimizer state over the GPUs; "
                               "reduce-scatter and a weight all-gather per step instead of DDP's all-reduce"),
    "fsdp": (4.0, "FSDP full sharding also shards the weights and all-gathers each layer in forward and "
                  "backward: about 1.5x DDP's communication"),
}
"""What the sharding knob may switch a replicated run (:func:`memguard.strategies.is_replicated`) to, with
cost and why: names of :data:`memguard.strategies.TABLE` (tests/test_strategies.py checks they are sharded)."""

TENSOR_PARALLEL = ("tp", 5.0, "tensor parallel across each node's GPUs also splits activations (heads and hidden "
                              "units): an all-reduce per attention and MLP block in forward and backward, on the "
                              "node's fast links; FSDP2 shards over the nodes")
"""The sharding knob's last resort, after ZeRO-2 / FSDP, for a model that can be tensor-parallelised (its own
plan or ``configure_model``): name, cost, why."""


def change_fields(change: Change) -> dict[str, Any]:
    """The configuration fields a plan's change sets (the inverse of :func:`_levels` for one change). The
    micro-batch is left out: the callers (sizing) search that size themselves."""
    if change.knob == "precision":
        return {"precision": change.after}
    if change.knob == "optimizer":
        return {"optimizer": change.after}
    if change.knob == "checkpointing":
        return {"gradient_checkpointing": change.after == "on"}
    if change.knob == "offload":
        return {"optimizer_offload": change.after == "on"}
    if change.knob == "sharding":
        return {"strategy": change.after}
    raise unknown_name("knob", change.knob, [k for k in KNOBS if k != "micro_batch"])


def change_label(change: Change) -> str:
    """A change in a few words, for lists of cumulative changes: "bf16-mixed", "adamw8bit",
    "checkpointing", "fsdp", "offload"."""
    if change.knob in ("checkpointing", "offload"):
        return change.knob if change.after == "on" else f"no {change.knob}"
    return change.after


def _levels(knob: str, base: TrainingConfig, bf16: bool, bf16_true: bool, optimizers: set[str],
            world_size: int = 1, strategy: str | None = None, tensor_parallel: bool = False) -> list:
    if knob == "precision":
        out = []
        if base.precision == "32-true":
            target = "bf16-mixed" if bf16 else "16-mixed"
            out.append(({"precision": target}, Change("precision", base.precision, target,
                                                      how_to("precision", target), 1.0,
                                                      "mixed precision: usually faster, numerics change slightly")))
        if bf16_true and bf16 and base.precision in ("32-true", "bf16-mixed", "16-mixed"):
            out.append(({"precision": "bf16-true"}, Change("precision", base.precision, "bf16-true",
                                                           how_to("precision", "bf16-true"), 2.0,
                                                           "weights and optimizer state in bf16 lose precision")))
        return out
    if knob == "optimizer":
        if base.optimizer not in _ADAM_FAMILY:
            return []
        return [({"optimizer": name}, Change("optimizer", base.optimizer, name, how_to("optimizer", name),
                                             _OPTIMIZER_COST[name], _OPTIMIZER_WHY[name]))
                for name in _OPTIMIZER_COST if name in optimizers]
    if knob == "micro_batch":
        out = []
        size, factor, cost = base.micro_batch_size, 2, 0.0
        while size % factor == 0 and size // factor >= 1:
            cost += 2.0
            new, acc = size // factor, base.accumulate_grad_batches * factor
            out.append(({"micro_batch_size": new, "accumulate_grad_batches": acc},
                        Change("micro_batch", f"{size} x {base.accumulate_grad_batches}", f"{new} x {acc}",
                               how_to("micro_batch", f"{new} x {acc}"), cost,
                               "smaller micro-batches lower GPU utilisation; effective batch unchanged")))
            factor *= 2
        return out
    if knob == "checkpointing":
        if base.gradient_checkpointing:
            return []
        return [({"gradient_checkpointing": True},
                 Change("checkpointing", "off", "on", how_to("checkpointing", "on"), 3.0,
                        "recomputes the forward in backward: about a third more compute"))]
    if knob == "sharding":
        current = base.strategy or strategy or "auto"
        if world_size <= 1:
            return []
        names = dict(_SHARDING) if strategies.is_replicated(current) else {}
        row = strategies.find(current)
        if tensor_parallel and row is not None and row.kind is not strategies.Kind.TP:
            names[TENSOR_PARALLEL[0]] = TENSOR_PARALLEL[1:]
        return [({"strategy": name}, Change("sharding", current, name, how_to("sharding", name), cost, why))
                for name, (cost, why) in names.items()]
    if knob == "offload":
        if base.optimizer_offload:
            return []
        return [({"optimizer_offload": True},
                 Change("offload", "off", "on", how_to("offload", "on"), 6.0,
                        "the optimizer step waits on host transfers"))]
    raise unknown_name("knob", knob, KNOBS)


def slice_batch(batch: Any, size: int) -> Any:
    """The first ``size`` samples of a batch whose tensors share a leading batch dimension, as separate
    tensors (a data loader yields fresh micro-batches, not views into a larger batch)."""

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > size:
            return x[:size].clone()
        return x

    return tree_map(cut, batch)


def resize_batch(batch: Any, size: int) -> Any:
    """``batch`` with ``size`` samples: the first ``size`` (:func:`slice_batch`), or more, made by repeating
    its samples. Floating-point tensors grow on the meta device (their shapes are what an estimate reads;
    a 4096-image batch is not materialized); integer and boolean ones (token ids, masks, labels, whose
    values the trace may read) repeat their rows."""
    current = batch_size_of(batch)
    if size <= current:
        return slice_batch(batch, size)

    def grow(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != current:
            return x
        shape = (size, *x.shape[1:])
        if x.is_floating_point() or x.is_complex() or x.device.type == "meta":
            return torch.empty(shape, dtype=x.dtype, device="meta")
        return x[torch.arange(size, device=x.device) % current].clone()

    return tree_map(grow, batch)


def batch_size_of(batch: Any) -> int:
    """The leading dimension shared by the batch's tensors (1 when it has none)."""
    sizes = {x.shape[0] for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor) and x.dim() > 0}
    return max(sizes) if sizes else 1


def estimator(
    model: torch.nn.Module,
    batch: Any,
    *,
    optimizers: Mapping[str, Mapping[str, Any]] | None = None,
    gradient_checkpointing: bool | None = None,
    **fixed: Any,
) -> Evaluate:
    """An :data:`Evaluate` over ``estimate()``, memoised per configuration: each configuration gets its own
    estimate (micro-batches are sliced from ``batch``, larger ones grown from it: :func:`resize_batch`);
    ``fixed`` passes the settings the planner does not
    change (device, loss_fn, quantization, step order...).

    ``optimizers`` maps a configuration's optimizer name to the estimate() arguments that stand for it
    (the user's own optimizer factory and kwargs under the name the configuration uses); other names are
    catalog names. ``gradient_checkpointing`` is what a configuration without checkpointing passes (None:
    keep what the model does).

    Speed: the estimates share one :class:`~memguard.trace.TraceCache`, so configurations that differ only
    in the optimizer or its offload replay the model's forward and backward instead of tracing them, and
    ``evaluate.quick`` (:func:`optimizer_what_if`) lets the planner skip hopeless candidates untraced.
    """
    from memguard.trace import TraceCache

    overrides = dict(optimizers or {})
    traces = TraceCache()
    memo: dict[TrainingConfig, Estimate] = {}

    def evaluate(config: TrainingConfig) -> Estimate:
        if config in memo:
            return memo[config]
        optimizer = dict(overrides.get(config.optimizer) or {"optimizer": config.optimizer})
        settings = {**fixed, "strategy": config.strategy} if config.strategy is not None else fixed
        found = estimate(
            model,
            resize_batch(batch, config.micro_batch_size),
            **optimizer,
            precision=config.precision,
            gradient_checkpointing=True if config.gradient_checkpointing else gradient_checkpointing,
            accumulate_grad_batches=config.accumulate_grad_batches,
            optimizer_offload=config.optimizer_offload,
            trace_cache=traces,
            **settings,
        )
        if not supplying_now():  # a guess drawn from other sizes' traces is never served as an estimate
            memo[config] = found
        return found

    device = str(fixed.get("device", "cuda"))
    evaluate.quick = optimizer_what_if(model, "cpu" if device == "cpu" else "cuda")  # type: ignore[attr-defined]
    return evaluate


def optimizer_what_if(model: torch.nn.Module, device: str) -> Callable[[TrainingConfig, dict], int | None]:
    """A quick lower estimate for a configuration from an already traced one of the same precision and
    checkpointing that differs in its optimizer, its offload, or a smaller micro-batch: each phase's peak
    with the old optimizer's state and step scratch swapped for the new one's (from the optimizer catalog;
    none on the device when offloaded) and the batch-sized categories (activations, temporaries, inputs)
    scaled down with the micro-batch. Those parts are affine in the batch size with a non-negative fixed
    part, so scaling them down errs low. Lets the planner skip candidates that cannot fit without tracing
    them; it never accepts one."""
    from memguard.categories import Category
    from memguard.device.models import CUDA_BLOCK
    from memguard.optimizers import CATALOG, state_bytes, step_transient_bytes, unified_state_bytes

    target = "cpu" if device == "cpu" else "cuda"
    impl = "for-loop" if target == "cpu" else "foreach"
    rnd = None if target == "cpu" else (lambda n: -(-n // CUDA_BLOCK) * CUDA_BLOCK if n else 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaled = (Category.ACTIVATIONS, Category.TEMPORARIES, Category.INPUTS)

    def specs(precision: Precision) -> list:
        dtype = precision.param_dtype
        return [(tuple(p.shape), dtype if dtype is not None and p.is_floating_point() else p.dtype) for p in trainable]

    @functools.lru_cache(maxsize=None)
    def device_side(config: TrainingConfig) -> tuple[int, int, int]:
        """(state, step scratch, unified bytes) of the configuration's optimizer on the device; asked once
        per configuration, however many traced ones it is compared with."""
        if config.optimizer_offload:
            return 0, 0, 0
        shapes = specs(config.precision)
        return (state_bytes(config.optimizer, shapes, impl, device=target, round_up=rnd),
                step_transient_bytes(config.optimizer, shapes, impl, device=target, round_up=rnd),
                unified_state_bytes(config.optimizer, shapes, impl, device=target))

    def comparable(config: TrainingConfig, other: TrainingConfig) -> bool:
        return (other.precision == config.precision and other.strategy == config.strategy
                and other.gradient_checkpointing == config.gradient_checkpointing
                and config.micro_batch_size <= other.micro_batch_size
                and other.optimizer in CATALOG and config.optimizer in CATALOG)

    def quick(config: TrainingConfig, known: dict) -> int | None:
        best: int | None = None
        for other, est in known.items():
            if not comparable(config, other) or other == config:
                continue
            old_state, old_step, _ = device_side(other)
            new_state, new_step, new_unified = device_side(config)
            ratio = config.micro_batch_size / other.micro_batch_size
            peak = 0
            for phase, total in est.phase_peaks.items():
                parts = est.phase_breakdowns[phase]
                value = total
                if parts.get(Category.OPTIMIZER_STATE, 0) > 0:
                    value -= old_state - new_state
                if phase.endswith("optimizer"):
                    value += new_step - old_step
                value -= int(sum(parts.get(c, 0) for c in scaled) * (1.0 - ratio))
                peak = max(peak, value)
            overhead = est.device_bytes - est.peak_bytes - est.unified_bytes
            guess = peak + overhead + new_unified
            best = guess if best is None else max(best, guess)
        return best

    return quick
