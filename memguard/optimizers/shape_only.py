"""The optimizers the trace builds when the real class cannot run on shape-only tensors (bitsandbytes,
torchao, Lion, torch's fused kernels, which have no meta implementation).

A :class:`ShapeOnlyOptimizer` executes a catalog row's layout and program: it allocates exactly the state
tensors the real optimizer creates, lazily, with the real dtypes and sizes, and the modelled step scratch,
so the analytic what-ifs and the trace agree by construction. :func:`stand_in` makes a factory of one for
a row; :func:`adam_like_bound` is the conservative stand-in for an optimizer memguard does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from memguard.optimizers.catalog import OptimizerEntry
from memguard.optimizers.programs import (
    Alloc,
    Buffer,
    Event,
    Free,
    Layout,
    MakeState,
    Options,
    ParamSpec,
    Program,
    _state_first,
)

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class ShapeOnlyOptimizer(torch.optim.Optimizer):
    """An optimizer that allocates what a real one would without computing anything, for optimizers that
    cannot run on shape-only tensors.

    Given a ``layout`` and ``program`` (a catalog row's), it creates exactly the row's state tensors, with
    their dtypes and sizes, when the program says so (lazily on the first step, or in the constructor with
    ``eager_state``), and allocates and frees the program's scratch in order. Shared buffers are created
    once; "host" buffers are CPU tensors; "unified" buffers are not allocated but summed into
    ``unified_bytes`` (and recorded as ``state[p]["unified_bytes"]``).

    The older form stays: ``state_bytes(param) -> int`` gives one uint8 block of state per parameter and
    ``transient_bytes(params) -> list[int]`` the scratch blocks a step holds at once.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        state_bytes: Callable[[torch.Tensor], int] | None = None,
        transient_bytes: Callable[[list[torch.Tensor]], list[int]] = lambda ps: [],
        *,
        layout: Layout | None = None,
        program: Program | None = None,
        options: Options | None = None,
        defaults: Mapping[str, Any] | None = None,
        eager_state: bool = False,
        group_scalars: int = 0,
    ) -> None:
        super().__init__(params, dict(defaults or {}))
        self.options = options or Options()
        self.unified_bytes = 0
        self._shared: dict[str, torch.Tensor] = {}
        if layout is None:
            legacy = state_bytes or (lambda p: 0)
            self._layout: Callable[[torch.Tensor], list[Buffer]] = lambda p: (
                [Buffer("state", (n,), torch.uint8)] if (n := int(legacy(p))) > 0 else []
            )
            self._program: Callable[[list[torch.Tensor]], list[Event]] = lambda live: _legacy_program(
                live, transient_bytes
            )
        else:
            self._layout = lambda p: layout(ParamSpec.of(p), self.options)
            steps = program or (lambda ps, o: _state_first(ps))
            self._program = lambda live: steps([ParamSpec.of(p) for p in live], self.options)
        count = group_scalars * len(self.param_groups)
        self._group_scalars = [torch.zeros((), dtype=torch.float32) for _ in range(count)]
        if eager_state:
            for group in self.param_groups:
                for p in group["params"]:
                    self._make_state(p)

    def _make_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        for b in self._layout(p):
            if b.where == "unified":
                self.unified_bytes += b.nbytes
                state["unified_bytes"] = state.get("unified_bytes", 0) + b.nbytes
                continue
            if b.shared and b.key in self._shared:
                state[b.key] = self._shared[b.key]
                continue
            tensor = torch.empty(b.shape, dtype=b.dtype, device="cpu" if b.where == "host" else p.device)
            if b.shared:
                self._shared[b.key] = tensor
            state[b.key] = tensor

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not live:
            return loss
        scratch: dict[str, torch.Tensor] = {}
        for ev in self._program(live):
            if isinstance(ev, MakeState):
                self._make_state(live[ev.index])
            elif isinstance(ev, Alloc):
                scratch[ev.key] = torch.empty(ev.nbytes, dtype=torch.uint8, device="cpu" if ev.host else live[0].device)
            else:
                scratch.pop(ev.key, None)
        scratch.clear()
        return loss


def _legacy_program(
    live: list[torch.Tensor], transient_bytes: Callable[[list[torch.Tensor]], list[int]]
) -> list[Event]:
    ev: list[Event] = [MakeState(i) for i in range(len(live))]
    blocks = [n for n in transient_bytes(live) if n > 0]
    ev += [Alloc(f"t{j}", n) for j, n in enumerate(blocks)]
    ev += [Free(f"t{j}") for j in range(len(blocks))]
    return ev


def stand_in(row: OptimizerEntry, options: Options) -> Factory:
    """A factory of the row's :class:`ShapeOnlyOptimizer`: the real state and the modelled step."""

    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return ShapeOnlyOptimizer(
            params, layout=row.layout, program=row.program, options=options, defaults=dict(options.kwargs),
            eager_state=row.eager_state, group_scalars=row.group_scalars,
        )

    factory.__name__ = row.name
    return factory


def adam_like_bound(params: list[torch.nn.Parameter]) -> ShapeOnlyOptimizer:
    """A conservative stand-in for an optimizer that cannot be traced: Adam-sized state (two copies of
    each parameter, in its dtype) and a foreach-sized step transient (one copy of all parameters)."""
    return ShapeOnlyOptimizer(
        params,
        state_bytes=lambda p: 2 * p.numel() * p.element_size(),
        transient_bytes=lambda ps: [p.numel() * p.element_size() for p in ps],
    )
