"""The optimizer catalog: one row (:class:`OptimizerEntry`) for each optimizer memguard knows by name, saying
which tensors it keeps per parameter (its layout), what its step allocates (its program), where its state
lives, and which real class it stands for; the mapping from an optimizer class back to its row
(:func:`entry_for_class`, :func:`catalog_name`); and the analytic what-ifs read from the rows
(:func:`state_bytes`, :func:`unified_state_bytes`, :func:`step_transient_bytes`), which the planner uses to
price an optimizer switch without tracing again.

``implementation`` mirrors the target device's default: torch picks for-loop on the CPU and foreach on
CUDA; ``device`` ("cuda" or "cpu") decides what is device-specific (paged state falls back to ordinary
memory on the CPU; bitsandbytes' CPU backend computes in eager fp32 with scratch its CUDA kernels do not
need).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from memguard.errors import InvalidArgumentError, unknown_name
from memguard.optimizers.library_programs import (
    _ao_layout,
    _ao_program,
    _bnb_layout,
    _bnb_program,
    _lion_layout,
    _lion_program,
)
from memguard.optimizers.programs import (
    IMPLEMENTATIONS,
    Layout,
    Options,
    ParamSpec,
    Program,
    _adafactor_layout,
    _adafactor_program,
    _adagrad_layout,
    _adagrad_program,
    _adam_layout,
    _adam_program,
    _rmsprop_layout,
    _rmsprop_program,
    _sgd_layout,
    _sgd_program,
    program_peak,
)
from memguard.quiet import quiet

NOMINAL_SHAPE = (4096, 4096)
"""The parameter the nominal bytes-per-parameter figures are computed for: large enough that per-tensor
extras (step counters, quantization maps) vanish, divisible by every block size."""


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
