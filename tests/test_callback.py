"""MemGuard in real Lightning fits on the CPU: it decides before the first step and its plan takes effect."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from memguard import MemguardError
from memguard.act.callback import MemGuard, precision_plugin
from memguard.act.guard import OutOfMemoryPredicted
from memguard.optimizers import available, real_class
from memguard.plan import OPTIMIZER_CHOICES
from lit_models import LitDecoder, pl


def _trainer(callback: MemGuard, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=[callback], **defaults)


def _requirements(allow) -> list[tuple]:
    """Every configuration the planner would try, cheapest first, with what each needs (budget 1 byte)."""
    probe = MemGuard(policy="warn", budget=1, allow=allow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(probe, max_steps=1).fit(LitDecoder())
    return probe.decision.plan.tried


def _fit(allow, budget, policy="auto", **kwargs):
    model = LitDecoder()
    callback = MemGuard(policy=policy, budget=budget, allow=allow, **kwargs)
    trainer = _trainer(callback)
    trainer.fit(model)
    return model, callback, trainer


def test_fits_as_configured_changes_nothing() -> None:
    model, callback, trainer = _fit(None, "4GiB")
    assert callback.decision.fits and callback.changes == []
    assert set(model.seen["dtype"]) == {torch.float32} and set(model.seen["batch"]) == {8}
    assert trainer.global_step == 3


def test_auto_switches_to_bf16_mixed_when_that_is_the_cheapest_fit() -> None:
    tried = _requirements(["precision"])
    base, bf16 = tried[0][1], tried[1][1]
    assert tried[1][0].precision == "bf16-mixed" and bf16 < base
    model, callback, trainer = _fit(["precision"], bf16)
    assert callback.applied.precision == "bf16-mixed"
    assert set(model.seen["dtype"]) == {torch.bfloat16}  # autocast really active in training_step
    assert trainer.precision == "bf16-mixed"
    assert set(model.seen["batch"]) == {8} and trainer.global_step == 3


def test_auto_lowers_micro_batch_and_keeps_the_effective_batch() -> None:
    tried = _requirements(["micro_batch"])
    config, need = tried[1]
    model, callback, trainer = _fit(["micro_batch"], need)
    assert callback.applied == config and config.micro_batch_size < 8
    assert set(model.seen["batch"]) == {config.micro_batch_size}
    assert trainer.accumulate_grad_batches == config.accumulate_grad_batches
    assert config.micro_batch_size * config.accumulate_grad_batches == 8
    assert model.batch_size == config.micro_batch_size
    assert len(model.seen["batch"]) == 3 * config.accumulate_grad_batches and trainer.global_step == 3


def test_auto_turns_on_checkpointing() -> None:
    tried = _requirements(["checkpointing"])
    config, need = tried[1]
    assert config.gradient_checkpointing
    model, callback, trainer = _fit(["checkpointing"], need)
    assert callback.applied.gradient_checkpointing
    assert all(getattr(b, "_memguard_checkpointed", False) for b in model.net.blocks)
    assert set(model.seen["batch"]) == {8} and trainer.global_step == 3


# torchao's optimizers swap through the same rebuild as the others; tests/test_optimizers.py rebuilds and trains
# every choice (learning rate, schedule bookkeeping, state). Their step is compiled, and compiling it cold costs
# most of a minute per class, so the real Lightning fits here use the optimizers that need no compiling.
@pytest.mark.parametrize("name", [n for n in OPTIMIZER_CHOICES if not n.startswith("ao_")])
def test_auto_swaps_to_each_optimizer_the_planner_can_choose(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each swap, one at a time: three real steps on the new class, the scheduler still driving it."""
    if not available(name):
        pytest.skip(f"{name} is not installed")
    monkeypatch.setattr("memguard.act.callback.optimizers_available", lambda: (name,))
    tried = _requirements(["optimizer"])
    assert [c.optimizer for c, _ in tried] == ["adamw", name]
    model, callback, trainer = _fit(["optimizer"], tried[1][1])
    assert callback.applied.optimizer == name
    assert model.seen["optimizer"] == [real_class(name).__name__] * 3 and trainer.global_step == 3
    # StepLR halves the learning rate every step on the new optimizer: the scheduler still drives it
    assert model.seen["lr"] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.05
    assert set(model.seen["batch"]) == {8}  # the effective batch is the run's own


def test_abort_raises_before_the_first_step() -> None:
    tried = _requirements(["precision"])
    model = LitDecoder()
    trainer = _trainer(MemGuard(policy="abort", budget=tried[0][1] - 1))
    with pytest.raises(OutOfMemoryPredicted, match=r"(?s)does not fit as configured.*plan fits.*parameters"):
        trainer.fit(model)
    assert trainer.global_step == 0 and model.seen["batch"] == []


def test_nothing_fits_aborts_under_auto_too() -> None:
    trainer = _trainer(MemGuard(policy="auto", budget=1024, allow=["precision"]))
    with pytest.raises(OutOfMemoryPredicted, match="Nothing allowed fits"):
        trainer.fit(LitDecoder())
    assert trainer.global_step == 0


def test_warn_trains_unchanged() -> None:
    tried = _requirements(["precision"])
    with pytest.warns(UserWarning, match="does not fit as configured"):
        model, callback, trainer = _fit(["precision"], tried[0][1] - 1, policy="warn")
    assert callback.applied is None and trainer.global_step == 3
    assert set(model.seen["dtype"]) == {torch.float32} and set(model.seen["batch"]) == {8}


class Untraceable(LitDecoder):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # a size computed from the weights with no bound from the input: memguard cannot trace it
        repeats = (self.net.head.weight[0, : batch.shape[1]].abs() * 4).long()
        extra = batch[0].repeat_interleave(repeats)
        return super().training_step(batch, batch_idx) + 0 * extra.float().sum()


def test_untraceable_model_trains_under_warn_and_fails_clearly_under_abort() -> None:
    model = Untraceable()
    with pytest.warns(UserWarning, match=r"could not predict.*repeat_interleave"):
        trainer = _trainer(MemGuard(policy="warn", budget="1GiB"))
        trainer.fit(model)
    assert trainer.global_step == 3
    with pytest.raises(MemguardError, match="could not predict"):
        _trainer(MemGuard(policy="abort", budget="1GiB")).fit(Untraceable())


def test_resume_reapplies_the_saved_plan(tmp_path) -> None:
    tried = _requirements(["precision"])
    budget = tried[1][1]
    model = LitDecoder()
    callback = MemGuard(budget=budget, allow=["precision"])
    trainer = _trainer(callback, enable_checkpointing=True, default_root_dir=tmp_path, max_steps=2)
    trainer.fit(model)
    ckpt = trainer.checkpoint_callback.best_model_path or str(next(tmp_path.rglob("*.ckpt")))
    # a resumed run with plenty of memory keeps the saved plan instead of deciding anew
    resumed_cb = MemGuard(budget="64GiB", allow=["precision"])
    resumed_model = LitDecoder()
    trainer2 = _trainer(resumed_cb, max_steps=4)
    trainer2.fit(resumed_model, ckpt_path=ckpt)
    assert resumed_cb.decision.fits  # with 64 GiB a fresh decision would keep 32-true...
    assert resumed_cb._resumed and resumed_cb.applied.precision == "bf16-mixed"  # ...the saved plan wins
    assert set(resumed_model.seen["dtype"]) == {torch.bfloat16}


def test_precision_plugin_class_per_strategy() -> None:
    from pytorch_lightning.plugins.precision import (
        DeepSpeedPrecision, FSDPPrecision, HalfPrecision, MixedPrecision,
    )

    class FakeStrategy:
        root_device = torch.device("cpu")

    def trainer_with(name: str):
        strategy = type(name, (FakeStrategy,), {})()
        return type("T", (pl.Trainer,), {})  .__new__(type("T", (pl.Trainer,), {})), strategy

    for name, cls in [("SingleDeviceStrategy", MixedPrecision), ("DDPStrategy", MixedPrecision),
                      ("FSDPStrategy", FSDPPrecision), ("DeepSpeedStrategy", DeepSpeedPrecision)]:
        trainer, strategy = trainer_with(name)
        trainer.__dict__["_memguard_strategy"] = strategy
        type(trainer).strategy = property(lambda self: self.__dict__["_memguard_strategy"])
        assert type(precision_plugin(trainer, "bf16-mixed")) is cls
    assert type(precision_plugin(trainer_with("DDPStrategy")[0] if False else trainer, "bf16-true")) in (
        HalfPrecision, DeepSpeedPrecision)


def test_bad_arguments_are_rejected_up_front() -> None:
    from memguard import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="unknown policy 'panic'"):
        MemGuard(policy="panic")
    with pytest.raises(InvalidArgumentError, match="unknown knob 'precisoin'"):
        MemGuard(allow=["precisoin"])
    with pytest.raises(InvalidArgumentError, match="unknown budget unit 'parsecs'.*GiB"):
        MemGuard(budget="12 parsecs")


class BuiltInConfigureModel(LitDecoder):
    """Layers created in configure_model (as for sharded initialisation) must be counted too."""

    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            from zoo import Decoder

            self.net = Decoder()


def test_model_built_in_configure_model_is_estimated_in_full() -> None:
    full = MemGuard(policy="warn", budget="4GiB")
    _trainer(full, max_steps=1).fit(LitDecoder())
    lazy = MemGuard(policy="warn", budget="4GiB")
    trainer = _trainer(lazy, max_steps=1)
    trainer.fit(BuiltInConfigureModel())
    assert lazy.decision.estimate.peak_bytes == full.decision.estimate.peak_bytes
    assert trainer.global_step == 1


class WithExampleInput(LitDecoder):
    """A toy example_input_array of 2 samples beside a real train dataloader of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.zeros(2, 64, dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)


class ExampleInputOnly(WithExampleInput):
    train_dataloader = None  # type: ignore[assignment]


def test_the_real_first_batch_comes_before_example_input_array() -> None:
    cb = MemGuard(policy="warn", budget="4GiB")
    _trainer(cb, max_steps=1).fit(WithExampleInput())
    assert "first batch of the train dataloader" in cb.batch_source
    assert cb.decision.config.micro_batch_size == 8  # the dataloader's batch, not the example's 2
    assert not cb.decision.notes
    cb2 = MemGuard(policy="warn", budget="4GiB", example_batch=torch.zeros(8, 64, dtype=torch.long))
    _trainer(cb2, max_steps=1).fit(LitDecoder())
    assert "example_batch given" in cb2.batch_source
    assert cb2.decision.estimate.peak_bytes > 0


def test_micro_batch_plan_halves_the_real_batch_not_the_example() -> None:
    """With example_input_array of 2 and a dataloader of 8, the plan must keep an effective batch of 8."""
    tried = _requirements(["micro_batch"])
    config, need = tried[1]
    model = WithExampleInput()
    callback = MemGuard(policy="auto", budget=need, allow=["micro_batch"])
    trainer = _trainer(callback)
    trainer.fit(model)
    assert callback.applied.micro_batch_size * callback.applied.accumulate_grad_batches == 8
    assert set(model.seen["batch"]) == {callback.applied.micro_batch_size} and trainer.global_step == 3


def test_example_input_array_without_a_dataloader_is_said_to_be_forward_only() -> None:
    cb = MemGuard(policy="warn", budget="4GiB")
    with pytest.raises(Exception, match="train_dataloader"):  # Lightning's own complaint, after memguard decided
        _trainer(cb, max_steps=1).fit(ExampleInputOnly())
    assert "example_input_array" in cb.batch_source
    assert any("forward pass" in n and "probably low" in n for n in cb.decision.notes)
    assert "probably low" in str(cb.decision)


class VaryingLengths(LitDecoder):
    def train_dataloader(self):  # noqa: ANN201
        from torch.utils.data import DataLoader

        data = [torch.randint(0, 512, (n,)) for n in (32, 32, 64, 64)]
        return DataLoader(data, batch_size=2)


def test_warns_when_batches_vary_in_shape() -> None:
    with pytest.warns(UserWarning, match="batches vary in shape"):
        _trainer(MemGuard(policy="warn", budget="4GiB"), max_steps=1).fit(VaryingLengths())


def test_batch_size_max_trains_with_the_largest_batch_that_fits() -> None:
    model, callback, trainer = _fit(None, "60MiB", batch_size="max")
    n = callback.found_batch_size
    assert 1 < n < 64 and max(model.seen["batch"]) == n and callback.decision.fits  # (a last batch is partial)
    assert model.batch_size == n and trainer.global_step == 3
    with pytest.raises(OutOfMemoryPredicted):  # one more sample does not fit the same budget
        _trainer(MemGuard(policy="abort", budget="60MiB")).fit(LitDecoder(batch_size=n + 1))
    power_model, power, _ = _fit(None, "60MiB", batch_size="power")
    assert power.found_batch_size & (power.found_batch_size - 1) == 0
    assert power.found_batch_size <= n < 2 * power.found_batch_size
    assert set(power_model.seen["batch"]) == {power.found_batch_size}
    # a resumed run keeps the saved batch size
    resumed = MemGuard(batch_size="max", budget="1GiB")
    fresh = LitDecoder()
    resumed._run = (trainer, fresh)
    resumed.load_state_dict(callback.state_dict())
    assert fresh.batch_size == n == resumed.found_batch_size
    with pytest.raises(MemguardError, match="Did you mean 'max'"):
        MemGuard(batch_size="maximum")


def test_lightningcli_config_with_memguard(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """LightningCLI builds the callback from a YAML config (class_path / init_args), as users write it."""
    from pytorch_lightning.cli import LightningCLI

    caplog.set_level(logging.INFO)  # the report is Lightning's rank_zero_info

    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  max_steps: 2\n  logger: false\n"
        "  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n    - class_path: memguard.MemGuard\n      init_args:\n        policy: abort\n"
        "        budget: 1MiB\n        allow: [precision]\n"
        "model:\n  batch_size: 8\n"
    )
    with pytest.raises(OutOfMemoryPredicted, match=r"1\.00 MiB available \(budget\)"):
        LightningCLI(LitDecoder, save_config_callback=None, args=["fit", "--config", str(config)])
    config.write_text(config.read_text().replace("budget: 1MiB", "budget: 8GiB"))
    cli = LightningCLI(LitDecoder, save_config_callback=None, args=["fit", "--config", str(config)])
    assert cli.trainer.global_step == 2
    assert [type(c).__name__ for c in cli.trainer.callbacks].count("MemGuard") == 1
    assert "It fits" in caplog.text
