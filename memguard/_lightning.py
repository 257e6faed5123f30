"""The one module that imports Lightning, under either of its names.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same Trainer under two package names, and a
Trainer only accepts callbacks derived from its own package's Callback. MemGuard therefore derives from
every installed one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def installed() -> list[ModuleType]:
    """The Lightning packages that import here, ``lightning.pytorch`` first."""
    found = []
    for name in _PACKAGES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


def require() -> list[ModuleType]:
    found = installed()
    if not found:
        raise ImportError(
            "memguard's MemGuard callback needs PyTorch Lightning: pip install 'memguard[lightning]' "
            "(or pip install lightning)"
        )
    return found


def package_of(trainer: object) -> ModuleType:
    """The Lightning package a Trainer instance comes from."""
    for module in installed():
        if isinstance(trainer, module.Trainer):
            return module
    return require()[0]


def callback_bases() -> tuple[type, ...]:
    return tuple(m.Callback for m in require())


def package_of_module(module: object) -> ModuleType | None:
    """The Lightning package a LightningModule instance comes from (None for a plain nn.Module)."""
    for package in installed():
        if isinstance(module, package.LightningModule):
            return package
    return None
