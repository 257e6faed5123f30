"""Models that make torch or transformers take a tracing-only branch on fake tensors: the trace must take the
branch a real eager run takes (estimate(device="cpu") against the measured CPU peak)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memguard
from memguard.trace.library_branches import eager_branches, eager_module_conversion
from test_estimate_accuracy import measured, predicted
from zoo import Case


class ConvertsItsRouter(nn.Module):
    """Converts a submodule inside forward, as SwitchTransformers' router does with its classifier
    (``self.classifier = self.classifier.to(self.dtype)``): a copy for real only where the dtype changes."""

    def __init__(self, router_dtype: torch.dtype) -> None:
        super().__init__()
        self.router_dtype = router_dtype
        self.body = nn.Linear(256, 256)
        self.router = nn.Linear(256, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        self.router = self.router.to(self.router_dtype)
        r = self.router(h.to(self.router_dtype)).softmax(-1).to(h.dtype)
        return F.cross_entropy(self.head(r), y)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)


@pytest.mark.parametrize(("precision", "router_dtype", "converted"), [
    ("32-true", torch.float32, False),  # a no-op .to(): torch's swap of fake parameters used to fail here
    ("32-true", torch.float64, True),
    ("bf16-true", torch.float32, True),
])
def test_module_converted_in_forward(precision: str, router_dtype: torch.dtype, converted: bool) -> None:
    case = Case("converts_its_router", lambda: ConvertsItsRouter(router_dtype), _batch, precision=precision)
    real = measured(case)
    est = predicted(case)
    error = (est.peak_bytes - real) / real
    assert abs(error) <= 0.02, f"predicted {est.peak_bytes:,} vs measured {real:,} ({error:+.2%})"
    if converted:  # the converted parameters are parameters, their optimizer state has their new dtype
        router = sum(p.numel() for p in nn.Linear(256, 512).parameters()) * router_dtype.itemsize
        assert est.breakdown[memguard.Category.OPTIMIZER_STATE] >= 2 * router


def test_swap_of_real_tensors_and_the_switches_are_restored() -> None:
    a, b = torch.zeros(2), torch.ones(3)
    with eager_module_conversion():
        torch.utils.swap_tensors(a, b)  # real tensors are swapped as before
    assert a.shape == (3,) and b.shape == (2,)
    transformers = pytest.importorskip("transformers.utils.import_utils")
    before_swap, before_fake = torch.utils.swap_tensors, transformers.is_fake_tensor
    with eager_branches(), eager_module_conversion():
        assert torch.utils.swap_tensors is not before_swap and transformers.is_fake_tensor is not before_fake
    assert torch.utils.swap_tensors is before_swap and transformers.is_fake_tensor is before_fake
