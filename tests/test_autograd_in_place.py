"""What autograd does in place for plain tensors (memguard.trace.autograd_in_place), against the real CPU peak.

Each model sends several gradients into one tensor's buffer, or scatters a gradient into zeros; they differ
in whether the real run works in place (the engine holds the only reference to a dense operand; a C++
formula's own zeros) or must allocate (a shared operand, a broadcast view, a user's out-of-place backward).
The estimate has to follow the real run both ways: in place where it works in place, and never in place
where it does not, which would under-predict.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import memguard
from groundtruth import REAL_OPTIMIZERS, measure_peak
from memguard.trace.autograd_in_place import AutogradInPlace


def _batch() -> torch.Tensor:
    return torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(0))


class Slices(nn.Module):
    """One projection sliced into blocks (as block-local attention does): each block's gradient is a
    sole, dense buffer the engine adds the next one into."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(32, 512), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        parts = [h[..., i:i + 64].sin() for i in range(0, 512, 64)]
        return self.out(torch.stack(parts).sum(0)).pow(2).mean()


class SharedOperands(nn.Module):
    """``a + a`` hands one gradient twice to the same buffer, and ``sum`` broadcasts a view: the real
    engine cannot add either in place, so each addition allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.proj(x)
        b = (a + a).tanh()
        c = b + a.sum(dim=-1, keepdim=True) + (b * a).cos()
        return c.pow(2).mean()


class Residual(nn.Module):
    """A residual stream: every block's gradient meets the skip connection's in one buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x.pow(2).mean()


class Gathered(nn.Module):
    """Relative-position logits gathered from a projection, rows picked by index_select and single
    entries by take: each backward builds zeros and scatters the gradient into them in place."""

    def __init__(self) -> None:
        super().__init__()
        self.rel, self.out = nn.Linear(32, 256), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.rel(x)  # (8, 64, 256)
        index = (torch.arange(64)[:, None] + torch.arange(64)[None, :]).expand(8, 64, 64)
        picked = logits.gather(-1, index)
        rows = logits.index_select(1, torch.arange(0, 64, 2))
        return self.out(picked).pow(2).mean() + rows.mean() + logits.take(torch.arange(0, 4096, 3)).mean()


class _OutOfPlaceScatter(torch.autograd.Function):
    """A user's backward written out of place: the real run allocates the scatter's result too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return x.gather(-1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add(-1, index, grad), None


class UserScatter(nn.Module):
    """A custom backward that scatters out of place, as the real run then does too: its zeros and its
    result are both alive at the peak of backward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.arange(0, 256, 16).expand(8, 64, 16)
        return _OutOfPlaceScatter.apply(self.proj(x), index).pow(2).mean()


@pytest.mark.parametrize("model_cls", [Gathered, Residual, SharedOperands, Slices, UserScatter], ids=lambda c: c.__name__)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_in_place_follows_the_real_run(model_cls: type[nn.Module], optimizer: str) -> None:
    torch.manual_seed(0)
    model = model_cls()
    real = measure_peak(model, _batch(), REAL_OPTIMIZERS[optimizer], loss_fn=lambda m, b: m(b))
    est = memguard.estimate(model, _batch(), loss_fn=lambda m, b: m(b), optimizer=optimizer, device="cpu").peak_bytes
    error = (est - real) / real
    assert 0 <= error <= 0.02, f"predicted {est:,} vs measured {real:,} ({error:+.2%})"


def test_the_probe_finds_a_sole_operand_under_fake_tensors() -> None:
    """Without a calibrated count the mechanism stays off; under fake tensors it must switch on."""
    buffers = AutogradInPlace()

    class Consulting(TorchDispatchMode):  # consults the buffers on every operator, as the recording does
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            buffers.in_place_target(func, args, kwargs or {})
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(), Consulting():
        buffers.calibrate()
    assert buffers._sole is not None


def test_nothing_is_in_place_outside_a_window() -> None:
    """An addition a backward formula makes for itself (no post-hook has fired) always allocates."""
    buffers = AutogradInPlace()
    buffers._sole = (1, 1)
    a, b = torch.ones(3), torch.ones(3)
    assert buffers.in_place_target(torch.ops.aten.add.Tensor, (a, b), {}) is None
