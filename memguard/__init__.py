"""memguard: predict the peak GPU memory of a training run before it starts, and act on it."""

from memguard.categories import Category
from memguard.errors import InvalidArgumentError, MemguardError, TraceError
from memguard.estimate import Estimate, TimelinePoint, estimate
from memguard.precision import Precision

__version__ = "0.1.0"

__all__ = [
    "Category",
    "Estimate",
    "InvalidArgumentError",
    "MemguardError",
    "Precision",
    "TimelinePoint",
    "TraceError",
    "estimate",
]
