"""estimate(device="cpu") against the measured CPU peak of the same training steps, for every zoo case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


class TimeLoop(nn.Module):
    """Reads ``h[:, :, i]`` in a loop over time, as Mamba's slow path does: backward accumulates one
    ``select_backward`` gradient per step into ``h``'s. The real autograd engine adds them in place into its
    buffer (it holds the only reference); for fake tensors it never does (a tensor subclass), so the trace
    allocates a new buffer per addition."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(16, 256), nn.Linear(256, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).transpose(1, 2).contiguous()
        s = torch.zeros(h.shape[0], h.shape[1])
        for i in range(h.shape[2]):
            s = s * 0.9 + h[:, :, i]
        return self.out(s).pow(2).mean()


def test_in_place_gradient_accumulation() -> None:
    case = Case("time_loop", TimeLoop, lambda: torch.randn(8, 128, 16, generator=torch.Generator().manual_seed(0)))
    real, est = measured(case), predicted(case).peak_bytes
    assert abs(est - real) / real <= 0.02, f"predicted {est:,} vs measured {real:,}"
