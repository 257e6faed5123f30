"""The transformers Trainer callback on the CPU: it checks in on_train_begin and speaks TrainingArguments."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memguard import OutOfMemoryPredicted  # noqa: E402
from memguard.errors import InvalidArgumentError  # noqa: E402
from memguard.integrations.hf import MemGuardCallback, max_batch_arguments, training_arguments  # noqa: E402
from memguard.plan import Change  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 16) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer(tmp_path, callback: MemGuardCallback, model: torch.nn.Module | None = None, **args):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, **args)
    return transformers.Trainer(model=model or _model(), args=arguments, train_dataset=_Tokens(),
                                callbacks=[callback])


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> MemGuardCallback:
    """What the run needs, read from a warn-only check with a budget of one byte (every plan candidate's need)."""
    probe = MemGuardCallback(policy="warn", budget=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path_factory.mktemp("probe"), probe).train()
    return probe


def test_default_policy_is_auto_like_the_lightning_callback() -> None:
    assert MemGuardCallback().policy == "auto"


def test_a_plan_is_given_in_training_arguments(tmp_path, probed) -> None:
    decision = probed.decision
    assert not decision.fits and decision.plan is not None and decision.plan.fits is False
    callback = MemGuardCallback(budget=decision.required_bytes - 1)  # auto: only checkpointing is applied here
    with pytest.raises(OutOfMemoryPredicted) as info:
        _trainer(tmp_path, callback).train()
    text = str(info.value)
    assert "TrainingArguments(" in text and "Trainer(" not in text.replace("TrainingArguments(", "")
    assert callback.suggested and set(callback.suggested) <= {
        "bf16", "fp16", "optim", "gradient_checkpointing", "per_device_train_batch_size",
        "gradient_accumulation_steps"}
    assert "a plain PyTorch loop" in text  # the transformers Trainer zeroes gradients after the step


def test_auto_turns_on_checkpointing_when_that_alone_fits(tmp_path, probed) -> None:
    tried = {c.gradient_checkpointing and c.precision == "32-true" and c.micro_batch_size == 8
             and c.optimizer == probed.decision.config.optimizer: need for c, need in probed.decision.plan.tried}
    model = _model()
    callback = MemGuardCallback(budget=tried[True])
    trainer = _trainer(tmp_path, callback, model=model)
    with pytest.warns(UserWarning, match=r"TrainingArguments\(gradient_checkpointing=True\).*checkpointing was turned on"):
        trainer.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert trainer.state.global_step == 2


def test_training_arguments_for_each_knob() -> None:
    changes = [Change("precision", "32-true", "bf16-mixed", "", 1, ""),
               Change("optimizer", "adamw", "adamw8bit", "", 2, ""),
               Change("micro_batch", "8 x 1", "2 x 4", "", 4, ""),
               Change("checkpointing", "off", "on", "", 3, "")]
    assert training_arguments(changes) == {"bf16": True, "optim": "adamw_bnb_8bit", "per_device_train_batch_size": 2,
                                           "gradient_accumulation_steps": 4, "gradient_checkpointing": True}


def test_max_batch_arguments_is_the_callbacks_own_line(tmp_path) -> None:
    """The answer N is exactly where the callback's check (same budget, margin 0) turns: a Trainer built with
    N trains, one built with N + 1 is stopped before its first step."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True)
    budget = 12 << 20
    sized, found = max_batch_arguments(args, _model(), _Tokens(64), budget=budget, margin=0.0)
    n = found.batch_size
    assert 2 < n < 64 and sized.per_device_train_batch_size == n and args.per_device_train_batch_size == 2
    for size, fits in ((n, True), (n + 1, False)):
        trainer = transformers.Trainer(
            model=_model(), args=transformers.TrainingArguments(**{**sized.to_dict(), "per_device_train_batch_size": size}),
            train_dataset=_Tokens(64), callbacks=[MemGuardCallback(policy="abort", budget=budget, margin=0.0)])
        if fits:
            trainer.train()
            assert trainer.state.global_step == 1
        else:
            with pytest.raises(OutOfMemoryPredicted):
                trainer.train()


def test_max_batch_arguments_names_an_optim_it_does_not_predict(tmp_path) -> None:
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw", use_cpu=True, report_to=[])
    with pytest.raises(InvalidArgumentError, match=r"TrainingArguments.optim 'galore_adamw'.*optimizer="):
        max_batch_arguments(args, _model(), _Tokens(), budget="1GiB")
