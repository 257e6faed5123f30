"""Models memguard cannot trace, for tests/test_untraceable_quiet.py (imported by class path, so a config's
``model.class_path`` can name them): each uses a custom operator whose fake kernel torch cannot run."""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("memguard_tests::cpu_only_scale", mutates_args=())
def cpu_only_scale(x: torch.Tensor) -> torch.Tensor:
    """A custom operator with a CPU kernel and no fake kernel: fake tensors cannot run it."""
    return x * 2


@torch.library.custom_op("memguard_tests::fake_raises", mutates_args=())
def fake_raises(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@fake_raises.register_fake
def _fake_raises(x: torch.Tensor) -> torch.Tensor:
    """A fake kernel that raises TypeError: torch's fake mode logs that with a stack, 40+ lines."""
    raise TypeError("this fake kernel does not support its input")


class NoFakeKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_only_scale(self.lin(x)).sum()


class FakeKernelRaises(NoFakeKernel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_raises(self.lin(x)).sum()
