"""Sizes in reports take the unit that suits them: a 100 MiB budget is not "0.10 GiB"."""

from __future__ import annotations

import re

import torch

import memguard
from memguard.report import format_bytes, render_report, unit_for


def test_unit_for_picks_the_largest_unit_with_a_magnitude_of_at_least_one() -> None:
    assert [unit_for(n) for n in (1, 2**10, 100 * 2**20, 2**30 - 1, 80 * 2**30, 3 * 2**40)] == [
        "B", "KiB", "MiB", "MiB", "GiB", "TiB"]
    assert format_bytes(3 * 2**20) == "3.00 MiB" and format_bytes(-5 * 2**20) == "-5.00 MiB"


def _small_estimate() -> memguard.Estimate:
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return memguard.estimate(model, torch.randn(32, 256), optimizer="adamw", device="cpu")


def test_a_small_budget_reads_in_mib_not_in_hundredths_of_a_gib() -> None:
    est = _small_estimate()
    text = render_report(est, 2**20)
    assert "0.00 GiB" not in text and not re.search(r"\b0\.0\d GiB", text)
    assert "MiB" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("parameters", "capacity"))]
    assert rows and all("MiB" in row for row in rows)


def test_a_large_capacity_reads_in_gib_and_states_the_step_order() -> None:
    est = _small_estimate()
    text = render_report(est, 80 * 2**30)
    assert "80.00 GiB" in text
    capacity_row = next(line for line in text.splitlines() if line.strip().startswith("capacity"))
    assert "GiB" in capacity_row
    assert "Traced step: forward, backward, optimizer step, zero_grad" in text
