"""The checks every entry point shares (config files, the command line, ``estimate``, ``preflight``, the
callbacks, sizing): one function per kind of value, each raising :class:`InvalidArgumentError` that names
the argument and says what would be valid. The config loader turns the same errors into problems listed
with their file and key, so a value means the same and fails the same way wherever it is given.

Bottom layer: imports nothing from memguard but :mod:`memguard.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from memguard.errors import InvalidArgumentError, unknown_name

MAX_COUNT = 2**31 - 1
"""The largest batch size, sequence length, image side or device count memguard accepts: far beyond any
run (a batch of two billion samples), and small enough that a tensor built from such sizes keeps its
element count inside int64."""


def positive_int(value: Any, name: str, *, limit: int = MAX_COUNT) -> int:
    """A whole number from 1 to ``limit``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {_show(value)}")
    if value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value}")
    if value > limit:
        raise InvalidArgumentError(f"{name} must be at most {limit:,} (the largest size memguard accepts), got {value:,}")
    return value


def number(value: Any, name: str, *, low: float, high: float, low_open: bool = False,
           high_open: bool = False) -> float:
    """A finite real number between ``low`` and ``high``, each end included unless ``*_open``."""
    if isinstance(value, str) and value.strip().endswith("%"):
        raise InvalidArgumentError(f"{name} is a fraction, not a percentage: give 0.05 for 5%, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise InvalidArgumentError(f"{name} must be {'>' if low_open else '>='} {low:g} and "
                                   f"{'<' if high_open else '<='} {high:g}, got {value:g}")
    return float(value)


def margin(value: Any, name: str = "margin") -> float:
    """The safety margin: a fraction in [0, 1) of the predicted need (0.05 = 5%)."""
    return number(value, name, low=0.0, high=1.0, high_open=True)


def names(value: Any, name: str, valid: Iterable[str], kind: str) -> tuple[str, ...]:
    """A list of names (knobs, say): a list or tuple of strings, or one string holding one name or several
    separated by commas ("precision,optimizer"); each must be one of ``valid``."""
    valid = tuple(valid)
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = list(value)
    else:
        raise InvalidArgumentError(f"{name} must be a list of {kind}s ({', '.join(valid)}), got {_show(value)}")
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgumentError(f"{name} must hold {kind} names, got {_show(item)}")
        if item not in valid:
            raise InvalidArgumentError(f"{name}: {unknown_name(kind, item, valid)}")
    return tuple(items)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


__all__ = ["MAX_COUNT", "margin", "names", "number", "positive_int"]
