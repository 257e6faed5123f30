"""Estimates at other sizes drawn from real traces (memguard/estimation/sized_traces.py): on models written
here, a page drawn through two sizes, or told by one trace at a multiple of 13, gives the same estimate as
tracing that size; structures that differ draw nothing; a guess never reaches a memo."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import memguard
from memguard.estimation import sized_traces
from memguard.estimation.sized_traces import drawn, recording, same_structure, supplying, supplying_now, told
from memguard.plan import TrainingConfig, estimator
from memguard.trace import Trace


class Tower(nn.Module):
    """Width 48 and 40 classes: no dimension is a multiple of 13, so the batch alone carries 13."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.LayerNorm(96), nn.Linear(96, 40))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).logsumexp(-1).mean()


class Attending(nn.Module):
    """Eager attention: a batch x sequence x sequence score matrix, memory quadratic in the sequence."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.out(scores @ v).square().mean()


OPTIONS = {"cuda": dict(gpu="A100-80GB"), "cpu": dict(device="cpu")}


def _page(model: nn.Module, batch: torch.Tensor, **options) -> tuple[sized_traces.Page, memguard.Estimate]:
    with recording() as page:
        est = memguard.estimate(model, batch, **options)
    return page, est


def _guessed(model: nn.Module, batch: torch.Tensor, page: sized_traces.Page, **options) -> memguard.Estimate:
    with supplying(page):
        return memguard.estimate(model, batch, **options)


@pytest.mark.parametrize("device", sorted(OPTIONS))
def test_two_sizes_draw_every_other_size_to_the_byte(device):
    model, options = Tower(), OPTIONS[device]
    make = lambda n: torch.randn(n, 48)  # noqa: E731
    low, _ = _page(model, make(6), **options)
    high, _ = _page(model, make(20), **options)
    for n in (1, 9, 57, 300):
        real = memguard.estimate(model, make(n), **options)
        guess = _guessed(model, make(n), drawn([(6, low), (20, high)], n), **options)
        assert (guess.peak_bytes, guess.reserved_bytes, guess.device_bytes) == (
            real.peak_bytes, real.reserved_bytes, real.device_bytes), n
        assert guess.phase_peaks == real.phase_peaks


def test_one_trace_at_13_tells_which_allocations_carry_the_batch():
    model, options = Tower(), OPTIONS["cuda"]
    page, _ = _page(model, torch.randn(13, 48), **options)
    for n in (4, 100, 777):
        real = memguard.estimate(model, torch.randn(n, 48), **options)
        guess = _guessed(model, torch.randn(n, 48), told(page, 13, 13, 1, n), **options)
        assert guess.device_bytes == real.device_bytes, n


def test_a_parabola_through_three_sequence_lengths_is_exact_and_a_line_is_not():
    model, options = Attending(), OPTIONS["cuda"]
    make = lambda t: torch.randn(2, t, 32)  # noqa: E731
    pages = [(t, _page(model, make(t), **options)[0]) for t in (8, 30, 64)]
    real = memguard.estimate(model, make(500), **options)
    assert _guessed(model, make(500), drawn(pages, 500), **options).peak_bytes == real.peak_bytes
    line = _guessed(model, make(500), drawn(pages[1:], 500), **options)
    assert line.peak_bytes < real.peak_bytes  # the score matrix grows faster than a line through two lengths
    told_page = told(_page(model, make(13), **options)[0], 13, 13, 2, 500)
    assert _guessed(model, make(500), told_page, **options).peak_bytes == real.peak_bytes


def test_different_programs_draw_nothing():
    a, _ = _page(Tower(), torch.randn(6, 48), **OPTIONS["cpu"])
    b, _ = _page(Attending(), torch.randn(2, 6, 32), **OPTIONS["cpu"])
    assert drawn([(6, a), (7, b)], 10) is None
    assert drawn([(6, a), (6, a)], 10) is None  # one size twice is no line
    routed = dataclasses.replace(a[0][0], assumed_routing=True)
    assert not same_structure(routed, a[0][0])


def test_frees_that_happen_together_may_come_in_any_order():
    one = Trace(sizes=[4, 8, 16], categories=[None] * 3, events=[1, 2, 3, -2, -1, -3])
    other = dataclasses.replace(one, events=[1, 2, 3, -1, -3, -2])
    moved = dataclasses.replace(one, events=[1, 2, -2, 3, -1, -3])
    assert same_structure(one, other) and not same_structure(one, moved)


def test_a_guess_is_never_kept_by_the_planner_memo():
    model = Tower()
    evaluate = estimator(model, torch.randn(8, 48), device="cpu")
    config = TrainingConfig(micro_batch_size=8)
    low, _ = _page(model, torch.randn(6, 48), device="cpu")
    high, _ = _page(model, torch.randn(20, 48), device="cpu")
    fake = drawn([(6, low), (20, high)], 8)
    fake = [(dataclasses.replace(t, sizes=[s * 3 for s in t.sizes]), state) for t, state in fake]  # a wrong guess
    with supplying(fake):
        assert supplying_now()
        wrong = evaluate(config)
    assert not supplying_now()
    right = evaluate(config)
    assert right.peak_bytes != wrong.peak_bytes
    assert right.peak_bytes == memguard.estimate(model, torch.randn(8, 48), device="cpu").peak_bytes


def test_kernel_scratch_padded_to_its_blocks_is_not_told():
    from zoo import LSTMLM

    lstm, _ = _page(LSTMLM(), torch.randint(0, 1000, (13, 32)), device="cpu")  # oneDNN's RNN workspace
    assert not sized_traces.tells(lstm, 13)
    tower, _ = _page(Tower(), torch.randn(13, 48), **OPTIONS["cuda"])
    assert sized_traces.tells(tower, 13)


def test_the_search_traces_three_sizes_when_one_trace_tells_the_rest():
    model, options = Tower(), OPTIONS["cuda"]
    make = lambda n: torch.randn(n, 48)  # noqa: E731
    budget = memguard.estimate(model, make(700), **options).device_bytes
    result = memguard.max_batch_size(model, make, budget=budget, margin=0.0, **options)
    n = result.batch_size
    assert [s for s, _ in result.tried] == [13, n, n + 1] and result.guessed > 0
    assert memguard.estimate(model, make(n), **options).device_bytes <= budget
    assert memguard.estimate(model, make(n + 1), **options).device_bytes > budget
