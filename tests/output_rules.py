"""What may appear on a user's terminal while memguard works: memguard's own words only.

Shared by tests/test_quiet.py (the front ends), tests/test_examples.py (the example scripts) and
tests/test_example_configs.py (``memguard check`` on the example configs). A line is memguard's when it
starts with "memguard", is a warning whose message starts with "memguard" (and the source line Python
prints under it), or belongs to a memguard report
(from its "FITS" / "DOES NOT FIT" headline to its margin-policy paragraph). Lines a script prints itself
are allowed by the prefixes the caller names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NOISE = (
    "USDT", "STAGE:", "profiler_start", "profiler_stop",  # kineto, from C++
    "Failed to load",  # torchao's extension libraries; bitsandbytes' CPU kernels
    "Enum subclass", "register_constant",  # torch's pytree, logged while torchao loads
    "kernels-community",
    "Traceback",
)
"""Text that is never memguard's: a line holding any of it is stray wherever it appears."""

_WARNING = re.compile(r"^.*:\d+: (\w*Warning): (.*)$")
_REPORT_HEAD = re.compile(r"^(FITS|DOES NOT FIT)\b")
_REPORT_TAIL = "set it with memguard.margin in a config or --margin."


def stray_lines(text: str, prefixes: Iterable[str] = ("memguard",)) -> list[str]:
    """The lines of ``text`` that are not memguard's, nor start with one of ``prefixes``."""
    allowed = ("memguard", *prefixes)
    stray: list[str] = []
    in_report = source_line_may_follow = False
    for line in text.splitlines():
        follows_warning, source_line_may_follow = source_line_may_follow, False
        if any(marker in line for marker in NOISE):
            stray.append(line)
        elif in_report:
            in_report = not line.endswith(_REPORT_TAIL)
        elif _REPORT_HEAD.match(line):
            in_report = True
        elif (warning := _WARNING.match(line)) is not None:
            if warning.group(2).startswith("memguard"):
                source_line_may_follow = True
            else:
                stray.append(line)
        elif follows_warning and line.startswith("  "):
            continue
        elif line.strip() and not line.startswith(allowed):
            stray.append(line)
    return stray


def after(text: str, marker: str) -> str:
    """The text after the first line equal to ``marker`` (all of it when the marker is missing, so that
    nothing is excused by accident)."""
    lines = text.splitlines()
    return "\n".join(lines[lines.index(marker) + 1:]) if marker in lines else text
