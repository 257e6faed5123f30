"""memguard for the transformers Trainer: ``Trainer(..., callbacks=[MemGuardCallback()])``.

The check runs in ``on_train_begin``, when the optimizer exists and nothing has been trained. The answer is
given in TrainingArguments terms (bf16, optim, gradient_checkpointing, per_device_train_batch_size /
gradient_accumulation_steps), since those are what a user changes. The Trainer's precision, optimizer and
data loader are already built at that point, so under "auto" memguard applies only what can still change
before the first step (activation checkpointing) and aborts with the full recipe otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("memguard.integrations.hf needs transformers: pip install 'memguard[transformers]'") from exc

from memguard import advice, checkpointing
from memguard.act.guard import Decision, OutOfMemoryPredicted, check_policy, explain
from memguard.units import parse_bytes
from memguard.plan import DEFAULT_MARGIN, Change
from memguard.quiet import quiet

def training_arguments(changes: list[Change]) -> dict[str, Any]:
    """The TrainingArguments that apply a plan's changes."""
    out: dict[str, Any] = {}
    for change in changes:
        out.update(advice.training_arguments(change.knob, change.after))
    return out


class MemGuardCallback(TrainerCallback):
    """Check a transformers Trainer run before its first step.

    policy: "auto" (default, as for the Lightning callback) turns on activation checkpointing when that
    alone makes the run fit; any other change (precision, optimizer, batch size) must be made in
    TrainingArguments before the Trainer is built, so auto then stops the run with the arguments to set.
    "abort" raises memguard.OutOfMemoryPredicted unless the run fits as configured; "warn" warns.
    """

    def __init__(self, policy: str = "auto", budget: int | str | None = None, margin: float = DEFAULT_MARGIN,
                 example_batch: Any = None) -> None:
        self.policy = check_policy(policy)
        self.budget = parse_bytes(budget)
        self.margin = margin
        self.example_batch = example_batch
        self.decision: Decision | None = None
        self.suggested: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        from memguard.act.preflight import preflight

        batch = self.example_batch if self.example_batch is not None else next(iter(train_dataloader))
        precision = "bf16-mixed" if args.bf16 else "16-mixed" if args.fp16 else "32-true"
        try:
            with warnings.catch_warnings(), quiet():
                warnings.simplefilter("ignore")  # preflight's own warning; this callback words its own
                decision = preflight(
                    model, dict(batch), optimizer=optimizer if optimizer is not None else "adamw",
                    precision=precision, device=args.device, budget=self.budget, policy="warn", margin=self.margin,
                    gradient_checkpointing=bool(args.gradient_checkpointing) or None,
                    accumulate_grad_batches=args.gradient_accumulation_steps, dialect="transformers",
                    compile=_compile_of(args),
                )
        except Exception as exc:  # noqa: BLE001 - memguard's own failure never stops a run unless asked
            if self.policy == "abort":
                raise
            warnings.warn(f"memguard could not check this run ({exc}); training continues", stacklevel=2)
            return
        self.decision = decision
        if decision.fits:
            return
        self.suggested = training_arguments(decision.plan.changes) if decision.plan else {}
        verb = "Set" if decision.will_fit else "The closest miss sets"
        message = explain(decision) + f" {verb} TrainingArguments({_kwargs(self.suggested)})."
        if self.policy == "warn":
            warnings.warn(message, stacklevel=2)
            return
        if self.policy == "auto" and decision.plan is not None and decision.plan.fits and (
            set(self.suggested) == {"gradient_checkpointing"}
        ):
            checkpointing.enable(model)
            warnings.warn(message + " Activation checkpointing was turned on.", stacklevel=2)
            return
        raise OutOfMemoryPredicted(message + "\n\n" + str(decision), decision)


def _kwargs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _compile_of(args: Any) -> dict[str, Any] | None:
    """``TrainingArguments(torch_compile=True, torch_compile_backend=..., torch_compile_mode=...)``: the Trainer
    compiles the whole model that way before training (None: as the model is)."""
    if not getattr(args, "torch_compile", False):
        return None
    spec: dict[str, Any] = {"backend": getattr(args, "torch_compile_backend", None) or "inductor"}
    if getattr(args, "torch_compile_mode", None):
        spec["mode"] = args.torch_compile_mode
    return spec

