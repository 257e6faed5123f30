"""estimate(device="cpu") against the measured CPU peak of the same training steps, for every zoo case."""

from __future__ import annotations

import pytest
import torch

import memguard
from memguard import checkpointing
from groundtruth import REAL_OPTIMIZERS, measure_peak
from zoo import CASES, Case

HALF = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TRUE_HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def measured(case: Case) -> int:
    torch.manual_seed(0)
    return measure_peak(
        case.build(),
        case.batch(),
        REAL_OPTIMIZERS[case.optimizer],
        loss_fn=case.loss_fn,
        autocast_dtype=HALF.get(case.precision),
        param_dtype=TRUE_HALF.get(case.precision),
        zero_grad_before_backward=case.zero_grad_before_backward,
        prepare=checkpointing.enable if case.gradient_checkpointing else None,
        accumulate=case.accumulate,
    )


def predicted(case: Case) -> memguard.Estimate:
    torch.manual_seed(0)
    return memguard.estimate(
        case.build(),
        case.batch(),
        loss_fn=case.loss_fn,
        optimizer=case.optimizer,
        precision=case.precision,
        device="cpu",
        gradient_checkpointing=case.gradient_checkpointing,
        zero_grad_before_backward=case.zero_grad_before_backward,
        accumulate_grad_batches=case.accumulate,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu_peak_within_2_percent(case: Case) -> None:
    real = measured(case)
    est = predicted(case)
    error = (est.peak_bytes - real) / real
    assert abs(error) <= 0.02, f"{case.name}: predicted {est.peak_bytes:,} vs measured {real:,} ({error:+.2%})"
    assert sum(v for k, v in est.breakdown.items() if k not in (memguard.Category.ALLOCATOR, memguard.Category.CONTEXT)) == est.peak_bytes
