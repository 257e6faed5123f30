"""``memguard check``: estimate a configuration on each target GPU and plan where it does not fit.

Pure apart from NVML when no target is given or configured; the command line (memguard.cli) prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from memguard import strategies
from memguard.device import gpus as local_gpus
from memguard.spec.check_spec import CheckSpec
from memguard.errors import MemguardError
from memguard.device.catalog import lookup, match_device
from memguard.plan import TrainingConfig, assess, change_fields, change_label, estimator, required_bytes
from memguard.results import (CheckResult, Estimate, GpuCount, MinGpus, SizeAnswer, SizeResult, Target,
                              TargetResult)
from memguard.sizing import Ladder, SizeRefused, per_unit, search
from memguard.trace import TRACED_MICRO_BATCHES


def resolve_targets(spec: CheckSpec) -> list[Target]:
    """The spec's GPUs from the catalog; without any, the GPUs of this machine (free memory, from NVML)."""
    if spec.gpus:
        out = []
        for name in spec.gpus:
            gpu = lookup(name)
            out.append(Target(gpu.name, gpu.usable_bytes, "catalog: usable memory", gpu, gpu.bf16))
        return out
    found = local_gpus.discover()
    usable = [g for g in found.gpus if g.error is None]
    if not usable:
        reason = found.error or "; ".join(f"GPU {g.index}: {g.error}" for g in found.gpus) or "none found"
        raise MemguardError(f"no GPU to check against ({reason}); pass --gpu NAME "
                            "(memguard gpus --catalog lists the names)")
    return [Target(g.name, g.free_bytes, f"GPU {g.index}: free memory now (NVML)", match_device(g), g.bf16, g.index)
            for g in usable]


def run_check(spec: CheckSpec, targets: Sequence[Target] | None = None) -> CheckResult:
    """Estimate the configuration on each target and, where it does not fit and fallbacks are allowed,
    plan the cheapest change that does. Pure apart from NVML when no target is given or configured.

    Targets of the same GPU model share their estimates: only the capacity differs.
    """
    targets = list(targets) if targets is not None else resolve_targets(spec)
    model = spec.model_factory()
    notes = list(spec.notes) + _strategy_notes(spec)
    if spec.training.accumulate_grad_batches > TRACED_MICRO_BATCHES:
        notes.append(f"accumulate_grad_batches {spec.training.accumulate_grad_batches}: traced with "
                     f"{TRACED_MICRO_BATCHES} micro-batches per step; later ones repeat the second exactly, so the "
                     "peak is the same")
    evaluators: dict[str | None, Callable[[TrainingConfig], Estimate]] = {}
    results = []
    from memguard.estimation.tensor_parallel import parallelizable

    tensor_parallel = parallelizable(model)
    for target in targets:
        key = target.catalog.name if target.catalog is not None else None
        if key not in evaluators:
            evaluators[key] = _evaluator(spec, model, target.catalog)
        found = assess(spec.training, evaluators[key], target.capacity_bytes, margin=spec.margin,
                       search=spec.fallback and spec.allow != (), allow=spec.allow, bf16_supported=target.bf16,
                       world_size=spec.world_size or 1, strategy=spec.strategy, tensor_parallel=tensor_parallel)
        results.append(TargetResult(target, found.estimate, found.required_bytes, found.fits, found.plan,
                                    notes=_target_notes(spec, target)))
    params = list(model.parameters())  # tied weights once
    return CheckResult(spec, results, notes, parameters=sum(p.numel() for p in params),
                       trainable=sum(p.numel() for p in params if p.requires_grad))



SIZE_LIMITS = {"batch_size": 1 << 16, "seq_len": 1 << 20}
"""How far ``--max-batch-size`` / ``--max-seq-len`` search."""


def size_check(result: CheckResult, knob: str, spec_for: Callable[[int], CheckSpec]) -> None:
    """Answer ``--max-batch-size`` (``knob="batch_size"``) or ``--max-seq-len`` on every target of
    ``result``: the largest size that fits as configured and, where the configuration needed a plan, after
    each of the plan's changes in turn. ``spec_for(n)`` loads the same config with that size, so an answer
    N means ``memguard check --batch-size N --no-fallback`` exits 0 on that GPU and N+1 exits 1: the same
    estimate and the same margin decide both. The answers go to each target's ``sizing``."""
    specs: dict[int, CheckSpec] = {}
    base = result.spec

    def spec_at(n: int) -> CheckSpec:
        if n not in specs:
            try:
                specs[n] = spec_for(n)
            except MemguardError as exc:  # the config refuses the size (longer than the model's positions)
                raise SizeRefused(str(exc).split(": ")[-1]) from exc
            if knob == "batch_size":  # the model does not depend on the batch size: build it once
                specs[n].model_factory = base.model_factory
        return specs[n]

    for tr in result.targets:
        key = tr.target.catalog
        evaluators: dict[int, Callable[[TrainingConfig], Estimate]] = {}

        def run(fields: dict[str, Any], start: tuple[int, int, Estimate] | None = None) -> SizeResult:
            def required(n: int) -> tuple[int, Estimate]:
                spec = spec_at(n)
                if n not in evaluators:
                    evaluators[n] = _evaluator(spec, spec.model_factory(), key)
                config = dataclasses.replace(spec.training, **fields)
                est = evaluators[n](config)
                return required_bytes(est, spec.margin), est

            return search(knob, required, tr.target.capacity_bytes, base.margin, Ladder(limit=SIZE_LIMITS[knob]),
                          quadratic=knob == "seq_len", per_unit=per_unit(base.margin), start=start)

        # the configured batch was estimated by the check itself: the search starts there
        configured = (base.training.micro_batch_size, tr.required_bytes, tr.estimate) if knob == "batch_size" else None
        answer = SizeAnswer(run({}, configured))
        if tr.plan is not None and tr.plan.changes:
            fields: dict[str, Any] = {}
            labels: list[str] = []
            for change in tr.plan.changes:
                if change.knob == "micro_batch":  # the size searched is the micro-batch
                    continue
                fields.update(change_fields(change))
                labels.append(change_label(change))
                answer.with_changes.append((" + ".join(labels), run(dict(fields))))
        tr.sizing.append(answer)


MIN_GPU_STRATEGIES = ("ddp", "deepspeed_stage_2", "fsdp", "deepspeed_stage_3")
"""What ``--min-gpus`` tries, cheapest communication first (a tie in GPUs goes to the first); tensor
parallelism ("tp": across each node's GPUs, FSDP2 over the nodes) comes last, for models that have a
tensor-parallel plan."""
MAX_NODES = 64


def min_gpus(result: CheckResult, per_node: int = 8, max_nodes: int = MAX_NODES) -> None:
    """``--min-gpus``: on every target, the fewest GPUs for which each of :data:`MIN_GPU_STRATEGIES` fits
    the configuration as written (no plan), counting devices on one node first (1 to ``per_node``), then
    whole nodes. Per-rank memory does not grow with the count, so each answer is a search over those
    counts (doubling from one GPU, then halving the bracket: small answers cost few estimates, and small
    world sizes are the cheap ones), and each answer N is confirmed: N fits and the count before it does
    not. A replicating strategy (DDP) keeps everything on every GPU: it fits on N GPUs only if one GPU
    fits the run, so its answer is 1 or none."""
    base = result.spec
    counts = [(d, 1) for d in range(1, per_node + 1)] + [(per_node, k) for k in range(2, max_nodes + 1)]
    model = base.model_factory()
    from memguard.estimation.tensor_parallel import parallelizable

    names = MIN_GPU_STRATEGIES + (("tp",) if parallelizable(model) else ())
    for tr in result.targets:
        answers: dict[str, GpuCount | None] = {}
        for name in names:
            needs: dict[int, int] = {}
            layouts = _tp_counts(model, counts, per_node) if name == "tp" else counts

            def fits(i: int, name: str = name, needs: dict[int, int] = needs, layouts: list = layouts) -> bool:
                if i not in needs:
                    d, k = layouts[i]
                    spec = dataclasses.replace(base, strategy=name, devices=d, num_nodes=k, fallback=False,
                                               tensor_parallel_size=None, data_parallel_size=None)
                    est = _evaluator(spec, model, tr.target.catalog)(spec.training)
                    needs[i] = required_bytes(est, spec.margin)
                return needs[i] <= tr.target.capacity_bytes

            hi = _first_fitting(fits, len(layouts), replicated=strategies.is_replicated(name))
            if hi is None:
                answers[name] = None
                continue
            answers[name] = GpuCount(name, layouts[hi][0], layouts[hi][1], needs[hi])
        tr.min_gpus = MinGpus(answers, per_node, max_nodes)


def _tp_counts(model: nn.Module, counts: list[tuple[int, int]], per_node: int) -> list[tuple[int, int]]:
    """The layouts tensor parallelism can take: each rank computes whole attention heads, so the devices of
    a node (the tensor-parallel size) must divide the model's head counts; nodes are added only when a full
    node's devices do."""
    from memguard.estimation.tensor_parallel import head_counts

    heads = head_counts(model).values()

    def whole(d: int) -> bool:
        return all(h % d == 0 for h in heads)

    return [(d, k) for d, k in counts if whole(d) and (k == 1 or d == per_node)]


def _first_fitting(fits: Callable[[int], bool], n: int, replicated: bool = False) -> int | None:
    """The first index in ``range(n)`` where the monotone ``fits`` holds (None: nowhere)."""
    if fits(0):
        return 0
    if replicated:
        return None
    lo, hi = 0, 1
    while True:
        if hi >= n - 1:
            hi = n - 1
            return None if lo == hi or not fits(hi) else _bisect(fits, lo, hi)
        if fits(hi):
            return _bisect(fits, lo, hi)
        lo, hi = hi, 2 * hi + 1


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """``fits(lo)`` is false and ``fits(hi)`` true: the first index that fits."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _evaluator(spec: CheckSpec, model: nn.Module, gpu: Any) -> Callable[[TrainingConfig], Estimate]:
    """The planner's estimate function for one GPU model (memoised per configuration, traces shared)."""
    return estimator(
        model,
        spec.batch,
        optimizers={spec.training.optimizer: {"optimizer": spec.optimizer, "optimizer_kwargs": spec.optimizer_kwargs}},
        gradient_checkpointing=spec.gradient_checkpointing,
        loss_fn=spec.loss_fn,
        device="cuda",
        gpu=gpu,
        zero_grad_before_backward=spec.zero_grad_before_backward,
        on_untraceable="bound",
        quantization=spec.quantization,
        compile=spec.compile if spec.compile is not None else False,
        **_distributed(spec),
    )


def _distributed(spec: CheckSpec) -> dict[str, Any]:
    """estimate()'s strategy arguments: per-rank prediction for several ranks (or an explicit strategy)."""
    world = spec.world_size or 1
    if world == 1 and (spec.strategy is None or strategies.is_single_process(spec.strategy)):
        return {}
    strategy: Any = spec.strategy
    row = strategies.find(spec.strategy)
    if row is not None and row.kind is strategies.Kind.TP:
        from memguard.estimation.strategy_options import Strategy, TPOptions

        strategy = Strategy(row.kind, row.name, TPOptions(spec.tensor_parallel_size, spec.data_parallel_size))
    return {"strategy": strategy, "world_size": world, "num_nodes": spec.num_nodes or 1}


def _strategy_notes(spec: CheckSpec) -> list[str]:
    """What the numbers mean under the configured strategy and device count."""
    if spec.world_size is None:
        return ["the number of devices is decided at run time (devices: auto): predicted for one device"]
    if spec.world_size == 1:
        return []
    return [f"strategy {spec.strategy!r} over {spec.world_size} devices ({spec.devices} per node x {spec.num_nodes} "
            f"node{'s' if spec.num_nodes > 1 else ''}): the numbers are the largest rank's"]


def _target_notes(spec: CheckSpec, target: Target) -> list[str]:
    notes = []
    if spec.training.precision.startswith("bf16") and not target.bf16:
        notes.append(f"{target.name} has no native bfloat16: Lightning will refuse precision "
                     f"{spec.training.precision!r} there; use '16-mixed'")
    if target.catalog is None:
        notes.append(f"{target.name} is not in memguard's GPU catalog: kernels and CUDA context modelled as an "
                     "sm80-class GPU")
    return notes
