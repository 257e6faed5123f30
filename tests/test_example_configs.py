"""Smoke test of examples/*.yaml: every config checks with its documented exit code and prints only memguard's
lines (the scripts are in tests/test_examples.py; a file each so the test workers share them out)."""

from __future__ import annotations

import sys

import pytest
from output_rules import NOISE
from test_examples import EXAMPLES, _run

pytestmark = pytest.mark.slow  # each runs memguard check in a subprocess

CHECKS = {
    "ddp-4gpu.yaml": ([], 0),
    "gpt2-small.yaml": ([], 0),
    "lightningcli.yaml": (["--gpu", "T4"], 0),  # its comment: memguard check examples/lightningcli.yaml --gpu T4
    "llama-2-7b.yaml": ([], 3),  # its comment and the README: does not fit as configured, exits with 3
    "qlora-llama-2-7b.yaml": ([], 0),
    "vit-8bit.yaml": ([], 0),
}
"""Each YAML's extra arguments and exit code (0 fits, 3 fits only with the plan)."""


def test_every_config_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_config_checks_with_its_exit_code_and_prints_only_memguard(name: str) -> None:
    extra, exit_code = CHECKS[name]
    done = _run([sys.executable, "-m", "memguard", "check", str(EXAMPLES / name), *extra])
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("memguard")] == []
    assert [line for line in done.stdout.splitlines() if any(marker in line for marker in NOISE)] == []
    assert "Exit code" in done.stdout
