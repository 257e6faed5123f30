"""Byte sizes in and out: the one place memguard reads a size written by a person or writes one for a
person. Everything else keeps int bytes."""

from __future__ import annotations

import re

from memguard.errors import InvalidArgumentError, unknown_name

KiB, MiB, GiB, TiB, PiB, EiB = 2**10, 2**20, 2**30, 2**40, 2**50, 2**60

BINARY = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB, "PiB": PiB, "EiB": EiB}
"""The units memguard writes sizes in."""

_READ = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15, "eb": 10**18,
         "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB, "pib": PiB, "eib": EiB}
"""The units memguard reads (case-insensitive): decimal GB = 10**9 beside binary GiB = 2**30."""


def unit_for(n: int) -> str:
    """The unit a table of sizes up to ``n`` is written in: the largest binary unit in which ``n`` is at
    least 1, so a 100 MiB budget reads "100.00 MiB", not "0.10 GiB"."""
    return next((u for u in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB") if abs(n) >= BINARY[u]), "B")


def format_bytes(n: int, unit: str = "auto") -> str:
    """``n`` bytes in a binary unit: ``"80.00 GiB"``, ``"512 B"``.

    ``unit="auto"`` picks the largest unit in which the magnitude is at least 1; otherwise one of
    ``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB``, ``EiB``. Negative sizes (differences) keep their sign.
    """
    if unit == "auto":
        unit = unit_for(n)
    if unit not in BINARY:
        raise unknown_name("unit", unit, ["auto", *BINARY])
    if unit == "B":
        return f"{int(n)} B"
    return f"{n / BINARY[unit]:.2f} {unit}"


def parse_bytes(value: int | float | str | None, what: str = "budget") -> int | None:
    """``12GiB``, ``"16 GB"``, ``8e9`` or an int -> bytes (GiB = 2**30, GB = 10**9)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidArgumentError(f"{what} must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match:
        raise InvalidArgumentError(f"{what} {value!r} is not a size; write e.g. 12GiB, 16GB or 8000000000")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit not in _READ:
        raise unknown_name(f"{what} unit", match.group(2), ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
    nbytes = int(number * _READ[unit])
    if nbytes <= 0:
        raise InvalidArgumentError(f"{what} must be positive, got {value!r}")
    return nbytes
