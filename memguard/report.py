"""Rendering for people: byte sizes with units and plain text tables.

Sizes are ``int`` bytes everywhere else in memguard; units appear only here. Binary units throughout
(KiB = 2**10, MiB = 2**20, GiB = 2**30, TiB = 2**40), always spelled with the "i" so nobody mistakes them
for the decimal GB (10**9) of spec sheets.
"""

from __future__ import annotations

from collections.abc import Sequence

from memguard.errors import unknown_name

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def format_bytes(n: int, unit: str = "auto") -> str:
    """``n`` bytes in a binary unit: ``"80.00 GiB"``, ``"512 B"``.

    ``unit="auto"`` picks the largest unit in which the magnitude is at least 1; otherwise one of
    ``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB``. Negative sizes (differences) keep their sign.
    """
    if unit == "auto":
        unit = next((u for u in ("TiB", "GiB", "MiB", "KiB") if abs(n) >= _UNITS[u]), "B")
    if unit not in _UNITS:
        raise unknown_name("unit", unit, ["auto", *_UNITS])
    if unit == "B":
        return f"{int(n)} B"
    return f"{n / _UNITS[unit]:.2f} {unit}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A plain text table: a header line, a rule, then one line per row, columns two spaces apart.

    ``align`` has one character per column, ``"<"`` (left) or ``">"`` (right); by default text columns
    are left-aligned and columns whose cells are all numbers right-aligned. Cells become ``str(cell)``.
    """
    cells = [[str(c) for c in row] for row in rows]
    width = len(headers)
    for row in cells:
        if len(row) != width:
            raise ValueError(f"row {row!r} has {len(row)} cells; the table has {width} columns")
    align = align or "".join(_default_align(rows, col) for col in range(width))
    if len(align) != width or set(align) - {"<", ">"}:
        raise ValueError(f"align must be {width} characters of '<' or '>', got {align!r}")
    widths = [max([len(headers[c])] + [len(r[c]) for r in cells]) for c in range(width)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _default_align(rows: Sequence[Sequence[object]], col: int) -> str:
    """Right for a column of numbers, left otherwise."""
    values = [row[col] for row in rows]
    numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return ">" if numeric else "<"
