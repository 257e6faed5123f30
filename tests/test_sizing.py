"""The largest batch / longest sequence that fits (memguard/sizing.py): the search against brute force on
synthetic memory curves, and the answer against the real CPU peaks of the zoo's models (margin 0, a budget
between the real peaks of two sizes: the answer must be the real largest size)."""

from __future__ import annotations

import pytest
import torch

import memguard
from groundtruth import measure_peak
from memguard.errors import InvalidArgumentError
from memguard.sizing import Ladder, SizeRefused, search
from zoo import CNN, Decoder, LSTMLM


def _brute(curve, budget: int, ladder: Ladder) -> int:
    best = 0
    for k in range(1, ladder.top + 1):
        if curve(ladder.size(k)) <= budget:
            best = ladder.size(k)
    return best


CURVES = {
    "affine": lambda n: 1000 + 37 * n,
    "jump at 300": lambda n: 1000 + 37 * n + (5000 if n >= 300 else 0),
    "quadratic": lambda n: 5000 + 3 * n + n * n // 7,
    "flat then steep": lambda n: 20000 if n < 50 else 20000 + 900 * (n - 50),
    "rounded to 512": lambda n: -(-(1000 + 37 * n) // 512) * 512,
}


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize("ladder", [Ladder(), Ladder(step=8), Ladder(power=True), Ladder(limit=200)],
                         ids=["plain", "multiple of 8", "powers of two", "limit 200"])
@pytest.mark.parametrize("budget", [900, 12_345, 40_000, 10**9])
@pytest.mark.parametrize("start", [None, 64], ids=["from 1", "from 64"])
def test_search_finds_what_brute_force_finds(name, ladder, budget, start):
    curve = CURVES[name]
    first = (start, curve(start), None) if start is not None else None
    result = search("batch_size", lambda n: (curve(n), None), budget, 0.0, ladder,
                    quadratic=name == "quadratic", start=first)
    assert result.value == _brute(curve, budget, ladder)
    assert result.limited == (result.value == ladder.size(ladder.top))
    sizes = [s for s, _ in result.tried]
    assert len(sizes) == len(set(sizes)), "a size is never estimated twice"
    if result.value and not result.limited:
        assert result.value in sizes, "the answer is confirmed by its own estimate"
        assert ladder.size(ladder.rung_at_or_below(result.value) + 1) in sizes, "and the next rung's"


def test_a_refused_size_stops_the_search_below_it():
    def required(n):
        if n > 300:
            raise SizeRefused("longer than the model's 300 positions")
        return 1000 + 37 * n, None

    result = search("seq_len", required, 10**9, 0.0, Ladder(limit=1 << 20), quadratic=True)
    assert result.value == 300 and result.limited and "300 positions" in result.refused
    small = search("seq_len", required, 1000 + 37 * 120, 0.0, Ladder(limit=1 << 20), quadratic=True)
    assert small.value == 120 and not small.limited


def test_affine_memory_costs_few_estimates():
    result = search("batch_size", lambda n: (1000 + 37 * n, None), 100_000, 0.0, Ladder(),
                    per_unit=lambda _est, _size: 37)
    assert result.value == (100_000 - 1000) // 37
    assert len(result.tried) <= 4


def _between(peak_low: int, peak_high: int) -> int:
    assert peak_high > peak_low, "the real peak must grow with the size for this check"
    return (peak_low + peak_high) // 2


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


ZOO = {
    # name: (model, make_batch(n), loss_fn, precision, real size to aim at)
    "CNN with BatchNorm": (CNN, lambda n: (torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))),
                           lambda m, b: m(*b), "32-true", 5),
    "decoder with SDPA, bf16-mixed": (lambda: Decoder(layers=2), lambda n: torch.randint(0, 512, (n, 64)),
                                      None, "bf16-mixed", 3),
    "LSTM": (LSTMLM, lambda n: torch.randint(0, 1000, (n, 32)), None, "32-true", 4),
    "decoder with checkpointing": (lambda: Decoder(layers=2, ckpt=True), lambda n: torch.randint(0, 512, (n, 64)),
                                   None, "32-true", 3),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_max_batch_size_is_the_real_largest_batch(name):
    build, make_batch, loss_fn, precision, aim = ZOO[name]
    torch.manual_seed(0)
    model = build()
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    peaks = [measure_peak(model, make_batch(n), adamw, loss_fn=loss_fn, autocast_dtype=autocast) for n in (aim, aim + 1)]
    result = memguard.max_batch_size(model, make_batch, budget=_between(*peaks), margin=0.0, device="cpu",
                                     optimizer="adamw", precision=precision, loss_fn=loss_fn)
    assert result.batch_size == aim, result.tried
    assert result.estimate.peak_bytes == result.required_bytes <= _between(*peaks)


def test_max_seq_len_is_the_real_longest_sequence():
    torch.manual_seed(0)
    model = Decoder(layers=2)
    make_batch = lambda t: torch.randint(0, 512, (2, t))  # noqa: E731
    aim = 150
    peaks = [measure_peak(model, make_batch(t), adamw) for t in (aim, aim + 1)]
    result = memguard.max_seq_len(model, make_batch, budget=_between(*peaks), margin=0.0, device="cpu")
    assert result.seq_len == aim, result.tried


def test_nothing_fits_and_bad_arguments():
    model = CNN()
    make_batch = ZOO["CNN with BatchNorm"][1]
    kwargs = dict(device="cpu", loss_fn=lambda m, b: m(*b))
    none = memguard.max_batch_size(model, make_batch, budget="64KiB", **kwargs)
    assert none.batch_size == 0 and none.estimate is not None and "not even" in str(none)
    with pytest.raises(InvalidArgumentError, match="budget="):
        memguard.max_batch_size(model, make_batch, **kwargs)
    with pytest.raises(InvalidArgumentError, match="margin"):
        memguard.max_batch_size(model, make_batch, budget="1GiB", margin=-0.1, **kwargs)
    with pytest.raises(InvalidArgumentError, match="multiple_of"):
        memguard.max_batch_size(model, make_batch, budget="1GiB", multiple_of=0, **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"make_batch\(\d+\) raised ZeroDivisionError"):
        memguard.max_batch_size(model, lambda n: 1 / 0, budget="1GiB", **kwargs)


def test_a_size_the_model_cannot_run_bounds_the_answer():
    model = Decoder(layers=1)  # a 256-position table
    result = memguard.max_seq_len(model, lambda t: torch.randint(0, 512, (1, t)), budget="1GiB", device="cpu")
    assert result.seq_len == 256 and result.limited and "does not run" in result.refused


def test_a_doubling_ladder_starts_at_its_first_rung():
    """No power of two is a multiple of 13: the search starts at one sample, not at the 13th rung (4,096)."""
    model = CNN()
    make_batch = ZOO["CNN with BatchNorm"][1]
    result = memguard.max_batch_size(model, make_batch, budget="40MiB", power_of_two=True, device="cpu",
                                     loss_fn=lambda m, b: m(*b))
    sizes = [s for s, _ in result.tried]
    assert sizes[0] == 1 and result.batch_size & (result.batch_size - 1) == 0
    assert result.batch_size in sizes and 2 * result.batch_size in sizes
