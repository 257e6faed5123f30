"""The losses memguard traces a LightningModule with: its own ``training_step``, or, with only an
``example_input_array``, its forward summed into a scalar. One place, for the callback and for configs.

Nothing here is Lightning-specific beyond the method names, so nothing imports Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memguard.errors import InvalidArgumentError


def silence_logging(model: nn.Module) -> None:
    """``self.log`` / ``log_dict`` / ``print`` inside ``training_step`` need a Trainer and must not reach a
    real one while memguard traces a copy: on the copy they become no-ops."""
    for name in ("log", "log_dict", "print"):
        if hasattr(model, name):
            setattr(model, name, lambda *a, **k: None)


def training_step_loss(model: nn.Module, batch: Any, *, instead: str = "pass loss_fn=...") -> torch.Tensor:
    """The module's own ``training_step(batch, 0)``: its loss tensor, or ``["loss"]`` of a returned mapping.
    ``instead`` says, in the caller's words, what to do when it returns none (manual optimization)."""
    silence_logging(model)
    out = model.training_step(batch, 0)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(f"training_step returned no loss tensor (manual optimization?); {instead}")
    return out


def forward_sum_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``forward(example_input_array)`` as Lightning calls it (a tuple or list spread into arguments, a
    mapping into keywords), every floating-point output summed into a scalar to backpropagate."""
    if isinstance(batch, (tuple, list)):
        out = model(*batch)
    elif isinstance(batch, Mapping):
        out = model(**batch)
    else:
        out = model(batch)
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise InvalidArgumentError(f"{type(model).__name__}.forward returned no floating-point tensor to "
                                   "backpropagate; give an example batch so that training_step is traced")
    return sum(t.float().sum() for t in leaves)
