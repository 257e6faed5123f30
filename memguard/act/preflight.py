"""``memguard.preflight``: the same guard as the Lightning callback for any training loop (plain PyTorch,
Lightning Fabric, the transformers Trainer through memguard.integrations.hf)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from memguard import checkpointing, validation
from memguard.act.guard import (
    Decision,
    OutOfMemoryPredicted,
    check_policy,
    decide,
    detect_capacity,
    explain,
    optimizer_factory,
    optimizers_available,
)
from memguard.optimizers import catalog_name
from memguard.plan import DEFAULT_MARGIN, KNOBS, TrainingConfig, batch_size_of, estimator
from memguard.precision import Precision
from memguard.quiet import quiet
from memguard.units import parse_bytes


def preflight(
    model: nn.Module,
    batch: Any,
    *,
    optimizer: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    precision: str = "32-true",
    device: str | torch.device | None = None,
    budget: int | str | None = None,
    policy: str = "abort",
    allow: Iterable[str] | None = None,
    margin: float = DEFAULT_MARGIN,
    gradient_checkpointing: bool | None = None,
    accumulate_grad_batches: int = 1,
    quantization: str | None = None,
    dialect: str = "pytorch",
    compile: bool | str | dict | None = None,
) -> Decision:
    """Check a run before its first step: predict, compare with the device, then act by ``policy``.

    ``optimizer`` may be a live optimizer (its class, hyperparameters and parameter groups are read, its
    state never touched), a catalog name, a class or a factory. ``device=None`` means the GPU this process
    will use if there is one, else the CPU (available host memory). ``budget`` overrides the capacity.

    abort: raises :class:`memguard.OutOfMemoryPredicted` (with the report) unless the run fits as
    configured. warn: warns and returns. auto: returns a Decision whose plan the caller applies with
    ``model, optimizer = decision.apply(model, optimizer)``, ``decision.autocast()`` and
    ``decision.micro_batch_size`` / ``decision.accumulate_grad_batches``; raises if nothing fits.

    The traced step is a plain loop's (forward, backward, optimizer step, zero_grad); every report says
    so. ``dialect`` words the plan for the loop it is applied to ("pytorch", "lightning" for Fabric users
    who think in Trainer arguments, "transformers"). ``compile`` is :func:`memguard.estimate`'s: a model
    compiled with torch.compile is predicted compiled without it.
    """
    check_policy(policy)
    margin = validation.margin(margin, "preflight(margin=)")
    if allow is not None:
        allow = validation.names(allow, "preflight(allow=)", KNOBS, "knob")
    target = _device(device)
    capacity = detect_capacity(target, parse_bytes(budget))
    factory, name = _optimizer(optimizer, model, target.type)
    config = TrainingConfig(precision=Precision.parse(precision), optimizer=name,
                            micro_batch_size=batch_size_of(batch), accumulate_grad_batches=accumulate_grad_batches,
                            gradient_checkpointing=bool(gradient_checkpointing))
    fixed: dict[str, Any] = {"loss_fn": loss_fn, "device": "cuda" if target.type == "cuda" else "cpu",
                             "quantization": quantization, "compile": compile}
    if target.type == "cuda" and capacity.gpu is not None:
        fixed["gpu"] = capacity.gpu

    evaluate = estimator(model, batch, optimizers={name: {"optimizer": factory}},
                         gradient_checkpointing=gradient_checkpointing, **fixed)
    knobs = tuple(k for k in (allow if allow is not None else ("precision", "optimizer", "micro_batch",
                                                                 "checkpointing"))
                  if k != "checkpointing" or checkpointing.available(model))
    with quiet():  # tracing and planning (torch's logs, the optimizer libraries' imports)
        decision = decide(config, evaluate, capacity, policy=policy, margin=margin, allow=knobs,
                          optimizers_available=optimizers_available, device_type=target.type, dialect=dialect)
    if decision.fits:
        return decision
    message = explain(decision)
    if policy == "warn":
        warnings.warn(message, stacklevel=2)
        return decision
    if policy == "abort" or not decision.will_fit:
        raise OutOfMemoryPredicted(message + "\n\n" + str(decision), decision)
    return decision


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    from memguard.device import gpus

    found = gpus.discover()
    return torch.device("cuda", 0) if found.gpus and found.gpus[0].error is None else torch.device("cpu")


def _optimizer(optimizer: Any, model: nn.Module, device_type: str) -> tuple[Any, str]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer_factory(optimizer, model, device_type)
    if isinstance(optimizer, str):
        return optimizer, optimizer.strip().lower().replace("-", "_")
    if isinstance(optimizer, type):
        return optimizer, catalog_name(optimizer) or optimizer.__name__
    return optimizer, getattr(optimizer, "__name__", "factory")
