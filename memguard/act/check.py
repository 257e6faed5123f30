"""``memguard check``: estimate a configuration on each target GPU and plan where it does not fit.

Pure apart from NVML when no target is given or configured; the command line (memguard.cli) prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from memguard import strategies
from memguard.device import gpus as local_gpus
from memguard.spec.check_spec import CheckSpec
from memguard.errors import MemguardError
from memguard.device.catalog import lookup, match_device
from memguard.plan import TrainingConfig, assess, estimator
from memguard.results import CheckResult, Estimate, Target, TargetResult
from memguard.trace import TRACED_MICRO_BATCHES


def resolve_targets(spec: CheckSpec) -> list[Target]:
    """The spec's GPUs from the catalog; without any, the GPUs of this machine (free memory, from NVML)."""
    if spec.gpus:
        out = []
        for name in spec.gpus:
            gpu = lookup(name)
            out.append(Target(gpu.name, gpu.usable_bytes, "catalog: usable memory", gpu, gpu.bf16))
        return out
    found = local_gpus.discover()
    usable = [g for g in found.gpus if g.error is None]
    if not usable:
        reason = found.error or "; ".join(f"GPU {g.index}: {g.error}" for g in found.gpus) or "none found"
        raise MemguardError(f"no GPU to check against ({reason}); pass --gpu NAME "
                            "(memguard gpus --catalog lists the names)")
    return [Target(g.name, g.free_bytes, f"GPU {g.index}: free memory now (NVML)", match_device(g), g.bf16, g.index)
            for g in usable]


def run_check(spec: CheckSpec, targets: Sequence[Target] | None = None) -> CheckResult:
    """Estimate the configuration on each target and, where it does not fit and fallbacks are allowed,
    plan the cheapest change that does. Pure apart from NVML when no target is given or configured.

    Targets of the same GPU model share their estimates: only the capacity differs.
    """
    targets = list(targets) if targets is not None else resolve_targets(spec)
    model = spec.model_factory()
    notes = list(spec.notes) + _strategy_notes(spec)
    if spec.training.accumulate_grad_batches > TRACED_MICRO_BATCHES:
        notes.append(f"accumulate_grad_batches {spec.training.accumulate_grad_batches}: traced with "
                     f"{TRACED_MICRO_BATCHES} micro-batches per step; later ones repeat the second exactly, so the "
                     "peak is the same")
    evaluators: dict[str | None, Callable[[TrainingConfig], Estimate]] = {}
    results = []
    for target in targets:
        key = target.catalog.name if target.catalog is not None else None
        if key not in evaluators:
            evaluators[key] = _evaluator(spec, model, target.catalog)
        found = assess(spec.training, evaluators[key], target.capacity_bytes, margin=spec.margin,
                       search=spec.fallback and spec.allow != (), allow=spec.allow, bf16_supported=target.bf16,
                       world_size=spec.world_size or 1, strategy=spec.strategy)
        results.append(TargetResult(target, found.estimate, found.required_bytes, found.fits, found.plan,
                                    notes=_target_notes(spec, target)))
    params = list(model.parameters())  # tied weights once
    return CheckResult(spec, results, notes, parameters=sum(p.numel() for p in params),
                       trainable=sum(p.numel() for p in params if p.requires_grad))



def _evaluator(spec: CheckSpec, model: nn.Module, gpu: Any) -> Callable[[TrainingConfig], Estimate]:
    """The planner's estimate function for one GPU model (memoised per configuration, traces shared)."""
    return estimator(
        model,
        spec.batch,
        optimizers={spec.training.optimizer: {"optimizer": spec.optimizer, "optimizer_kwargs": spec.optimizer_kwargs}},
        gradient_checkpointing=spec.gradient_checkpointing,
        loss_fn=spec.loss_fn,
        device="cuda",
        gpu=gpu,
        zero_grad_before_backward=spec.zero_grad_before_backward,
        on_untraceable="bound",
        quantization=spec.quantization,
        compile=spec.compile if spec.compile is not None else False,
        **_distributed(spec),
    )


def _distributed(spec: CheckSpec) -> dict[str, Any]:
    """estimate()'s strategy arguments: per-rank prediction for several ranks (or an explicit strategy)."""
    world = spec.world_size or 1
    if world == 1 and (spec.strategy is None or strategies.is_single_process(spec.strategy)):
        return {}
    return {"strategy": spec.strategy, "world_size": world, "num_nodes": spec.num_nodes or 1}


def _strategy_notes(spec: CheckSpec) -> list[str]:
    """What the numbers mean under the configured strategy and device count."""
    if spec.world_size is None:
        return ["the number of devices is decided at run time (devices: auto): predicted for one device"]
    if spec.world_size == 1:
        return []
    return [f"strategy {spec.strategy!r} over {spec.world_size} devices ({spec.devices} per node x {spec.num_nodes} "
            f"node{'s' if spec.num_nodes > 1 else ''}): the numbers are the largest rank's"]


def _target_notes(spec: CheckSpec, target: Target) -> list[str]:
    notes = []
    if spec.training.precision.startswith("bf16") and not target.bf16:
        notes.append(f"{target.name} has no native bfloat16: Lightning will refuse precision "
                     f"{spec.training.precision!r} there; use '16-mixed'")
    if target.catalog is None:
        notes.append(f"{target.name} is not in memguard's GPU catalog: kernels and CUDA context modelled as an "
                     "sm80-class GPU")
    return notes
