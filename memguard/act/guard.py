"""Deciding before a run starts: capacity, estimate, plan, policy. Shared by the Lightning callback and the
standalone preflight, so both front ends say and do the same thing.

This is an edge module (it reads NVML and host memory); the estimate and the plan stay pure.
"""

from __future__ import annotations


from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from memguard.errors import MemguardError, unknown_name
from memguard.results import Estimate
from memguard.plan import DEFAULT_MARGIN, Plan, TrainingConfig, assess, required_bytes
from memguard.units import format_bytes

POLICIES = ("auto", "abort", "warn")

class OutOfMemoryPredicted(MemguardError):
    """The run would not fit (under the policy in force), raised before its first step.

    ``decision`` carries the estimate, the capacity and the plan that would fit (if any).
    """

    def __init__(self, message: str, decision: Decision | None = None) -> None:
        super().__init__(message)
        self.decision = decision


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise unknown_name("policy", policy, POLICIES)
    return policy


@dataclass
class Capacity:
    """How much memory the run may use on its device, and where that number came from."""

    bytes: int
    source: str
    gpu: Any = None
    """The catalog entry of the local GPU, when known (kernels, bf16 support, context size)."""
    bf16: bool = True


def detect_capacity(device: torch.device, budget: int | None = None) -> Capacity:
    """The free memory of ``device`` now: NVML for a GPU (never creating a CUDA context), available host
    memory for the CPU. ``budget`` overrides the number (the GPU's kernels still come from NVML)."""
    if device.type == "cuda":
        from memguard.device import gpus
        from memguard.device.catalog import match_device

        index = device.index or 0
        found = gpus.discover(devices=[index])
        info = found.gpus[0] if found.gpus else None
        entry = match_device(info) if info is not None and info.error is None else None
        bf16 = bool(info.bf16) if info is not None and info.error is None else True
        if budget is not None:
            return Capacity(budget, "budget", entry, bf16)
        if info is None or info.error is not None:
            reason = found.error or (info.error if info is not None else "no GPU")
            raise MemguardError(f"cannot read the free memory of {device}: {reason}; pass budget=...")
        return Capacity(info.free_bytes, f"free memory of GPU {index} ({info.name}) from NVML", entry, bf16)
    if budget is not None:
        return Capacity(budget, "budget")
    import psutil

    return Capacity(int(psutil.virtual_memory().available), "available host memory (psutil)")


@dataclass
class Decision:
    """What memguard decided for a run: the estimate as configured, the capacity, and the plan.

    ``fits`` is True when the run fits as configured; ``plan`` is the cheapest configuration that fits
    (None when the configuration was kept, ``plan.fits`` False when nothing allowed fits).
    """

    fits: bool
    estimate: Estimate
    capacity_bytes: int
    config: TrainingConfig
    plan: Plan | None
    policy: str
    margin: float
    capacity_source: str = ""
    notes: list[str] = field(default_factory=list)
    """What the reader must know about this decision beyond the estimate (a forward-only example batch)."""
    device_type: str = "cuda"
    dialect: str = "lightning"
    """Whose words the plan's changes are given in: "lightning", "transformers" or "pytorch" (memguard.advice)."""

    @property
    def shown_plan(self) -> Plan | None:
        """The plan as this front end's user makes it by hand."""
        return self.plan.described_as(self.dialect) if self.plan is not None else None

    @property
    def required_bytes(self) -> int:
        return required_bytes(self.estimate, self.margin)

    @property
    def will_fit(self) -> bool:
        """Fits as configured, or with the plan."""
        return self.fits or (self.plan is not None and self.plan.fits)

    @property
    def chosen(self) -> TrainingConfig:
        """The configuration to train with: the plan's under auto when it fits, else the original."""
        if self.policy == "auto" and not self.fits and self.plan is not None and self.plan.fits:
            return self.plan.config
        return self.config

    @property
    def micro_batch_size(self) -> int:
        return self.chosen.micro_batch_size

    @property
    def accumulate_grad_batches(self) -> int:
        return self.chosen.accumulate_grad_batches

    def autocast(self) -> Any:
        """The autocast context for the chosen precision (a no-op context for full or "true" precision)."""
        import contextlib

        dtype = self.chosen.precision.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def fabric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``lightning.fabric.Fabric(...)`` that apply the chosen precision."""
        return {"precision": self.chosen.precision}

    def apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[Any, Any]:
        """Apply the chosen plan to a hand-written loop: checkpointing on the model, weights in half precision
        for a "true" half precision, the optimizer rebuilt as the new class over the same parameter groups.
        Mixed precision is applied by running the forward under :meth:`autocast`; the micro-batch size and
        accumulation steps are :attr:`micro_batch_size` and :attr:`accumulate_grad_batches`."""
        from memguard import checkpointing
        from memguard.optimizers import rebuild_optimizer

        chosen = self.chosen
        if chosen.gradient_checkpointing and not self.config.gradient_checkpointing:
            checkpointing.enable(model)
        dtype = chosen.precision.param_dtype
        if dtype is not None and chosen.precision != self.config.precision:
            model = model.to(dtype)
        if optimizer is not None and chosen.optimizer != self.config.optimizer:
            optimizer = rebuild_optimizer(optimizer, chosen.optimizer)
        return model, optimizer

    def __str__(self) -> str:
        from memguard.report import render_report

        return render_report(self.estimate, self.capacity_bytes, plan=self.shown_plan if not self.fits else None,
                             margin=self.margin, notes=self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "capacity_bytes": self.capacity_bytes,
            "capacity_source": self.capacity_source,
            "policy": self.policy,
            "margin": self.margin,
            "as_configured": self.estimate.to_dict(),
            "plan": None if self.plan is None else {
                "fits": self.plan.fits,
                "changes": [vars(c) for c in self.plan.changes],
                "config": self.plan.config.to_dict(),
                "device_bytes": self.plan.estimate.device_bytes,
                "peak_bytes": self.plan.estimate.peak_bytes,
            },
        }


def decide(
    config: TrainingConfig,
    evaluate: Callable[[TrainingConfig], Estimate],
    capacity: Capacity,
    *,
    policy: str = "auto",
    margin: float = DEFAULT_MARGIN,
    allow: Iterable[str] | None = None,
    allow_bf16_true: bool = False,
    optimizers_available: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    device_type: str = "cuda",
    dialect: str = "lightning",
) -> Decision:
    """Estimate ``config``; if it does not fit, search for the cheapest plan that does (all policies plan,
    so abort and warn can say what would have fit). ``optimizers_available`` may be a function, asked only
    when a plan is searched: finding out means importing bitsandbytes and torchao, about a second."""
    check_policy(policy)
    allow = None if allow is None else tuple(allow)

    def available() -> dict[str, Any]:  # asked only when a plan may change the optimizer
        if optimizers_available is None or (allow is not None and "optimizer" not in allow):
            return {}
        found = optimizers_available() if callable(optimizers_available) else optimizers_available
        return {"optimizers_available": tuple(found)}

    result = assess(config, evaluate, capacity.bytes, margin=margin, more=available, allow=allow,
                    bf16_supported=capacity.bf16, allow_bf16_true=allow_bf16_true)
    return Decision(result.fits, result.estimate, capacity.bytes, config, result.plan, policy, margin,
                    capacity.source, device_type=device_type, dialect=dialect)


def explain(decision: Decision) -> str:
    """The one-paragraph summary used in errors and warnings; the full report is ``str(decision)``."""

    need = format_bytes(decision.required_bytes)
    cap = format_bytes(decision.capacity_bytes)
    head = (f"memguard: predicted {need} needed (peak {format_bytes(decision.estimate.peak_bytes)} allocated, "
            f"{format_bytes(decision.estimate.device_bytes)} on the device, margin {decision.margin:.0%}) "
            f"against {cap} available ({decision.capacity_source}).")
    caveats = "".join(f" {note}" for note in decision.notes)
    plan = decision.shown_plan
    if decision.fits:
        return head + " It fits." + caveats
    if plan is not None and plan.fits:
        changes = "; ".join(str(c) for c in plan.changes)
        return head + f" It does not fit as configured. This plan fits ({format_bytes(plan.required_bytes)}): {changes}." + caveats
    if plan is not None:
        return head + (f" Nothing allowed fits; the closest ({format_bytes(plan.required_bytes)}) is: "
                       + ("; ".join(str(c) for c in plan.changes) or "as configured") + ".") + caveats
    return head + " It does not fit." + caveats


# ---------------------------------------------------------------------------------------------------------
# Optimizers of a live run, read for the estimate (rebuilding them for a plan: memguard.optimizers.swapping)


def optimizer_factory(optimizer: torch.optim.Optimizer, model: torch.nn.Module, device_type: str) -> tuple[Any, str]:
    """A factory that rebuilds ``optimizer`` (class, hyperparameters, parameter groups) over memguard's copies
    of ``model``'s trainable parameters, and the optimizer's catalog name. Its state is never read.

    Torch optimizers get the implementation the target device defaults to; bitsandbytes and torchao ones
    cannot run on shape-only tensors, so their catalog stand-in is used. Wrappers (accelerate's
    AcceleratedOptimizer, Lightning's LightningOptimizer) are looked through."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(trainable)}
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
        groups.append((hyper, [index[id(p)] for p in group["params"] if id(p) in index]))
    cls = type(optimizer)
    foreach = device_type == "cuda"

    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        built = []
        for hyper, idxs in groups:
            hyper = dict(hyper)
            if "foreach" in hyper and hyper["foreach"] is None and not hyper.get("fused"):
                hyper["foreach"] = foreach
            built.append({**hyper, "params": [params[i] for i in idxs]})
        return cls(built)

    from memguard.optimizers import catalog_name

    name = catalog_name(optimizer)
    if name is not None and cls.__module__.split(".")[0] in ("bitsandbytes", "torchao"):
        return name, name
    if name is not None and any(g.get("fused") for g in optimizer.param_groups):
        from memguard.optimizers import make_factory

        # torch's fused kernels have no shape-only implementation: the catalog's fused stand-in is exact
        return make_factory(name, "fused", device="cpu" if device_type == "cpu" else "cuda")[0], name
    return factory, name or cls.__name__


def optimizers_available() -> tuple[str, ...]:
    """The memory-saving optimizers the planner may switch to here (their library imports)."""
    from memguard.optimizers import CATALOG
    from memguard.plan import OPTIMIZER_CHOICES

    found = []
    for name in OPTIMIZER_CHOICES:
        row = CATALOG.get(name)
        if row is None:
            continue
        try:
            row.load_class()
        except Exception:  # noqa: BLE001 - library missing: the knob skips that optimizer
            continue
        found.append(name)
    return tuple(found)
