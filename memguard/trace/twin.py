"""A fake twin of the user's model and batch: every parameter, buffer and batch tensor replaced by a fake
tensor of the same shape, strides and dtype, so the user's model is never read, modified or materialized."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

from memguard.trace import fake_rules
from memguard.trace.compiled import CompiledPart, CompileSpec, compile_twin, find_compiled, uncompile
from memguard.categories import Category
from memguard.errors import TraceError
from memguard.trace.recording import BATCH, _Recorder


# ---------------------------------------------------------------------------------------------------------
# Making a fake twin of the user's model


def _fake_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake CPU tensor of the same shape and strides, created inside an active FakeTensorMode."""
    target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=target, device="cpu")


def recorded_twin(model: nn.Module, batch: Any, mode: FakeTensorMode, param_dtype: torch.dtype | None,
                  shared: tuple, prepare: Any, compile: CompileSpec | bool | None = False,
                  ) -> tuple[nn.Module, Any, _Recorder, list[CompiledPart]]:
    """The fake twin of ``model`` in train mode, prepared (``prepare`` runs under ``mode``: layers it creates
    must be fake too), its fake batch, a recorder that already holds both as the setup phase, and the parts
    of the twin that run compiled. Every tracer starts here (one process, or one rank of a sharded run).

    The twin's parts are compiled as the user's model compiles them when ``compile`` is None, the whole twin
    with ``compile``'s spec when the model has no compiled part, and nothing when ``compile`` is False (see
    :mod:`memguard.trace.compiled`)."""
    found = find_compiled(model)  # read on the user's model: a deep copy drops ``module.compile()``
    twin = uncompile(fake_model_copy(model, mode, param_dtype, shared))
    twin.train()
    if prepare is not None:
        with mode:
            prepare(twin)
    parts: list[CompiledPart] = []
    if compile is not False:
        parts = found or ([CompiledPart("", compile)] if isinstance(compile, CompileSpec) else [])
    fbatch = fake_batch(batch, mode, param_dtype)
    recorder = _Recorder()
    recorder.phase("setup")
    recorder.watch(twin, compiled=[p.path for p in parts])
    track_model_and_batch(recorder, twin, fbatch)
    twin = compile_twin(twin, parts, around=recorder.attributed, hooks=recorder.watch_compiled)
    return twin, fbatch, recorder, parts


def fake_model_copy(
    model: nn.Module, mode: FakeTensorMode, param_dtype: torch.dtype | None = None, shared: tuple = ()
) -> nn.Module:
    """Deep-copy the module tree with every parameter, buffer and tensor attribute replaced by a fake one.

    The user's tensors are never read (only their shape, stride and dtype), so a model on ``meta`` or on a
    GPU works the same, and nothing of theirs is modified: tied weights stay tied because the memo maps one
    original object to one fake object. Objects in ``shared`` (a Lightning Trainer the module points to)
    are referenced, not copied.
    """
    memo: dict[int, Any] = {id(obj): obj for obj in shared}
    with mode:
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and id(p) not in memo:
                    memo[id(p)] = nn.Parameter(_fake_like(p, param_dtype), requires_grad=p.requires_grad)
            for b in module._buffers.values():
                if b is not None and id(b) not in memo:
                    memo[id(b)] = _fake_like(b, param_dtype if b.is_floating_point() and b.dtype != torch.float32 else None)
            for value in vars(module).values():
                if isinstance(value, torch.Tensor) and id(value) not in memo and not isinstance(value, nn.Parameter):
                    memo[id(value)] = _fake_like(value)
    try:
        twin = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any copy failure becomes one actionable message
        raise TraceError(
            f"memguard could not copy the model structure to trace it ({type(exc).__name__}: {exc}). "
            "memguard never traces the original model; make the module deep-copyable "
            "(no open files, locks or generators as attributes).",
            operation="copy.deepcopy",
        ) from exc
    return twin


def fake_batch(batch: Any, mode: FakeTensorMode, float_dtype: torch.dtype | None = None) -> Any:
    """The batch with every tensor replaced by a fake CPU tensor of the same shape and dtype, carrying its
    values where they are readable (see :func:`memguard.trace.fake_rules.fake_leaf`)."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return fake_rules.fake_leaf(x, mode, float_dtype)
        return x

    return tree_map(convert, batch)



def track_model_and_batch(recorder: _Recorder, model: nn.Module, batch: Any) -> None:
    """Record the model's parameters and buffers (held by their modules, after :meth:`_Recorder.watch`)
    and the batch as allocated before the first step. A function, so no loop variable keeps a tensor alive."""
    for p in dict.fromkeys(model.parameters()):
        recorder.tag(p, Category.PARAMETERS, "parameter", owner_of=p)
    for b in model.buffers():
        recorder.tag(b, Category.PARAMETERS, "buffer", owner_of=b)
    owner = recorder._owner_names[recorder._owner_id(BATCH)]
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            recorder.track(leaf, Category.INPUTS, kind="input")
            for aid in recorder._aids(leaf):
                recorder.trace.holders[aid] = recorder._pair(owner, "input")
