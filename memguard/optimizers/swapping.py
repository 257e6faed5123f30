"""Swapping an optimizer class into a live run: the one path that rebuilds a running optimizer as a catalog
row's real class (:func:`swap_plan` and :meth:`SwapPlan.build`, :func:`rebuild_optimizer` for a single
optimizer), used by the Lightning callback and ``Decision.apply``; :func:`repoint_scheduler`, which moves
an LR scheduler onto the rebuilt optimizer; and :func:`real_class` / :func:`available`, which say whether
the class can be imported here.

Kept apart from the catalog because it imports the optional libraries (bitsandbytes, torchao,
lion-pytorch) and touches real optimizers, while everything the estimate needs runs without them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import wraps
from typing import Any
from weakref import ref

import torch

from memguard.errors import InvalidArgumentError
from memguard.optimizers.catalog import OptimizerEntry, _import, entry, entry_for_class

def real_class(name: str | OptimizerEntry) -> type:
    """Import and return the real optimizer class of a catalog row (for 8-bit Adam/AdamW, bitsandbytes
    first and torchao when bitsandbytes is missing); a clear error names what to install."""
    return swap_plan(name).cls


def available(name: str | OptimizerEntry) -> bool:
    """Whether :func:`real_class` can build this optimizer in this environment."""
    try:
        real_class(name)
    except InvalidArgumentError:
        return False
    return True


SHARED_MEANING = ("lr", "weight_decay", "betas", "eps", "momentum")
"""Hyperparameters that mean the same thing in every optimizer class that takes them in the same form, so
a swap carries them over. The form is checked against the new class's default: ``eps`` is a float in
AdamW and a pair in torch's Adafactor, so Adafactor keeps its own. Every other hyperparameter takes the
new class's default, since it names a feature the new class may lack or treat differently (``amsgrad``,
``foreach``, ``fused``, ``decoupled_weight_decay``, ``maximize``)."""


@dataclass(frozen=True)
class SwapPlan:
    """How to replace a running optimizer by a catalog row's real class: the one rebuild path used by the
    Lightning callback and ``Decision.apply``.

    ``name`` is the row whose class is built (an alternative's when the first choice is missing: estimate
    with it), ``cls`` the class, ``defaults`` the row's own defaults (momentum for "sgd_momentum"),
    ``signature`` the keyword arguments ``cls`` takes with their defaults (None: it takes ``**kwargs``).
    """

    name: str
    cls: type
    defaults: dict[str, Any]
    signature: dict[str, Any] | None

    def param_groups(self, old: torch.optim.Optimizer) -> list[dict[str, Any]]:
        """The old groups re-keyed for ``cls``: the :data:`SHARED_MEANING` hyperparameters it takes are kept
        when their form matches its default's (a pair of betas stays a pair), keys no optimizer defines (a
        scheduler's ``initial_lr``, group names) are kept, the row's defaults fill in, and everything else
        is left to ``cls``'s own defaults."""
        groups = []
        for g in old.param_groups:
            new: dict[str, Any] = {"params": g["params"]}
            for key, value in g.items():
                if key == "params":
                    continue
                if key not in old.defaults:  # not a hyperparameter: scheduler bookkeeping, a group's name
                    new[key] = value
                elif key in SHARED_MEANING and self._takes(key, value):
                    new[key] = value
            for key, value in self.defaults.items():
                if self._takes(key, value):
                    new.setdefault(key, value)
            groups.append(new)
        return groups

    def _takes(self, key: str, value: Any) -> bool:
        if self.signature is None:
            return True
        if key not in self.signature:
            return False
        return _same_form(self.signature[key], value)

    def build(self, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """A new ``cls`` over the old optimizer's parameters and hyperparameters (fresh state)."""
        return self.cls(self.param_groups(old))


def _same_form(default: Any, value: Any) -> bool:
    """Whether ``value`` can stand where the class's ``default`` stands: a pair for a pair, a number (or a
    tensor, torchao's learning rate) for a number; a default of None accepts anything."""
    if default is None or default is inspect.Parameter.empty:
        return True
    if isinstance(default, (tuple, list)) or isinstance(value, (tuple, list)):
        return isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)) and len(default) == len(value)
    numeric = (int, float, torch.Tensor)
    return not isinstance(default, numeric) or isinstance(value, numeric)


def rebuild_optimizer(old: torch.optim.Optimizer, name: str | OptimizerEntry) -> torch.optim.Optimizer:
    """The optimizer a plan swaps in: catalog row ``name``'s real class over ``old``'s parameter groups."""
    return swap_plan(name).build(old)


def swap_plan(name: str | OptimizerEntry) -> SwapPlan:
    """The plan to build ``name``'s real class over a running optimizer's parameter groups."""
    row = entry(name)
    try:
        cls = row.load_class()
    except InvalidArgumentError as missing:
        for path in row.alternatives:
            alt = entry_for_class(path)
            try:
                cls = _import(path, row)
            except InvalidArgumentError:
                continue
            return SwapPlan(alt.name if alt else row.name, cls, dict(row.defaults), _signature(cls))
        raise missing
    return SwapPlan(row.name, cls, dict(row.defaults), _signature(cls))


def _signature(cls: type) -> dict[str, Any] | None:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p.default for k, p in params.items() if k not in ("self", "params")}


def repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler at a new optimizer and re-install its step-counting wrapper (the one
    LRScheduler.__init__ puts on ``optimizer.step`` to detect calls in the wrong order)."""
    scheduler.optimizer = optimizer
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = ref(optimizer)
    func = optimizer.step.__func__

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
