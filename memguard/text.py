"""The few lines ``print(estimate)`` shows, and the text tables and holder sections every report shares.

Below :mod:`memguard.report` (which adds verdicts, plans, JSON and plots) and below the estimate itself,
so that ``Estimate.__str__`` renders without importing the report layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memguard.categories import ALLOCATED_CATEGORIES, Category
from memguard.units import format_bytes

if TYPE_CHECKING:
    from memguard.results import Estimate

_NAMES = {Category.OPTIMIZER_STATE: "optimizer state", Category.ALLOCATOR: "allocator cache",
          Category.CONTEXT: "CUDA context"}
_ORDER = (*ALLOCATED_CATEGORIES, Category.ALLOCATOR, Category.CONTEXT)
"""Report order: allocated categories, then what the device holds on top of them."""



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


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


# ---------------------------------------------------------------------------------------------------------
# Where the memory goes: the largest holders at the peak

HOLDER_ROWS = 8
"""Modules listed in the report's holders section (kinds: ``KIND_ROWS``); the JSON keeps them all."""
KIND_ROWS = 6


def _short(kind: str) -> str:
    """Kinds as the report's tables show them: "(saved)" for what autograd keeps for backward."""
    return kind.replace(" (saved for backward)", " (saved)")


def _parts(parts: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{_short(name)} {format_bytes(n)}" for name, n in parts)


def holders_section(estimate: Estimate, modules: int = HOLDER_ROWS, kinds: int = KIND_ROWS) -> str:
    """Which modules and which kinds of tensors hold the memory at the peak: the largest module patterns
    (repeated blocks merged, ``xN`` how many) with their largest kinds, then the largest kinds with the
    modules holding them. Sizes sum over every block a pattern stands for."""
    by_module = estimate.top_holders(modules, by="module", parts=2)
    rows = [[g.name, f"x{g.count}" if g.count > 1 else "", format_bytes(g.bytes), _parts(g.parts)]
            for g in by_module]
    table = render_table(["module", "", "size", "largest kinds"], rows, align="<<><")
    by_kind = estimate.top_holders(kinds, by="kind", parts=2)
    kind_rows = [[_short(g.name), _NAMES.get(g.category, str(g.category)), format_bytes(g.bytes), _parts(g.parts)]
                 for g in by_kind]
    kind_table = render_table(["kind", "category", "size", "largest holders"], kind_rows, align="<<><")
    return (f"Largest holders at the peak ({estimate.peak_phase}; \"*\" merges repeated blocks, xN counts them):\n"
            + _indent(table) + "\n\nLargest kinds of tensors at the peak (aten.*: the operator that made them; "
            "(saved): kept for backward):\n" + _indent(kind_table))


def render_estimate(estimate: Estimate, modules: int = 5, kinds: int = 5) -> str:
    """A few lines for ``print(estimate)``: the peak and what holds it, in adaptive units."""
    e = estimate
    lines = [f"memguard estimate: peak {format_bytes(e.peak_bytes)} allocated ({e.peak_phase or 'no phase'}), "
             f"{format_bytes(e.reserved_bytes)} reserved, {format_bytes(e.device_bytes)} on the device",
             f"device {e.device}, precision {e.precision or '?'}, optimizer {e.optimizer or '?'}"
             + (" (approximate)" if e.approximate else "")]
    if e.compiled:
        lines.append(e.compiled)
    parts = [(_NAMES.get(c, c.value), e.breakdown.get(c, 0)) for c in _ORDER if e.breakdown.get(c, 0)]
    if parts:
        lines.append("breakdown: " + _parts(parts))
    if e.bound_bytes > e.peak_bytes:
        lines.append(f"routing bound: {format_bytes(e.bound_bytes)} allocated under the skewed routing "
                     "(the peak above assumes balanced routing)")
    if e.holders:
        lines.append(holders_section(e, modules, kinds))
    return "\n".join(lines)
