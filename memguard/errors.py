"""memguard's exceptions.

Every error memguard raises on purpose derives from :class:`MemguardError`, a ``RuntimeError`` so that
code catching runtime failures around a training run also catches ours.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemguardError(RuntimeError):
    """Base class of every error memguard raises on purpose."""


class TraceError(MemguardError):
    """The training step could not be traced on fake tensors.

    ``operation`` names what stopped the trace (an aten operator or a Python call) so the message can tell
    the user what to change.
    """

    def __init__(self, message: str, *, operation: str | None = None, phase: str | None = None):
        super().__init__(message)
        self.operation = operation
        self.phase = phase


class InvalidArgumentError(MemguardError, ValueError):
    """An argument has a value memguard does not understand; the message lists the valid ones."""


def closest(word: object, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to ``word`` (anything; a non-string is compared as written), for "did you
    mean" messages."""
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(str(word).lower(), list(lowered), n=n, cutoff=0.4)
    return [lowered[h] for h in hits]


def unknown_name(kind: str, word: object, choices: Iterable[str]) -> InvalidArgumentError:
    """An error for an unknown name that suggests the nearest valid ones and lists them all."""
    choices = sorted(str(c) for c in choices)
    near = closest(word, choices)
    hint = f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    return InvalidArgumentError(f"unknown {kind} {word!r}.{hint} Valid: {', '.join(choices)}.")
