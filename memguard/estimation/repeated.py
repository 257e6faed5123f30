"""Identical blocks analysed once: a deep compiled model's estimate from shallow copies of it.

Compiling a 32-layer model on fake tensors costs what compiling it for real costs (dynamo, AOTAutograd and
inductor see every layer), minutes for a 7B model. The memory of a stack of identical blocks is affine in
their number: each block adds its parameters, gradients, optimizer state and saved activations, and the
peak of each phase of the step moves by the same amount per block. So a compiled model with a stack of at
least :data:`MIN_BLOCKS` identical blocks is analysed compiled at two shallow depths (``a`` and ``a + 1``
blocks, ``a`` is 0 or 1) and each quantity of the estimate is extended along the line through them
(per phase, so a peak that moves from one phase to another with depth is still found).

That rests on an assumption, and memguard checks it where it is cheap to check: the eager trace of the
full model (seconds) must lie on the line through the eager traces at the same two depths, phase by phase.
A model whose blocks behave differently by position (every sixth layer with full attention, a block that
skips itself) fails the check and is analysed compiled whole, as before. What is extended is the compiled
analyses themselves: the second shallow one includes one boundary between two blocks, so fusion across a
boundary, the same at every boundary, is counted once per block as in the real graph.

What the extended estimate lacks: a timeline (each shallow analysis has its own) and, when the peak is in
another phase than at the shallow depths, the holders list. Both are said in the estimate's notes.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from memguard.categories import Category
from memguard.estimation.request import EstimateRequest
from memguard.results import Estimate, Holder
from memguard.trace.compiled import CompiledPart, CompileSpec, describe_parts, find_compiled

MIN_BLOCKS = 6
"""Stacks shorter than this are compiled whole: two shallow analyses cost about as much."""

RELATIVE_TOLERANCE = 0.001
"""How far (of the full eager peak) a phase's eager peak may lie from the line and still count as on it."""


@dataclass(frozen=True)
class BlockStack:
    """The longest-weighing ``nn.ModuleList`` / ``nn.Sequential`` of structurally identical blocks."""

    path: str
    count: int


def find_block_stack(model: nn.Module, minimum: int | None = None) -> BlockStack | None:
    """The stack of identical blocks holding the most parameters (the decoder layers, not one layer's
    experts), or None. Identical: same module types, parameter and buffer names, shapes, dtypes and
    trainability."""
    minimum = MIN_BLOCKS if minimum is None else minimum
    best: tuple[int, str, int] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        blocks = list(module._modules.values())
        if len(blocks) < minimum or any(b is None for b in blocks):
            continue
        first = _signature(blocks[0])
        if any(_signature(b) != first for b in blocks[1:]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, len(blocks))
    return None if best is None else BlockStack(best[1], best[2])


def _signature(block: nn.Module) -> tuple:
    return (
        tuple((name, type(m)) for name, m in block.named_modules()),
        tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in block.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers()),
    )


def shallow_view(model: nn.Module, stack: BlockStack, depth: int) -> nn.Module:
    """``model`` with only the stack's first ``depth`` blocks: new module objects along the path to the
    stack (their child dicts copied), everything else shared, so the user's model is untouched and nothing
    is materialized."""

    def fresh(module: nn.Module) -> nn.Module:
        out = copy.copy(module)
        out._modules = dict(module._modules)
        return out

    names = stack.path.split(".") if stack.path else []
    root = fresh(model)
    parent = root
    for name in names[:-1]:
        child = fresh(parent._modules[name])
        parent._modules[name] = child
        parent = child
    if names:
        blocks = fresh(parent._modules[names[-1]])
        parent._modules[names[-1]] = blocks
    else:
        blocks = root
    blocks._modules = dict(list(blocks._modules.items())[:depth])
    return root


def estimate_by_depth(model: nn.Module, batch: Any, req: EstimateRequest,
                      estimate_one: Callable[[nn.Module, Any, EstimateRequest], Estimate]) -> Estimate | None:
    """The compiled estimate of a deep model from two shallow compiled analyses, or None when the model
    does not qualify (not compiled, no stack of identical blocks, blocks that behave differently by
    position, a shallow copy that does not run): the caller then analyses it whole."""
    started = time.perf_counter()
    if req.compile is False or not isinstance(model, nn.Module):
        return None
    base, spec, parts = _compiled_base(model, req)
    if base is None:
        return None
    stack = find_block_stack(base)
    if stack is None:
        return None
    # the check needs each phase's peak, not the steady state: one step is enough
    eager = dataclasses.replace(req, compile=False, trace_cache=None, steps=1)
    compiled = dataclasses.replace(req, compile=spec, trace_cache=None)
    try:
        full = estimate_one(base, batch, eager)
    except Exception:  # noqa: BLE001 - the whole analysis reports what fails
        return None
    for low in (0, 1):
        try:
            views = [shallow_view(base, stack, low), shallow_view(base, stack, low + 1)]
            lines = [estimate_one(view, batch, eager) for view in views]
        except Exception:  # noqa: BLE001 - a model that needs all its blocks is analysed whole
            continue
        if _on_line(lines[0], lines[1], full, stack.count - low - 1):
            break
    else:
        return None
    shallow = [estimate_one(view, batch, compiled) for view in views]
    if not all(est.compiled for est in shallow):  # the compiled analysis fell back (and warned): eager it is
        fallback = estimate_one(base, batch, dataclasses.replace(req, compile=False))
        fallback.notes = list(dict.fromkeys(fallback.notes + [n for est in shallow for n in est.notes]))
        return fallback
    result = extend(shallow[0], shallow[1], stack.count - low - 1)
    result.compiled = describe_parts(parts or [CompiledPart("", spec)])
    result.notes = list(dict.fromkeys(shallow[1].notes + [
        f"identical blocks analysed once: {stack.path or 'the model'} has {stack.count} identical blocks; the "
        f"compiled step was analysed with {low} and {low + 1} of them and extended to {stack.count} (the "
        f"eager trace of all {stack.count} lies on the same line); no timeline"
        + ("" if result.holders else ", no holders list (the peak is in another phase than at those depths)"),
    ]))
    result.seconds = time.perf_counter() - started
    return result


def _compiled_base(model: nn.Module, req: EstimateRequest) -> tuple[nn.Module | None, Any, list[CompiledPart]]:
    """The module to cut (the plain model under a whole-model ``OptimizedModule``), the ``compile`` the
    shallow estimates ask for, and the user's compiled parts (None: not handled here)."""
    parts = find_compiled(model)
    if not parts:
        return (model, req.compile, []) if isinstance(req.compile, CompileSpec) else (None, None, [])
    if any(p.lightning for p in parts):
        return None, None, parts
    orig = getattr(model, "_orig_mod", None)
    if parts[0].path == "" and isinstance(orig, nn.Module):
        if len(parts) > 1:
            return None, None, parts
        return orig, parts[0].spec, parts
    return model, None, parts


def _on_line(low: Estimate, high: Estimate, full: Estimate, steps: int) -> bool:
    """Whether every phase's peak of ``full`` is where the line through ``low`` and ``high`` puts it."""
    if set(low.phase_peaks) != set(full.phase_peaks) or set(high.phase_peaks) != set(full.phase_peaks):
        return False
    tolerance = RELATIVE_TOLERANCE * full.peak_bytes
    return all(abs(_along(low.phase_peaks[p], high.phase_peaks[p], steps) - full.phase_peaks[p]) <= tolerance
               for p in full.phase_peaks)


def _along(low: int, high: int, steps: int) -> int:
    """The value ``steps`` blocks past ``high`` on the line through ``low`` (one block fewer) and ``high``."""
    return high + (high - low) * steps


def extend(low: Estimate, high: Estimate, steps: int) -> Estimate:
    """``high`` with ``steps`` more blocks, each adding what the last one added over ``low``: every byte
    count per phase and category, the peak being the largest phase peak there.

    The allocator's slack (reserved minus allocated) is extended like the rest, although it is not affine
    in depth (which cached segment a request fits depends on everything before it): for Llama-2-7B the
    slack grows most with the first block, so the extended reserved figure errs high (+1.5% against the
    whole analysis, benchmarks/results/compiled.md); the allocated peak is exact."""
    phase_peaks = {p: _along(low.phase_peaks.get(p, 0), v, steps) for p, v in high.phase_peaks.items()}
    phase_breakdowns = {
        p: {c: max(0, _along(low.phase_breakdowns.get(p, {}).get(c, 0), v, steps)) for c, v in cats.items()}
        for p, cats in high.phase_breakdowns.items()
    }
    peak_phase = max(phase_peaks, key=phase_peaks.__getitem__)
    peak = phase_peaks[peak_phase]
    slack = max(0, _along(_slack(low), _slack(high), steps))
    breakdown = dict(phase_breakdowns[peak_phase])
    breakdown[Category.ALLOCATOR] = slack
    breakdown[Category.CONTEXT] = high.breakdown.get(Category.CONTEXT, 0)
    same_phase = peak_phase == high.peak_phase == low.peak_phase
    holders = _extend_holders(low.holders, high.holders, steps) if same_phase else []
    if sum(h.bytes for h in holders) != peak:
        holders = []
    unified = _along(low.unified_bytes, high.unified_bytes, steps)
    return dataclasses.replace(
        high,
        peak_bytes=peak,
        reserved_bytes=peak + slack,
        device_bytes=peak + slack + breakdown[Category.CONTEXT] + unified,
        breakdown=breakdown,
        timeline=[],
        phases=[],
        peak_phase=peak_phase,
        phase_peaks=phase_peaks,
        phase_breakdowns=phase_breakdowns,
        per_rank=[peak],
        unified_bytes=unified,
        holders=holders,
        bound_bytes=max(peak, _along(low.bound_bytes, high.bound_bytes, steps)),
    )


def _slack(est: Estimate) -> int:
    return est.reserved_bytes - est.peak_bytes


def _extend_holders(low: list[Holder], high: list[Holder], steps: int) -> list[Holder]:
    """Holders keyed by (module pattern, kind, category); a ``*`` that counted every block counts them all."""
    before = {(h.module, h.kind, h.category): h for h in low}
    out = []
    for h in high:
        old = before.get((h.module, h.kind, h.category))
        size = _along(old.bytes if old else 0, h.bytes, steps)
        if size <= 0:
            continue
        old_repeats = old.repeats if old else tuple(0 for _ in h.repeats)
        repeats = tuple(r + (r - o) * steps if r > o else r for r, o in zip(h.repeats, old_repeats))
        out.append(Holder(h.module, h.kind, h.category, size, repeats))
    return sorted(out, key=lambda h: (-h.bytes, h.module, h.kind))
