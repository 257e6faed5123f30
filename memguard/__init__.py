"""memguard: predict the peak GPU memory of a training run before it starts, and act on it.

The public names are imported on first use, so ``memguard gpus`` and ``memguard check`` start without
loading torch or Lightning before they need them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "estimate": "memguard.estimation",
    "Estimate": "memguard.results",
    "TimelinePoint": "memguard.results",
    "preflight": "memguard.act.preflight",
    "Decision": "memguard.act.guard",
    "OutOfMemoryPredicted": "memguard.act.guard",
    "MemGuard": "memguard.act.callback",
    "Category": "memguard.categories",
    "Precision": "memguard.precision",
    "MemguardError": "memguard.errors",
    "InvalidArgumentError": "memguard.errors",
    "TraceError": "memguard.errors",
    "TrainingConfig": "memguard.plan",
    "Plan": "memguard.plan",
    "max_batch_size": "memguard.sizing",
    "max_seq_len": "memguard.sizing",
    "SizeResult": "memguard.sizing",
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
