"""Recording allocations: :class:`Trace` (every allocation and free of the traced steps, in program order,
with its category and holder), the recorder that fills it from storage lifetimes, and the dispatch mode that
sees every operator's outputs."""

from __future__ import annotations

import bisect
import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from memguard.trace import fake_rules
from memguard.categories import Category
from memguard.device.models import DeviceModel
from memguard.trace.autograd_in_place import AutogradInPlace
from memguard.trace.compiled import teach_rng_operators


# ---------------------------------------------------------------------------------------------------------
# The recording


@dataclass
class Trace:
    """Every allocation of the traced steps, in program order.

    ``events`` is a list of signed allocation ids: ``+(aid + 1)`` allocates, ``-(aid + 1)`` frees.
    ``sizes[aid]`` is the storage's byte size and ``categories[aid]`` what it turned out to be.
    ``phases`` marks where each phase (``"step1.forward"``...) starts in ``events``.
    ``holder_names[holders[aid]]`` is ``(module path, kind)``: who holds the allocation (see
    :meth:`holder_of`). One int per allocation into a small interned table keeps large traces compact.
    """

    sizes: list[int] = field(default_factory=list)
    categories: list[Category] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    phases: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unified_bytes: int = 0
    """Optimizer state a paged optimizer keeps in CUDA unified memory (never in ``events``)."""
    holders: list[int] = field(default_factory=list)
    holder_names: list[tuple[str, str]] = field(default_factory=list)
    compiled: str = ""
    """Which parts ran compiled and with which backend (``"compiled (inductor): whole model"``), or ""."""
    assumed_routing: bool = False
    """Whether routing decisions were assumed (see :mod:`memguard.trace.fake_rules`): the peak is then the
    balanced routing's, and a bound needs the skewed routing's trace too."""

    def holder_of(self, aid: int) -> tuple[str, str]:
        """``(module path, kind)`` of allocation ``aid``.

        The module path is the one ``named_modules`` gives (``"model.layers.3.mlp.up_proj"``), or one of the
        bracketed labels below when no module made it. The kind is finer than the category: the operator
        that made it (``"aten.mm"``, with ``SAVED`` appended when backward released it: autograd kept it),
        ``"parameter"``, ``"buffer"``, ``"gradient"``, ``"input"`` or the optimizer's state key
        (``"exp_avg"``). Allocations added after tracing (a strategy's buckets) are ``UNTRACED``.
        """
        if aid < len(self.holders):
            return self.holder_names[self.holders[aid]]
        return (UNTRACED, "")

    def peak_bytes(self, start: int = 0) -> int:
        """The most bytes live at once from event ``start`` on (sizes as recorded, nothing rounded)."""
        live = peak = 0
        for ev in self.events[start:]:
            live += self.sizes[ev - 1] if ev > 0 else -self.sizes[-ev - 1]
            peak = max(peak, live)
        return peak

    def freed(self) -> set[int]:
        """The allocation ids the trace frees (the others live to its end)."""
        return {-ev - 1 for ev in self.events if ev < 0}

    def live_at(self, index: int) -> list[int]:
        """The allocation ids alive just after event ``index``."""
        live: set[int] = set()
        for ev in self.events[: index + 1]:
            if ev > 0:
                live.add(ev - 1)
            else:
                live.discard(-ev - 1)
        return sorted(live)

    def phase_of(self, index: int) -> str:
        name = self.phases[0][1] if self.phases else ""
        for start, phase in self.phases:
            if start > index:
                break
            name = phase
        return name


_PLAIN = (torch.Tensor, FakeTensor, nn.Parameter)

ROOT = "(model)"
"""The module path of the model itself (its own ``forward``, outside every submodule)."""
OUTSIDE = "(outside the model)"
"""Forward work outside the model's modules: a ``loss_fn``'s own operations."""
BACKWARD = "(backward)"
"""Backward work no module's forward created (gradient accumulation)."""
OPTIMIZER = "(optimizer)"
"""The optimizer's step scratch (its state is attributed to each parameter's module)."""
BATCH = "(batch)"
UNTRACED = "(strategy)"
"""Allocations a strategy model adds to a trace afterwards (DDP buckets, ZeRO partitions)."""
SAVED = " (saved for backward)"

_NO_SEQUENCE = 2**64 - 1
"""The sequence number autograd gives nodes that no forward created (AccumulateGrad)."""


def _kind_name(kind: Any) -> str:
    """``torch.ops.aten.mm.default`` -> ``"aten.mm"``; strings stay as they are."""
    if isinstance(kind, str):
        return kind
    if kind is None:
        return "other"
    name = getattr(kind, "_opname", None)
    namespace = getattr(kind, "namespace", None)
    return f"{namespace}.{name}" if name and namespace else str(kind)


@functools.lru_cache(maxsize=None)
def _workspace_kind(op: Any) -> str:
    """The kind of the scratch memory a kernel allocates for ``op`` (cuBLAS / cuDNN / oneDNN)."""
    return f"{_kind_name(op)} workspace"


def _phase_owner(name: str) -> str:
    """Who holds what is allocated outside every module during phase ``name``."""
    if name.endswith(".forward"):
        return OUTSIDE
    if name.endswith(".backward"):
        return BACKWARD
    if "optimizer" in name:
        return OPTIMIZER
    return f"({name.rsplit('.', 1)[-1]})"


class _Recorder:
    """Assigns an id to each storage the first time it is seen and logs allocs and frees."""

    def __init__(self) -> None:
        self.trace = Trace()
        self._ids: dict[int, int] = {}  # id(storage) -> aid; a storage's entry dies with it
        self._refs: dict[int, weakref.ref] = {}
        self._phase_of_aid: list[int] = []
        self._live: set[int] = set()
        self._phase_index = -1
        self.closed = False
        self.is_paused = False
        self._aliases: list[Any] = []
        self.kept: set[int] = set()  # allocations made once per process, never replayed
        # Who holds each allocation: module paths are interned once, (owner, kind) pairs once more.
        self.op: Any = None  # the operator whose outputs are being tracked: an allocation's default kind
        self._owner_ids: dict[str, int] = {}
        self._owner_names: list[str] = []
        self._pair_ids: dict[tuple[str, str], int] = {}
        self._holder_ids: dict[tuple[int, Any], int] = {}
        self._module = -1  # owner id of the innermost module whose forward is running; -1 outside all
        self._stack: list[int] = []
        self._context = self._owner_id("(setup)")  # owner outside every module in the current phase
        # Autograd numbers nodes in creation order: where the running module changed, in those numbers,
        # tells backward which module's forward created the node it runs.
        self._marks: list[int] = []
        self._mark_owners: list[int] = []
        # id(parameter or its shadow) -> (owner id, the tensor): the reference tells a reused id apart
        self._param_owner: dict[int, tuple[int, weakref.ref]] = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Operators run meanwhile are not recorded (their storages get bound explicitly)."""
        self.is_paused = True
        try:
            yield
        finally:
            self.is_paused = False

    # storages -------------------------------------------------------------------------------------------
    def aid_of(self, tensor: torch.Tensor) -> int | None:
        try:
            return self._ids.get(id(tensor.untyped_storage()))
        except (RuntimeError, NotImplementedError):
            return None

    def track(self, tensor: torch.Tensor, category: Category = Category.OTHER, nbytes: int | None = None,
              kind: str | None = None) -> None:
        if type(tensor) not in _PLAIN and is_traceable_wrapper_subclass(tensor):
            attrs, _ = tensor.__tensor_flatten__()
            for attr in attrs:
                inner = getattr(tensor, attr)
                if isinstance(inner, torch.Tensor):
                    self.track(inner, category, kind=kind)
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if id(storage) in self._ids:
            return
        aid = self._new(int(storage.nbytes()) if nbytes is None else int(nbytes), category, kind)
        self.bind(storage, aid)

    def _new(self, nbytes: int, category: Category, kind: Any = None, holder: int | None = None) -> int:
        """A new allocation, held by the running module as ``kind`` (default: the operator running)."""
        aid = len(self.trace.sizes)
        self.trace.sizes.append(nbytes)
        self.trace.categories.append(category)
        self.trace.holders.append(self._holder(self.op if kind is None else kind) if holder is None else holder)
        self._phase_of_aid.append(self._phase_index)
        self._live.add(aid)
        self.trace.events.append(aid + 1)
        return aid

    def bind(self, storage: Any, aid: int) -> None:
        """Make ``storage`` the owner of allocation ``aid``: its death frees it."""
        key = id(storage)
        self._ids[key] = aid
        self._refs[aid] = weakref.ref(storage, self._freer(aid, key))

    def alias(self, storage: Any, of: torch.Tensor) -> None:
        """Treat ``storage`` as the same memory as ``of`` (in-place ops on it allocate nothing)."""
        aid = self.aid_of(of)
        if aid is not None:
            self._ids[id(storage)] = aid
            self._aliases.append(storage)  # kept alive so its id is never reused

    def adopt(self, out: torch.Tensor, into: torch.Tensor) -> bool:
        """``out`` is ``into`` updated in place by the real run: it takes over ``into``'s allocation."""
        aid = self.aid_of(into)
        try:
            same = out.untyped_storage().nbytes() == into.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return False
        if aid is None or not same or self.aid_of(out) is not None:
            return False
        self.unbind(into.untyped_storage())
        self.bind(out.untyped_storage(), aid)
        return True

    def unbind(self, storage: Any) -> None:
        """Forget ``storage`` without freeing its allocation (its id is about to be rebound)."""
        aid = self._ids.pop(id(storage), None)
        if aid is not None:
            self._refs.pop(aid, None)

    def _freer(self, aid: int, key: int) -> Callable[[Any], None]:
        def free(_ref: Any) -> None:
            if self._ids.get(key) == aid:
                del self._ids[key]
            if self.closed:
                return
            self._refs.pop(aid, None)
            self._live.discard(aid)
            self.trace.events.append(-(aid + 1))

        return free

    def transient(self, nbytes: int, category: Category, kind: str | None = None) -> None:
        """An allocation that is freed right away: a kernel's internal scratch space."""
        if nbytes <= 0:
            return
        aid = self._new(int(nbytes), category, kind)
        self._live.discard(aid)
        self.trace.events.append(-(aid + 1))

    def persistent(self, nbytes: int, category: Category, kind: str | None = None) -> None:
        """An allocation a library keeps until the process ends (never freed in the trace)."""
        self.kept.add(self._new(int(nbytes), category, kind))

    def replay(
        self,
        events: list[int],
        remap: dict[int, int],
        sizes: Any = None,
        categories: Any = None,
        holders: Any = None,
    ) -> None:
        """Append ``events`` again with fresh ids for the allocations they make (``remap`` is filled
        with old id -> new id), so a repeated, identical program segment costs no second trace.
        ``sizes`` / ``categories`` / ``holders`` (``(module path, kind)`` names) map the old ids when the
        events come from another trace; each copy keeps its original's holder."""
        sizes = self.trace.sizes if sizes is None else sizes
        categories = self.trace.categories if categories is None else categories
        if holders is None:
            holder_of = self.trace.holders.__getitem__
        else:
            def holder_of(old: int) -> int:
                return self._pair(*holders[old])
        for ev in events:
            if ev > 0:
                old = ev - 1
                remap[old] = self._new(sizes[old], categories[old], holder=holder_of(old))
            else:
                new = remap[-ev - 1]
                self._live.discard(new)
                self.trace.events.append(-(new + 1))

    # holders: which module, and what kind of tensor -------------------------------------------------------
    def _owner_id(self, path: str) -> int:
        owner = self._owner_ids.get(path)
        if owner is None:
            owner = self._owner_ids[path] = len(self._owner_names)
            self._owner_names.append(path)
        return owner

    def _pair(self, owner: str, kind: str) -> int:
        """The holder id of ``(owner, kind)`` in this trace's table."""
        hid = self._pair_ids.get((owner, kind))
        if hid is None:
            hid = self._pair_ids[(owner, kind)] = len(self.trace.holder_names)
            self.trace.holder_names.append((owner, kind))
        return hid

    def _holder(self, kind: Any) -> int:
        """The holder of an allocation made now: the running module, else the module whose forward created
        the autograd node running (backward, recomputation included), else the phase's own label."""
        owner = self._module
        if owner < 0:
            owner = self._autograd_owner()
            if owner < 0:
                owner = self._context
        key = (owner, kind)
        hid = self._holder_ids.get(key)
        if hid is None:
            hid = self._holder_ids[key] = self._pair(self._owner_names[owner], _kind_name(kind))
        return hid

    def _autograd_owner(self) -> int:
        node = torch._C._current_autograd_node()
        if node is None or not self._marks:
            return -1
        seq = node._sequence_nr()
        if seq >= _NO_SEQUENCE:
            return -1
        i = bisect.bisect_right(self._marks, seq) - 1
        return self._mark_owners[i] if i >= 0 else -1

    def _mark(self, owner: int) -> None:
        """Autograd nodes created from now on belong to ``owner`` (until the next mark)."""
        seq = torch._C._autograd._get_sequence_nr()
        if self._marks and self._marks[-1] == seq:
            self._mark_owners[-1] = owner  # no node was created since the last mark
        else:
            self._marks.append(seq)
            self._mark_owners.append(owner)

    def _enter(self, owner: int, _module: nn.Module, _args: Any) -> None:
        self._stack.append(self._module)
        self._module = owner
        self._mark(owner)

    def _leave(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        self._module = self._stack.pop() if self._stack else -1
        self._mark(self._module if self._module >= 0 else self._context)

    def watch(self, model: nn.Module, compiled: list[str] = ()) -> None:
        """Attribute what ``model``'s modules allocate to their paths, and each parameter, buffer (and so
        gradient and optimizer state) to the module that owns it. Hooks go on memguard's copy only.

        Modules at or under a ``compiled`` path get no hooks: dynamo would trace them into the graph or
        break it there, and the compiled step would differ from the user's (see :meth:`attributed`)."""
        leave = self._leave
        for path, module in model.named_modules():
            owner = self._owner_id(path or ROOT)
            inside = any(path == c or path.startswith(c + ".") or not c for c in compiled)
            if not inside:
                module.register_forward_pre_hook(functools.partial(self._enter, owner))
                module.register_forward_hook(leave, always_call=True)
            for tensors in (module._parameters, module._buffers):
                for t in tensors.values():
                    if t is not None and self._owner_of(t) is None:
                        self._param_owner[id(t)] = (owner, weakref.ref(t))

    def watch_compiled(self, wrapper: nn.Module, path: str) -> None:
        """Attribute what a compiled module (``wrapper``, torch.compile's module) allocates to ``path``."""
        wrapper.register_forward_pre_hook(functools.partial(self._enter, self._owner_id(path or ROOT)))
        wrapper.register_forward_hook(self._leave, always_call=True)

    def attributed(self, path: str, call: Callable) -> Callable:
        """``call`` (a compiled module's call) with what it allocates attributed to the module at ``path``,
        from outside the compiled code."""
        owner = self._owner_id(path or ROOT)

        def run(*args: Any, **kwargs: Any) -> Any:
            self._enter(owner, None, args)
            try:
                return call(*args, **kwargs)
            finally:
                self._leave(None, args, None)

        return run

    def _owner_of(self, tensor: torch.Tensor) -> int | None:
        """The module owning parameter or buffer ``tensor`` (None if :meth:`watch` never saw it)."""
        entry = self._param_owner.get(id(tensor))
        return entry[0] if entry is not None and entry[1]() is tensor else None

    def same_owner(self, tensor: torch.Tensor, like: torch.Tensor) -> None:
        """``tensor`` (an optimizer's stand-in) stands for parameter ``like``."""
        owner = self._owner_of(like)
        if owner is not None:
            self._param_owner[id(tensor)] = (owner, weakref.ref(tensor))

    def _aids(self, tensor: torch.Tensor) -> list[int]:
        """The allocations behind ``tensor``: its storage's, or its inner tensors' for a wrapper subclass."""
        if type(tensor) not in _PLAIN and is_traceable_wrapper_subclass(tensor):
            attrs, _ = tensor.__tensor_flatten__()
            return [a for attr in attrs if isinstance(inner := getattr(tensor, attr), torch.Tensor)
                    for a in self._aids(inner)]
        aid = self.aid_of(tensor)
        return [] if aid is None else [aid]

    def _rename(self, aid: int, kind: str, owner_of: torch.Tensor | None) -> None:
        owner = self._owner_of(owner_of) if owner_of is not None else None
        path = self._owner_names[owner] if owner is not None else self.trace.holder_names[self.trace.holders[aid]][0]
        self.trace.holders[aid] = self._pair(path, kind)

    def note_saved(self, events: list[int]) -> None:
        """Activations that ``events`` (a ``backward()`` call's) free were kept for backward: saved
        tensors, checkpoint inputs. Their kind says so. Found from the frees afterwards, because a
        saved-tensor hook would cost an extra dispatch per saved tensor."""
        categories, holders, names = self.trace.categories, self.trace.holders, self.trace.holder_names
        for ev in events:
            if ev < 0 and categories[-ev - 1] is Category.ACTIVATIONS:
                owner, kind = names[holders[-ev - 1]]
                if not kind.endswith(SAVED):
                    holders[-ev - 1] = self._pair(owner, kind + SAVED)

    # phases and tags ------------------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        self._phase_index = len(self.trace.phases)
        self.trace.phases.append((len(self.trace.events), name))
        self._context = self._owner_id(_phase_owner(name))
        if self._module < 0:
            self._mark(self._context)

    def tag(self, tensor: torch.Tensor, category: Category, kind: str | None = None,
            owner_of: torch.Tensor | None = None) -> None:
        """Mark a storage as ``category`` unless an earlier, more specific tag exists; with ``kind``, it is
        also held as ``kind`` by the module owning parameter ``owner_of`` (or by its maker)."""
        aid = self.aid_of(tensor)
        if aid is None:
            self.track(tensor, category, kind=kind)
            if kind is not None:
                for made in self._aids(tensor):
                    self._rename(made, kind, owner_of)
            return
        if self.trace.categories[aid] in (Category.OTHER, Category.TEMPORARIES, Category.ACTIVATIONS, category):
            self.trace.categories[aid] = category
            if kind is not None:
                self._rename(aid, kind, owner_of)

    def tag_live_from_current_phase(self, category: Category) -> None:
        """Everything allocated in the current phase and still alive becomes ``category``."""
        for aid in self._live:
            if self._phase_of_aid[aid] == self._phase_index and self.trace.categories[aid] == Category.OTHER:
                self.trace.categories[aid] = category

    def finish(self) -> Trace:
        for aid, cat in enumerate(self.trace.categories):
            if cat == Category.OTHER and self._phase_of_aid[aid] >= 0:
                self.trace.categories[aid] = Category.TEMPORARIES
        self.closed = True
        return self.trace


_FAKE_RULES = fake_rules.RULES


class _RecordingMode(TorchDispatchMode):
    def __init__(self, recorder: _Recorder, device: DeviceModel) -> None:
        super().__init__()
        self.recorder = recorder
        self.device = device
        self.last_op: Any = None
        self.scalar_reads_ok = False
        self.skip_host_tensors = False
        self.assumptions = fake_rules.Assumptions()
        self.in_place = AutogradInPlace()
        self.compiling = False

    def ignore_compile_internals(self) -> bool:
        """While the twin's compiled parts run (``compiling``), torch.compile compiles them with this mode
        switched off and runs the compiled code under it: the recorder sees what the compiled code allocates,
        not what compiling does. Otherwise dynamo skips compiled code under a dispatch mode (eager)."""
        return self.compiling

    @contextlib.contextmanager
    def optimizer_running(self) -> Iterator[None]:
        """The optimizer runs on meta stand-ins: reading a step counter is allowed (see below), and on a GPU
        target any real CPU tensor it makes (torch's step counters) is host memory, not device memory.
        Libraries' own compiled optimizer updates run eagerly here (their memory is modelled per library)."""
        self.scalar_reads_ok = True
        self.skip_host_tensors = not self.device.host_is_device
        compiling, self.compiling = self.compiling, False
        try:
            yield
        finally:
            self.scalar_reads_ok = False
            self.skip_host_tensors = False
            self.compiling = compiling

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.last_op = func
        if self.scalar_reads_ok and func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            # An optimizer reading a step counter (.item()): the value never changes what is allocated.
            return 1 if not args[0].is_floating_point() else 1.0
        rule = _FAKE_RULES.get(func)  # where memguard replaces torch's fake behaviour
        in_place = self.in_place.in_place_target(func, args, kwargs)
        out = func(*args, **kwargs) if rule is None else rule(self.assumptions, func, args, kwargs)
        if self.recorder.is_paused:
            return out
        if in_place is not None and isinstance(out, torch.Tensor) and self.recorder.adopt(out, in_place):
            return out  # the real run updates ``in_place`` (see memguard/trace/autograd_in_place.py)
        self.in_place.made(func, out)
        if isinstance(out, torch.Tensor):
            flat = [out]
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) or o is None for o in out):
            flat = list(out)
        else:
            flat = tree_flatten(out)[0]
        extra = self.device.op_memory(func, args, kwargs, flat)
        sizes = extra.output_bytes
        self.recorder.op = func
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                if self.skip_host_tensors and t.device.type == "cpu":
                    continue
                self.recorder.track(t, nbytes=sizes[i] if i < len(sizes) else None)
        if extra.transient:
            self.recorder.transient(extra.transient, Category.WORKSPACE, _workspace_kind(func))
        if extra.persistent:
            self.recorder.persistent(extra.persistent, Category.WORKSPACE, _workspace_kind(func))
        return out


teach_rng_operators(_RecordingMode)
