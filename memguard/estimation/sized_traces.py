"""Estimates at other sizes drawn from real traces at two or three sizes: what keeps the largest-batch
search cheap.

A training step runs the same operators in the same order at every batch size; only the allocations'
sizes change, and each is a polynomial in the batch size: affine (a tensor has the batch dimension or it
has not), quadratic in the sequence length under eager attention (B x H x T x T scores). So real traces
of one run at two sizes whose structure is identical (events, phases, categories, holders) give every
allocation's size at any other size, and the estimate built from that trace (same device model, same
allocator replay, same strategy bookkeeping) costs a summary, not a trace. It is a guess: kernels chosen by
size or shapes computed from the batch break the polynomial, which is why :mod:`memguard.sizing` confirms
every answer with real estimates and only uses guesses to choose what to estimate.

Mechanics: :func:`memguard.estimation.single.estimate_one` makes every trace through :func:`traced`.
Inside a :func:`recording` block the traces it makes are kept, in call order (one per estimated rank);
inside a :func:`supplying` block it takes them from the given page instead of tracing. The caller's own
estimate function (memoised, per rank, through the planner) runs unchanged; :func:`supplying_now` tells a
memo not to keep what it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from memguard.categories import Category
from memguard.trace import Trace

FIXED = frozenset({Category.PARAMETERS, Category.GRADIENTS, Category.OPTIMIZER_STATE})
"""What :func:`told` never scales: the size of the batch does not change them."""

Page = list[tuple[Trace, Any]]
"""The traces one estimate made, in the order it made them, each with its device model's learned state."""


@dataclass
class _Book:
    recorded: Page = field(default_factory=list)
    supply: Page | None = None


_BOOK: ContextVar[_Book | None] = ContextVar("memguard_sized_traces", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Page]:
    """Keep the traces the estimates inside the block make; the yielded page fills as they run."""
    book = _Book()
    token = _BOOK.set(book)
    try:
        yield book.recorded
    finally:
        _BOOK.reset(token)


@contextlib.contextmanager
def supplying(page: Page) -> Iterator[None]:
    """Estimates inside the block take their traces from ``page`` (in order) instead of tracing."""
    token = _BOOK.set(_Book(supply=list(page)))
    try:
        yield
    finally:
        _BOOK.reset(token)


def supplying_now() -> bool:
    """Whether estimates made now are guesses (a memo must not keep them for a real request)."""
    book = _BOOK.get()
    return book is not None and book.supply is not None


def traced(make: Callable[[], Trace], device: Any) -> Trace:
    """``make()``'s trace, kept when recording; the next supplied one instead when supplying (its device
    state restored into ``device``). A supply that runs out traces for real."""
    book = _BOOK.get()
    if book is not None and book.supply:
        trace, state = book.supply.pop(0)
        device.restore(state)
        return trace
    trace = make()
    if book is not None and book.supply is None:
        book.recorded.append((trace, device.state()))
    return trace


def same_structure(one: Trace, other: Trace) -> bool:
    """Whether two traces ran the same program: only their allocation sizes may differ, and the order of
    frees that happen together (autograd releasing a node's saved tensors walks a set)."""
    return (len(one.sizes) == len(other.sizes) and one.phases == other.phases
            and one.categories == other.categories and one.holders == other.holders
            and one.holder_names == other.holder_names and one.compiled == other.compiled
            and not one.assumed_routing and not other.assumed_routing
            and (one.events == other.events or _frees_as_sets(one.events) == _frees_as_sets(other.events)))


def _frees_as_sets(events: list[int]) -> list[int]:
    """``events`` with each run of consecutive frees in one order."""
    out: list[int] = []
    run: list[int] = []
    for ev in events:
        if ev < 0:
            run.append(ev)
            continue
        if run:
            out.extend(sorted(run))
            run = []
        out.append(ev)
    return out + sorted(run)


def drawn(pages: list[tuple[int, Page]], size: int) -> Page | None:
    """The page an estimate at ``size`` would record, drawn through ``pages`` (two or three (size, page)
    pairs of the same run): each allocation's size on the polynomial through the pages' sizes of it
    (a line through two, a parabola through three), rounded up. None when the pages' structures differ."""
    if len(pages) < 2 or len({s for s, _ in pages}) != len(pages) or not pages[0][1]:
        return None
    count = len(pages[0][1])
    if any(len(page) != count for _, page in pages):
        return None
    weights, denominator = _lagrange([s for s, _ in pages], size)
    out: Page = []
    for i in range(count):
        traces = [page[i][0] for _, page in pages]
        if not all(same_structure(traces[0], t) for t in traces[1:]):
            return None
        columns = list(zip(*(t.sizes for t in traces)))
        sizes = [c[0] if min(c) == max(c) else -(-sum(w * s for w, s in zip(weights, c)) // denominator)
                 for c in columns]
        if any(s < 0 for s in sizes):
            return None
        unified = -(-sum(w * t.unified_bytes for w, t in zip(weights, traces)) // denominator)
        out.append((_resized(traces[-1], sizes, max(0, unified)), pages[-1][1][i][1]))
    return out


def told(page: Page, size: int, prime: int, degree: int, at: int) -> Page:
    """The page an estimate at ``at`` would record, told by one page recorded at ``size``, a multiple of
    ``prime`` (and of no other factor of the run's shapes): an allocation whose size ``prime`` divides
    carries the size (batch x ..., or sequence x sequence x ... when ``prime`` squared divides it and
    ``degree`` is 2) and scales with it; any other is fixed, and so are the parameters, gradients and
    optimizer state, and workspaces a library keeps for the whole process, whatever their size (the
    pre-Hopper cuBLAS workspace is 65 x 2**17 bytes). One trace at a size like 13 tells which is which,
    where a trace at 8 cannot (8 divides the hidden width too). A guess: a fixed activation that happens to
    be a multiple of ``prime``, one that is partly both (``logits[:, :-1]`` carries ``t - 1``), or kernel
    scratch padded to the kernel's own blocks is drawn wrong."""
    out: Page = []
    for trace, state in page:
        freed = trace.freed()
        sizes = []
        for aid, (s, category) in enumerate(zip(trace.sizes, trace.categories)):
            fixed = category in FIXED or (category is Category.WORKSPACE and aid not in freed)
            power, rest = 0, s
            while power < degree and rest and rest % prime == 0 and not fixed:
                rest //= prime
                power += 1
            sizes.append(-(-s * at ** power // size ** power))
        out.append((_resized(trace, sizes, trace.unified_bytes), state))
    return out


def _resized(trace: Trace, sizes: list[int], unified_bytes: int) -> Trace:
    """``trace`` with other sizes, its lists copied: a strategy may append to the trace an estimate is given."""
    return dataclasses.replace(trace, sizes=sizes, unified_bytes=unified_bytes, events=list(trace.events),
                               phases=list(trace.phases), notes=list(trace.notes),
                               categories=list(trace.categories))


SCRATCH_SHARE = 0.01
"""How much of a trace's peak kernel scratch of sizes the telling prime does not divide may weigh before
one trace no longer tells the others (:func:`tells`)."""


def tells(page: Page, prime: int) -> bool:
    """Whether :func:`told` can trust ``page``: kernel scratch the dispatcher does not see is measured by
    running the kernel (on the CPU), sized by the kernel's own blocking; when such scratch that ``prime``
    does not divide weighs more than :data:`SCRATCH_SHARE` of the peak, it is not telling fixed from
    scaling, and a second size must be traced."""
    for trace, _ in page:
        freed = trace.freed()
        odd = sum(s for aid, (s, c) in enumerate(zip(trace.sizes, trace.categories))
                  if c is Category.WORKSPACE and aid in freed and s % prime)
        if odd > SCRATCH_SHARE * trace.peak_bytes():
            return False
    return True


def _lagrange(points: list[int], x: int) -> tuple[list[int], int]:
    """The Lagrange weights of ``points`` at ``x`` as integers over one common denominator: sizes stay exact."""
    weights = []
    for i, xi in enumerate(points):
        w = Fraction(1)
        for j, xj in enumerate(points):
            if j != i:
                w *= Fraction(x - xj, xi - xj)
        weights.append(w)
    denominator = math.lcm(*(w.denominator for w in weights))
    return [int(w * denominator) for w in weights], denominator
