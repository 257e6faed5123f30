"""Config problems: each names its file and key; all are collected and raised at once as one ConfigError."""

from __future__ import annotations


import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


from memguard.errors import MemguardError


# ---------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (file and dotted key) and what."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"


class ConfigError(MemguardError, ValueError):
    """Everything wrong with a config, found in one pass so the user fixes it in one edit."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = str(self.problems[0])
        else:
            files = {p.file for p in self.problems}
            where = f" in {next(iter(files))}" if len(files) == 1 else ""
            text = f"{len(self.problems)} problems{where}:\n" + "\n".join(
                f"  {p}" for p in self.problems)
        super().__init__(text)


COMMAND_LINE = "command line"
"""What problems with ``--set`` and the other options name as their file."""


class _Problems:
    """A collector: sections report what is wrong and carry on, so one run finds every problem."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(Problem(self.file, key, message))

    @contextlib.contextmanager
    def from_command_line(self) -> Iterator[None]:
        """Problems added meanwhile are about command-line options, not the file."""
        with self.in_file(COMMAND_LINE):
            yield

    @contextlib.contextmanager
    def in_file(self, file: str) -> Iterator[None]:
        """Problems added meanwhile are about another file (a DeepSpeed JSON the config points to)."""
        saved, self.file = self.file, file
        try:
            yield
        finally:
            self.file = saved

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)
