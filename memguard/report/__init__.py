"""Rendering for people and scripts: the text report (:mod:`.render`), its JSON (:mod:`.json_report`) and
plots (:mod:`.plot`). The only place besides :mod:`memguard.units` and :mod:`memguard.text` that writes a
size with a unit; everything below keeps ``int`` bytes."""

from memguard.report.json_report import to_json
from memguard.report.plot import PLOT_SUFFIXES, phase_spans, plot
from memguard.report.render import describe_batch, margin_policy, render_check, render_report
from memguard.text import render_table
from memguard.units import format_bytes, unit_for

__all__ = ["PLOT_SUFFIXES", "describe_batch", "format_bytes", "margin_policy", "phase_spans", "plot", "render_check",
           "render_report", "render_table", "to_json", "unit_for"]
