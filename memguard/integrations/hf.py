"""memguard for the transformers Trainer: ``Trainer(..., callbacks=[MemGuardCallback()])``.

The check runs in ``on_train_begin``, when the optimizer exists and nothing has been trained. The answer is
given in TrainingArguments terms (bf16, optim, gradient_checkpointing, per_device_train_batch_size /
gradient_accumulation_steps), since those are what a user changes. The Trainer's precision, optimizer and
data loader are already built at that point, so under "auto" memguard applies only what can still change
before the first step (activation checkpointing) and aborts with the full recipe otherwise.

The largest batch is answered before the Trainer exists (:func:`max_batch_arguments`), for the same reason:
the Trainer reads ``per_device_train_batch_size`` once, when it is constructed.
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("memguard.integrations.hf needs transformers: pip install 'memguard[transformers]'") from exc

from memguard import advice, checkpointing, validation
from memguard.act.guard import Decision, OutOfMemoryPredicted, check_policy, explain
from memguard.errors import InvalidArgumentError, unknown_name
from memguard.units import parse_bytes
from memguard.plan import DEFAULT_MARGIN, Change, resize_batch
from memguard.quiet import quiet
from memguard.results import SizeResult

OPTIM_NAMES = {**{hf: ours for ours, hf in advice.HF_OPTIM.items()}, "adamw_torch": "adamw",
               "adamw_torch_fused": "adamw", "adamw_8bit": "adamw8bit", "paged_adamw_32bit": "paged_adamw",
               "sgd": "sgd", "adagrad": "adagrad", "rmsprop": "rmsprop", "lion_32bit": "lion"}
"""memguard's name for each TrainingArguments(optim=...) it predicts."""

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
        self.margin = validation.margin(margin, "MemGuardCallback(margin=)")
        self.example_batch = example_batch
        self.decision: Decision | None = None
        self.suggested: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        from memguard.act.preflight import preflight

        batch = self.example_batch if self.example_batch is not None else next(iter(train_dataloader))
        precision = _precision_of(args)
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


def max_batch_arguments(args: Any, model: Any, train_dataset: Any, *, data_collator: Any = None,
                        budget: int | float | str | None = None, gpu: Any = None, margin: float | None = None,
                        multiple_of: int = 1, power_of_two: bool = False, optimizer: Any = None,
                        ) -> tuple[Any, SizeResult]:
    """TrainingArguments with ``per_device_train_batch_size`` set to the largest batch predicted to fit,
    and the search's result. Call it before building the Trainer: the Trainer fixes its batch size when it
    is constructed (before any callback runs), so this is the transformers side of Lightning's
    ``MemGuard(batch_size="max")``. The run is read from ``args`` as MemGuardCallback reads it (bf16/fp16,
    optim, gradient_checkpointing, gradient_accumulation_steps, torch_compile); batches are
    ``data_collator`` (transformers' default collator when None) over the dataset's first samples, grown by
    repeating them. ``optimizer`` overrides ``args.optim`` (a catalog name, class or factory)."""
    from dataclasses import replace

    from memguard.sizing import max_batch_size

    name = optimizer if optimizer is not None else _optimizer_of(args)
    collate = data_collator
    if collate is None:
        from transformers import default_data_collator as collate
    try:
        count = len(train_dataset)
    except TypeError as exc:
        raise InvalidArgumentError("max_batch_arguments: train_dataset must be a dataset with a length (samples "
                                   f"are taken from its start), got {type(train_dataset).__name__}") from exc
    if count < 1:
        raise InvalidArgumentError("max_batch_arguments: train_dataset is empty")
    base = collate([train_dataset[i] for i in range(min(count, 8))])

    def make_batch(n: int) -> Any:
        return resize_batch(base, n)

    device = "cpu" if getattr(args, "use_cpu", False) and gpu is None else "cuda"
    found = max_batch_size(
        model, make_batch, budget=budget, gpu=gpu, margin=margin, multiple_of=multiple_of,
        power_of_two=power_of_two, start=args.per_device_train_batch_size, optimizer=name,
        precision=_precision_of(args), device=device, gradient_checkpointing=bool(args.gradient_checkpointing) or None,
        accumulate_grad_batches=args.gradient_accumulation_steps, compile=_compile_of(args))
    if found.batch_size < 1:
        return args, found
    return replace(args, per_device_train_batch_size=found.batch_size), found


def _optimizer_of(args: Any) -> str:
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in OPTIM_NAMES:
        error = unknown_name("TrainingArguments.optim", optim, OPTIM_NAMES)
        raise InvalidArgumentError(f"{error} Or pass optimizer= (a memguard catalog name, class or factory).")
    return OPTIM_NAMES[optim]


def _precision_of(args: Any) -> str:
    return "bf16-mixed" if args.bf16 else "16-mixed" if args.fp16 else "32-true"


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

