"""The README's config reference lists every key the loader accepts, and nothing it does not: the key tables
of memguard/spec/schema.py are the source, so a new key without documentation fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memguard.spec import schema as config

README = Path(__file__).resolve().parents[1] / "README.md"


def reference() -> str:
    """The text of the README's "Config reference" section, up to the next section."""
    text = README.read_text()
    match = re.search(r"^#+ Config reference\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "README.md has no 'Config reference' section"
    return match.group(1)


def accepted_keys() -> list[str]:
    """Every dotted key the loader accepts, from its tables."""
    keys = list(config.TOP_LEVEL)
    keys += [f"{section}.{key}" for section, table in config.SCHEMA.items() for key in table]
    keys += [f"optimizer.{key}" for key in config.OPTIMIZER_KEYS]
    keys += [f"trainer.strategy.{key}" for key in config.STRATEGY_KEYS]
    keys += [f"trainer.{key}" for key in sorted(config.LIGHTNING_TRAINER_ARGS)]
    keys += sorted(config.DEEPSPEED_KEYS)
    return keys


@pytest.mark.parametrize("key", accepted_keys())
def test_every_accepted_key_is_documented(key: str) -> None:
    assert re.search(rf"`{re.escape(key)}[`.]", reference()), f"{key} is missing from README.md's config reference"


@pytest.mark.parametrize("argument", config.DEEPSPEED_STRATEGY_ARGS)
def test_the_deepspeed_strategy_arguments_read_are_documented(argument: str) -> None:
    row = next(line for line in reference().splitlines() if line.startswith("| `trainer.strategy.init_args`"))
    assert f"`{argument}`" in row


def test_the_reference_lists_no_key_the_loader_does_not_accept() -> None:
    known = set(accepted_keys())
    for line in reference().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            for key in re.findall(r"`([^`]+)`", first_cell):
                assert key in known, f"README.md documents {key!r}, which memguard/spec/schema.py does not accept"
