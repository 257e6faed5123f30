"""Rendering for people: byte sizes with units, plain text tables, the memory report, its JSON and plots.

Sizes are ``int`` bytes everywhere else in memguard; units appear only here. Binary units throughout
(KiB = 2**10, MiB = 2**20, GiB = 2**30, TiB = 2**40), always spelled with the "i" so nobody mistakes them
for the decimal GB (10**9) of spec sheets.
"""

from __future__ import annotations

import html
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memguard.categories import Category
from memguard.errors import InvalidArgumentError
from memguard.results import EXIT_MEANINGS
from memguard.text import _NAMES, _ORDER, HOLDER_ROWS, KIND_ROWS, _indent, holders_section, render_table
from memguard.units import GiB, format_bytes, unit_for

if TYPE_CHECKING:  # the report renders them; importing them here would load torch for `memguard gpus`
    from memguard.results import CheckResult, TargetResult
    from memguard.results import Estimate
    from memguard.plan import Plan

# ---------------------------------------------------------------------------------------------------------
# The memory report: one estimate against one capacity, with the plan when there is one

_BAR_WIDTH = 60
"""Characters of the ASCII bar; the larger of the capacity and the requirement spans it."""

_LETTERS = {
    Category.PARAMETERS: "P", Category.GRADIENTS: "G", Category.OPTIMIZER_STATE: "O", Category.ACTIVATIONS: "A",
    Category.TEMPORARIES: "T", Category.INPUTS: "I", Category.WORKSPACE: "W", Category.OTHER: "?",
    Category.ALLOCATOR: "R", Category.CONTEXT: "C",
}
_WRAP = 100
"""Prose in the report wraps at this width; tables keep their own."""
_COLORS = {
    Category.PARAMETERS: "#4e79a7", Category.GRADIENTS: "#f28e2b", Category.OPTIMIZER_STATE: "#e15759",
    Category.ACTIVATIONS: "#76b7b2", Category.TEMPORARIES: "#59a14f", Category.INPUTS: "#edc948",
    Category.WORKSPACE: "#b07aa1", Category.OTHER: "#9c755f", Category.ALLOCATOR: "#bab0ac",
    Category.CONTEXT: "#79706e",
}
def _pct(n: int, capacity: int) -> str:
    return f"{100 * n / capacity:.1f}%"


def render_report(
    estimate: Estimate,
    capacity_bytes: int,
    *,
    plan: Plan | None = None,
    gpu_name: str | None = None,
    margin: float | None = None,
    notes: Sequence[str] = (),
    policy: bool = True,
) -> str:
    """The memory report of one estimate against one capacity: the verdict and by how much, the breakdown
    at the peak (GiB and % of capacity; the plan's next to it), an ASCII bar against the card, the plan's
    changes with how to make them and what they cost, the notes, and the margin policy.

    Shared by ``memguard check``, :class:`memguard.MemGuard` and ``preflight`` so all three say the same
    thing. ``margin`` defaults to :data:`memguard.plan.DEFAULT_MARGIN`. ``notes`` are added to the
    estimate's; ``policy=False`` leaves out the margin paragraph (a multi-GPU report states it once).
    """
    from memguard.plan import DEFAULT_MARGIN, required_bytes

    margin = DEFAULT_MARGIN if margin is None else margin
    need = required_bytes(estimate, margin)
    where = f" on {gpu_name}" if gpu_name else ""
    unit = unit_for(max(capacity_bytes, need, plan.required_bytes if plan is not None else 0))
    lines = [_verdict(need, capacity_bytes, plan, where, margin), ""]
    if estimate.step_order:
        lines += [textwrap.fill(f"Traced step: {estimate.step_order}.", width=_WRAP), ""]
    lines.append(f"Memory at the predicted peak ({estimate.peak_phase}), against {format_bytes(capacity_bytes)} "
                 "of capacity:")
    lines.append(_indent(_breakdown_table(estimate, capacity_bytes, plan, margin, unit)))
    lines.append("")
    bars = [("as configured", estimate)] + ([("with plan", plan.estimate)] if plan is not None else [])
    lines.append(_indent(_bars(bars, capacity_bytes, margin)))
    if estimate.holders:
        lines += ["", holders_section(estimate)]
    if plan is not None:
        lines += ["", _plan_section(plan)]
    all_notes = list(dict.fromkeys([*notes, *estimate.notes]))
    if all_notes:
        lines += ["", "Notes:"] + [_bullet(n) for n in all_notes]
    if policy:
        lines += ["", margin_policy(margin)]
    return "\n".join(lines)


def margin_policy(margin: float) -> str:
    """The rule every verdict follows, stated in the report so nobody has to guess it."""
    return textwrap.fill(
        f"Margin policy: a configuration fits when its predicted device memory (allocated peak + allocator "
        f"cache + CUDA context) plus a {margin:.0%} safety margin is at most the capacity. The margin covers "
        "prediction error; set it with memguard.margin in a config or --margin.", width=_WRAP)


def _verdict(need: int, capacity: int, plan: Plan | None, where: str, margin: float) -> str:
    size = format_bytes
    needs = f"needs {size(need)} (margin {margin:.0%} included) of {size(capacity)}"
    if need <= capacity:
        return f"FITS{where}: {needs} ({_pct(need, capacity)}); headroom {size(capacity - need)}."
    head = f"DOES NOT FIT{where} as configured: {needs}; {size(need - capacity)} short."
    if plan is None:
        return head
    if plan.fits:
        return head + (f"\nThe plan below fits: it needs {size(plan.required_bytes)}; "
                       f"headroom {size(plan.headroom_bytes)}.")
    return head + (f"\nNothing the planner may change fits: the closest of {len(plan.tried)} configurations tried "
                   f"needs {size(plan.required_bytes)}, {size(-plan.headroom_bytes)} short.")


def _breakdown_table(estimate: Estimate, capacity: int, plan: Plan | None, margin: float, unit: str) -> str:
    from memguard.plan import required_bytes

    columns = [estimate] + ([plan.estimate] if plan is not None else [])
    headers = ["", "as configured", "% of capacity"]
    if plan is not None:
        headers += ["with plan", "% of capacity"]

    def row(label: str, values: list[int]) -> list[str]:
        cells = [label]
        for v in values:
            cells += [format_bytes(v, unit), _pct(v, capacity)]
        return cells

    rows = []
    for cat in _ORDER:
        values = [e.breakdown.get(cat, 0) for e in columns]
        if any(values):
            label = _NAMES.get(cat, cat.value) + (" (reserved - allocated)" if cat is Category.ALLOCATOR else "")
            rows.append(row(label, values))
    rows.append([""] * len(headers))
    rows.append(row("allocated peak", [e.peak_bytes for e in columns]))
    rows.append(row("reserved by the allocator", [e.reserved_bytes for e in columns]))
    on_device = "on the device (as NVML shows)" if estimate.device.startswith("cuda") else "on the device"
    rows.append(row(on_device, [e.device_bytes for e in columns]))
    needs = [required_bytes(e, margin) for e in columns]
    rows.append(row(f"margin {margin:.0%}", [n - e.device_bytes for n, e in zip(needs, columns)]))
    rows.append(row("required", needs))
    rows.append(row("capacity", [capacity for _ in columns]))
    rows.append(row("headroom", [capacity - n for n in needs]))
    return render_table(headers, rows, align="<" + ">" * (len(headers) - 1))


def _bars(bars: list[tuple[str, Estimate]], capacity: int, margin: float) -> str:
    """One bar per estimate, to a common scale: ``[`` ... ``]`` is the capacity, letters past ``]`` overflow."""
    from memguard.plan import required_bytes

    needs = [required_bytes(e, margin) for _, e in bars]
    span = max([capacity, *needs])
    cap_at = round(capacity / span * _BAR_WIDTH)
    width = max(len(label) for label, _ in bars)
    lines = []
    used: list[Category] = []
    for (label, est), need in zip(bars, needs):
        cells: list[str] = []
        total = 0
        for cat in _ORDER:
            total += est.breakdown.get(cat, 0)
            end = round(total / span * _BAR_WIDTH)
            if end > len(cells) and cat not in used:
                used.append(cat)
            cells += [_LETTERS[cat]] * (end - len(cells))
        end = round(need / span * _BAR_WIDTH)
        cells += ["+"] * (end - len(cells))
        cells += ["."] * (cap_at - len(cells))
        text = "".join(cells[:cap_at]) + "]" + "".join(cells[cap_at:])
        lines.append(f"{label:<{width}}  [{text}")
    keys = [f"{_LETTERS[c]} {_NAMES.get(c, c.value)}" for c in _ORDER if c in used]
    keys += ["+ margin", ". free", "] capacity"]
    legend: list[str] = []
    for key in keys:  # wrap between keys, never inside one
        if legend and len(legend[-1]) + 2 + len(key) <= _WRAP - width - 2:
            legend[-1] += "  " + key
        else:
            legend.append(key)
    lines += [f"{'':<{width}}  {line}" for line in legend]
    return "\n".join(lines)


def _plan_section(plan: Plan) -> str:
    title = "Plan" if plan.fits else "Closest configuration (does not fit)"
    if not plan.changes:
        return f"{title}: no change (the configuration as it is)."
    rows = [[c.knob, c.before, c.after, c.how, f"{c.cost:g}", c.why] for c in plan.changes]
    table = render_table(["change", "from", "to", "how", "cost", "why"], rows, align="<<<<><")
    return (f"{title}: {len(plan.changes)} change{'s' if len(plan.changes) > 1 else ''}, total cost {plan.cost:g} "
            "(cost ranks what a change costs in speed or numerics; lower is cheaper):\n" + _indent(table))


def _bullet(text: str) -> str:
    return textwrap.fill(text, width=_WRAP, initial_indent="  - ", subsequent_indent="    ",
                         break_on_hyphens=False, break_long_words=False)


def _holders_json(est: Estimate) -> dict[str, Any]:
    """The holders at the peak as data (bytes): every holder, and the report's two roll-ups."""
    return {
        "by_module": [g.to_dict() for g in est.top_holders(HOLDER_ROWS, by="module")],
        "by_kind": [g.to_dict() for g in est.top_holders(KIND_ROWS, by="kind")],
        "all": [h.to_dict() for h in est.holders],
    }


# ---------------------------------------------------------------------------------------------------------
# memguard check: the whole result


def render_check(result: CheckResult) -> str:
    """``memguard check``'s terminal report: what was checked, a comparison table when there are several
    GPUs, then each GPU's report. Nothing time-dependent is printed, so the same input gives the same text."""
    spec = result.spec
    t = spec.training
    optimizer = result.targets[0].estimate.optimizer if result.targets else t.optimizer  # "adamw (foreach)"
    lines = [f"memguard check {spec.path}"]
    facts = [
        ("model", f"{spec.model_label}: {result.parameters:,} parameters, " + (
            "all trainable" if result.trainable == result.parameters else f"{result.trainable:,} trainable")),
        ("batch", describe_batch(spec.batch)),
        ("training", f"{t.precision}, optimizer {optimizer}, micro-batch {t.micro_batch_size}, accumulate "
                     f"{t.accumulate_grad_batches}, checkpointing {'on' if t.gradient_checkpointing else 'off'}"),
    ]
    if spec.lora:
        targets = spec.lora.target_modules or "peft's default modules"
        shown = ", ".join(targets) if isinstance(targets, tuple) else targets
        facts.append(("lora", f"r={spec.lora.r}, alpha={spec.lora.alpha:g}, on {shown}"))
    if spec.quantization:
        facts.append(("quantized", f"frozen base weights in {spec.quantization}"))
    world = "auto" if spec.world_size is None else str(spec.world_size)
    facts.append(("devices", f"{world} (strategy {spec.strategy})"))
    width = max(len(k) for k, _ in facts)
    lines += [f"  {k:<{width}}  {v}" for k, v in facts]
    many = len(result.targets) > 1
    if many:
        lines += ["", _comparison(result)]
    for target in result.targets:
        lines += ["", f"== {target.target.name}: {format_bytes(target.target.capacity_bytes)} ({target.target.source}) =="]
        lines.append(render_report(target.estimate, target.target.capacity_bytes, plan=target.plan,
                                   gpu_name=target.target.name, margin=spec.margin, notes=target.notes,
                                   policy=not many))
    if result.notes:
        lines += ["", "About this check:"] + [_bullet(n) for n in result.notes]
    if many:
        lines += ["", margin_policy(spec.margin)]
    lines += ["", f"Exit code {result.exit_code}: {EXIT_MEANINGS[result.exit_code]}."]
    return "\n".join(lines)


def _comparison(result: CheckResult) -> str:
    unit = unit_for(max(max(t.target.capacity_bytes, t.required_bytes) for t in result.targets))
    rows = []
    for t in result.targets:
        if t.fits:
            verdict, detail = "fits", f"headroom {format_bytes(t.target.capacity_bytes - t.required_bytes)}"
        elif t.plan is not None and t.plan.fits:
            verdict = "fits with plan"
            detail = "; ".join(f"{c.knob} {c.before} -> {c.after}" for c in t.plan.changes)
        else:
            verdict, detail = "does not fit", f"{format_bytes(t.required_bytes - t.target.capacity_bytes)} short"
        rows.append([t.target.name, format_bytes(t.target.capacity_bytes, unit), format_bytes(t.required_bytes, unit),
                     verdict, detail])
    return render_table(["gpu", "capacity", "required", "verdict", "detail"], rows, align="<>><<")


def describe_batch(batch: Any) -> str:
    """The example batch's tensors as ``name (shape) dtype``, in order."""
    import torch

    if isinstance(batch, torch.Tensor):
        return f"{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, Mapping):
        return ", ".join(f"{k} {describe_batch(v)}" for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return ", ".join(describe_batch(v) for v in batch)
    return type(batch).__name__


# ---------------------------------------------------------------------------------------------------------
# JSON


def to_json(result: CheckResult) -> dict[str, Any]:
    """The check as JSON-ready data; sizes stay in bytes.

    The top-level ``fits`` / ``capacity_bytes`` / ``gpu`` / ``as_configured`` / ``plan`` describe the GPU
    that decides the exit code (the first with the worst outcome; the only one when one GPU is checked);
    ``targets`` holds the same for every GPU, in order.
    """
    spec = result.spec
    deciding = result.deciding
    targets = [_target_json(t, spec.margin) for t in result.targets]
    top = targets[result.targets.index(deciding)]
    return {
        "fits": result.fits,
        "exit_code": result.exit_code,
        "margin": spec.margin,
        "capacity_bytes": top["capacity_bytes"],
        "gpu": top["gpu"],
        "as_configured": top["as_configured"],
        "plan": top["plan"],
        "notes": list(dict.fromkeys([*result.notes, *top["notes"]])),
        "config": {
            "path": spec.path,
            "kind": spec.kind,
            "model": spec.model_label,
            "parameters": result.parameters,
            "trainable_parameters": result.trainable,
            "batch": _batch_json(spec.batch),
            "training": spec.training.to_dict(),
            "quantization": spec.quantization,
            "lora": None if spec.lora is None else {
                "r": spec.lora.r, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                "target_modules": list(spec.lora.target_modules) if isinstance(spec.lora.target_modules, tuple)
                else spec.lora.target_modules},
            "devices": spec.devices,
            "num_nodes": spec.num_nodes,
            "world_size": spec.world_size,
            "strategy": spec.strategy,
            "allow": None if spec.allow is None else list(spec.allow),
            "fallback": spec.fallback,
        },
        "targets": targets,
    }


def _target_json(t: TargetResult, margin: float) -> dict[str, Any]:
    g = t.target
    return {
        "gpu": {"name": g.name, "source": g.source, "catalog": g.catalog.name if g.catalog is not None else None,
                "index": g.index, "bf16": g.bf16, "capacity_bytes": g.capacity_bytes},
        "capacity_bytes": g.capacity_bytes,
        "fits": t.fits,
        "exit_code": t.exit_code,
        "as_configured": _estimate_json(t.estimate, g.capacity_bytes, margin),
        "plan": None if t.plan is None else {
            "fits": t.plan.fits,
            "cost": t.plan.cost,
            "changes": [{"knob": c.knob, "before": c.before, "after": c.after, "how": c.how, "cost": c.cost,
                         "why": c.why} for c in t.plan.changes],
            "config": t.plan.config.to_dict(),
            "tried": len(t.plan.tried),
            **_estimate_json(t.plan.estimate, g.capacity_bytes, margin),
        },
        "notes": list(dict.fromkeys([*t.notes, *t.estimate.notes])),
    }


def _estimate_json(est: Estimate, capacity: int, margin: float) -> dict[str, Any]:
    from memguard.plan import required_bytes

    need = required_bytes(est, margin)
    return {
        "peak_bytes": est.peak_bytes,
        "reserved_bytes": est.reserved_bytes,
        "device_bytes": est.device_bytes,
        "required_bytes": need,
        "headroom_bytes": capacity - need,
        "breakdown": {str(k): v for k, v in est.breakdown.items()},
        "peak_phase": est.peak_phase,
        "phase_peaks": dict(est.phase_peaks),
        "precision": est.precision,
        "optimizer": est.optimizer,
        "approximate": est.approximate,
        "step_order": est.step_order,
        "timeline": [{"index": p.index, "phase": p.phase, "allocated_bytes": p.allocated_bytes} for p in est.timeline],
        "holders": _holders_json(est),
    }


def _batch_json(batch: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return {"shape": list(batch.shape), "dtype": str(batch.dtype).removeprefix("torch.")}
    if isinstance(batch, Mapping):
        return {str(k): _batch_json(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_batch_json(v) for v in batch]
    return None


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
