"""A model memguard cannot trace: the user sees memguard's one-paragraph TraceError and nothing of torch's
fake-tensor or dynamo logging, from estimate(), preflight and ``memguard check``, even with TORCH_LOGS set.
Each case runs in a fresh process with stdout and stderr captured at the file descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from output_rules import after, stray_lines

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = TESTS / "untraceable_script.py"
TORCH_LOG_MARK = "torch/_subclasses/fake_tensor.py"


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEMGUARD_DEBUG", "PYTHONWARNINGS", "TORCH_LOGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["TORCH_LOGS"] = "+dynamo,fake_tensor"  # a user who turned torch's logging up still sees none of it
    env.update(extra)
    return env


def _run_script(front_end: str, model: str, **env: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), front_end, model], cwd=ROOT, env=_environment(**env),
                          timeout=300, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout
    return after(done.stdout, "test: ready").split("test: done")[0]


@pytest.mark.slow
@pytest.mark.parametrize("front_end", ["estimate", "preflight"])
@pytest.mark.parametrize("model", ["NoFakeKernel", "FakeKernelRaises"])
def test_only_memguards_error_is_shown(front_end: str, model: str) -> None:
    output = _run_script(front_end, model)
    assert "test: TraceError: memguard could not trace step1.forward" in output, output
    assert stray_lines(output, prefixes=("test:",)) == [], output


@pytest.mark.slow
def test_torch_log_is_there_to_hide() -> None:
    """The control: with MEMGUARD_DEBUG=1 torch's fake-tensor error log (with its stack) comes through, so
    the test above really hides it."""
    output = _run_script("estimate", "FakeKernelRaises", MEMGUARD_DEBUG="1")
    assert TORCH_LOG_MARK in output and "fake tensor raised TypeError" in output, output


@pytest.mark.slow
@pytest.mark.parametrize("model", ["NoFakeKernel", "FakeKernelRaises"])
def test_check_cli_prints_only_its_error(tmp_path: Path, model: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{class_path: untraceable_models.{model}}}\n"
        "memguard: {example_batch: {shape: [4, 8], dtype: float32}}\n"
        "optimizer: adamw\n"
        "trainer: {precision: 32-true}\n"
        "gpu: H100-80GB\n"
    )
    done = subprocess.run([sys.executable, "-m", "memguard", "check", str(config)], cwd=ROOT,
                          env=_environment(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == "", done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memguard: error: memguard could not trace"), done.stderr
