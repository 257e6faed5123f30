"""How to make a plan's change by hand, in the words of the loop the user writes.

The planner decides *what* changes (a knob, from a value to another); this module says *how*, once per
front end: a Lightning user changes ``Trainer(...)`` arguments, a transformers user ``TrainingArguments``,
a plain PyTorch loop applies a :class:`memguard.act.guard.Decision`. Keeping every phrasing here means a report
never tells a transformers user to set ``Trainer(accumulate_grad_batches=4)``.
"""

from __future__ import annotations

from typing import Any

from memguard.errors import unknown_name
from memguard.optimizers import CATALOG

DIALECTS = ("lightning", "transformers", "pytorch")
"""Lightning (``memguard check`` and the MemGuard callback), the transformers Trainer, plain PyTorch."""

HF_OPTIM = {"adamw8bit": "adamw_bnb_8bit", "ao_adamw8bit": "adamw_torch_8bit", "ao_adamw4bit": "adamw_torch_4bit",
            "adafactor": "adafactor", "paged_adamw8bit": "paged_adamw_8bit"}
"""TrainingArguments(optim=...) names of the same optimizers."""


def split_micro_batch(after: str) -> tuple[int, int]:
    """``"8 x 2"`` (a micro_batch change's ``after``) -> (micro-batch size, accumulation steps)."""
    micro, accumulate = (int(x) for x in after.split(" x "))
    return micro, accumulate


def training_arguments(knob: str, after: str) -> dict[str, Any]:
    """The TrainingArguments that make one change in a transformers Trainer run."""
    if knob == "precision":
        return {"bf16": True} if after.startswith("bf16") else {"fp16": True}
    if knob == "optimizer":
        return {"optim": HF_OPTIM.get(after, after)}
    if knob == "checkpointing":
        return {"gradient_checkpointing": True}
    if knob == "micro_batch":
        micro, accumulate = split_micro_batch(after)
        return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulate}
    if knob == "sharding":
        if after == "tp":
            return {"tp_plan": "auto (from_pretrained)"}
        return {"deepspeed": "a ZeRO-2 config"} if after.startswith("deepspeed") else {"fsdp": "full_shard"}
    if knob == "offload":
        return {"deepspeed": "a ZeRO config with offload_optimizer"}
    raise ValueError(f"no advice for knob {knob!r}")


def how_to(knob: str, after: str, dialect: str = "lightning") -> str:
    """One change, said the way a user of ``dialect`` makes it."""
    if dialect not in DIALECTS:
        raise unknown_name("dialect", dialect, DIALECTS)
    if dialect == "transformers":
        return "TrainingArguments(" + ", ".join(f"{k}={v!r}" for k, v in training_arguments(knob, after).items()) + ")"
    plain = dialect == "pytorch"
    if knob == "precision":
        if not plain:
            return f"Trainer(precision='{after}')"
        if after.endswith("-true"):
            return "decision.apply(model, optimizer) casts the weights to half precision"
        return "run forward and loss under decision.autocast()"
    if knob == "optimizer":
        row = CATALOG.get(after)
        cls = row.cls_path if row is not None else after
        return f"decision.apply(model, optimizer) rebuilds it as {cls}" if plain else cls
    if knob == "micro_batch":
        micro, accumulate = split_micro_batch(after)
        if plain:
            return (f"micro-batches of {micro}, {accumulate} backward passes per optimizer step "
                    "(decision.micro_batch_size, decision.accumulate_grad_batches)")
        return f"batch_size={micro}, Trainer(accumulate_grad_batches={accumulate})"
    if knob == "checkpointing":
        if plain:
            return "decision.apply(model, optimizer) checkpoints the repeated blocks"
        return "activation checkpointing on the repeated blocks"
    if knob == "sharding":
        if after == "tp":
            return ("Trainer(strategy=ModelParallelStrategy()) with the module's configure_model applying its "
                    "tensor-parallel plan; in memguard check, trainer.strategy: tp")
        return f"Trainer(strategy='{after}')"
    if knob == "offload":
        return "optimizer state in host memory"
    raise ValueError(f"no advice for knob {knob!r}")
