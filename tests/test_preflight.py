"""memguard.preflight for hand-written loops, Lightning Fabric and the transformers Trainer (all on the CPU)."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch

import memguard
from memguard import OutOfMemoryPredicted
from memguard.optimizers import available, real_class
from memguard.plan import OPTIMIZER_CHOICES, TrainingConfig, estimator, required_bytes
from groundtruth import measure_peak
from zoo import Decoder, _ids

BATCH = _ids(4, 64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Decoder()


def _need(config: TrainingConfig) -> int:
    return required_bytes(estimator(_model(), BATCH, device="cpu")(config), memguard.plan.DEFAULT_MARGIN)


BASE = TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=4)


def test_fits_returns_the_decision_and_changes_nothing() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    decision = memguard.preflight(model, BATCH, optimizer=opt, device="cpu", budget="8GiB")
    assert decision.fits and decision.plan is None and decision.capacity_bytes == 8 * 2**30
    assert "fits" in str(decision).lower()
    assert not opt.state  # the optimizer's state is never touched


def test_abort_raises_before_any_parameter_changes() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OutOfMemoryPredicted, match="does not fit as configured") as info:
        memguard.preflight(model, BATCH, optimizer=opt, device="cpu", budget=_need(BASE) - 1)
    assert info.value.decision is not None and not info.value.decision.fits
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state


def test_warn_warns_and_changes_nothing() -> None:
    model = _model()
    with pytest.warns(UserWarning, match="does not fit"):
        decision = memguard.preflight(model, BATCH, optimizer="adamw", device="cpu", budget=_need(BASE) - 1,
                                      policy="warn")
    assert not decision.fits and decision.chosen == decision.config


def _train(model, optimizer, decision, steps: int = 2) -> list[torch.dtype]:
    """The hand-written loop of examples/preflight_loop.py, recording the matmul dtype under autocast."""
    seen = []
    micro, acc = decision.micro_batch_size, decision.accumulate_grad_batches
    for _ in range(steps):
        for i in range(acc):
            chunk = BATCH[i * micro:(i + 1) * micro]
            with decision.autocast():
                seen.append(model.head(model.emb(chunk)).dtype)
                loss = model(chunk) / acc
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return seen


def test_auto_plan_applies_and_really_fits() -> None:
    bf16 = TrainingConfig(precision="bf16-mixed", optimizer="adamw", micro_batch_size=4)
    budget = _need(bf16)
    assert budget < _need(BASE)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    decision = memguard.preflight(model, BATCH, optimizer=opt, device="cpu", budget=budget, policy="auto",
                                  allow=["precision"])
    assert not decision.fits and decision.plan.fits and decision.chosen.precision == "bf16-mixed"
    model, opt = decision.apply(model, opt)
    assert set(_train(model, opt, decision)) == {torch.bfloat16}
    # the applied plan, run for real on the CPU, stays under the budget
    real = measure_peak(_model(), BATCH, lambda ps: torch.optim.AdamW(ps), autocast_dtype=torch.bfloat16)
    assert real <= budget


def test_auto_swaps_optimizer_and_turns_on_checkpointing() -> None:
    pytest.importorskip("bitsandbytes")
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    target = TrainingConfig(precision="32-true", optimizer="adamw8bit", micro_batch_size=4,
                            gradient_checkpointing=True)
    decision = memguard.preflight(model, BATCH, optimizer=opt, device="cpu", budget=_need(target), policy="auto",
                                  allow=["optimizer", "checkpointing"])
    assert decision.plan.fits
    model, new_opt = decision.apply(model, opt)
    chosen = decision.chosen
    if chosen.optimizer != "adamw":
        assert "8bit" in type(new_opt).__name__ or "4bit" in type(new_opt).__name__ or "Adafactor" in type(new_opt).__name__
        assert new_opt.param_groups[0]["lr"] == 3e-4
    if chosen.gradient_checkpointing:
        assert memguard.checkpointing.is_enabled(model)
    _train(model, new_opt, decision)


# The torchao swaps go through the same rebuild as the others; tests/test_optimizers.py rebuilds and trains
# every choice, so the plain loop here runs the optimizers whose step needs no compiling.
@pytest.mark.parametrize("name", [n for n in OPTIMIZER_CHOICES if not n.startswith("ao_")])
def test_apply_swaps_to_each_optimizer_the_planner_can_choose(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not available(name):
        pytest.skip(f"{name} is not installed")
    monkeypatch.setattr(importlib.import_module("memguard.act.preflight"), "optimizers_available", lambda: (name,))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, eps=1e-6)
    target = TrainingConfig(precision="32-true", optimizer=name, micro_batch_size=4)
    decision = memguard.preflight(model, BATCH, optimizer=opt, device="cpu", budget=_need(target), policy="auto",
                                  allow=["optimizer"])
    assert decision.chosen.optimizer == name
    model, new_opt = decision.apply(model, opt)
    assert type(new_opt) is real_class(name) and float(new_opt.param_groups[0]["lr"]) == pytest.approx(3e-4)
    _train(model, new_opt, decision, steps=3)
    assert new_opt.state


def test_optimizer_libraries_are_asked_only_when_the_optimizer_may_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding the 8-bit optimizers imports bitsandbytes and torchao (seconds): a plan that may not change
    the optimizer does not ask."""
    asked = []
    monkeypatch.setattr(importlib.import_module("memguard.act.preflight"), "optimizers_available",
                        lambda: asked.append(1) or ("adafactor",))
    budget = _need(TrainingConfig(precision="bf16-mixed", optimizer="adamw", micro_batch_size=4))
    for allow, times in ((["precision"], 0), (["precision", "optimizer"], 1)):
        decision = memguard.preflight(_model(), BATCH, optimizer="adamw", device="cpu", budget=budget,
                                      policy="warn", allow=allow)
        assert decision.plan is not None and len(asked) == times


def test_the_report_speaks_the_plain_loop() -> None:
    target = TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=1, accumulate_grad_batches=4)
    decision = memguard.preflight(_model(), BATCH, optimizer="adamw", device="cpu", budget=_need(target),
                                  policy="auto", allow=["micro_batch"])
    text = str(decision)
    assert "decision.micro_batch_size" in text and "Trainer(" not in text
    assert "a plain PyTorch loop" in text  # the traced step order is stated


def test_micro_batch_plan_keeps_the_effective_batch() -> None:
    target = TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=1, accumulate_grad_batches=4)
    decision = memguard.preflight(_model(), BATCH, optimizer="adamw", device="cpu", budget=_need(target),
                                  policy="auto", allow=["micro_batch"])
    assert decision.micro_batch_size * decision.accumulate_grad_batches == 4
    assert decision.micro_batch_size < 4


def test_fabric_applies_the_chosen_precision() -> None:
    from lightning_fabric import Fabric

    bf16 = TrainingConfig(precision="bf16-mixed", optimizer="adamw", micro_batch_size=4)
    model = _model()
    decision = memguard.preflight(model, BATCH, optimizer="adamw", device="cpu", budget=_need(bf16),
                                  policy="auto", allow=["precision"])
    fabric = Fabric(accelerator="cpu", devices=1, **decision.fabric_kwargs())
    model, opt = fabric.setup(model, torch.optim.AdamW(model.parameters()))
    out = model(BATCH)  # Fabric's precision plugin wraps forward in autocast
    with fabric.autocast():
        dtype = model.module.head(model.module.emb(BATCH)).dtype
    fabric.backward(out)
    opt.step()
    assert dtype == torch.bfloat16 and fabric.strategy.precision.precision == "bf16-mixed"


def test_transformers_trainer_callback_abort_and_warn(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from memguard.integrations.hf import MemGuardCallback, training_arguments
    from zoo import _hf_gpt2

    ids = _ids(16, 32)
    data = [{"input_ids": r, "labels": r} for r in ids]

    def trainer_with(callback):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                              use_cpu=True, report_to=[], save_strategy="no", logging_steps=50)
        return transformers.Trainer(model=_hf_gpt2(), args=args, train_dataset=data, callbacks=[callback])

    need = required_bytes(memguard.estimate(_hf_gpt2(), {"input_ids": ids[:4], "labels": ids[:4]}, device="cpu"),
                          memguard.plan.DEFAULT_MARGIN)
    trainer = trainer_with(MemGuardCallback(policy="abort", budget=int(need * 0.8)))
    with pytest.raises(OutOfMemoryPredicted, match=r"Set TrainingArguments\((bf16|fp16|optim|per_device_train_batch_size|gradient_checkpointing)="):
        trainer.train()
    assert trainer.state.global_step == 0
    warn_cb = MemGuardCallback(policy="warn", budget=int(need * 0.8))
    trainer = trainer_with(warn_cb)
    with pytest.warns(UserWarning, match="does not fit|Nothing allowed fits"):
        trainer.train()
    assert trainer.state.global_step == 2
    fits = trainer_with(MemGuardCallback(policy="abort", budget="8GiB"))
    fits.train()
    assert fits.state.global_step == 2


def test_training_arguments_mapping() -> None:
    from memguard.integrations.hf import training_arguments
    from memguard.plan import Change

    changes = [Change("precision", "32-true", "bf16-mixed", "", 1, ""), Change("optimizer", "adamw", "adamw8bit", "", 2, ""),
               Change("micro_batch", "8 x 1", "2 x 4", "", 4, ""), Change("checkpointing", "off", "on", "", 3, "")]
    assert training_arguments(changes) == {"bf16": True, "optim": "adamw_bnb_8bit", "per_device_train_batch_size": 2,
                                           "gradient_accumulation_steps": 4, "gradient_checkpointing": True}
