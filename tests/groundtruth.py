"""Measure the real peak of live tensor bytes of training steps on the CPU, independently of memguard.

The CPU allocator reports every allocation and free to torch.profiler when memory profiling is on, with
its running total of allocated bytes. The peak of that total over the steps, minus what was allocated
before the first event, plus the bytes of the model and batch that existed before (computed directly from
their storages), is the real peak of live tensor bytes of the steps. Nothing here uses memguard's tracer.
"""

from __future__ import annotations

import contextlib
import copy
import gc

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
    wrap=None,
) -> int:
    """Real CPU peak of live tensor bytes of ``steps`` training steps, run on a copy of ``model``.

    The copy that trains, and its optimizer, are made inside the profiled window, so every block alive in
    the steps (the optimizer constructor's own buffers included) is one the profiler saw allocated, and a
    block freed there (a module that converts its own parameters in forward frees them) is subtracted."""
    staged = copy.deepcopy(model)
    if param_dtype is not None:
        staged = staged.to(param_dtype)
        batch = tree_map_float(batch, param_dtype)
    staged.train()
    if loss_fn is None:
        from memguard.trace import default_loss_fn as loss_fn  # the call convention only, not the tracer
    base = _storage_bytes(tree_flatten(batch)[0])
    torch.manual_seed(0)
    gc.collect()
    with autograd_profile(profile_memory=True, use_cpu=True) as prof:
        model = copy.deepcopy(staged)
        if prepare is not None:  # on the copy that trains: a preparation may hold references to its module
            prepare(model)
        if wrap is not None:  # torch.compile: the wrapper trains the copy's parameters
            model = wrap(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params) if make_optimizer is not None and params else None
        run_real_steps(model, batch, loss_fn, opt, steps=steps, accumulate=accumulate, autocast_dtype=autocast_dtype,
                       zero_grad_before_backward=zero_grad_before_backward)
    del staged
    return base + live_peak(allocation_events(prof))


def measure_compiled_peak(model: torch.nn.Module, batch, make_optimizer=None, *, compile_fn=torch.compile,
                          **kwargs) -> int:
    """Real CPU peak of ``steps`` training steps of ``compile_fn(copy of model)`` (inductor by default).

    The copy is compiled inside the profiled window, at its first forward: compiling works on fake tensors
    and keeps nothing that the steps see, so a compiled step's own buffers are what the window's peak holds
    (checked against compiling and running a throwaway copy first: 32 bytes more on a 98 MiB step).

    dynamo's caches are reset first, as in a training process that compiles its model once: a second
    compile of the same code (another model of the same class measured earlier) recompiles with automatic
    dynamic shapes, a different graph (a transformers Llama's real peak moved by 5% that way)."""
    torch._dynamo.reset()
    return measure_peak(model, batch, make_optimizer, wrap=compile_fn, **kwargs)


def live_peak(events: list) -> int:
    """The peak of bytes allocated inside the window and still alive, from each event's address: a free
    of a block allocated before the window (earlier work's garbage) does not count, where the allocator's
    own running total would drop. Events with the same timestamp are applied allocations first for an
    address that is not live yet (an allocation and its free within one clock tick)."""
    live: dict[int, int] = {}
    current = peak = 0
    i = 0
    while i < len(events):
        stamp, pending = events[i].start_time_ns, []
        while i < len(events) and events[i].start_time_ns == stamp:
            fields = events[i].extra_fields
            i += 1
            if fields.alloc_size > 0:
                live[fields.ptr] = fields.alloc_size
                current += fields.alloc_size
                peak = max(peak, current)
            elif fields.ptr in live:
                current -= live.pop(fields.ptr)
            else:
                pending.append(fields.ptr)
        for ptr in pending:
            current -= live.pop(ptr, 0)
    return peak


def tree_map_float(batch, dtype):
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch)
