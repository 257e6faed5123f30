"""The memory report and ``memguard check``'s text: verdicts, breakdown tables, bars, the plan.

Sizes are ``int`` bytes everywhere else in memguard; units appear only in :mod:`memguard.report` (through
:mod:`memguard.units`, binary units spelled with the "i").
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from memguard.categories import Category
from memguard.results import EXIT_MEANINGS, size_knob_name
from memguard.text import _NAMES, _ORDER, _indent, holders_section, render_table
from memguard.units import format_bytes, unit_for

if TYPE_CHECKING:  # the report renders them; importing them here would load torch for `memguard gpus`
    from memguard.plan import Plan
    from memguard.results import CheckResult, Estimate


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
ABSURD = 100
"""A need more than this many times the capacity is reported in a sentence, not a breakdown table."""


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
    if estimate.compiled:
        lines += [textwrap.fill(f"Predicted {estimate.compiled}: the compiled step's saved activations and "
                                "buffers, as torch.compile runs it.", width=_WRAP), ""]
    if need > ABSURD * capacity_bytes:  # a table of billions of percent says nothing: say it plainly
        lines.append(textwrap.fill(
            f"This configuration needs {format_bytes(need)} per device, {need / capacity_bytes:,.0f} times the "
            f"{format_bytes(capacity_bytes)} available: far beyond what any change memguard can make recovers. "
            "Check the batch size and sequence length; what holds the memory is listed below.", width=_WRAP))
    else:
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
    lines += render_sizing(result) + render_min_gpus(result)
    if result.notes:
        lines += ["", "About this check:"] + [_bullet(n) for n in result.notes]
    if many:
        lines += ["", margin_policy(spec.margin)]
    lines += ["", f"Exit code {result.exit_code}: {EXIT_MEANINGS[result.exit_code]}."]
    return "\n".join(lines)


def render_sizing(result: CheckResult) -> list[str]:
    """The answers to ``--max-batch-size`` / ``--max-seq-len``: one line per GPU ("as configured: 6; with
    bf16-mixed: 11; ..."), a table when several GPUs were checked."""
    lines: list[str] = []
    knobs = list(dict.fromkeys(a.knob for t in result.targets for a in t.sizing))
    for knob in knobs:
        name = size_knob_name(knob)
        lines += ["", f"Largest {name} that fits (margin {result.spec.margin:.0%}; each answer N was estimated "
                      f"to fit and N+1 not to, unless marked):"]
        rows = []
        for t in result.targets:
            for a in (a for a in t.sizing if a.knob == knob):
                parts = [f"as configured: {_size_value(a.configured)}"]
                parts += [f"with {label}: {_size_value(r)}" for label, r in a.with_changes]
                rows.append((t.target.name, parts, a))
        if len(rows) == 1:
            lines.append("  " + "; ".join(rows[0][1]))
        else:
            labels = list(dict.fromkeys(label for *_, a in rows for label, _ in a.with_changes))
            headers = ["GPU", "as configured"] + [f"with {label}" for label in labels]
            table = [[gpu, _size_value(a.configured)]
                     + [next((_size_value(r) for label, r in a.with_changes if label == want), "-") for want in labels]
                     for gpu, _, a in rows]
            lines.append(render_table(headers, table, align="<" + ">" * (len(headers) - 1)))
    return lines


def render_min_gpus(result: CheckResult) -> list[str]:
    """``--min-gpus``: per GPU model, each strategy's fewest GPUs, the layout and what each GPU needs."""
    lines: list[str] = []
    for t in result.targets:
        found = t.min_gpus
        if found is None:
            continue
        best = found.best
        lines += ["", f"Fewest {t.target.name} GPUs that fit as configured (up to {found.per_node} per node, then "
                      f"up to {found.max_nodes} nodes; margin {result.spec.margin:.0%}):"]
        rows = [[name, "-", f"does not fit on {found.per_node * found.max_nodes}", "-"] if c is None else
                [name, str(c.count), f"{c.devices} per node x {c.num_nodes} node{'s' if c.num_nodes > 1 else ''}",
                 format_bytes(c.required_bytes)] for name, c in found.per_strategy.items()]
        lines.append(render_table(["strategy", "GPUs", "layout", "needs per GPU"], rows, align="<><>"))
        lines.append(f"  fewest: {best.count} with {best.strategy}" if best else "  no strategy fits")
    return lines


def _size_value(r: Any) -> str:
    if r.refused:
        return f"{r.value} (the most the run takes)"
    return f"{r.value}+" if r.limited else str(r.value)


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
