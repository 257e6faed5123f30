"""memguard: predict the peak GPU memory of a training run before it starts, and act on it.

The public names are imported on first use, so ``memguard gpus`` and ``memguard check`` start without
loading torch or Lightning before they need them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "estimate": "memguard.estimation",
    "Estimate": "memguard.results",
    "TimelinePoint": "memguard.results",
    "preflight": "memguard.preflight",
    "Decision": "memguard.guard",
    "OutOfMemoryPredicted": "memguard.guard",
    "MemGuard": "memguard.callback",
    "Category": "memguard.categories",
    "Precision": "memguard.precision",
    "MemguardError": "memguard.errors",
    "InvalidArgumentError": "memguard.errors",
    "TraceError": "memguard.errors",
    "TrainingConfig": "memguard.plan",
    "Plan": "memguard.plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """Importing a submodule that shares its name with a public function (memguard.preflight) must not hide the function: Python sets the package attribute on import."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and _EXPORTS[name] == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
