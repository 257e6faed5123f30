"""Step programs: how memguard describes an optimizer's memory without running it, and the descriptions of
torch.optim's classes.

An optimizer's memory is described per parameter, never as bytes per parameter, because what it keeps
depends on each parameter's size and its step scratch on the implementation and on the order of the
parameters:

- a *layout* gives the state tensors one parameter gets (:class:`Buffer`: shape, dtype, and where they
  live: ``device``, ``host`` for torch's CPU step counters, ``unified`` for bitsandbytes' paged buffers);
- a *program* gives the step as a sequence of scratch allocations and frees (:class:`Alloc`,
  :class:`Free`) and, for the shape-only stand-ins, where the lazily created state appears
  (:class:`MakeState`); :func:`program_peak` reads its peak.

This module holds those types (with :class:`ParamSpec` and :class:`Options`, what a layout and a program
are given), the helpers the programs share, and the layouts and programs of torch.optim, written from each
class's ``_init_group`` and ``_single_tensor_*`` / ``_multi_tensor_*`` code. Torch optimizers are traced
for real on meta tensors (for-loop and foreach), so their programs serve the analytic what-ifs and are
checked against the trace in the tests. The other libraries' descriptions are in
:mod:`memguard.optimizers.library_programs`; the catalog that names them all in
:mod:`memguard.optimizers.catalog`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch

IMPLEMENTATIONS = ("for-loop", "foreach", "fused")
LOCATIONS = ("device", "unified", "cpu")
"""Where an optimizer's state lives: in device memory, in CUDA unified memory (bitsandbytes' paged
optimizers: outside torch's allocator counters, paged to host under pressure), or in host memory (offload)."""


# ---------------------------------------------------------------------------------------------------------
# Describing parameters, state tensors and step programs


@dataclass(frozen=True)
class ParamSpec:
    """What the catalog needs to know about a parameter: its shape and dtype (never its values)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, x: torch.Tensor | tuple[Iterable[int], torch.dtype] | ParamSpec) -> ParamSpec:
        if isinstance(x, ParamSpec):
            return x
        if isinstance(x, torch.Tensor):
            return cls(tuple(x.shape), x.dtype)
        shape, dtype = x
        return cls(tuple(int(s) for s in shape), dtype)


@dataclass(frozen=True)
class Buffer:
    """One tensor an optimizer keeps for a parameter.

    ``where``: "device" (next to the parameter), "host" (a CPU tensor, like torch's non-fused step
    counters) or "unified" (bitsandbytes' paged buffers in CUDA unified memory). ``shared`` buffers exist
    once per optimizer whatever the number of parameters (bitsandbytes' quantization maps).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str = "device"
    shared: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Alloc:
    """The step allocates ``nbytes`` of scratch under ``key`` (on the host when ``host``)."""

    key: str
    nbytes: int
    host: bool = False


@dataclass(frozen=True)
class Free:
    """The scratch under ``key`` is released."""

    key: str


@dataclass(frozen=True)
class MakeState:
    """The optimizer creates the state of parameter ``index`` here (first step only)."""

    index: int


Event = Union[Alloc, Free, MakeState]


@dataclass(frozen=True)
class Options:
    """What decides an optimizer's memory besides its parameters: the implementation that really runs,
    the target device ("cuda" or "cpu") and the constructor's keyword arguments."""

    implementation: str = "foreach"
    device: str = "cuda"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.kwargs.get(key, default)
        return default if value is None else value

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


Layout = Callable[[ParamSpec, Options], list[Buffer]]
Program = Callable[[list[ParamSpec], Options], list[Event]]


def _scalar_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype: step counters follow the default dtype (float32 or float64).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _free(events: list[Event], keys: str | list[str] | None) -> None:
    if keys is None:
        return
    for key in [keys] if isinstance(keys, str) else keys:
        events.append(Free(key))


def _alloc_each(events: list[Event], ps: list[ParamSpec], members: list[int], prefix: str) -> list[str]:
    keys = [f"{prefix}{i}" for i in members]
    events.extend(Alloc(k, ps[i].nbytes) for k, i in zip(keys, members))
    return keys


def _dtype_groups(ps: list[ParamSpec]) -> list[list[int]]:
    """Parameter indices grouped as ``Optimizer._group_tensors_by_device_and_dtype`` groups them for the
    foreach kernels (one device here). Its C++ map yields the groups in reverse order of first appearance
    (checked for fp32 / bf16 / fp16 mixes); the order matters because a group's scratch may overlap the
    previous group's."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(ps):
        groups.setdefault(p.dtype, []).append(i)
    return list(groups.values())[::-1]


def _state_first(ps: list[ParamSpec]) -> list[Event]:
    # torch's _init_group creates every parameter's state before the update runs.
    return [MakeState(i) for i in range(len(ps))]


# ---------------------------------------------------------------------------------------------------------
# torch.optim (layouts from each class's _init_group, programs from its _single_tensor_* / _multi_tensor_*)


def _torch_step(o: Options, on_device: bool) -> Buffer:
    dtype = torch.float32 if o.implementation == "fused" else _scalar_dtype()
    return Buffer("step", (), dtype, "device" if on_device else "host")


def _sgd_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    return [Buffer("momentum_buffer", p.shape, p.dtype)] if o.get("momentum", 0.0) != 0 else []


def _sgd_program(ps: list[ParamSpec], o: Options) -> list[Event]:
    """for-loop: ``grad = -grad`` (maximize) and ``grad.add(param)`` (weight decay) are per-parameter
    temporaries, as is ``grad.add(buf)`` with Nesterov; the momentum buffer is the state (a clone of the
    gradient on the first step). foreach: the same per dtype group, as lists. fused: nothing."""
    momentum, wd = o.get("momentum", 0.0), o.get("weight_decay", 0.0)
    nesterov, maximize = o.get("nesterov", False), o.get("maximize", False)
    ev: list[Event] = []
    if o.implementation == "fused":
        return _state_first(ps)  # _fused_sgd: empty_like momentum buffers first, then one kernel
    if o.implementation == "for-loop":
        grad: str | None = None
        for i, p in enumerate(ps):
            if maximize:
                ev.append(Alloc(f"neg{i}", p.nbytes))
            _free(ev, grad)
            grad = f"neg{i}" if maximize else None
            if wd != 0:
                ev.append(Alloc(f"wd{i}", p.nbytes))
                _free(ev, grad)
                grad = f"wd{i}"
            if momentum != 0:
                ev.append(MakeState(i))
                if nesterov:
                    ev.append(Alloc(f"nesterov{i}", p.nbytes))
                _free(ev, grad)
                grad = f"nesterov{i}" if nesterov else None
        _free(ev, grad)
        return ev
    held: list[str] = []
    for members in _dtype_groups(ps):
        _free(ev, held)  # device_grads is rebound at the top of the next group
        held = _alloc_each(ev, ps, members, "neg") if maximize else []
        if wd != 0 and not maximize:
            held = _alloc_each(ev, ps, members, "wd")
        if momentum != 0:
            ev.extend(MakeState(i) for i in members)
            if not nesterov:
                _free(ev, held)  # device_grads = bufs
                held = []
    _free(ev, held)
    return ev


def _adam_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    out = [
        _torch_step(o, o.implementation == "fused" or o.get("capturable", False)),
        Buffer("exp_avg", p.shape, p.dtype),
        Buffer("exp_avg_sq", p.shape, p.dtype),
    ]
    if o.get("amsgrad", False):
        out.append(Buffer("max_exp_avg_sq", p.shape, p.dtype))
    return out


def _adam_program(decoupled: bool) -> Program:
    def program(ps: list[ParamSpec], o: Options) -> list[Event]:
        """for-loop (_single_tensor_adam): per parameter ``exp_avg_sq.sqrt()`` and its quotient exist
        together (2x the parameter) while the previous parameter's ``denom`` is still bound (it is
        rebound only after the new one is computed); ``-grad`` (maximize) and Adam's coupled weight decay
        ``grad.add(param)`` add one more. foreach (_multi_tensor_adam): ``_foreach_sqrt(exp_avg_sqs)``,
        a copy of every parameter of the dtype group, while the previous group's is still bound; a
        4-byte CPU tensor bumps the CPU step counters. fused: nothing (one in-place kernel)."""
        wd = o.get("weight_decay", 1e-2 if decoupled else 0.0)
        coupled_wd = wd != 0 and not (decoupled or o.get("decoupled_weight_decay", False))
        maximize = o.get("maximize", False)
        ev = _state_first(ps)
        if o.implementation == "fused":
            return ev
        if o.implementation == "for-loop":
            grad: str | None = None
            denom: str | None = None
            for i, p in enumerate(ps):
                if maximize:
                    ev.append(Alloc(f"neg{i}", p.nbytes))
                _free(ev, grad)
                grad = f"neg{i}" if maximize else None
                if coupled_wd:
                    ev.append(Alloc(f"wd{i}", p.nbytes))
                    _free(ev, grad)
                    grad = f"wd{i}"
                ev += [Alloc(f"sqrt{i}", p.nbytes), Alloc(f"denom{i}", p.nbytes), Free(f"sqrt{i}")]
                _free(ev, denom)
                denom = f"denom{i}"
            _free(ev, denom)
            _free(ev, grad)
            return ev
        host_steps = not o.get("capturable", False)
        previous: list[str] = []
        for members in _dtype_groups(ps):
            held = _alloc_each(ev, ps, members, "neg") if maximize else []
            if host_steps:
                ev += [Alloc("one", 4, host=True), Free("one")]
            if coupled_wd and not maximize:
                held = _alloc_each(ev, ps, members, "wd")
            _free(ev, held)  # del device_grads
            sqrt = _alloc_each(ev, ps, members, "sqrt")
            _free(ev, previous)
            previous = sqrt
        _free(ev, previous)
        return ev

    return program


def _rmsprop_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    out = [_torch_step(o, o.get("capturable", False)), Buffer("square_avg", p.shape, p.dtype)]
    if o.get("momentum", 0.0) > 0:
        out.append(Buffer("momentum_buffer", p.shape, p.dtype))
    if o.get("centered", False):
        out.append(Buffer("grad_avg", p.shape, p.dtype))
    return out


def _rmsprop_program(ps: list[ParamSpec], o: Options) -> list[Event]:
    """for-loop: ``avg = square_avg.sqrt()`` per parameter while the previous ``avg`` is still bound
    (``addcmul`` when centered); ``-grad`` and ``grad.add(param)`` are per-parameter temporaries.
    foreach: ``_foreach_sqrt`` of the group while the previous group's is bound, and the same
    temporaries as lists. torch has no fused RMSprop: "fused" runs the for-loop."""
    wd, maximize = o.get("weight_decay", 0.0), o.get("maximize", False)
    ev = _state_first(ps)
    if o.implementation == "for-loop":
        return _sqrt_per_parameter(ev, ps, wd, maximize, "avg")
    held: list[str] = []
    previous: list[str] = []
    for members in _dtype_groups(ps):
        _free(ev, held)
        held = _alloc_each(ev, ps, members, "neg") if maximize else []
        if not o.get("capturable", False):
            ev += [Alloc("one", 4, host=True), Free("one")]
        if wd != 0 and not maximize:
            held = _alloc_each(ev, ps, members, "wd")
        avg = _alloc_each(ev, ps, members, "avg")
        _free(ev, previous)
        previous = avg
    _free(ev, previous)
    _free(ev, held)
    return ev


def _sqrt_per_parameter(ev: list[Event], ps: list[ParamSpec], wd: float, maximize: bool, name: str) -> list[Event]:
    """The for-loop step RMSprop and Adagrad share: per parameter, ``-grad`` (maximize) and
    ``grad.add(param)`` (weight decay) temporaries, and a square root bound until the next parameter's."""
    grad: str | None = None
    root: str | None = None
    for i, p in enumerate(ps):
        _free(ev, grad)
        grad = None
        if maximize:
            ev.append(Alloc(f"neg{i}", p.nbytes))
            grad = f"neg{i}"
        if wd != 0:
            ev.append(Alloc(f"wd{i}", p.nbytes))
            _free(ev, grad)
            grad = f"wd{i}"
        ev.append(Alloc(f"{name}{i}", p.nbytes))
        _free(ev, root)
        root = f"{name}{i}"
    _free(ev, root)
    _free(ev, grad)
    return ev


def _adagrad_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    return [_torch_step(o, o.implementation == "fused"), Buffer("sum", p.shape, p.dtype)]


def _adagrad_program(ps: list[ParamSpec], o: Options) -> list[Event]:
    """Adagrad creates its state in the constructor. for-loop: ``std = state_sum.sqrt()`` per parameter
    while the previous ``std`` is bound. foreach: ``_foreach_sqrt(state_sums)`` and the numerator
    ``_foreach_mul(grads, -clr)`` of the group (in place on a temporary gradient list when weight decay or
    maximize made one). fused: nothing."""
    wd, maximize = o.get("weight_decay", 0.0), o.get("maximize", False)
    ev: list[Event] = []
    if o.implementation == "fused":
        return ev
    if o.implementation == "for-loop":
        return _sqrt_per_parameter(ev, ps, wd, maximize, "std")
    grads_held: list[str] = []  # bound to device_grads
    numerator: list[str] = []  # bound to numerator (may be the same list as device_grads)
    std_prev: list[str] = []
    for members in _dtype_groups(ps):
        if grads_held is not numerator:
            _free(ev, grads_held)
        grads_held = _alloc_each(ev, ps, members, "neg") if maximize else []
        ev += [Alloc("one", 4, host=True), Free("one")]
        if wd != 0 and not maximize:
            grads_held = _alloc_each(ev, ps, members, "wd")
        std = _alloc_each(ev, ps, members, "std")
        _free(ev, std_prev)
        std_prev = std
        old = numerator
        numerator = grads_held if (wd != 0 or maximize) else _alloc_each(ev, ps, members, "num")
        _free(ev, old)
    _free(ev, std_prev)
    _free(ev, numerator)
    if grads_held is not numerator:
        _free(ev, grads_held)
    return ev


def _adafactor_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    out = [Buffer("step", (), _scalar_dtype(), "host")]
    if len(p.shape) > 1:
        out.append(Buffer("row_var", p.shape[:-1] + (1,), p.dtype))
        out.append(Buffer("col_var", p.shape[:-2] + (1,) + p.shape[-1:], p.dtype))
    else:
        out.append(Buffer("variance", p.shape, p.dtype))
    return out


def _adafactor_program(ps: list[ParamSpec], o: Options) -> list[Event]:
    """for-loop (_single_tensor_adafactor): a matrix gets its row and column norms and the full
    ``row_var @ col_var`` estimate (which becomes the update); a vector gets ``grad * grad`` and a clone
    of its variance. Every name stays bound until the next parameter that rebinds it, so the previous
    update lives while the next one is computed. foreach: the same per (dtype, matrix-or-vector) group,
    as lists, with the previous group's updates bound until the new ones are complete. The 0-d norms the
    step reads with ``.item()`` are short-lived temporaries. torch has no fused Adafactor."""
    maximize = o.get("maximize", False)
    ev = _state_first(ps)
    if o.implementation == "for-loop":
        grad = row_mean = col_mean = update = grad_sq = None
        for i, p in enumerate(ps):
            if maximize:
                ev.append(Alloc(f"neg{i}", p.nbytes))
            _free(ev, grad)
            grad = f"neg{i}" if maximize else None
            ev += [Alloc("pnorm", p.itemsize), Free("pnorm")]
            if len(p.shape) > 1:
                rows, cols = p.shape[-2], p.shape[-1]
                ev.append(Alloc(f"row_mean{i}", p.nbytes // cols))
                _free(ev, row_mean)
                row_mean = f"row_mean{i}"
                ev.append(Alloc(f"col_mean{i}", p.nbytes // rows))
                _free(ev, col_mean)
                col_mean = f"col_mean{i}"
                ev += [Alloc(f"var{i}", p.nbytes), Alloc("rv_mean", p.nbytes // (rows * cols)), Free("rv_mean")]
            else:
                ev.append(Alloc(f"grad_sq{i}", p.nbytes))
                _free(ev, grad_sq)
                grad_sq = f"grad_sq{i}"
                ev.append(Alloc(f"var{i}", p.nbytes))
            _free(ev, update)
            update = f"var{i}"
            ev += [Alloc("unorm", p.itemsize), Free("unorm")]
        for key in (grad, row_mean, col_mean, update, grad_sq):
            _free(ev, key)
        return ev
    grouped: dict[tuple[torch.dtype, bool], list[int]] = {}
    for members in _dtype_groups(ps):
        for i in members:
            grouped.setdefault((ps[i].dtype, len(ps[i].shape) > 1), []).append(i)
    held: list[str] = []
    updates: list[str] = []
    for (_, matrix), members in grouped.items():
        _free(ev, held)
        held = _alloc_each(ev, ps, members, "neg") if maximize else []
        ev += [Alloc("one", 4, host=True), Free("one")]
        for i in members:
            ev += [Alloc("pnorm", ps[i].itemsize), Free("pnorm")]
        if matrix:
            for prefix, axis in (("row_mean", -1), ("col_mean", -2)):
                keys = [f"{prefix}{i}" for i in members]
                ev += [Alloc(k, ps[i].nbytes // ps[i].shape[axis]) for k, i in zip(keys, members)]
                _free(ev, keys)
            var = _alloc_each(ev, ps, members, "var")
            means = [f"rv_mean{i}" for i in members]
            ev += [Alloc(k, ps[i].nbytes // (ps[i].shape[-1] * ps[i].shape[-2])) for k, i in zip(means, members)]
            _free(ev, means)
        else:
            _free(ev, _alloc_each(ev, ps, members, "grad_sq"))
            var = _alloc_each(ev, ps, members, "var")
        _free(ev, updates)
        updates = var
        for i in members:
            ev += [Alloc("unorm", ps[i].itemsize), Free("unorm")]
    _free(ev, updates)
    _free(ev, held)
    return ev


def program_peak(events: Iterable[Event], round_up: Callable[[int], int] | None = None) -> int:
    """The highest sum of live scratch in a step program."""
    rnd = round_up or (lambda n: n)
    live = peak = 0
    sizes: dict[str, int] = {}
    for ev in events:
        if isinstance(ev, Alloc):
            if ev.key in sizes:
                raise ValueError(f"step program allocates {ev.key!r} twice")
            sizes[ev.key] = rnd(ev.nbytes)
            live += sizes[ev.key]
            peak = max(peak, live)
        elif isinstance(ev, Free):
            live -= sizes.pop(ev.key, 0)
    return peak
