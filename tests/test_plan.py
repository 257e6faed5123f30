"""The planner picks the cheapest configuration whose own estimate fits, and that configuration really fits."""

from __future__ import annotations

import pytest
import torch

from memguard import InvalidArgumentError, checkpointing
from memguard.plan import TrainingConfig, _candidates, estimator, plan, required_bytes, slice_batch
from groundtruth import measure_peak
from zoo import Decoder, _ids

TORCH_ONLY = ("adafactor",)  # optimizers whose real CPU run the ground truth can replay here
BATCH = _ids(4, 64)
BASE = TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=4)
ALLOW = ("precision", "optimizer", "micro_batch", "checkpointing")
_CACHE: dict = {}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Decoder(layers=2)


def _evaluate():
    """One estimate per configuration for the whole module (the planner's own cache is per call)."""
    inner = estimator(_model(), BATCH, device="cpu")

    def evaluate(config):
        if config not in _CACHE:
            _CACHE[config] = inner(config)
        return _CACHE[config]

    evaluate.quick = inner.quick  # the planner's optimizer what-ifs are exercised too
    return evaluate


def _all_candidates(allow=None):
    return _candidates(BASE, tuple(allow or ALLOW), True, False, set(TORCH_ONLY))


def _requirements(evaluate, allow=None):
    return [(c, changes, required_bytes(evaluate(c), 0.0)) for c, changes in _all_candidates(allow)]


@pytest.fixture(scope="module")
def requirements():
    return _requirements(_evaluate())


def _expected(reqs, capacity):
    return next((c for c, _, need in reqs if need <= capacity), None)


def _real_peak(config: TrainingConfig) -> int:
    opt = {"adamw": lambda ps: torch.optim.AdamW(ps), "adafactor": lambda ps: torch.optim.Adafactor(ps)}[config.optimizer]
    return measure_peak(
        _model(),
        slice_batch(BATCH, config.micro_batch_size),
        opt,
        autocast_dtype=torch.bfloat16 if config.precision == "bf16-mixed" else None,
        prepare=checkpointing.enable if config.gradient_checkpointing else None,
        accumulate=config.accumulate_grad_batches,
    )


def test_base_that_fits_is_kept_unchanged(requirements) -> None:
    base_need = requirements[0][2]
    result = plan(BASE, _evaluate(), base_need + 1, allow=ALLOW, margin=0.0, optimizers_available=TORCH_ONLY)
    assert result.fits and result.config == BASE and result.changes == []


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_cheapest_fitting_plan_is_chosen_and_really_fits(requirements, rank: int) -> None:
    base_need = requirements[0][2]
    smaller = sorted({need for _, _, need in requirements if need < base_need})
    capacity = smaller[min(rank, len(smaller) - 1)]
    expected = _expected(requirements, capacity)
    result = plan(BASE, _evaluate(), capacity, allow=ALLOW, margin=0.0, optimizers_available=TORCH_ONLY,
                  max_evaluations=500)
    assert result.fits
    assert result.config == expected
    assert result.required_bytes <= capacity
    assert result.config.effective_batch_size == BASE.effective_batch_size
    # the planned configuration, run for real on the CPU, stays under the capacity
    assert _real_peak(result.config) <= capacity


def test_forbidden_knobs_are_never_used(requirements) -> None:
    base_need = requirements[0][2]
    allowed = ("micro_batch",)
    reqs = _requirements(_evaluate(), allowed)
    capacity = min(need for _, _, need in reqs)
    result = plan(BASE, _evaluate(), capacity, allow=allowed, margin=0.0, optimizers_available=TORCH_ONLY)
    assert result.fits and capacity < base_need
    assert {c.knob for c in result.changes} == {"micro_batch"}
    assert result.config.precision == BASE.precision and not result.config.gradient_checkpointing
    assert result.config.effective_batch_size == BASE.effective_batch_size


def test_nothing_fits_returns_the_closest_miss(requirements) -> None:
    smallest = min(need for _, _, need in requirements)
    result = plan(BASE, _evaluate(), smallest // 2, allow=ALLOW, margin=0.0, optimizers_available=TORCH_ONLY,
                  max_evaluations=500)
    assert not result.fits
    assert result.required_bytes == smallest
    assert result.headroom_bytes < 0


def test_margin_is_applied() -> None:
    evaluate = _evaluate()
    need = required_bytes(evaluate(BASE), 0.0)
    assert plan(BASE, evaluate, need, margin=0.0, allow=[]).fits
    assert not plan(BASE, evaluate, need, margin=0.05, allow=[]).fits


def test_costs_are_ordered_and_explained() -> None:
    cands = _all_candidates()
    costs = [sum(ch.cost for ch in changes) for _, changes in cands]
    assert costs == sorted(costs)
    assert cands[0][1] == []
    for _, changes in cands[1:6]:
        for ch in changes:
            assert ch.how and ch.why and ch.cost > 0


def test_bf16_unsupported_falls_back_to_fp16_mixed() -> None:
    cands = _candidates(BASE, ("precision",), False, False, set())
    assert [c.precision for c, _ in cands] == ["32-true", "16-mixed"]


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown knob 'precisoin'.*precision"):
        plan(BASE, _evaluate(), 10, allow=["precisoin"])
    with pytest.raises(InvalidArgumentError, match="capacity must be positive"):
        plan(BASE, _evaluate(), 0)


def test_optimizer_what_if_agrees_with_a_full_trace() -> None:
    """The what-if the planner uses to skip optimizer candidates lands close to the traced answer."""
    evaluate = _evaluate()
    known = {BASE: evaluate(BASE)}
    other = TrainingConfig(precision="32-true", optimizer="adafactor", micro_batch_size=4)
    guess = evaluate.quick(other, known)
    full = evaluate(other).device_bytes
    assert guess is not None and abs(guess - full) / full < 0.05


@pytest.mark.parametrize("other", [
    TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=1, accumulate_grad_batches=4),
    TrainingConfig(precision="32-true", optimizer="sgd", micro_batch_size=2, accumulate_grad_batches=2),
    TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=4, optimizer_offload=True),
])
def test_what_if_errs_low_for_smaller_micro_batches_and_offload(other: TrainingConfig) -> None:
    """What-ifs only skip candidates: for a smaller micro-batch or offloaded state they must not land above
    the traced answer (or the planner could skip a plan that fits), yet stay informative."""
    evaluate = _evaluate()
    known = {BASE: evaluate(BASE)}
    guess = evaluate.quick(other, known)
    full = evaluate(other).device_bytes
    assert guess is not None and 0.6 * full <= guess <= full


def test_sharding_knob_switches_a_replicated_run_to_a_sharded_strategy() -> None:
    """Over several GPUs, a DDP run that does not fit is sharded: the plan is the first sharded strategy, in
    cost order (ZeRO-2, then FSDP), whose own per-rank estimate fits."""
    import memguard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])  # 34M parameters
    batch = torch.randn(8, 2048)
    evaluate = estimator(model, batch, device="cuda", strategy="ddp", world_size=4)
    base = TrainingConfig(precision="32-true", optimizer="adamw", micro_batch_size=8)
    need = {name: required_bytes(memguard.estimate(model, batch, device="cuda", strategy=name, world_size=4), 0.05)
            for name in ("ddp", "deepspeed_stage_2", "fsdp")}
    assert min(need["deepspeed_stage_2"], need["fsdp"]) < need["ddp"]
    capacity = (min(need["deepspeed_stage_2"], need["fsdp"]) + need["ddp"]) // 2
    expected = next(name for name in ("deepspeed_stage_2", "fsdp") if need[name] <= capacity)
    result = plan(base, evaluate, capacity, allow=("sharding",), world_size=4, strategy="ddp")
    assert result.fits and result.config.strategy == expected
    assert [c.how for c in result.changes] == [f"Trainer(strategy='{expected}')"]
    assert result.required_bytes == need[expected]
    assert not plan(base, evaluate, capacity, allow=("sharding",), world_size=1, strategy="ddp").fits
    assert not plan(base, evaluate, capacity, allow=("sharding",), world_size=4, strategy="fsdp").fits


def test_sharding_is_offered_only_for_replicating_strategies_on_several_devices() -> None:
    def sharded(world: int, strategy: str | None) -> list:
        return [c.strategy for c, _ in _candidates(BASE, ("sharding",), True, False, set(), world, strategy)]

    assert sharded(8, "ddp") == [None, "deepspeed_stage_2", "fsdp"]
    assert sharded(8, None) == [None, "deepspeed_stage_2", "fsdp"]
    assert sharded(1, "ddp") == [None]
    assert sharded(8, "fsdp") == sharded(8, "deepspeed_stage_3") == [None]


def test_tensor_parallel_is_the_last_sharding_step_for_models_with_a_plan() -> None:
    def offered(world: int, strategy: str | None, tensor_parallel: bool = True) -> list:
        return [c.strategy for c, _ in _candidates(BASE, ("sharding",), True, False, set(), world, strategy,
                                                  tensor_parallel)]

    assert offered(8, "ddp") == [None, "deepspeed_stage_2", "fsdp", "tp"]
    assert offered(8, "fsdp") == offered(8, "deepspeed_stage_3") == [None, "tp"]  # FSDP alone does not fit
    assert offered(8, "tp") == offered(1, "ddp") == [None]
    assert offered(8, "ddp", tensor_parallel=False) == [None, "deepspeed_stage_2", "fsdp"]
