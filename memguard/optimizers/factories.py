"""From what a user gives to what the trace builds: :func:`make_factory` turns a catalog name, an optimizer
class or a factory into a factory over the traced parameters (the real torch class with the target
device's implementation, or the catalog's shape-only stand-in), and :func:`first_optimizer` finds the
optimizer in whatever a LightningModule's ``configure_optimizers`` returned.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from memguard.errors import InvalidArgumentError, unknown_name
from memguard.optimizers.catalog import CATALOG, OptimizerEntry, entry, entry_for_class
from memguard.optimizers.programs import IMPLEMENTATIONS
from memguard.optimizers.shape_only import Factory, stand_in

def first_optimizer(configured: Any) -> torch.optim.Optimizer | None:
    """The first optimizer in whatever ``configure_optimizers`` returned (an optimizer, lists, dicts)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        for item in configured:
            found = first_optimizer(item)
            if found is not None:
                return found
    return None


def _class_implementation(cls: type, kwargs: Mapping[str, Any], requested: str) -> str:
    if cls.__module__.startswith("lion_pytorch"):
        if cls.__module__.endswith("foreach"):
            return "foreach"
        return "fused" if kwargs.get("use_triton") else "for-loop"
    return requested


def make_factory(
    optimizer: str | type | Factory | None,
    implementation: str,
    kwargs: dict[str, Any] | None = None,
    *,
    device: str = "cuda",
) -> tuple[Factory | None, str]:
    """Turn what the user passed into ``(factory, label)``; the factory builds the optimizer over params.

    ``implementation`` ("for-loop", "foreach", "fused") is applied to torch optimizers that take it, so
    the trace follows the code path the target device would run; torch's fused kernels (which have no
    meta implementation), bitsandbytes, torchao and Lion run as the catalog's stand-ins, whether named or
    passed as their class. ``device`` ("cuda" or "cpu") decides where paged state goes and which
    bitsandbytes backend's scratch is modelled. Libraries are not needed to trace their stand-ins, only to
    swap the real class in (:func:`real_class`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise unknown_name("optimizer implementation", implementation, IMPLEMENTATIONS)
    kwargs = dict(kwargs or {})
    if optimizer is None:
        return None, "none"
    if isinstance(optimizer, (str, OptimizerEntry)):
        row = entry(optimizer)
        options = row.options(implementation, device, kwargs)
        if row.runs_real(options):
            cls = row.load_class()
            merged = dict(options.kwargs)
            impl_kwargs = _impl_kwargs(cls, implementation, merged)
            return _class_factory(cls, {**merged, **impl_kwargs}), row.name
        return stand_in(row, options), row.name
    if inspect.isclass(optimizer):
        row = entry_for_class(optimizer)
        if row is not None:
            impl = _class_implementation(optimizer, kwargs, implementation)
            options = row.options(impl, device, kwargs, with_defaults=False)
            if not row.runs_real(options):
                return stand_in(row, options), optimizer.__name__
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"optimizer class {optimizer.__name__} is not a torch.optim.Optimizer")
        impl_kwargs = _impl_kwargs(optimizer, implementation, kwargs)
        return _class_factory(optimizer, {**kwargs, **impl_kwargs}), optimizer.__name__
    if callable(optimizer):
        return optimizer, getattr(optimizer, "__name__", "factory")
    raise InvalidArgumentError(
        f"optimizer must be a name ({', '.join(sorted(CATALOG))}), an optimizer class or a factory "
        f"params -> optimizer; got {type(optimizer).__name__}"
    )


def _class_factory(cls: type, kwargs: dict[str, Any]) -> Factory:
    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return cls(params, **kwargs)

    return factory


def _accepts(cls: type, arg: str) -> bool:
    try:
        return arg in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _impl_kwargs(cls: type, implementation: str, given: Mapping[str, Any]) -> dict[str, Any]:
    if "foreach" in given or "fused" in given:
        return {}  # the user chose; respect it
    out: dict[str, Any] = {}
    if _accepts(cls, "foreach"):
        out["foreach"] = implementation == "foreach"
    if implementation == "fused" and _accepts(cls, "fused"):
        out["fused"] = True
        out["foreach"] = False
    return out
