"""Sizing without a GPU: the largest batch (or sequence) whose prediction fits a budget.

Lightning's BatchSizeFinder, accelerate's ``find_executable_batch_size`` and transformers'
``auto_find_batch_size`` answer this by trial: real steps, doubling until out-of-memory. memguard's estimate
is exact on what it traces, so the same question is a search over estimates, before the job starts.

Memory is close to affine in the batch size (each sample adds its activations) and close to quadratic in
the sequence length under eager attention, but not exactly either (allocator segments, kernels chosen by
size), so guesses only propose where to look: every answer is confirmed by two full estimates, the size
that fits and the next one that does not. Guesses come from the real estimates' traces
(:mod:`memguard.estimation.sized_traces`), one of them made at a telling size (13), so a search usually
costs three real estimates (13, the answer, the next size); each miss of the guesses costs one more and
brings a nearer trace, and a bracket that stops shrinking is bisected, so the search always ends.

Pure: ``required(size)`` is given by the caller (an estimate plus the margin), nothing here prints.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memguard.categories import Category
from memguard.errors import InvalidArgumentError, TraceError
from memguard.estimation.sized_traces import Page, drawn, recording, supplying, tells, told
from memguard.results import Estimate, SizeResult

Required = Callable[[int], tuple[int, Estimate]]
"""size -> (bytes the run needs with the margin, the estimate behind it); raises :class:`SizeRefused` for a
size the configuration cannot take (a sequence longer than the model's positions)."""


class SizeRefused(InvalidArgumentError):
    """A size the run cannot take at all, whatever the memory: the search stops below it and says why."""


@dataclass(frozen=True)
class Ladder:
    """The sizes the answer may take: multiples of ``step`` (``step * k``), or with ``power`` the powers of
    two from ``step`` (``step * 2**(k-1)``); ``k`` runs from 1 to the last rung at or below ``limit``."""

    step: int = 1
    power: bool = False
    limit: int = 1 << 16

    def __post_init__(self) -> None:
        for name in ("step", "limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{'multiple_of' if name == 'step' else name} must be a positive "
                                           f"integer, got {value!r}")
        if self.limit < self.step:
            raise InvalidArgumentError(f"limit ({self.limit}) is below multiple_of ({self.step})")

    def size(self, k: int) -> int:
        return self.step * (2 ** (k - 1) if self.power else k)

    def rung_at_or_below(self, size: float) -> int:
        """The last rung whose size is at most ``size`` (0 below the first)."""
        if size < self.step:
            return 0
        ratio = size / self.step
        return int(math.floor(math.log2(ratio))) + 1 if self.power else int(math.floor(ratio))

    @property
    def top(self) -> int:
        return self.rung_at_or_below(self.limit)


TELLING_PRIMES = (13, 17, 19, 23)
"""Sizes the first real estimate is made at (times the ladder's step): a trace at a multiple of a prime
that divides no other dimension tells which allocations carry the size (see ``sized_traces.told``)."""


def search(knob: str, required: Required, budget_bytes: int, margin: float, ladder: Ladder | None = None,
           quadratic: bool = False, per_unit: Callable[[Estimate, int], float] | None = None,
           start: int | tuple[int, int, Estimate] | None = None) -> SizeResult:
    """The largest rung of ``ladder`` whose ``required`` bytes are at most ``budget_bytes``, confirmed by
    estimating it and the next rung. ``quadratic``: memory grows with the square of the size (the
    sequence length). ``per_unit(estimate, size)``: the bytes one more unit of size adds, read from an
    estimate, for a first proposal when nothing can be guessed yet. ``start``: where the search begins (the
    configured batch, say): a size, or one already estimated as (size, required bytes, estimate), which
    saves that estimate but gives no trace to guess from.

    Between real estimates, sizes are guessed from the real ones' traces (:mod:`memguard.estimation.
    sized_traces`): a guess costs an allocator replay, not a trace. The first real estimate is made at a
    telling size (13 samples: its allocations that carry the size are the multiples of 13), which guesses
    every other size; the search walks the guessed curve, allocator segments and all, to where it crosses
    the budget and spends real estimates there: usually three in all (the telling size, the answer and the
    size after it), more where the guesses miss (kernels whose scratch is not proportional to the size),
    each miss giving a nearer trace to guess from."""
    ladder = ladder or Ladder()
    seen: dict[int, tuple[int, Estimate]] = {}
    pages: dict[int, Page] = {}
    guessed: dict[int, tuple[int, bool]] = {}  # rung -> (bytes, told by one page)
    tried: list[tuple[int, int]] = []
    refused: dict[int, str] = {}
    counted = 0
    telling = True  # until a real estimate contradicts a told guess

    def need(k: int) -> int:
        nonlocal telling
        if k in refused:
            return budget_bytes + 1
        if k not in seen:
            try:
                with recording() as page:
                    seen[k] = required(ladder.size(k))
            except SizeRefused as exc:
                if k == 1:
                    raise
                refused[k] = str(exc)
                return budget_bytes + 1
            tried.append((ladder.size(k), seen[k][0]))
            if k in guessed and guessed[k][1] and guessed[k][0] != seen[k][0]:
                telling = False  # sizes here are not all multiples or fixed (a shifted t - 1, kernel scratch)
            if page:
                pages[k] = page
                guessed.clear()  # a nearer page may draw them better
        return seen[k][0]

    def guess(k: int) -> int | None:
        """Rung ``k``'s bytes: real when estimated, else drawn from the real traces (None: none can)."""
        nonlocal counted
        if k in seen or k in refused:
            return need(k)
        if k not in guessed:
            page, told_ = _draw(pages, k, ladder, 2 if quadratic else 1, telling)
            if page is None:
                return None
            try:
                with supplying(page):
                    guessed[k] = (required(ladder.size(k))[0], told_)
            except SizeRefused:
                guessed[k] = (budget_bytes + 1, told_)
            counted += 1
        return guessed[k][0]

    def result(k: int, limited: bool = False) -> SizeResult:
        at = max(k, 1)
        why = refused.get(k + 1, "")
        return SizeResult(knob, ladder.size(k) if k else 0, seen[at][1], seen[at][0], budget_bytes, margin,
                          tried, limited or bool(why), why, guessed=counted)

    top = ladder.top
    begin = start if isinstance(start, int) else start[0] if start is not None else None
    if begin is not None and ladder.size(max(1, ladder.rung_at_or_below(begin))) == begin:
        first = ladder.rung_at_or_below(begin)
        if not isinstance(start, int):  # estimated before the search: no trace to guess from
            seen[first] = (start[1], start[2])
            tried.append((start[0], start[1]))
    else:  # no power of two is a multiple of a prime: a doubling ladder starts at its first rung
        first = 1 if ladder.power else _telling_rung(ladder, 1, top + 1, TELLING_PRIMES[0])
    lo, hi = (first, None) if need(first) <= budget_bytes else (0, first)
    line = lo + 1 if lo else max(1, first // 2)
    slope = per_unit(seen[first][1], ladder.size(first)) if per_unit is not None else 0
    if slope > 0:
        line = max(1, ladder.rung_at_or_below(ladder.size(first) + (budget_bytes - seen[first][0]) / slope))
    prime = _telling_prime(ladder, first)
    if first in pages and prime and not tells(pages[first], prime):
        # kernel scratch padded to its own blocks: a second small size draws a line where one trace cannot tell
        telling = False
        line = 2 * first if lo else line
    stalled = 0
    while True:
        if hi is not None and hi == lo + 1:
            return result(lo)
        if hi is None and lo >= top:
            return result(lo, limited=True)
        if stalled >= 3 and hi is not None:
            k, stalled = (lo + hi) // 2, 0
        else:
            # a size the run refused (the model's positions) leaves no memory to guess from: bisect to it
            crossing = None if hi in refused else _guessed_crossing(guess, lo, hi, top, line, budget_bytes)
            if crossing is not None:  # confirm the guessed answer: itself, then the rung after it
                k = crossing if crossing > lo and crossing not in seen else crossing + 1
            elif pages or start is None or lo == 0:
                k = line
            else:  # from an estimate made before the search: make the first page a telling one
                k = _telling_rung(ladder, lo + 1, hi or top + 1, line)
        k = min(max(k, lo + 1), top if hi is None else hi - 1)
        width = None if hi is None else hi - lo
        if need(k) <= budget_bytes:
            lo = k
        else:
            hi = k
        if width is not None and hi is not None:
            stalled = stalled + 1 if (hi - lo) * 2 > width else 0
        line = (ladder.rung_at_or_below(_propose(seen, lo, hi, ladder, budget_bytes, quadratic)) if lo
                else max(1, (hi or 2) // 2))


def _telling_prime(ladder: Ladder, k: int) -> int | None:
    """The telling prime that divides rung ``k``'s size and not the ladder's step, if any."""
    return next((p for p in TELLING_PRIMES if ladder.size(k) % p == 0 and ladder.step % p), None)


def _telling_rung(ladder: Ladder, low: int, high: int, near: int) -> int:
    """The rung in ``[low, high)`` nearest ``near`` whose size a telling prime divides (and the step does
    not); ``near`` itself when there is none within an eighth of it (or the ladder doubles)."""
    if ladder.power:
        return min(max(near, low), high - 1)
    primes = [p for p in TELLING_PRIMES if ladder.step % p]
    reach = max(TELLING_PRIMES[-1], near // 8)
    for distance in range(reach + 1):
        for k in (near - distance, near + distance):
            if low <= k < high and any(k % p == 0 for p in primes):
                return k
    return min(max(near, low), high - 1)


GUESSES = 40
"""The most guesses one walk to the guessed crossing takes (each an allocator replay, milliseconds to a
tenth of a second): secant steps, each followed by a bisection when it did not halve the bracket."""


def _guessed_crossing(guess: Callable[[int], int | None], lo: int, hi: int | None, top: int, line: int,
                      budget: int) -> int | None:
    """The rung in ``[lo, hi)`` where the guessed curve crosses the budget (its last fitting rung), walked
    from ``line`` (the proposal of the real points) by secant steps on the guesses, bisecting when a step
    lands outside the bracket; None while nothing can be guessed."""
    low, high = lo, (hi if hi is not None else top + 1)
    values: dict[int, int] = {}
    k = min(max(line, low + 1), high - 1)
    for _ in range(GUESSES):
        if high == low + 1:
            break
        value = guess(k)
        if value is None:
            return None
        values[k] = value
        width = high - low
        if value <= budget:
            low = k
        else:
            high = k
        if high == low + 1:
            break
        # a secant step that did not halve the bracket (a flat or stepped curve) is followed by a bisection
        no_end_yet = high == top + 1
        k = _secant(values, low, high, budget) if no_end_yet or (high - low) * 2 <= width else (low + high) // 2
    return low if high == low + 1 or low > lo else None


def _secant(values: dict[int, int], low: int, high: int, budget: int) -> int:
    """The next rung strictly between ``low`` (fits) and ``high`` (does not): where the line through the two
    guesses nearest the crossing meets the budget (the bracket's ends, or the two largest fitting sizes
    while nothing above has been guessed, stepping at most doubling), else the bracket's middle."""
    below = sorted(k for k in values if k <= low)
    pair = [below[-1], high] if below and high in values else below[-2:]
    middle = (low + high) // 2
    if len(pair) < 2:
        return min(max(2 * low, low + 1), high - 1) if high not in values else middle
    (k0, k1), (y0, y1) = pair, (values[pair[0]], values[pair[1]])
    if y1 <= y0:
        return middle
    k = max(k0 + int((budget - y0) * (k1 - k0) // (y1 - y0)), low + 1)  # the line's last fitting rung + 1
    if high not in values:
        k = min(k, 2 * low)
    return k if low < k < high else (middle if high in values else min(max(k, low + 1), high - 1))


def _draw(pages: dict[int, Page], k: int, ladder: Ladder, degree: int, telling: bool) -> tuple[Page | None, bool]:
    """Rung ``k``'s page, and whether one page told it: drawn through the ``degree + 1`` real pages nearest
    to it whose structures agree (exact where every allocation is a polynomial of that degree in the size),
    else (while ``telling``) told by the nearest telling page, else (a parabola short of its third page)
    through two."""
    near = sorted(pages, key=lambda j: (abs(j - k), -j))

    def through(count: int) -> Page | None:
        for chosen in itertools.islice(itertools.combinations(near[:count + 2], count), 6):
            page = drawn([(ladder.size(j), pages[j]) for j in sorted(chosen)], ladder.size(k))
            if page is not None:
                return page
        return None

    page = through(degree + 1)
    if page is not None:
        return page, False
    for j in near if telling else ():
        prime = _telling_prime(ladder, j)
        if prime is not None:
            return told(pages[j], ladder.size(j), prime, degree, ladder.size(k)), True
    return (through(2) if degree > 1 else None), False


def _propose(seen: dict[int, tuple[int, Any]], lo: int, hi: int | None, ladder: Ladder, budget: int,
             quadratic: bool) -> float:
    """Where the curve through the bracket's ends (the two largest fitting sizes while there is no upper
    end) crosses the budget: a size, not a rung. With ``quadratic`` a third point, the nearest other,
    bends the line into a parabola."""
    if hi is not None and hi not in seen:  # the upper end was refused: no memory to draw a line to
        return (ladder.size(lo) + ladder.size(hi)) / 2
    ends = [lo, hi] if hi is not None else sorted(seen)[-2:]
    others = sorted((j for j in seen if j not in ends), key=lambda j: abs(j - lo))
    chosen = ends + (others[:1] if quadratic else [])
    near = sorted((ladder.size(j), seen[j][0]) for j in chosen)
    if quadratic and len(near) == 3:
        crossing = _parabola_crossing(near, budget)
        if crossing is not None:
            return crossing
    (s0, r0), (s1, r1) = (near[0], near[-1]) if hi is not None else (near[-2], near[-1])
    if r1 <= r0:  # no growth between them: double, or halve the bracket
        return 2.0 * ladder.size(lo) if hi is None else (ladder.size(lo) + ladder.size(hi)) / 2
    return s1 + (budget - r1) * (s1 - s0) / (r1 - r0)


def _parabola_crossing(points: list[tuple[int, int]], budget: int) -> float | None:
    (x0, y0), (x1, y1), (x2, y2) = points
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    if denom == 0:
        return None
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    c = y0 - a * x0 * x0 - b * x0
    if a <= 0:
        return None
    disc = b * b - 4 * a * (c - budget)
    if disc < 0:
        return None
    return (-b + math.sqrt(disc)) / (2 * a)


def per_unit(margin: float) -> Callable[[Estimate, int], float]:
    """The first proposal's slope: bytes per sample (or token) at the first size, from the batch-sized
    categories of the forward or backward phase that holds the most of them (at larger sizes that phase
    holds the peak; the optimizer step's temporaries are parameter-sized), margin included."""

    def slope(est: Estimate, size: int) -> float:
        scaled = (Category.ACTIVATIONS, Category.TEMPORARIES, Category.INPUTS)
        most = max((sum(parts.get(c, 0) for c in scaled) for phase, parts in est.phase_breakdowns.items()
                    if phase.endswith(("forward", "backward"))), default=0)
        return most * (1.0 + margin) / size

    return slope


# ---------------------------------------------------------------------------------------------------------
# The Python entry points


def _budget(budget: int | float | str | None, gpu: Any, estimate_kwargs: dict[str, Any], caller: str) -> int:
    from memguard.device.catalog import lookup
    from memguard.units import parse_bytes

    if budget is not None:
        return parse_bytes(budget, "budget")  # type: ignore[return-value]
    if gpu is None:
        raise InvalidArgumentError(f"{caller} needs budget= (bytes, or a size such as '20GiB') or gpu= (a GPU "
                                   "catalog name such as 'A100-80GB'; memguard gpus --catalog lists them)")
    entry = lookup(gpu) if isinstance(gpu, str) else gpu
    if str(estimate_kwargs.get("device", "cuda")) == "cpu":
        raise InvalidArgumentError(f"{caller}: gpu= sizes for a GPU, but device='cpu'; give budget= for the CPU")
    return int(entry.usable_bytes)


def _margin(margin: float | None, caller: str) -> float:
    from memguard.plan import DEFAULT_MARGIN
    from memguard.validation import margin as checked

    return DEFAULT_MARGIN if margin is None else checked(margin, f"{caller}(margin=)")


def _sized(model: Any, make_batch: Callable[[int], Any], knob: str, *, budget: Any, gpu: Any,
           margin: float | None, multiple_of: int, power_of_two: bool, limit: int, quadratic: bool,
           start: int | None, estimate_kwargs: dict[str, Any]) -> SizeResult:
    from memguard.estimation import estimate
    from memguard.plan import required_bytes

    caller = f"max_{knob}"
    if not callable(make_batch):
        raise InvalidArgumentError(f"{caller}: make_batch must be a function size -> batch, got "
                                   f"{type(make_batch).__name__}")
    capacity = _budget(budget, gpu, estimate_kwargs, caller)
    rate = _margin(margin, caller)
    if gpu is not None:
        estimate_kwargs.setdefault("gpu", gpu)
    ladder = Ladder(multiple_of, power_of_two, limit)

    def required(size: int) -> tuple[int, Estimate]:
        try:
            batch = make_batch(size)
        except Exception as exc:  # noqa: BLE001 - the user's function: say which size it failed at
            raise InvalidArgumentError(f"{caller}: make_batch({size}) raised {type(exc).__name__}: {exc}") from exc
        try:
            est = estimate(model, batch, **estimate_kwargs)
        except TraceError as exc:  # the model cannot take this size (a position table, a fixed shape)
            raise SizeRefused(f"{knob} {size} does not run: {str(exc).splitlines()[0][:300]}") from exc
        return required_bytes(est, rate), est

    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 1):
        raise InvalidArgumentError(f"{caller}: start must be a positive integer (a size to begin at), got {start!r}")
    return search(knob, required, capacity, rate, ladder, quadratic=quadratic, per_unit=per_unit(rate), start=start)


def max_batch_size(model: Any, make_batch: Callable[[int], Any], *, budget: int | float | str | None = None,
                   gpu: Any = None, margin: float | None = None, multiple_of: int = 1, power_of_two: bool = False,
                   limit: int = 1 << 16, start: int | None = None, **estimate_kwargs: Any) -> SizeResult:
    """The largest batch size ``n`` for which ``make_batch(n)``'s predicted peak, plus the margin, fits
    ``budget`` (bytes or "20GiB"), or the usable memory of ``gpu`` (a catalog name) when no budget is given.
    ``.batch_size`` is 0 when not even one sample fits. ``multiple_of`` / ``power_of_two`` restrict the
    answer (multiples of 8; powers of two); ``limit`` bounds the search; ``start`` (the batch size the run
    has now, say) is where the search begins instead of 1. Other keywords go to :func:`memguard.estimate`
    (optimizer, precision, device...). Costs three or four real estimates (see the module's docstring)."""
    return _sized(model, make_batch, "batch_size", budget=budget, gpu=gpu, margin=margin, multiple_of=multiple_of,
                  power_of_two=power_of_two, limit=limit, quadratic=False, start=start,
                  estimate_kwargs=estimate_kwargs)


def max_seq_len(model: Any, make_batch: Callable[[int], Any], *, budget: int | float | str | None = None,
                gpu: Any = None, margin: float | None = None, multiple_of: int = 1, power_of_two: bool = False,
                limit: int = 1 << 20, start: int | None = None, **estimate_kwargs: Any) -> SizeResult:
    """The longest sequence ``t`` for which ``make_batch(t)`` fits, as :func:`max_batch_size` (``.seq_len``).
    Proposals come from a parabola (attention makes memory grow faster than the sequence)."""
    return _sized(model, make_batch, "seq_len", budget=budget, gpu=gpu, margin=margin, multiple_of=multiple_of,
                  power_of_two=power_of_two, limit=limit, quadratic=True, start=start,
                  estimate_kwargs=estimate_kwargs)
