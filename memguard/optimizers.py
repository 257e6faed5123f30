"""The optimizer catalog: one table that says, for each optimizer memguard knows by name, how to build it
for a trace and how much state it keeps.

Torch optimizers are traced for real (on meta tensors), so their state and step transients come out of
the trace exactly; the table's analytic numbers serve the planner's quick what-ifs and the optimizers that
cannot run under tracing. ``implementation`` mirrors the device's default: torch picks for-loop on the CPU
and foreach on CUDA.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from memguard.errors import InvalidArgumentError, unknown_name

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

IMPLEMENTATIONS = ("for-loop", "foreach", "fused")


@dataclass(frozen=True)
class OptimizerEntry:
    """One row of the catalog.

    ``state_bytes_per_param`` is keyed by the parameter's element size in bytes (4 for fp32, 2 for
    bf16/fp16) and counts every tensor kept between steps. ``library`` names the distribution that
    provides the class, for messages and for swapping it in.
    """

    name: str
    summary: str
    library: str
    cls_path: str
    state_bytes_per_param: dict[int, float]
    defaults: dict[str, Any] = field(default_factory=dict)
    supports_impl: bool = True
    paged: bool = False

    def load_class(self) -> type:
        module, _, attr = self.cls_path.rpartition(".")
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError as exc:
            raise InvalidArgumentError(
                f"optimizer {self.name!r} needs the {self.library!r} package: pip install {self.library}"
            ) from exc
        return getattr(mod, attr)


def _torch(name: str, summary: str, cls: str, state: float, **defaults: Any) -> OptimizerEntry:
    # torch keeps state in the parameter's dtype, so bytes per parameter scale with its element size.
    return OptimizerEntry(name, summary, "torch", f"torch.optim.{cls}", {4: 4.0 * state, 2: 2.0 * state}, defaults)


CATALOG: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        _torch("sgd", "SGD without momentum: no state", "SGD", 0, lr=1e-2),
        _torch("sgd_momentum", "SGD with momentum: one buffer", "SGD", 1, lr=1e-2, momentum=0.9),
        _torch("adam", "Adam: two moments", "Adam", 2, lr=1e-3),
        _torch("adamw", "AdamW: two moments", "AdamW", 2, lr=1e-3),
        _torch("rmsprop", "RMSprop: square average", "RMSprop", 1, lr=1e-2),
        _torch("adagrad", "Adagrad: sum of squares", "Adagrad", 1, lr=1e-2),
        OptimizerEntry("adafactor", "torch Adafactor: factored second moment (row + column)", "torch",
                       "torch.optim.Adafactor", {4: 0.0, 2: 0.0}, {"lr": 1e-2}),
    )
}


def entry(name: str) -> OptimizerEntry:
    key = name.strip().lower().replace("-", "_")
    if key not in CATALOG:
        raise unknown_name("optimizer", name, CATALOG)
    return CATALOG[key]


def _accepts(cls: type, arg: str) -> bool:
    try:
        return arg in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def make_factory(
    optimizer: str | type | Factory | None,
    implementation: str,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Factory | None, str]:
    """Turn what the user passed into ``(factory, label)``; the factory builds the optimizer over params.

    ``implementation`` ("for-loop", "foreach", "fused") is applied to torch optimizers that take it, so
    the trace follows the code path the target device would run.
    """
    if implementation not in IMPLEMENTATIONS:
        raise unknown_name("optimizer implementation", implementation, IMPLEMENTATIONS)
    kwargs = dict(kwargs or {})
    if optimizer is None:
        return None, "none"
    if isinstance(optimizer, str):
        row = entry(optimizer)
        cls = row.load_class()
        merged = {**row.defaults, **kwargs}
        label = row.name
    elif inspect.isclass(optimizer):
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"optimizer class {optimizer.__name__} is not a torch.optim.Optimizer")
        cls, merged, label = optimizer, kwargs, optimizer.__name__
    elif callable(optimizer):
        return optimizer, getattr(optimizer, "__name__", "factory")
    else:
        raise InvalidArgumentError(
            f"optimizer must be a name ({', '.join(sorted(CATALOG))}), an optimizer class or a factory "
            f"params -> optimizer; got {type(optimizer).__name__}"
        )
    impl_kwargs = _impl_kwargs(cls, implementation, merged)

    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return cls(params, **{**merged, **impl_kwargs})

    return factory, label


def _impl_kwargs(cls: type, implementation: str, given: dict[str, Any]) -> dict[str, Any]:
    if "foreach" in given or "fused" in given:
        return {}  # the user chose; respect it
    out: dict[str, Any] = {}
    if _accepts(cls, "foreach"):
        out["foreach"] = implementation == "foreach"
    if implementation == "fused" and _accepts(cls, "fused"):
        out["fused"] = True
        out["foreach"] = False
    return out


def names() -> Iterable[str]:
    return sorted(CATALOG)


class ShapeOnlyOptimizer(torch.optim.Optimizer):
    """An optimizer that allocates what a real one would (state created lazily on the first step, a step
    transient) without computing anything, for optimizers that cannot run on shape-only tensors.

    ``state_bytes(param) -> int`` gives the bytes of state kept for a parameter; ``transient_bytes(params)
    -> list[int]`` the scratch blocks a step holds at once (all freed when the step ends).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        state_bytes: Callable[[torch.Tensor], int],
        transient_bytes: Callable[[list[torch.Tensor]], list[int]] = lambda ps: [],
    ) -> None:
        super().__init__(params, {})
        self._state_bytes = state_bytes
        self._transient_bytes = transient_bytes

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in live:
            if p not in self.state or not self.state[p]:
                nbytes = self._state_bytes(p)
                if nbytes > 0:
                    self.state[p]["state"] = torch.empty(nbytes, dtype=torch.uint8, device=p.device)
        scratch = [torch.empty(n, dtype=torch.uint8, device=live[0].device) for n in self._transient_bytes(live) if n > 0]
        del scratch


def adam_like_bound(params: list[torch.nn.Parameter]) -> ShapeOnlyOptimizer:
    """A conservative stand-in for an optimizer that cannot be traced: Adam-sized state (two copies of
    each parameter, in its dtype) and a foreach-sized step transient (one copy of all parameters)."""
    return ShapeOnlyOptimizer(
        params,
        state_bytes=lambda p: 2 * p.numel() * p.element_size(),
        transient_bytes=lambda ps: [p.numel() * p.element_size() for p in ps],
    )
