"""memguard.report: the verdict, the breakdown and the JSON say what the numbers say.

Each check reads a number back out of the rendered text or data and compares it with the estimate it came
from, so a report that mislabels, rounds the wrong way or drops a category fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import memguard
from memguard import report
from memguard.text import _NAMES
from memguard.units import GiB
from memguard.categories import ALLOCATED_CATEGORIES
from memguard.plan import required_bytes
from memguard.results import EXIT_MEANINGS
from memguard.units import format_bytes

CAPACITY = 64 * 2**20


@pytest.fixture(scope="module")
def estimate() -> memguard.Estimate:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    return memguard.estimate(model, torch.randn(64, 256), device="cpu")


def test_the_verdict_follows_the_requirement_against_the_capacity(estimate: memguard.Estimate) -> None:
    need = required_bytes(estimate, 0.05)
    fits = report.render_report(estimate, need, margin=0.05)
    assert fits.startswith(f"FITS: needs {format_bytes(need)} (margin 5% included) of {format_bytes(need)} (100.0%)")
    short = report.render_report(estimate, need - 2**20, margin=0.05)
    assert short.startswith("DOES NOT FIT as configured")
    assert f"{format_bytes(2**20)} short" in short


def test_the_breakdown_rows_add_up_to_the_allocated_peak(estimate: memguard.Estimate) -> None:
    """Every category row of the table, read back in the report's unit, sums to the allocated peak row."""
    text = report.render_report(estimate, CAPACITY)
    unit = report.unit_for(max(CAPACITY, required_bytes(estimate, 0.05)))
    factor = GiB if unit == "GiB" else 2**20 if unit == "MiB" else 2**10 if unit == "KiB" else 1
    block = text.split("of capacity:\n", 1)[1].split("  as configured  [", 1)[0]
    categories, totals, below = {}, {}, False
    for line in block.splitlines()[2:]:  # below the header and the rule
        cells = re.split(r"\s{2,}", line.strip())
        if not line.strip():
            below = True  # the blank row separates the categories from the totals
            continue
        if len(cells) >= 2 and cells[1].endswith(unit):
            (totals if below else categories)[cells[0]] = float(cells[1].split()[0]) * factor
    assert totals["allocated peak"] == pytest.approx(estimate.peak_bytes, abs=factor / 100)
    assert sum(categories.values()) == pytest.approx(estimate.peak_bytes, abs=len(categories) * factor / 100)
    assert set(categories) == {_NAMES.get(c, c.value) for c, v in estimate.breakdown.items()
                               if v and c in ALLOCATED_CATEGORIES}


def test_notes_and_margin_policy_are_stated(estimate: memguard.Estimate) -> None:
    text = report.render_report(estimate, CAPACITY, notes=["a note of the caller"], margin=0.1)
    assert "a note of the caller" in text
    assert "plus a 10% safety margin" in text
    assert "plus a" not in report.render_report(estimate, CAPACITY, policy=False)


def test_check_json_carries_the_estimates_bytes_and_the_exit_code(tmp_path: Path) -> None:
    from memguard.act.check import run_check
    from memguard.spec.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: gpt2}\ndata: {batch_size: 1, seq_len: 64}\ngpu: [T4, H100-80GB]\n"
                    "memguard: {fallback: false}\n")
    result = run_check(load_config(path))
    data = json.loads(json.dumps(report.to_json(result)))
    assert data["exit_code"] == result.exit_code
    for target, entry in zip(result.targets, data["targets"]):
        assert entry["as_configured"]["peak_bytes"] == target.estimate.peak_bytes
        assert entry["capacity_bytes"] == target.target.capacity_bytes
    text = report.render_check(result)
    assert text.rstrip().endswith(f"Exit code {result.exit_code}: {EXIT_MEANINGS[result.exit_code]}.")


def test_an_html_plot_draws_every_gpu(tmp_path: Path) -> None:
    from memguard.act.check import run_check
    from memguard.spec.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: gpt2}\ndata: {batch_size: 1, seq_len: 64}\ngpu: [T4, A100-80GB]\n"
                    "memguard: {fallback: false}\n")
    out = report.plot(run_check(load_config(path)), tmp_path / "plot.html")
    html = out.read_text()
    assert "<svg" in html and "T4" in html and "A100" in html
