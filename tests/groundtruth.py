"""Measure the real peak of live tensor bytes of training steps on the CPU, independently of memguard.

The CPU allocator reports every allocation and free to torch.profiler when memory profiling is on, with
its running total of allocated bytes. The peak of that total over the steps, minus what was allocated
before the first event, plus the bytes of the model and batch that existed before (computed directly from
their storages), is the real peak of live tensor bytes of the steps. Nothing here uses memguard's tracer.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.autograd.profiler import profile as autograd_profile
from torch.utils._pytree import tree_flatten


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def allocation_events(prof) -> list:
    """Every CPU allocator event of the profile (the profiler's raw event objects: ``extra_fields`` holds
    ``alloc_size`` and ``total_allocated``, ``parent`` the operator it happened in), in time order."""
    out = []
    stack = list(prof.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        fields = ev.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            out.append(ev)
    out.sort(key=lambda ev: (ev.start_time_ns, ev.extra_fields.alloc_size, ev.extra_fields.total_allocated))
    return out


def _allocation_totals(prof) -> list[tuple[int, int]]:
    """(alloc_size, total_allocated) of every CPU allocator event, from the profiler's raw results."""
    return [(ev.extra_fields.alloc_size, ev.extra_fields.total_allocated) for ev in allocation_events(prof)]


REAL_OPTIMIZERS = {
    # the real optimizers, built the way a user would: torch's own defaults pick the implementation
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


def run_real_steps(model, batch, loss_fn, opt, *, steps: int = 2, accumulate: int = 1,
                   autocast_dtype: torch.dtype | None = None, zero_grad_before_backward: bool = False,
                   after_backward=None) -> None:
    """The real training steps, in the order the prediction assumes (Lightning's with
    ``zero_grad_before_backward``): every measurement of a real step, ours or a peer tool's, runs this."""
    for _ in range(steps):
        for micro in range(accumulate):
            ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model, batch)
            if zero_grad_before_backward and opt is not None and micro == 0:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            del loss
            if after_backward is not None:
                after_backward()
        if opt is not None:
            opt.step()
            if not zero_grad_before_backward:
                opt.zero_grad(set_to_none=True)


def measure_peak(
    model: torch.nn.Module,
    batch,
    make_optimizer=None,
    *,
    loss_fn=None,
    autocast_dtype: torch.dtype | None = None,
    param_dtype: torch.dtype | None = None,
    steps: int = 2,
    zero_grad_before_backward: bool = False,
    prepare=None,
    accumulate: int = 1,
) -> int:
    """Real CPU peak of live tensor bytes of ``steps`` training steps, run on a copy of ``model``."""
    model = copy.deepcopy(model)
    if param_dtype is not None:
        model = model.to(param_dtype)
        batch = tree_map_float(batch, param_dtype)
    model.train()
    if prepare is not None:
        prepare(model)
    if loss_fn is None:
        from memguard.trace import default_loss_fn as loss_fn  # the call convention only, not the tracer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params) if make_optimizer is not None and params else None
    base = _storage_bytes(list(model.parameters()) + list(model.buffers()) + tree_flatten(batch)[0])
    torch.manual_seed(0)
    with autograd_profile(profile_memory=True, use_cpu=True) as prof:
        run_real_steps(model, batch, loss_fn, opt, steps=steps, accumulate=accumulate, autocast_dtype=autocast_dtype,
                       zero_grad_before_backward=zero_grad_before_backward)
    events = _allocation_totals(prof)
    if not events:
        return base
    first_size, first_total = events[0]
    start = first_total - first_size
    peak = max(total for _, total in events)
    return base + max(0, peak - start)


def tree_map_float(batch, dtype):
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch)
