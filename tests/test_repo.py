"""The repository's promises about itself: the README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")
    return [line.strip() for block in blocks[1::2] for line in block.splitlines() if line.strip().startswith("pip install")]


def test_ci_runs_the_readme_test_command() -> None:
    test_commands = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_commands) == 1, test_commands
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_setup_pins_the_cpu_torch_first() -> None:
    for command in _readme_commands():
        assert command.startswith("pip install torch==2.13.0 && "), command
