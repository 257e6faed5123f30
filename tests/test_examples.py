"""Smoke test of examples/*.py: every script runs on the CPU, and what reaches the terminal is memguard's
(tests/output_rules.py) or the example's own print (each starts with "example:"). The YAMLs are checked in
tests/test_example_configs.py."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from output_rules import stray_lines

pytestmark = pytest.mark.slow  # each runs an example in a subprocess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "lit_model.py")
"""lit_model.py is the module examples/lightningcli.yaml names, not a script."""


LIBRARY_LINES = {
    "fabric_preflight.py": ("Using bfloat16 Automatic Mixed Precision (AMP)",),
    "lightning_memguard.py": ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:",
                              "`Trainer.fit` stopped:", "`isinstance(treespec, LeafSpec)` is deprecated"),
}
"""Text of lines a library prints in the example's own code, outside memguard: Lightning's Trainer and
Fabric describe the hardware and precision when they are built and say why fit stopped, and Lightning's
fit loop warns about a torch pytree API when it sets up the dataloader."""

_LOG_STAMP = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MEMGUARD_DEBUG", "PYTHONWARNINGS")}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=_environment(), timeout=600, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_every_example_is_covered() -> None:
    assert SCRIPTS


def test_log_stamps_do_not_count_when_lines_are_compared() -> None:
    assert _normalised("W1206 14:13:05.750000 4002 torch/x.py:1] m") == _normalised("W0101 00:00:00.1 7 torch/x.py:1] m")


# ---------------------------------------------------------------------------------------------------------
# The scripts


def _imports_only(script: Path) -> str:
    """The script's module-level imports (with their try/except ImportError fallbacks), and nothing else."""
    tree = ast.parse(script.read_text())
    keep = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) or (
        isinstance(node, ast.Try) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body))]
    return ast.unparse(ast.Module(body=keep, type_ignores=[]))


def _normalised(line: str) -> str:
    return _LOG_STAMP.sub(r"\1 ", line)


def _printed_by_its_imports(script: Path) -> set[str]:
    """What the libraries print when the example imports them, before any memguard call: the user's own
    imports, which memguard cannot keep quiet (transformers loads torchao, for one)."""
    done = _run([sys.executable, "-c", _imports_only(script)])
    assert done.returncode == 0, done.stderr
    return {_normalised(line) for line in (done.stdout + done.stderr).splitlines()}


def _script_params() -> list:
    return list(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", _script_params())
def test_example_script_runs_and_prints_only_memguard_and_its_own_lines(name: str) -> None:
    script = EXAMPLES / name
    done = _run([sys.executable, str(script)])
    assert done.returncode == 0, done.stdout + done.stderr
    stray = [line for line in stray_lines(done.stdout + "\n" + done.stderr, prefixes=("example:",))
             if not any(text in line for text in LIBRARY_LINES.get(name, ()))]
    if stray:
        imported = _printed_by_its_imports(script)
        stray = [line for line in stray if _normalised(line) not in imported]
    assert stray == [], done.stdout + done.stderr
    assert any(line.startswith("example:") for line in done.stdout.splitlines()), done.stdout
