"""The optimizer catalog: one table that says, for each optimizer memguard knows by name, which tensors it
keeps per parameter, what its step allocates, where its state lives, and how to build the real class.

Why a table of *layouts and programs* rather than of bytes per parameter: what an optimizer keeps depends
on each parameter's size (bitsandbytes keeps tensors under 4096 elements in 32 bits, torchao only quantizes
tensors whose size divides its block, Adafactor factors matrices), and its step scratch depends on the
implementation and on the order of the parameters. Each row therefore holds

- ``layout``: the state tensors one parameter gets (shape, dtype, and where they live: ``device``,
  ``host`` for torch's CPU step counters, ``unified`` for bitsandbytes' paged buffers);
- ``program``: the step as a sequence of scratch allocations and frees (and, for the stand-ins, where the
  lazily created state appears), written from the library's source.

Torch optimizers are traced for real on meta tensors (for-loop and foreach), so the trace is exact; their
programs serve the analytic what-ifs (:func:`state_bytes`, :func:`step_transient_bytes`) and are checked
against the trace in the tests. Optimizers that cannot run on shape-only tensors (bitsandbytes, torchao,
Lion, torch's fused kernels, which have no meta implementation) are traced through a
:class:`ShapeOnlyOptimizer` that executes the row's layout and program: it allocates exactly the state
tensors the real optimizer creates, lazily, with the real dtypes and sizes, and the modelled step scratch.
So the analytic functions and the trace agree by construction for those.

``implementation`` mirrors the target device's default: torch picks for-loop on the CPU and foreach on
CUDA; ``device`` ("cuda" or "cpu") decides what is device-specific (paged state falls back to ordinary
memory on the CPU; bitsandbytes' CPU backend computes in eager fp32 with scratch its CUDA kernels do not
need).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from memguard.errors import InvalidArgumentError, unknown_name
from memguard.quiet import quiet

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

IMPLEMENTATIONS = ("for-loop", "foreach", "fused")
LOCATIONS = ("device", "unified", "cpu")
"""Where an optimizer's state lives: in device memory, in CUDA unified memory (bitsandbytes' paged
optimizers: outside torch's allocator counters, paged to host under pressure), or in host memory (offload)."""

PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages a state buffer only when its parameter has at least this many elements
(``Optimizer8bit.get_state_buffer``: ``p.numel() < 1e5`` stays in ordinary device memory)."""

NOMINAL_SHAPE = (4096, 4096)
"""The parameter the nominal bytes-per-parameter figures are computed for: large enough that per-tensor
extras (step counters, quantization maps) vanish, divisible by every block size."""


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


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes (bitsandbytes/optim/optimizer.py: Optimizer2State.init_state / update_step)

BNB_BLOCKSIZE = 256
"""Block size of bitsandbytes' blockwise 8-bit optimizer states (hard-coded in ``init_state``)."""
BNB_QMAP_SIZE = 256
"""Entries of bitsandbytes' dynamic quantization maps (``create_dynamic_map``): float32, one signed map
for the first moment and one unsigned map for the second, shared by every parameter."""


def _bnb_bits(o: Options, eight_bit: bool) -> int:
    return 8 if eight_bit else int(o.get("optim_bits", 32))


def _bnb_layout(eight_bit: bool, paged: bool) -> Layout:
    def layout(p: ParamSpec, o: Options) -> list[Buffer]:
        """Two moments: uint8 with float32 absmax per block of 256 and the two shared quantization maps,
        or float32 (whatever the parameter's dtype) below ``min_8bit_size`` elements or with 32-bit
        state. The step counter is a Python int. Paged buffers of parameters with at least
        ``PAGED_MIN_NUMEL`` elements live in unified memory on CUDA (on the CPU, paging falls back to
        ordinary memory); absmax and maps never are paged."""
        bits = _bnb_bits(o, eight_bit)
        if p.numel < int(o.get("min_8bit_size", 4096)):
            bits = 32
        is_paged = paged or bool(o.get("is_paged", False))
        where = "unified" if is_paged and not o.on_cpu and p.numel >= PAGED_MIN_NUMEL else "device"
        if bits == 32:
            out = [Buffer("state1", p.shape, torch.float32, where), Buffer("state2", p.shape, torch.float32, where)]
        else:
            blocks = -(-p.numel // BNB_BLOCKSIZE)
            out = [
                Buffer("state1", p.shape, torch.uint8, where),
                Buffer("qmap1", (BNB_QMAP_SIZE,), torch.float32, shared=True),
                Buffer("state2", p.shape, torch.uint8, where),
                Buffer("qmap2", (BNB_QMAP_SIZE,), torch.float32, shared=True),
                Buffer("absmax1", (blocks,), torch.float32),
                Buffer("absmax2", (blocks,), torch.float32),
            ]
        if o.get("max_unorm", 0.0) > 0:
            out.append(Buffer("unorm_vec", (1,), torch.float32))
        return out

    return layout


def _scalar_op(out: Alloc) -> list[Event]:
    # An eager op between a tensor and a Python float wraps the float into two small CPU tensors (a
    # float64 and a float32 copy) that live while the op's output is allocated.
    return [Alloc("wrapped64", 8), Alloc("wrapped32", 4), out, Free("wrapped32"), Free("wrapped64")]


def _bnb_program(eight_bit: bool) -> Program:
    def program(ps: list[ParamSpec], o: Options) -> list[Event]:
        """State is created parameter by parameter, just before its update. On CUDA the update is one
        in-place kernel (``optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``): no scratch.
        On the CPU (backends/cpu/ops.py) the update runs in eager fp32: 8-bit state is dequantized into
        two fp32 copies, the gradient (and a half-precision parameter) converted to fp32, the denominator
        computed with one temporary, then both moments re-quantized through a uint8 + absmax pair; 32-bit
        state computes ``state1 / (state2.sqrt() + eps)`` with two temporaries. Checked against the CPU
        backend's measured allocations, byte for byte."""
        ev: list[Event] = []
        for i, p in enumerate(ps):
            ev.append(MakeState(i))
            if not o.on_cpu:
                continue
            f32 = 4 * p.numel
            half = p.dtype != torch.float32
            eight = _bnb_bits(o, eight_bit) == 8 and p.numel >= int(o.get("min_8bit_size", 4096))
            keys: list[str] = []
            if eight:
                ev += [Alloc("s1f", f32), Alloc("s2f", f32)]
                keys += ["s1f", "s2f"]
            if half:
                ev += [Alloc("g_cast", f32), *_scalar_op(Alloc("g", f32)), Free("g_cast"), Alloc("p_f32", f32)]
                keys += ["g", "p_f32"]
            else:
                ev += _scalar_op(Alloc("g", f32))
                keys.append("g")
            if eight:
                ev += [Alloc("sqrt", f32), *_scalar_op(Alloc("denom", f32)), Free("sqrt")]
                keys.append("denom")
                blocks = -(-p.numel // BNB_BLOCKSIZE)
                for s in ("1", "2"):
                    ev += [Alloc(f"absmax{s}", 4 * blocks), Alloc(f"codes{s}", p.numel), Free(f"absmax{s}"),
                           Free(f"codes{s}")]
            else:
                ev += [Alloc("sqrt", f32), *_scalar_op(Alloc("sum", f32)), Free("sqrt"),
                       Alloc("update", f32), Free("sum")]
                keys.append("update")
            _free(ev, keys)
        return ev

    return program


# ---------------------------------------------------------------------------------------------------------
# torchao (torchao/optim/adam.py: _AdamBase._new_buffer, subclass_8bit / subclass_4bit / subclass_fp8)

_AO_KINDS = {
    # kind: (default block size, codes bytes per element numerator/denominator, qmap entries)
    "8bit": (256, torch.uint8, 1, 256),
    "4bit": (128, torch.uint8, 2, 16),
    "fp8": (256, torch.float8_e4m3fn, 1, 0),
}


def _ao_keys(o: Options) -> list[str]:
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if o.get("amsgrad", False) else [])


def _ao_quantized(p: ParamSpec, block: int) -> bool:
    # _new_buffer: "follow bitsandbytes, only quantize tensors >= 4096 values" that split into whole blocks.
    return p.numel >= 4096 and p.numel % block == 0


def _ao_layout(kind: str) -> Layout:
    default_block, codes_dtype, per_byte, qmap = _AO_KINDS[kind]

    def layout(p: ParamSpec, o: Options) -> list[Buffer]:
        """A host float32 step counter, then per moment either the quantized subclass (codes in the
        parameter's shape, or packed two per byte for 4-bit; float32 scales per block; a float32 qmap of
        its own per tensor for 8-bit and 4-bit) or, when the parameter is small or does not split into
        whole blocks, a plain tensor in the parameter's dtype."""
        block = int(o.get("block_size", default_block))
        out = [Buffer("step", (), torch.get_default_dtype(), "host")]
        for key in _ao_keys(o):
            if not _ao_quantized(p, block):
                out.append(Buffer(key, p.shape, p.dtype))
                continue
            codes_shape = p.shape if per_byte == 1 else (p.numel // per_byte,)
            out.append(Buffer(f"{key}.codes", codes_shape, codes_dtype))
            out.append(Buffer(f"{key}.scale", (p.numel // block,), torch.float32))
            if qmap:
                out.append(Buffer(f"{key}.qmap", (qmap,), torch.float32))
        return out

    return layout


def _ao_program(kind: str) -> Program:
    default_block = _AO_KINDS[kind][0]

    def program(ps: list[ParamSpec], o: Options) -> list[Event]:
        """State is created parameter by parameter; each update is one ``torch.compile``d
        ``single_param_adam``. Its scratch for a quantized moment of n elements, as measured from the
        compiled kernels (inductor, CPU backend; the CUDA backend fuses on its own terms): 8-bit keeps an
        fp32 copy (4n) and the new scales (4n/block); 4-bit unpacks the codes (n/2 then n bytes) and
        keeps fp32 values (4n), int64 codes (8n) and the scales; fp8 keeps the new scales and, for some
        shapes (small matrices), the new codes (n): the model keeps both, the larger of the two patterns.
        Plain moments update in place."""
        block = int(o.get("block_size", default_block))
        ev: list[Event] = []
        for i, p in enumerate(ps):
            ev.append(MakeState(i))
            if not _ao_quantized(p, block):
                continue
            n, scale = p.numel, 4 * (p.numel // block)
            moments = range(len(_ao_keys(o)))
            keys: list[str] = []
            if kind == "4bit":
                ev += [Alloc(f"packed{m}", n // 2) for m in moments]
                ev += [Alloc(f"unpacked{m}", n) for m in moments]
                _free(ev, [f"packed{m}" for m in moments])
                keys += [f"unpacked{m}" for m in moments]
            sizes = {"8bit": [("f32", 4 * n)], "4bit": [("f32", 4 * n), ("i64", 8 * n)], "fp8": [("codes", n)]}[kind]
            ev += [Alloc(f"scale{m}", scale) for m in moments]
            keys += [f"scale{m}" for m in moments]
            for name, nbytes in sizes:
                ev += [Alloc(f"{name}{m}", nbytes) for m in moments]
                keys += [f"{name}{m}" for m in moments]
            _free(ev, keys)
        return ev

    return program


# ---------------------------------------------------------------------------------------------------------
# Lion (lion-pytorch: lion_pytorch.Lion, lion_pytorch.foreach.Lion, Lion(use_triton=True))


def _lion_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    return [Buffer("exp_avg", p.shape, p.dtype)]


def _lion_program(ps: list[ParamSpec], o: Options) -> list[Event]:
    """for-loop (``update_fn``): ``exp_avg.clone().mul_(beta1).add(grad)`` holds the clone and the sum
    (2x the parameter) until the clone is dropped; the update lives until the function returns. The
    momentum is created lazily per parameter. foreach: ``updates = [t.clone() for t in exp_avgs]``, one
    copy of every parameter, after all momenta exist. fused (triton ``update_fn``): in place."""
    ev: list[Event] = []
    if o.implementation == "foreach":
        ev = _state_first(ps)
        _free(ev, _alloc_each(ev, ps, list(range(len(ps))), "update"))
        return ev
    for i, p in enumerate(ps):
        ev.append(MakeState(i))
        if o.implementation == "for-loop":
            ev += [Alloc("clone", p.nbytes), Alloc("update", p.nbytes), Free("clone"), Free("update")]
    return ev


# ---------------------------------------------------------------------------------------------------------
# The catalog


@dataclass(frozen=True)
class OptimizerEntry:
    """One row of the catalog.

    ``library`` is the distribution to install, ``cls_path`` the real class (for swapping it into a run),
    ``aliases`` other classes whose state and step are the same (mapped to this row when passed as a
    class), ``alternatives`` classes from another library :func:`real_class` falls back to.
    ``implementations`` are those the class has; any other requested one runs as ``fallback``.
    ``location`` says where the state lives. ``eager_state``: the constructor creates the state (Adagrad).
    ``group_scalars``: host float32 scalars made per parameter group at construction (torchao's tensor lr).
    """

    name: str
    summary: str
    library: str
    cls_path: str
    layout: Layout
    program: Program
    defaults: dict[str, Any] = field(default_factory=dict)
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    fallback: str = "for-loop"
    location: str = "device"
    aliases: tuple[str, ...] = ()
    alternatives: tuple[str, ...] = ()
    eager_state: bool = False
    group_scalars: int = 0

    def runs_real(self, options: Options) -> bool:
        """Whether the trace runs the real class (torch's for-loop and foreach implementations, on meta
        tensors) rather than the row's stand-in."""
        return self.library == "torch" and options.implementation != "fused"

    @property
    def paged(self) -> bool:
        return self.location == "unified"

    def effective(self, implementation: str, kwargs: Mapping[str, Any] | None = None) -> str:
        """The implementation that really runs: torch honours explicit ``foreach`` / ``fused`` arguments,
        Lion's ``use_triton`` is its fused kernel, and a class without the requested one falls back."""
        kwargs = kwargs or {}
        if self.library == "torch" and ("foreach" in kwargs or "fused" in kwargs):
            return "fused" if kwargs.get("fused") else "foreach" if kwargs.get("foreach") else "for-loop"
        if self.name == "lion" and kwargs.get("use_triton"):
            return "fused"
        return implementation if implementation in self.implementations else self.fallback

    def options(self, implementation: str, device: str = "cuda", kwargs: Mapping[str, Any] | None = None,
                *, with_defaults: bool = True) -> Options:
        merged = {**(self.defaults if with_defaults else {}), **(kwargs or {})}
        return Options(self.effective(implementation, merged), _device_kind(device), merged)

    @property
    def state_bytes_per_param(self) -> dict[int, float]:
        """Nominal state bytes per parameter, keyed by the parameter's element size (4: fp32, 2: bf16),
        for a large parameter where per-tensor extras vanish (unified memory included)."""
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            p = ParamSpec(NOMINAL_SHAPE, dtype)
            o = self.options("foreach", "cuda")
            out[dtype.itemsize] = sum(b.nbytes for b in self.layout(p, o)) / p.numel
        return out

    def load_class(self) -> type:
        return _import(self.cls_path, self)


def _torch(name: str, summary: str, cls: str, layout: Layout, program: Program, *,
           implementations: tuple[str, ...] = IMPLEMENTATIONS, eager_state: bool = False,
           **defaults: Any) -> OptimizerEntry:
    return OptimizerEntry(name, summary, "torch", f"torch.optim.{cls}", layout, program, defaults,
                          implementations=implementations, eager_state=eager_state)


def _bnb(name: str, summary: str, cls: str, *, eight_bit: bool, paged: bool, aliases: tuple[str, ...] = (),
         alternatives: tuple[str, ...] = ()) -> OptimizerEntry:
    return OptimizerEntry(
        name, summary, "bitsandbytes", f"bitsandbytes.optim.{cls}", _bnb_layout(eight_bit, paged),
        _bnb_program(eight_bit), implementations=("fused",), fallback="fused",
        location="unified" if paged else "device", aliases=aliases, alternatives=alternatives,
    )


def _ao(name: str, summary: str, cls: str, kind: str, alias: str) -> OptimizerEntry:
    return OptimizerEntry(
        name, summary, "torchao", f"torchao.optim.{cls}", _ao_layout(kind), _ao_program(kind),
        implementations=("for-loop",), fallback="for-loop", aliases=(f"torchao.optim.{alias}",), group_scalars=1,
    )


CATALOG: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        _torch("sgd", "SGD without momentum: no state", "SGD", _sgd_layout, _sgd_program, lr=1e-2),
        _torch("sgd_momentum", "SGD with momentum: one buffer", "SGD", _sgd_layout, _sgd_program,
               lr=1e-2, momentum=0.9),
        _torch("adam", "Adam: two moments", "Adam", _adam_layout, _adam_program(False), lr=1e-3),
        _torch("adamw", "AdamW: two moments", "AdamW", _adam_layout, _adam_program(True), lr=1e-3),
        _torch("rmsprop", "RMSprop: square average", "RMSprop", _rmsprop_layout, _rmsprop_program,
               implementations=("for-loop", "foreach"), lr=1e-2),
        _torch("adagrad", "Adagrad: sum of squares, made by the constructor", "Adagrad", _adagrad_layout,
               _adagrad_program, eager_state=True, lr=1e-2),
        _torch("adafactor", "torch Adafactor: factored second moment (row + column)", "Adafactor",
               _adafactor_layout, _adafactor_program, implementations=("for-loop", "foreach"), lr=1e-2),
        OptimizerEntry("lion", "Lion (lion-pytorch): one momentum buffer", "lion-pytorch", "lion_pytorch.Lion",
                       _lion_layout, _lion_program, {"lr": 1e-4}, aliases=("lion_pytorch.foreach.Lion",)),
        _bnb("adamw8bit", "bitsandbytes AdamW8bit: blockwise 8-bit moments", "AdamW8bit", eight_bit=True,
             paged=False, alternatives=("torchao.optim.AdamW8bit",)),
        _bnb("adam8bit", "bitsandbytes Adam8bit: blockwise 8-bit moments", "Adam8bit", eight_bit=True,
             paged=False, alternatives=("torchao.optim.Adam8bit",)),
        _bnb("paged_adamw8bit", "bitsandbytes PagedAdamW8bit: 8-bit moments in unified memory", "PagedAdamW8bit",
             eight_bit=True, paged=True, aliases=("bitsandbytes.optim.PagedAdam8bit",)),
        _bnb("paged_adamw", "bitsandbytes PagedAdamW: fp32 moments in unified memory", "PagedAdamW",
             eight_bit=False, paged=True,
             aliases=("bitsandbytes.optim.PagedAdamW32bit", "bitsandbytes.optim.PagedAdam",
                      "bitsandbytes.optim.PagedAdam32bit")),
        _ao("ao_adamw8bit", "torchao AdamW8bit: blockwise 8-bit moments", "AdamW8bit", "8bit", "Adam8bit"),
        _ao("ao_adamw4bit", "torchao AdamW4bit: blockwise 4-bit moments", "AdamW4bit", "4bit", "Adam4bit"),
        _ao("ao_adamw_fp8", "torchao AdamWFp8: blockwise fp8 moments", "AdamWFp8", "fp8", "AdamFp8"),
    )
}


def entry(name: str | OptimizerEntry) -> OptimizerEntry:
    """The catalog row for ``name`` ("adamw", "AdamW8bit", "paged-adamw8bit"...)."""
    if isinstance(name, OptimizerEntry):
        return name
    key = name.strip().lower().replace("-", "_")
    if key not in CATALOG:
        raise unknown_name("optimizer", name, CATALOG)
    return CATALOG[key]


def names() -> list[str]:
    return sorted(CATALOG)


def _device_kind(device: str | torch.device | Any) -> str:
    """"cpu" or "cuda" from a device name, a torch.device or a device model (its ``name``)."""
    if isinstance(device, torch.device):
        text = device.type
    else:
        text = str(device if isinstance(device, str) else getattr(device, "name", device))
    return "cpu" if text.split(":")[0] == "cpu" else "cuda"


def _missing(row: OptimizerEntry) -> InvalidArgumentError:
    hint = f"optimizer {row.name!r} needs {row.library}: pip install {row.library}"
    if row.alternatives:
        libs = sorted({path.split(".")[0] for path in row.alternatives})
        hint += f" (or {' / '.join(libs)}: pip install {' '.join(libs)})"
    return InvalidArgumentError(hint)


def _import(path: str, row: OptimizerEntry) -> type:
    module, _, attr = path.rpartition(".")
    try:
        with quiet(native_output=True):  # torchao and bitsandbytes log and warn while they load
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise _missing(row) from exc


# ---------------------------------------------------------------------------------------------------------
# Analytic what-ifs


ParamsLike = Union[nn.Module, Iterable[Union[torch.Tensor, tuple, ParamSpec]]]


def param_specs(params: ParamsLike) -> list[ParamSpec]:
    """Shapes and dtypes of the trainable parameters (a module's, deduplicated as ``parameters()`` does)."""
    if isinstance(params, nn.Module):
        return [ParamSpec.of(p) for p in params.parameters() if p.requires_grad]
    return [ParamSpec.of(p) for p in params]


def state_breakdown(
    name_or_entry: str | OptimizerEntry,
    params: ParamsLike,
    implementation: str = "foreach",
    *,
    device: str = "cuda",
    kwargs: Mapping[str, Any] | None = None,
    round_up: Callable[[int], int] | None = None,
) -> dict[str, int]:
    """Bytes of every tensor the optimizer keeps once each parameter has state, by where it lives:
    "device", "host" (torch's CPU step counters, torchao's), "unified" (paged bitsandbytes buffers).
    Shared tensors (bitsandbytes' quantization maps) count once. ``round_up`` applies a device
    allocator's block rounding to each tensor."""
    row = entry(name_or_entry)
    o = row.options(implementation, device, kwargs)
    rnd = round_up or (lambda n: n)
    out = {"device": 0, "host": 0, "unified": 0}
    shared: set[str] = set()
    for p in param_specs(params):
        for b in row.layout(p, o):
            if b.shared:
                if b.key in shared:
                    continue
                shared.add(b.key)
            out[b.where] += b.nbytes if b.where == "unified" else rnd(b.nbytes)
    return out


def state_bytes(
    name_or_entry: str | OptimizerEntry,
    params: ParamsLike,
    implementation: str = "foreach",
    *,
    device: str = "cuda",
    kwargs: Mapping[str, Any] | None = None,
    round_up: Callable[[int], int] | None = None,
) -> int:
    """What the trace counts as optimizer state on ``device``: device tensors, plus host tensors (torch's
    CPU step counters) when the target is the CPU itself; never paged buffers (:func:`unified_state_bytes`)."""
    parts = state_breakdown(name_or_entry, params, implementation, device=device, kwargs=kwargs, round_up=round_up)
    return parts["device"] + (parts["host"] if device == "cpu" else 0)


def unified_state_bytes(
    name_or_entry: str | OptimizerEntry,
    params: ParamsLike,
    implementation: str = "foreach",
    *,
    device: str = "cuda",
    kwargs: Mapping[str, Any] | None = None,
) -> int:
    """Bytes a paged optimizer keeps in CUDA unified memory: outside torch's allocator (so outside
    ``max_memory_allocated`` and the trace's peak), resident on the device until memory pressure pages it
    out. Zero for every other optimizer and on the CPU."""
    return state_breakdown(name_or_entry, params, implementation, device=device, kwargs=kwargs)["unified"]


def step_transient_bytes(
    name_or_entry: str | OptimizerEntry,
    params: ParamsLike,
    implementation: str = "foreach",
    *,
    device: str = "cuda",
    kwargs: Mapping[str, Any] | None = None,
    round_up: Callable[[int], int] | None = None,
) -> int:
    """Peak scratch bytes of an optimizer step once the state exists (every step after the first), above
    what was live when the step began. On the first step, state created before the update (torch) adds
    to it in full; state created per parameter (bitsandbytes, torchao, Lion's for-loop) overlaps it."""
    row = entry(name_or_entry)
    o = row.options(implementation, device, kwargs)
    return program_peak(row.program(param_specs(params), o), round_up)


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


# ---------------------------------------------------------------------------------------------------------
# Building optimizers for the trace


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


def _class_key(path: str) -> tuple[str, str]:
    return path.split(".")[0], path.rpartition(".")[2]


def entry_for_class(cls: type | str) -> OptimizerEntry | None:
    """The catalog row of an optimizer class (or its dotted path), matched by top-level package and class
    name: ``bitsandbytes.optim.adamw.AdamW8bit`` is bitsandbytes' AdamW8bit, not torchao's, and
    lion-pytorch's ``Lion`` is found in any of its modules. torch's ``SGD`` maps to "sgd"; its momentum
    comes from the arguments."""
    path = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__name__}"
    key = _class_key(path)
    for row in CATALOG.values():
        if key in {_class_key(p) for p in (row.cls_path, *row.aliases)}:
            return row
    return None


def catalog_name(optimizer: Any) -> str | None:
    """The catalog name of an optimizer class or a live optimizer (:func:`entry_for_class`)."""
    row = entry_for_class(optimizer if isinstance(optimizer, type) else type(optimizer))
    return row.name if row is not None else None


def first_optimizer(configured: Any) -> torch.optim.Optimizer | None:
    """The first optimizer in whatever ``configure_optimizers`` returned (an optimizer, lists, dicts)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        for item in configured:
            found = first_optimizer(item)
            if found is not None:
                return found
    return None


def _class_implementation(cls: type, kwargs: Mapping[str, Any], requested: str) -> str:
    if cls.__module__.startswith("lion_pytorch"):
        if cls.__module__.endswith("foreach"):
            return "foreach"
        return "fused" if kwargs.get("use_triton") else "for-loop"
    return requested


def make_factory(
    optimizer: str | type | Factory | None,
    implementation: str,
    kwargs: dict[str, Any] | None = None,
    *,
    device: str = "cuda",
) -> tuple[Factory | None, str]:
    """Turn what the user passed into ``(factory, label)``; the factory builds the optimizer over params.

    ``implementation`` ("for-loop", "foreach", "fused") is applied to torch optimizers that take it, so
    the trace follows the code path the target device would run; torch's fused kernels (which have no
    meta implementation), bitsandbytes, torchao and Lion run as the catalog's stand-ins, whether named or
    passed as their class. ``device`` ("cuda" or "cpu") decides where paged state goes and which
    bitsandbytes backend's scratch is modelled. Libraries are not needed to trace their stand-ins, only to
    swap the real class in (:func:`real_class`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise unknown_name("optimizer implementation", implementation, IMPLEMENTATIONS)
    kwargs = dict(kwargs or {})
    if optimizer is None:
        return None, "none"
    if isinstance(optimizer, (str, OptimizerEntry)):
        row = entry(optimizer)
        options = row.options(implementation, device, kwargs)
        if row.runs_real(options):
            cls = row.load_class()
            merged = dict(options.kwargs)
            impl_kwargs = _impl_kwargs(cls, implementation, merged)
            return _class_factory(cls, {**merged, **impl_kwargs}), row.name
        return stand_in(row, options), row.name
    if inspect.isclass(optimizer):
        row = entry_for_class(optimizer)
        if row is not None:
            impl = _class_implementation(optimizer, kwargs, implementation)
            options = row.options(impl, device, kwargs, with_defaults=False)
            if not row.runs_real(options):
                return stand_in(row, options), optimizer.__name__
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"optimizer class {optimizer.__name__} is not a torch.optim.Optimizer")
        impl_kwargs = _impl_kwargs(optimizer, implementation, kwargs)
        return _class_factory(optimizer, {**kwargs, **impl_kwargs}), optimizer.__name__
    if callable(optimizer):
        return optimizer, getattr(optimizer, "__name__", "factory")
    raise InvalidArgumentError(
        f"optimizer must be a name ({', '.join(sorted(CATALOG))}), an optimizer class or a factory "
        f"params -> optimizer; got {type(optimizer).__name__}"
    )


def _class_factory(cls: type, kwargs: dict[str, Any]) -> Factory:
    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return cls(params, **kwargs)

    return factory


def _accepts(cls: type, arg: str) -> bool:
    try:
        return arg in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _impl_kwargs(cls: type, implementation: str, given: Mapping[str, Any]) -> dict[str, Any]:
    if "foreach" in given or "fused" in given:
        return {}  # the user chose; respect it
    out: dict[str, Any] = {}
    if _accepts(cls, "foreach"):
        out["foreach"] = implementation == "foreach"
    if implementation == "fused" and _accepts(cls, "fused"):
        out["fused"] = True
        out["foreach"] = False
    return out


def adam_like_bound(params: list[torch.nn.Parameter]) -> ShapeOnlyOptimizer:
    """A conservative stand-in for an optimizer that cannot be traced: Adam-sized state (two copies of
    each parameter, in its dtype) and a foreach-sized step transient (one copy of all parameters)."""
    return ShapeOnlyOptimizer(
        params,
        state_bytes=lambda p: 2 * p.numel() * p.element_size(),
        transient_bytes=lambda ps: [p.numel() * p.element_size() for p in ps],
    )


# ---------------------------------------------------------------------------------------------------------
# Swapping the real class into a live run


def real_class(name: str | OptimizerEntry) -> type:
    """Import and return the real optimizer class of a catalog row (for 8-bit Adam/AdamW, bitsandbytes
    first and torchao when bitsandbytes is missing); a clear error names what to install."""
    return swap_plan(name).cls


def available(name: str | OptimizerEntry) -> bool:
    """Whether :func:`real_class` can build this optimizer in this environment."""
    try:
        real_class(name)
    except InvalidArgumentError:
        return False
    return True


SHARED_MEANING = ("lr", "weight_decay", "betas", "eps", "momentum")
"""Hyperparameters that mean the same thing in every optimizer class that takes them in the same form, so
a swap carries them over. The form is checked against the new class's default: ``eps`` is a float in
AdamW and a pair in torch's Adafactor, so Adafactor keeps its own. Every other hyperparameter takes the
new class's default, since it names a feature the new class may lack or treat differently (``amsgrad``,
``foreach``, ``fused``, ``decoupled_weight_decay``, ``maximize``)."""


@dataclass(frozen=True)
class SwapPlan:
    """How to replace a running optimizer by a catalog row's real class: the one rebuild path used by the
    Lightning callback and ``Decision.apply``.

    ``name`` is the row whose class is built (an alternative's when the first choice is missing: estimate
    with it), ``cls`` the class, ``defaults`` the row's own defaults (momentum for "sgd_momentum"),
    ``signature`` the keyword arguments ``cls`` takes with their defaults (None: it takes ``**kwargs``).
    """

    name: str
    cls: type
    defaults: dict[str, Any]
    signature: dict[str, Any] | None

    def param_groups(self, old: torch.optim.Optimizer) -> list[dict[str, Any]]:
        """The old groups re-keyed for ``cls``: the :data:`SHARED_MEANING` hyperparameters it takes are kept
        when their form matches its default's (a pair of betas stays a pair), keys no optimizer defines (a
        scheduler's ``initial_lr``, group names) are kept, the row's defaults fill in, and everything else
        is left to ``cls``'s own defaults."""
        groups = []
        for g in old.param_groups:
            new: dict[str, Any] = {"params": g["params"]}
            for key, value in g.items():
                if key == "params":
                    continue
                if key not in old.defaults:  # not a hyperparameter: scheduler bookkeeping, a group's name
                    new[key] = value
                elif key in SHARED_MEANING and self._takes(key, value):
                    new[key] = value
            for key, value in self.defaults.items():
                if self._takes(key, value):
                    new.setdefault(key, value)
            groups.append(new)
        return groups

    def _takes(self, key: str, value: Any) -> bool:
        if self.signature is None:
            return True
        if key not in self.signature:
            return False
        return _same_form(self.signature[key], value)

    def build(self, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """A new ``cls`` over the old optimizer's parameters and hyperparameters (fresh state)."""
        return self.cls(self.param_groups(old))


def _same_form(default: Any, value: Any) -> bool:
    """Whether ``value`` can stand where the class's ``default`` stands: a pair for a pair, a number (or a
    tensor, torchao's learning rate) for a number; a default of None accepts anything."""
    if default is None or default is inspect.Parameter.empty:
        return True
    if isinstance(default, (tuple, list)) or isinstance(value, (tuple, list)):
        return isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)) and len(default) == len(value)
    numeric = (int, float, torch.Tensor)
    return not isinstance(default, numeric) or isinstance(value, numeric)


def rebuild_optimizer(old: torch.optim.Optimizer, name: str | OptimizerEntry) -> torch.optim.Optimizer:
    """The optimizer a plan swaps in: catalog row ``name``'s real class over ``old``'s parameter groups."""
    return swap_plan(name).build(old)


def swap_plan(name: str | OptimizerEntry) -> SwapPlan:
    """The plan to build ``name``'s real class over a running optimizer's parameter groups."""
    row = entry(name)
    try:
        cls = row.load_class()
    except InvalidArgumentError as missing:
        for path in row.alternatives:
            alt = entry_for_class(path)
            try:
                cls = _import(path, row)
            except InvalidArgumentError:
                continue
            return SwapPlan(alt.name if alt else row.name, cls, dict(row.defaults), _signature(cls))
        raise missing
    return SwapPlan(row.name, cls, dict(row.defaults), _signature(cls))


def _signature(cls: type) -> dict[str, Any] | None:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p.default for k, p in params.items() if k not in ("self", "params")}
