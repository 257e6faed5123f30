"""memguard.trace: the recording of allocations and frees on a fake twin, checked against values derived by
hand for small programs (no measurement needed: every size follows from the shapes)."""

from __future__ import annotations

import torch
from torch import nn

from memguard.categories import Category
from memguard.trace import StepProgram, TraceCache, trace_training


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False))


def _sum_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).sum()


def _trace(model: nn.Module, batch: torch.Tensor, steps: int = 1, make_optimizer=None, reuse=None):  # noqa: ANN001, ANN202
    return trace_training(model, batch, make_optimizer, StepProgram(loss_fn=_sum_loss, steps=steps), reuse=reuse)


def _live_bytes(trace, index: int) -> int:  # noqa: ANN001
    return sum(trace.sizes[a] for a in trace.live_at(index))


def test_every_allocation_is_freed_or_survives_as_model_state() -> None:
    """Forward and backward without an optimizer: what is alive at the end is exactly the parameters, the
    batch and the two gradients (16x32 and 32x4 floats): every activation was freed."""
    model, batch = _mlp(), torch.randn(8, 16)
    trace = _trace(model, batch)
    end = _live_bytes(trace, len(trace.events) - 1)
    params = (16 * 32 + 32 * 4) * 4
    assert end == params + batch.numel() * 4 + params  # parameters, batch, gradients
    allocated = {ev - 1 for ev in trace.events if ev > 0}
    freed = {-ev - 1 for ev in trace.events if ev < 0}
    assert freed <= allocated  # nothing is freed that was not allocated


def test_activations_saved_for_backward_are_categorised_and_sized() -> None:
    """The first Linear's output (8x32) and the ReLU's output (8x32) are kept for backward: the ReLU
    backward needs its output, the second Linear its input (the same tensor)."""
    model, batch = _mlp(), torch.randn(8, 16)
    trace = _trace(model, batch)
    activations = [s for s, c in zip(trace.sizes, trace.categories) if c is Category.ACTIVATIONS]
    assert 8 * 32 * 4 in activations
    assert all(s > 0 for s in trace.sizes)


def test_the_users_model_and_batch_are_untouched() -> None:
    model, batch = _mlp(), torch.randn(8, 16)
    before = [p.detach().clone() for p in model.parameters()]
    _trace(model, batch, steps=2, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None and not p.is_meta for p in model.parameters())


def test_phases_are_in_program_order() -> None:
    trace = _trace(_mlp(), torch.randn(8, 16), steps=2, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    names = [name for _, name in trace.phases]
    for earlier, later in [("step1.forward", "step1.backward"), ("step1.backward", "step1.optimizer"),
                           ("step1.optimizer", "step2.forward")]:
        assert names.index(earlier) < names.index(later)
    starts = [start for start, _ in trace.phases]
    assert starts == sorted(starts)


def test_a_replayed_step_records_what_tracing_it_records() -> None:
    """TraceCache replays step 1's forward and backward from an earlier trace of the same model and batch:
    the events, sizes and categories must be those of a fresh trace."""
    model, batch = _mlp(), torch.randn(8, 16)
    opt = lambda ps: torch.optim.AdamW(ps)  # noqa: E731
    cache = TraceCache()
    first = _trace(model, batch, steps=2, make_optimizer=opt, reuse=cache.slot("k"))
    assert cache.slot("k").recording is not None  # the second trace replays this recording
    replayed = _trace(model, batch, steps=2, make_optimizer=opt, reuse=cache.slot("k"))
    fresh = _trace(model, batch, steps=2, make_optimizer=opt)
    for trace in (first, replayed):
        assert trace.events == fresh.events
        assert trace.sizes == fresh.sizes
        assert trace.categories == fresh.categories
