"""MemGuard: the Lightning callback that decides before the first step whether a run fits, and acts.

The callback is thin: it reads what Lightning is about to train (module, training_step, optimizers,
precision, accumulation, an example batch), hands it to :mod:`memguard.act.guard` (capacity, estimate, plan),
makes every rank agree, and applies the chosen plan through Lightning's own switches:

- in ``setup`` (before the strategy moves the model and builds optimizers, and before the dataloaders are
  built): with ``batch_size="max"``, set the largest batch that fits (memguard.sizing, every rank agreeing);
  decide; switch the precision plugin; change the data's ``batch_size`` and ``trainer.accumulate_grad_batches``;
- in ``on_fit_start`` (the model is complete and the optimizers exist): turn on activation checkpointing,
  swap the optimizer class over the same parameter groups and re-point the LR schedulers;
- after the first steps on CUDA: compare the prediction with the measured peak.

memguard's own failures never stop training under "warn" or "auto"; under "abort" they raise.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memguard import strategies, _lightning, checkpointing, validation
from memguard.errors import MemguardError
from memguard.results import Estimate
from memguard.act.guard import (
    Decision,
    OutOfMemoryPredicted,
    check_policy,
    decide,
    detect_capacity,
    explain,
    optimizer_factory,
    optimizers_available,
)
from memguard.optimizers import CATALOG, first_optimizer, repoint_scheduler, swap_plan
from memguard.plan import DEFAULT_MARGIN, KNOBS, TrainingConfig, batch_size_of, estimator, required_bytes
from memguard.sizing import Ladder, per_unit, search
from memguard.precision import Precision
from memguard.quiet import quiet
from memguard.units import format_bytes, parse_bytes
from memguard.losses import forward_sum_loss, silence_logging, training_step_loss

STATE_VERSION = 1

FORWARD_ONLY_NOTE = ("The batch came from example_input_array because the run has no train dataloader: only a "
                     "forward pass with the summed output as the loss was traced, so the prediction is probably low "
                     "(no real loss, and its batch size may not be the real one). Pass MemGuard(example_batch=...).")


class MemGuard(*_lightning.callback_bases()):  # type: ignore[misc]
    """Stop a Lightning run that would run out of memory before its first step, or make it fit.

    policy: "auto" applies the cheapest plan that fits (default), "abort" raises
        :class:`memguard.OutOfMemoryPredicted` before the first step, "warn" only warns.
    budget: bytes or a size string ("12GiB") to use instead of the device's free memory.
    margin: safety margin on top of the prediction (stated in every report).
    allow: the knobs the plan may turn, in order ("precision", "optimizer", "micro_batch",
        "checkpointing"); [] forbids any change. "offload" and "sharding" are accepted but never applied
        here: this callback installs no host-offloading optimizer, and the strategy is launched before it
        runs (``memguard check`` proposes both).
    example_batch: a batch exactly as ``training_step`` receives it; otherwise the first batch of the
        train dataloader; only when the run has none, the module's ``example_input_array`` (a forward pass
        alone, said in the report to be probably low).
    batch_arg_name: the attribute (on the module, its hparams or the datamodule) that sets the
        dataloader's batch size, for the micro-batch knob.
    check_steps: after this many training steps on CUDA, compare the prediction with the real peak.
    batch_size: "max" sets ``batch_arg_name`` to the largest batch size that fits before the dataloaders
        are built, "power" to the largest power of two (both as multiples of ``batch_size_multiple``): what
        Lightning's BatchSizeFinder finds by trial, predicted with no trial step. Every rank takes the
        smallest rank's answer; a resumed run keeps the saved one.
    """

    def __init__(
        self,
        policy: str = "auto",
        budget: int | str | None = None,
        margin: float = DEFAULT_MARGIN,
        allow: Iterable[str] | None = None,
        *,
        example_batch: Any = None,
        loss_fn: Any = None,
        batch_arg_name: str = "batch_size",
        allow_bf16_true: bool = False,
        check_steps: int = 2,
        batch_size: str | None = None,
        batch_size_multiple: int = 1,
    ) -> None:
        super().__init__()
        if batch_size not in (None, "max", "power"):
            from memguard.errors import unknown_name

            raise unknown_name("MemGuard batch_size", str(batch_size), ["max", "power"])
        self.batch_size = batch_size
        self.ladder = Ladder(step=batch_size_multiple, power=batch_size == "power")
        self.found_batch_size: int | None = None
        self.policy = check_policy(policy)
        self.budget = parse_bytes(budget)
        self.margin = validation.margin(margin, "MemGuard(margin=)")
        self.allow = validation.names(allow, "MemGuard(allow=)", KNOBS, "knob") if allow is not None else None
        self.example_batch = example_batch
        self.loss_fn = loss_fn
        self.batch_arg_name = batch_arg_name
        self.allow_bf16_true = allow_bf16_true
        self.check_steps = check_steps
        self.decision: Decision | None = None
        self.applied: TrainingConfig | None = None
        self.changes: list[dict] = []
        self.batch_source = ""
        self.forward_only = False
        self._pending_optimizer: str | None = None
        self._pending_checkpointing = False
        self._resumed = False
        self._checked = False
        self._run: tuple[Any, Any] | None = None

    # Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._run = (trainer, pl_module)
        with quiet():
            prepared, error = self._safely(self._prepare, trainer, pl_module)
            if self.batch_size is not None:
                error = self._size_batch(trainer, pl_module, prepared, error)
            decision = None
            if error is None:
                decision, error = self._safely(self._decide, trainer, pl_module, prepared)
        verdict = self._agree(trainer, decision, error)
        self._act(trainer, pl_module, verdict)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        try:
            with quiet():  # torchao and bitsandbytes while the optimizer is rebuilt
                if self._pending_checkpointing:
                    how = checkpointing.enable(pl_module)
                    self._log(trainer, f"memguard: activation checkpointing on ({how})")
                if self._pending_optimizer:
                    self._swap_optimizers(trainer, self._pending_optimizer)
                if self.applied is not None and trainer.logger is not None and self.changes:
                    trainer.logger.log_hyperparams({"memguard/plan": self._summary(),
                                                    "memguard/config": str(self.applied.to_dict())})
        except Exception as exc:  # noqa: BLE001 - never crash training for memguard's own failure
            if self.policy == "abort":
                raise MemguardError(f"memguard could not apply its plan: {exc}") from exc
            warnings.warn(f"memguard could not apply its plan ({exc}); training continues unchanged",
                          stacklevel=2)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._checked or trainer.global_step < self.check_steps:
            return
        self._checked = True
        device = trainer.strategy.root_device
        if device.type != "cuda" or self.decision is None:
            return
        try:
            allocated = torch.cuda.max_memory_allocated(device)
            reserved = torch.cuda.max_memory_reserved(device)
            est = self._expected_estimate()
            msg = (f"memguard self-check after {trainer.global_step} steps: max_memory_allocated "
                   f"{format_bytes(allocated)} (predicted {format_bytes(est.peak_bytes)}), "
                   f"max_memory_reserved {format_bytes(reserved)} (predicted {format_bytes(est.reserved_bytes)})")
            self._log(trainer, msg)
            if allocated > est.peak_bytes or reserved > est.reserved_bytes:
                warnings.warn(msg + ": the prediction was exceeded", stacklevel=2)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"memguard/measured_allocated_bytes": allocated,
                                            "memguard/predicted_allocated_bytes": est.peak_bytes,
                                            "memguard/measured_reserved_bytes": reserved,
                                            "memguard/predicted_reserved_bytes": est.reserved_bytes},
                                           step=trainer.global_step)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"memguard self-check failed: {exc}", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.applied is not None:
            state = {"version": STATE_VERSION, "config": self.applied.to_dict(), "changes": list(self.changes)}
        if self.found_batch_size:
            state.update(version=STATE_VERSION, batch_size=self.found_batch_size)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run trains with the plan it started with. Lightning restores callback state after
        ``setup`` but before the strategy builds the model and optimizers, so the saved plan replaces
        whatever ``setup`` decided for this run."""
        if self._run is None:
            return
        trainer, pl_module = self._run
        if state_dict.get("batch_size"):
            self.found_batch_size = int(state_dict["batch_size"])
            _lightning.package_of(trainer).utilities.parsing.lightning_setattr(
                pl_module, self.batch_arg_name, self.found_batch_size)
            self._log(trainer, f"memguard: resuming with the batch size saved in the checkpoint: "
                               f"{self.found_batch_size}")
        if not state_dict.get("config"):
            return
        self._resumed = True
        self.changes = list(state_dict.get("changes", []))
        self._apply_early(trainer, pl_module, TrainingConfig(**state_dict["config"]))
        self._log(trainer, f"memguard: resuming with the plan saved in the checkpoint: {self._summary()}")

    # Deciding -------------------------------------------------------------------------------------------
    @staticmethod
    def _safely(step: Any, *args: Any) -> tuple[Any, str | None]:
        try:
            return step(*args), None
        except Exception as exc:  # noqa: BLE001 - reported to every rank, acted on by policy
            return None, f"{type(exc).__name__}: {exc}"

    def _decide(self, trainer: Any, pl_module: Any, prepared: _Prepared) -> Decision:
        decision = decide(prepared.config, prepared.evaluate, prepared.capacity, policy=self.policy,
                          margin=self.margin, allow=prepared.allow, allow_bf16_true=self.allow_bf16_true,
                          optimizers_available=optimizers_available, device_type=prepared.device_type)
        if self.forward_only:
            decision.notes.append(FORWARD_ONLY_NOTE)
        return decision

    def _size_batch(self, trainer: Any, pl_module: Any, prepared: _Prepared | None, error: str | None) -> str | None:
        """``batch_size="max"|"power"``: each rank searches its largest batch (memguard.sizing), every rank
        takes the smallest answer (collective, reached by every rank whatever happened before), and the
        batch-size attribute is set before the dataloaders are built. Returns the error to act on."""
        local = None
        parsing = _lightning.package_of(trainer).utilities.parsing
        if error is None and prepared is not None:
            try:
                if not parsing.lightning_hasattr(pl_module, self.batch_arg_name):
                    raise MemguardError(f"MemGuard(batch_size={self.batch_size!r}) sets the attribute "
                                        f"{self.batch_arg_name!r} (batch_arg_name) on the module, its hparams or the "
                                        "datamodule, and the run has none")
                base = prepared.config

                def required(n: int) -> tuple[int, Estimate]:
                    est = prepared.evaluate(replace(base, micro_batch_size=n))
                    return required_bytes(est, self.margin), est

                size = base.micro_batch_size  # the first batch's: the search starts there
                found = search("batch_size", required, prepared.capacity.bytes, self.margin, self.ladder,
                               per_unit=per_unit(self.margin), start=(size, *required(size)))
                local = found.value
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
        everyone = _all_gather({"n": local, "error": error}, trainer.world_size)
        errors = [r["error"] for r in everyone if r["error"]]
        if errors:
            return errors[0]
        n = min(r["n"] for r in everyone)
        if n < 1:
            self._log(trainer, "memguard: not even a batch of one sample fits; the batch size is left as it is")
            return None
        self.found_batch_size = n
        parsing.lightning_setattr(pl_module, self.batch_arg_name, n)
        prepared.config = replace(prepared.config, micro_batch_size=n)
        ranks = " (the smallest rank's answer)" if trainer.world_size > 1 else ""
        self._log(trainer, f"memguard: {self.batch_arg_name} set to {n}{ranks}: the largest "
                           f"{'power of two ' if self.batch_size == 'power' else ''}batch predicted to fit "
                           f"{format_bytes(prepared.capacity.bytes)} with a {self.margin:.0%} margin, "
                           "found with no trial step")
        return None

    def _prepare(self, trainer: Any, pl_module: Any) -> _Prepared:
        """What deciding needs: the capacity, the batch and loss, the estimate function and the run's
        current configuration."""
        device = trainer.strategy.root_device
        capacity = detect_capacity(device, self.budget)
        batch, loss_fn = self._example(trainer, pl_module)
        model = self._model_for_estimate(pl_module)
        optimizer_factory, optimizer_name = self._optimizers(model, device)
        config = self._current_config(trainer, pl_module, batch)
        config = TrainingConfig(config.precision, optimizer_name, config.micro_batch_size,
                                config.accumulate_grad_batches, config.gradient_checkpointing)
        def prepare(twin: nn.Module) -> None:
            silence_logging(twin)
            if hasattr(twin, "_trainer"):
                twin._trainer = trainer  # copies drop it; training_step may read trainer state

        fixed: dict[str, Any] = dict(
            loss_fn=loss_fn, device="cuda" if device.type == "cuda" else "cpu", zero_grad_before_backward=True,
            prepare_model=prepare, shared=(trainer,),
        )
        if trainer.world_size > 1:  # this rank's share under the Trainer's own strategy object
            fixed.update(strategy=trainer.strategy, world_size=trainer.world_size, num_nodes=trainer.num_nodes)
        if device.type == "cuda" and capacity.gpu is not None:
            fixed["gpu"] = capacity.gpu

        evaluate = estimator(model, batch, optimizers={optimizer_name: {"optimizer": optimizer_factory}}, **fixed)
        allow = self._allowed_knobs(trainer, pl_module, device, optimizer_name)
        return _Prepared(config, evaluate, capacity, allow, device.type)

    def _current_config(self, trainer: Any, pl_module: Any, batch: Any) -> TrainingConfig:
        precision = Precision.parse(trainer.precision)
        micro = batch_size_of(batch) if batch is not None else 1
        return TrainingConfig(precision=precision, micro_batch_size=micro,
                              accumulate_grad_batches=int(trainer.accumulate_grad_batches),
                              gradient_checkpointing=checkpointing.is_enabled(pl_module))

    def _model_for_estimate(self, pl_module: nn.Module) -> nn.Module:
        """A meta-device copy with ``configure_model`` run, so layers built there are counted too. Under
        ``ModelParallelStrategy`` the module is returned as it is: the tensor-parallel estimate runs
        ``configure_model`` itself, against its fake mesh."""
        hook = getattr(type(pl_module), "configure_model", None)
        base = getattr(_lightning.package_of_module(pl_module), "LightningModule", None)
        if hook is None or base is None or hook is getattr(base, "configure_model", None):
            return pl_module
        if pl_module._trainer is not None and strategies.from_class_name(
                type(pl_module._trainer.strategy).__name__) == "model_parallel":
            return pl_module
        memo: dict[int, Any] = {id(pl_module._trainer): pl_module._trainer} if pl_module._trainer else {}
        for p in pl_module.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in pl_module.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        twin = copy.deepcopy(pl_module, memo)
        with torch.device("meta"):
            twin.configure_model()
        return twin

    def _example(self, trainer: Any, pl_module: Any) -> tuple[Any, Any]:
        """The batch to trace and the loss function that consumes it, and say where the batch came from.

        The real training step on a real batch comes first: ``example_input_array`` is a forward-only
        example, often of a toy batch size, so it is used only when the run has no train dataloader."""
        step_loss = self.loss_fn or _training_step_loss
        self.forward_only = False
        if self.example_batch is not None:
            self.batch_source = "the example_batch given to MemGuard, through training_step"
            return self.example_batch, step_loss
        first = self._first_training_batch(trainer)
        if first is not None:
            self.batch_source = "the first batch of the train dataloader, through training_step"
            return first, step_loss
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            self.batch_source = "the module's example_input_array (no train dataloader to read)"
            self.forward_only = True
            return example, self.loss_fn or forward_sum_loss
        raise MemguardError("memguard found no batch to trace: the run has no train dataloader yet and the module "
                            "no example_input_array; pass MemGuard(example_batch=...) with a batch as "
                            "training_step receives it")

    @staticmethod
    def _first_training_batch(trainer: Any) -> Any:
        """The first batch of a fresh iterator over the train dataloader (None when the run defines none);
        warns when the second batch has another shape, since only the first is traced."""
        source = trainer.fit_loop._data_source
        if not source.is_defined():
            return None
        loader = source.dataloader()
        if loader is None:
            return None
        iterator = iter(loader)
        try:
            first = next(iterator)
        except StopIteration:
            return None
        try:
            second = next(iterator)
            if _shapes(second) != _shapes(first):
                warnings.warn("memguard: training batches vary in shape; only the first batch was traced, so later "
                              "batches may need more memory. Pass MemGuard(example_batch=...) with the largest batch.",
                              stacklevel=2)
        except StopIteration:
            pass
        del iterator
        return first

    def _optimizers(self, pl_module: Any, device: torch.device) -> tuple[Any, str]:
        optimizer = first_optimizer(pl_module.configure_optimizers())
        if optimizer is None:
            return None, "none"
        return optimizer_factory(optimizer, pl_module, device.type)

    def _allowed_knobs(self, trainer: Any, pl_module: Any, device: torch.device, optimizer: str) -> tuple[str, ...]:
        knobs = list(self.allow if self.allow is not None else KNOBS)
        pkg = _lightning.package_of(trainer)
        if "micro_batch" in knobs and not pkg.utilities.parsing.lightning_hasattr(pl_module, self.batch_arg_name):
            knobs.remove("micro_batch")
        if "offload" in knobs:
            knobs.remove("offload")  # needs a host-offloading optimizer wrapper this callback does not install
        if "sharding" in knobs:
            knobs.remove("sharding")  # the strategy is launched before any callback runs: the CLI proposes it
        if "checkpointing" in knobs and not checkpointing.available(pl_module):
            knobs.remove("checkpointing")
        return tuple(knobs)

    # Agreeing -------------------------------------------------------------------------------------------
    def _agree(self, trainer: Any, decision: Decision | None, error: str | None) -> dict[str, Any]:
        """Every rank contributes its result; all act on the same verdict, so no rank waits alone."""
        mine = {
            "rank": trainer.global_rank,
            "error": error,
            "fits": decision.fits if decision else None,
            "plan_fits": bool(decision and decision.plan and decision.plan.fits),
            "config": decision.plan.config.to_dict() if decision and decision.plan else None,
            "changes": [vars(c) for c in decision.plan.changes] if decision and decision.plan else [],
            "cost": decision.plan.cost if decision and decision.plan else 0.0,
            "message": explain(decision) if decision else error,
        }
        everyone = _all_gather(mine, trainer.world_size)
        self.decision = decision
        errors = [r for r in everyone if r["error"]]
        if errors:
            return {"action": "error", "detail": errors[0]}
        if all(r["fits"] for r in everyone):
            return {"action": "fits", "detail": mine}
        short = [r for r in everyone if not r["fits"]]
        if any(not r["plan_fits"] for r in short):
            worst = next(r for r in short if not r["plan_fits"])
            return {"action": "nothing_fits", "detail": worst}
        winner = max(short, key=lambda r: (r["cost"], r["rank"] == 0))
        return {"action": "plan", "detail": winner}

    def _act(self, trainer: Any, pl_module: Any, verdict: dict[str, Any]) -> None:
        action, detail = verdict["action"], verdict["detail"]
        rank = detail.get("rank", 0)
        if action == "error":
            msg = f"memguard could not predict this run's memory (rank {rank}): {detail['error']}"
            if self.policy == "abort":
                raise MemguardError(msg)
            warnings.warn(msg + "; training continues unchanged", stacklevel=2)
            return
        if self.decision is not None:
            self._log(trainer, explain(self.decision))
            self._log(trainer, f"memguard: traced {self.batch_source}; step order: {self.decision.estimate.step_order}.")
        if action == "fits":
            return
        if action == "nothing_fits" or self.policy == "abort":
            message = detail["message"] if rank == trainer.global_rank else f"rank {rank}: {detail['message']}"
            if self.policy == "warn":
                warnings.warn(message, stacklevel=2)
                return
            raise OutOfMemoryPredicted(message + ("\n\n" + str(self.decision) if self.decision else ""),
                                       self.decision)
        if self.policy == "warn":
            warnings.warn(detail["message"], stacklevel=2)
            return
        target = TrainingConfig(**detail["config"])
        self.changes = detail["changes"]
        self._apply_early(trainer, pl_module, target)
        self._log(trainer, f"memguard: applying plan: {self._summary()}")

    # Applying -------------------------------------------------------------------------------------------
    def _apply_early(self, trainer: Any, pl_module: Any, target: TrainingConfig) -> None:
        """Set what must change before the strategy sets up: compared with the run's live settings, so
        applying a saved plan after a fresh decision lands on the saved plan exactly."""
        if target.precision != Precision.parse(trainer.precision):
            trainer.strategy.precision_plugin = precision_plugin(trainer, target.precision)
        parsing = _lightning.package_of(trainer).utilities.parsing
        if parsing.lightning_hasattr(pl_module, self.batch_arg_name) and (
            parsing.lightning_getattr(pl_module, self.batch_arg_name) != target.micro_batch_size
        ):
            parsing.lightning_setattr(pl_module, self.batch_arg_name, target.micro_batch_size)
        trainer.accumulate_grad_batches = target.accumulate_grad_batches
        self._pending_checkpointing = target.gradient_checkpointing and not checkpointing.is_enabled(pl_module)
        self._pending_optimizer = target.optimizer if target.optimizer in CATALOG and any(
            c.get("knob") == "optimizer" for c in self.changes) else None
        self.applied = target

    def _swap_optimizers(self, trainer: Any, name: str) -> None:
        swap = swap_plan(name)
        cls = swap.cls
        strategy = trainer.strategy
        new_list = []
        for old in strategy.optimizers:
            new = swap.build(old)
            for config in strategy.lr_scheduler_configs:
                if config.scheduler.optimizer is old:
                    repoint_scheduler(config.scheduler, new)
            new_list.append(new)
        strategy.optimizers = new_list
        self._log(trainer, f"memguard: optimizer swapped to {cls.__module__}.{cls.__name__}")

    # Reporting ------------------------------------------------------------------------------------------
    def _summary(self) -> str:
        return "; ".join(f"{c['knob']}: {c['before']} -> {c['after']} ({c['how']})" for c in self.changes) or "none"

    def _expected_estimate(self) -> Estimate:
        d = self.decision
        if d is not None and not d.fits and d.plan is not None and d.plan.fits and self.applied == d.plan.config:
            return d.plan.estimate
        return d.estimate

    @staticmethod
    def _log(trainer: Any, message: str) -> None:
        if trainer.is_global_zero:
            _lightning.package_of(trainer).utilities.rank_zero_info(message)


# ---------------------------------------------------------------------------------------------------------
# Helpers (module level so they are easy to test)


@dataclass
class _Prepared:
    """One rank's inputs to the decision (and to the batch-size search that may come first)."""

    config: TrainingConfig
    evaluate: Any
    capacity: Any
    allow: tuple[str, ...]
    device_type: str


def precision_plugin(trainer: Any, precision: str) -> Any:
    """Lightning's precision plugin for ``precision`` under the trainer's strategy."""
    pkg = _lightning.package_of(trainer)
    plugins = pkg.plugins.precision
    strategy = type(trainer.strategy).__name__
    if "FSDP" in strategy:
        return plugins.FSDPPrecision(precision)
    if "DeepSpeed" in strategy:
        return plugins.DeepSpeedPrecision(precision)
    if precision in ("bf16-true", "16-true"):
        return plugins.HalfPrecision(precision)
    if precision.endswith("-mixed"):
        device = "cuda" if trainer.strategy.root_device.type == "cuda" else "cpu"
        return plugins.MixedPrecision(precision, device)
    return plugins.Precision()


def _training_step_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return training_step_loss(model, batch, instead="pass MemGuard(loss_fn=...)")


def _shapes(batch: Any) -> list:
    return [tuple(t.shape) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]


def _all_gather(obj: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
