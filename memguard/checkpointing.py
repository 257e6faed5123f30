"""Turning activation checkpointing on, the same way for the trace and for a real run.

transformers models have their own switch (``gradient_checkpointing_enable``); for any other model the
repeated blocks (the longest ModuleList / Sequential of same-class children) are wrapped so each block's
forward runs under ``torch.utils.checkpoint`` and only its inputs are saved.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_WRAPPED = "_memguard_checkpointed"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The largest group of same-class siblings in a ModuleList / Sequential (the model's "layers")."""
    best: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        size = sum(p.numel() for c in children for p in c.parameters())
        best_size = sum(p.numel() for c in best for p in c.parameters())
        if size > best_size:
            best = children
    return best


def supports_hf_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and (
        hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")
    )


def _hf(model: nn.Module, new: str, old: str) -> Any:
    """transformers 5 renamed gradient_* to activation_*; use whichever this version has."""
    return getattr(model, new) if hasattr(model, new) else getattr(model, old)


def available(model: nn.Module) -> bool:
    """Whether :func:`enable` can turn checkpointing on for this model (the planner's knob needs it)."""
    return any(supports_hf_checkpointing(m) for m in model.modules()) or bool(repeated_blocks(model))


def enable(model: nn.Module) -> str:
    """Turn checkpointing on in ``model`` (in place); returns how, for reports. Raises if impossible.

    A transformers model anywhere inside (a LightningModule's ``self.model``) uses its own switch."""
    hf = next((m for m in model.modules() if supports_hf_checkpointing(m)), None)
    if hf is not None:
        model = hf
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "transformers gradient_checkpointing_enable()"
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no repeated blocks (a ModuleList or Sequential of same-class layers) "
            "to checkpoint; wrap its layers in torch.utils.checkpoint yourself"
        )
    for block in blocks:
        if getattr(block, _WRAPPED, False):
            continue
        block.forward = _checkpointed(block.forward)
        setattr(block, _WRAPPED, True)
    return f"torch.utils.checkpoint around {len(blocks)} x {type(blocks[0]).__name__}"


def disable(model: nn.Module) -> None:
    for module in model.modules():
        if supports_hf_checkpointing(module) and _hf_enabled(module):
            _hf(module, "activation_checkpointing_disable", "gradient_checkpointing_disable")()


def _hf_enabled(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _checkpointed(forward: Any) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def is_enabled(model: nn.Module) -> bool:
    if any(supports_hf_checkpointing(m) and _hf_enabled(m) for m in model.modules()):
        return True
    return any(getattr(m, _WRAPPED, False) for m in model.modules())
