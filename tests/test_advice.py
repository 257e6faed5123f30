"""Each plan change said the way the user of each front end makes it."""

from __future__ import annotations

import pytest

from memguard import InvalidArgumentError
from memguard.advice import DIALECTS, how_to, training_arguments
from memguard.plan import KNOBS

AFTER = {"precision": "bf16-mixed", "optimizer": "adamw8bit", "micro_batch": "2 x 4", "checkpointing": "on",
         "sharding": "deepspeed_stage_2", "offload": "on"}


@pytest.mark.parametrize("knob", KNOBS)
def test_every_knob_has_words_in_every_dialect(knob: str) -> None:
    said = {dialect: how_to(knob, AFTER[knob], dialect) for dialect in DIALECTS}
    assert all(said.values())
    assert said["transformers"].startswith("TrainingArguments(")
    assert "Trainer(accumulate_grad_batches" not in said["transformers"] + said["pytorch"]


def test_micro_batch_in_each_dialect() -> None:
    assert how_to("micro_batch", "2 x 4") == "batch_size=2, Trainer(accumulate_grad_batches=4)"
    assert how_to("micro_batch", "2 x 4", "transformers") == (
        "TrainingArguments(per_device_train_batch_size=2, gradient_accumulation_steps=4)")
    assert "decision.micro_batch_size" in how_to("micro_batch", "2 x 4", "pytorch")
    assert training_arguments("optimizer", "ao_adamw4bit") == {"optim": "adamw_torch_4bit"}


def test_unknown_dialect_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown dialect 'keras'.*lightning"):
        how_to("precision", "bf16-mixed", "keras")
