"""``memguard check --plot``: the breakdown and the step timeline as a PNG (matplotlib) or a self-contained
HTML page (inline SVG)."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from memguard.categories import Category
from memguard.errors import InvalidArgumentError
from memguard.text import _NAMES, _ORDER, holders_section
from memguard.units import GiB

if TYPE_CHECKING:  # importing them here would load torch for `memguard gpus`
    from memguard.results import CheckResult, Estimate

_COLORS = {
    Category.PARAMETERS: "#4e79a7", Category.GRADIENTS: "#f28e2b", Category.OPTIMIZER_STATE: "#e15759",
    Category.ACTIVATIONS: "#76b7b2", Category.TEMPORARIES: "#59a14f", Category.INPUTS: "#edc948",
    Category.WORKSPACE: "#b07aa1", Category.OTHER: "#9c755f", Category.ALLOCATOR: "#bab0ac",
    Category.CONTEXT: "#79706e",
}


# ---------------------------------------------------------------------------------------------------------
# Plots: PNG (matplotlib) or a self-contained HTML page (inline SVG)


def plot(result: CheckResult, path: str | os.PathLike) -> Path:
    """Draw the breakdown of each GPU's estimate (and plan) against its capacity, and the step timeline of
    the deciding GPU against the capacity, to ``path``: ``.png`` with matplotlib, ``.html`` / ``.htm`` as a
    page with inline SVG and no external assets."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise InvalidArgumentError(f"cannot plot to {path.name!r}: the file must end in .png, .html or .htm")
    bars, timelines, limits = _plot_data(result)
    deciding = result.deciding.estimate
    spans = phase_spans(deciding)
    title = f"memguard check {result.spec.path}: {result.spec.model_label}"
    if suffix == ".png":
        _plot_png(path, title, bars, timelines, limits, spans)
    else:
        holders = holders_section(deciding) if deciding.holders else ""
        path.write_text(_plot_html(title, bars, timelines, limits, spans, holders), encoding="utf-8")
    return path


def phase_spans(est: Estimate) -> list[tuple[str, int, int]]:
    """The timeline's phases as ``(label, first event, end event)``, in order: what the plots shade and
    label along the x-axis ("step1 forward", "step1 backward", "step1 optimizer", ...). Empty phases
    (a zero_grad that frees without allocating still spans its frees) are kept; setup is left out."""
    if not est.timeline:
        return []
    end = est.timeline[-1].index + 1
    starts = [(start, name) for start, name in est.phases if name != "setup"]
    spans = []
    for (start, name), (stop, _) in zip(starts, [*starts[1:], (end, "")]):
        if stop > start:
            spans.append((name.replace(".", " "), start, stop))
    return spans


_SPAN_COLORS = {"forward": "#e8f1fa", "backward": "#fbeee0", "optimizer": "#f6e3e3"}
"""Light shades behind the timeline by phase kind; other phases (zero_grad, init) stay white."""


def _span_color(label: str) -> str | None:
    return next((c for key, c in _SPAN_COLORS.items() if label.endswith(key)), None)


PLOT_SUFFIXES = (".png", ".html", ".htm")


def _plot_data(result: CheckResult) -> tuple[list, list, list]:
    """What both renderers draw, in GiB: bars (label, [(category, GiB)], capacity GiB), timelines (label,
    [(index, GiB)]) of the deciding GPU, and horizontal limits (label, GiB)."""
    margin = result.spec.margin
    bars = []
    for t in result.targets:
        ests = [("as configured", t.estimate)] + ([("with plan", t.plan.estimate)] if t.plan is not None else [])
        for label, est in ests:
            parts = [(c, est.breakdown.get(c, 0) / GiB) for c in _ORDER if est.breakdown.get(c, 0) > 0]
            bars.append((f"{t.target.name} {label}", parts, t.target.capacity_bytes / GiB))
    deciding = result.deciding
    ests = [("as configured", deciding.estimate)]
    if deciding.plan is not None:
        ests.append(("with plan", deciding.plan.estimate))
    timelines = [(label, [(p.index, p.allocated_bytes / GiB) for p in est.timeline]) for label, est in ests]
    cap = deciding.target.capacity_bytes
    est = deciding.estimate
    overhead = est.device_bytes - est.peak_bytes
    limits = [(f"{deciding.target.name} capacity", cap / GiB),
              ("allocation limit (capacity less margin, allocator cache and CUDA context)",
               max(0.0, (cap / (1 + margin) - overhead) / GiB))]
    return bars, timelines, limits


def _plot_png(path: Path, title: str, bars: list, timelines: list, limits: list, spans: Sequence = ()) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting to PNG needs matplotlib: pip install 'memguard[plot]' "
                          "(or write .html, which needs nothing)") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 3 + 0.5 * len(bars) + 4),
                                      gridspec_kw={"height_ratios": [max(1, len(bars)), 3]})
    labelled: set[Category] = set()
    for row, (label, parts, capacity) in enumerate(bars):
        left = 0.0
        for cat, gib in parts:
            name = None if cat in labelled else _NAMES.get(cat, cat.value)
            labelled.add(cat)
            top.barh(row, gib, left=left, color=_COLORS[cat], label=name)
            left += gib
        top.plot([capacity, capacity], [row - 0.45, row + 0.45], color="black", linewidth=2)
    top.set_yticks(range(len(bars)), [b[0] for b in bars])
    top.invert_yaxis()
    top.set_xlabel("GiB (black tick: capacity)")
    top.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.45 if len(bars) < 3 else -0.2))
    top.set_title(title, fontsize=10)
    for label, start, stop in spans:
        color = _span_color(label)
        if color is not None:
            bottom.axvspan(start, stop, color=color, linewidth=0)
    if spans:
        wide = max(b for *_, b in spans) * 0.04  # narrower spans keep their tick but not their name
        bottom.set_xticks([(a + b) / 2 for _, a, b in spans],
                          [label.replace(" ", "\n", 1) if b - a >= wide else "" for label, a, b in spans], fontsize=7)
        bottom.set_xticks([a for _, a, _ in spans], minor=True)
        bottom.tick_params(axis="x", which="minor", length=12)
        bottom.tick_params(axis="x", which="major", length=0)
    for label, points in timelines:
        bottom.plot([p[0] for p in points], [p[1] for p in points], label=f"allocated, {label}")
    for (label, gib), style in zip(limits, ("-", "--")):
        bottom.axhline(gib, color="black", linestyle=style, linewidth=1, label=label)
    bottom.set_xlabel("traced phase (two training steps; shaded: forward, backward, optimizer step)")
    bottom.set_ylabel("GiB")
    bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_html(title: str, bars: list, timelines: list, limits: list, spans: Sequence = (), holders: str = "") -> str:
    esc = html.escape
    width, left, right = 900, 260, 20
    plot_w = width - left - right
    row_h = 26
    span = max([sum(g for _, g in parts) for _, parts, _ in bars] + [cap for *_, cap in bars] + [1e-9])
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{len(bars) * row_h + 40}" '
           'font-family="sans-serif" font-size="12">']
    for row, (label, parts, capacity) in enumerate(bars):
        y = 10 + row * row_h
        x = float(left)
        svg.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{esc(label)}</text>')
        for cat, gib in parts:
            w = gib / span * plot_w
            svg.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 6}" fill="{_COLORS[cat]}">'
                       f'<title>{esc(_NAMES.get(cat, cat.value))}: {gib:.2f} GiB</title></rect>')
            x += w
        cx = left + capacity / span * plot_w
        svg.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y - 2}" y2="{y + row_h - 4}" stroke="black" '
                   f'stroke-width="2"><title>capacity {capacity:.2f} GiB</title></line>')
    svg.append(f'<text x="{left}" y="{len(bars) * row_h + 30}">0 GiB</text>'
               f'<text x="{width - right}" y="{len(bars) * row_h + 30}" text-anchor="end">{span:.1f} GiB '
               '(black tick: capacity)</text></svg>')
    legend = "".join(f'<span style="background:{_COLORS[c]}">&nbsp;&nbsp;&nbsp;</span> {esc(_NAMES.get(c, c.value))} '
                     for c in _ORDER if any(c == cat for _, parts, _ in bars for cat, _ in parts))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + esc(title) + "</title></head>"
            "<body style=\"font-family:sans-serif\">\n<h2>" + esc(title) + "</h2>\n<h3>Memory at the peak</h3>\n"
            + "\n".join(svg) + f"\n<p>{legend}</p>\n<h3>Allocated memory over the traced steps</h3>\n"
            + _timeline_svg(timelines, limits, spans)
            + (f"\n<h3>Where the memory goes</h3>\n<pre>{esc(holders)}</pre>" if holders else "")
            + "\n</body></html>\n")


def _timeline_svg(timelines: list, limits: list, spans: Sequence = ()) -> str:
    esc = html.escape
    width, height, left, bottom, top = 900, 320 + (30 if spans else 0), 60, 30 + (30 if spans else 0), 10
    plot_w, plot_h = width - left - 20, height - top - bottom
    xmax = max([p[0] for _, pts in timelines for p in pts] + [1])
    ymax = max([p[1] for _, pts in timelines for p in pts] + [g for _, g in limits] + [1e-9]) * 1.05
    colors = ("#4e79a7", "#59a14f")

    def xy(i: float, g: float) -> str:
        return f"{left + i / xmax * plot_w:.1f},{top + plot_h - g / ymax * plot_h:.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>']
    out += _span_svg(spans, xmax, left, top, plot_w, plot_h)
    for k in range(5):
        g = ymax * k / 4
        y = top + plot_h - g / ymax * plot_h
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{g:.0f}</text>')
    for n, (label, gib) in enumerate(limits):
        y = top + plot_h - gib / ymax * plot_h
        dash = "" if n == 0 else ' stroke-dasharray="6,4"'
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="black"{dash}>'
                   f'<title>{esc(label)}: {gib:.2f} GiB</title></line>')
    for (label, points), color in zip(timelines, colors):
        coords = " ".join(xy(i, g) for i, g in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5">'
                   f'<title>allocated, {esc(label)}</title></polyline>')
    out.append(f'<text x="{left}" y="{height - 8}">GiB allocated over the traced events (two training steps, '
               'by phase); solid: capacity, dashed: allocation limit</text></svg>')
    key = " ".join(f'<span style="color:{c}">&#9644; allocated, {esc(label)}</span>'
                   for (label, _), c in zip(timelines, colors))
    limit_text = "; ".join(f"{esc(label)}: {gib:.2f} GiB" for label, gib in limits)
    return "\n".join(out) + f"\n<p>{key}</p>\n<p>{limit_text}</p>"


def _span_svg(spans: Sequence, xmax: float, left: int, top: int, plot_w: int, plot_h: int) -> list[str]:
    """Shaded phase spans behind the timeline, a tick at each phase start and the phase's name under the
    axis (names too narrow to fit are left to the tooltip)."""
    esc = html.escape
    out = []
    for label, start, stop in spans:
        x0, x1 = left + start / xmax * plot_w, left + min(stop, xmax) / xmax * plot_w
        color = _span_color(label) or "none"
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 0.5):.1f}" height="{plot_h}" fill="{color}">'
                   f'<title>{esc(label)}</title></rect>')
        out.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 8}" stroke="#555"/>')
        if x1 - x0 >= 7 * len(label.split(" ")[-1]):
            words = label.split(" ", 1)
            for row, text in enumerate(words):
                out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top + plot_h + 20 + 12 * row}" text-anchor="middle" '
                           f'font-size="10">{esc(text)}</text>')
    return out
