"""Trace training steps on fake tensors and record every allocation and free.

Why this works: PyTorch's fake tensors run every operator's shape logic without computing or allocating,
so a whole forward / backward / optimizer step runs in seconds for a 70B model on a laptop. A dispatch mode
on top of the fake mode sees each operator's outputs; a new storage among them is an allocation, and a weak
reference on the storage tells us the moment the real allocator would have freed it (storage lifetime is
refcounted, so fake and real runs free at the same points of the program).

The result, :class:`Trace`, is device-neutral raw bytes in program order. Device models
(:mod:`memguard.device`) turn it into what a given device would report (rounding, allocator segments,
workspaces).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten, tree_map

from memguard import fake_rules
from memguard.categories import Category
from memguard.device import DeviceModel
from memguard.errors import TraceError
from memguard.autograd_in_place import AutogradInPlace
from memguard.library_branches import eager_branches, eager_module_conversion

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
    assumed_routing: bool = False
    """Whether routing decisions were assumed (see :mod:`memguard.fake_rules`): the peak is then the
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

    def watch(self, model: nn.Module) -> None:
        """Attribute what ``model``'s modules allocate to their paths, and each parameter, buffer (and so
        gradient and optimizer state) to the module that owns it. Hooks go on memguard's copy only."""
        leave = self._leave
        for path, module in model.named_modules():
            owner = self._owner_id(path or ROOT)
            module.register_forward_pre_hook(functools.partial(self._enter, owner))
            module.register_forward_hook(leave, always_call=True)
            for tensors in (module._parameters, module._buffers):
                for t in tensors.values():
                    if t is not None and self._owner_of(t) is None:
                        self._param_owner[id(t)] = (owner, weakref.ref(t))

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

    @contextlib.contextmanager
    def optimizer_running(self) -> Iterator[None]:
        """The optimizer runs on meta stand-ins: reading a step counter is allowed (see below), and on a GPU
        target any real CPU tensor it makes (torch's step counters) is host memory, not device memory."""
        self.scalar_reads_ok = True
        self.skip_host_tensors = not self.device.host_is_device
        try:
            yield
        finally:
            self.scalar_reads_ok = False
            self.skip_host_tensors = False

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
            return out  # the real run updates ``in_place`` (see autograd_in_place.py)
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


# ---------------------------------------------------------------------------------------------------------
# Making a fake twin of the user's model


def _fake_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake CPU tensor of the same shape and strides, created inside an active FakeTensorMode."""
    target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=target, device="cpu")


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
    values where they are readable (see :func:`memguard.fake_rules.fake_leaf`)."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return fake_rules.fake_leaf(x, mode, float_dtype)
        return x

    return tree_map(convert, batch)


# ---------------------------------------------------------------------------------------------------------
# Driving the steps


def default_loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Call the model with the batch; take ``.loss`` when the output carries one, else sum the output."""
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TraceError(
                f"the model returned {type(out).__name__}, not a tensor or an object with .loss; "
                "pass loss_fn=lambda model, batch: ... that returns a scalar loss."
            )
        loss = out if out.dim() == 0 else out.float().sum()
    return loss


TRACED_MICRO_BATCHES = 2
"""Gradient accumulation is traced with at most this many micro-batches per step: the first creates the
gradients, the second runs with them alive, and every later one repeats the second exactly (same live
tensors, same operations), so the peak is the same and a check of accumulate_grad_batches=64 costs no more
than one of 2."""


@dataclass
class StepProgram:
    """How one training step is driven, so the trace runs the same code as the real loop.

    ``zero_grad_before_backward`` mirrors Lightning's automatic optimization, which zeroes gradients
    between training_step and backward, so the previous step's gradients are alive during the forward.
    """

    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss_fn
    autocast_dtype: torch.dtype | None = None
    steps: int = 2
    zero_grad_before_backward: bool = False
    accumulate: int = 1
    """Micro-batches per optimizer step; later ones accumulate into the gradients the first created."""


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


@contextlib.contextmanager
def _phase(rec: _Recorder, mode: _RecordingMode, name: str) -> Iterator[None]:
    rec.phase(name)
    try:
        yield
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types; all become one clear message
        op = str(mode.last_op) if mode.last_op is not None else None
        raise TraceError(_explain(exc, op, name), operation=op, phase=name) from exc


def _explain(exc: Exception, op: str | None, phase: str) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    hint = "If the model branches on tensor values, give memguard a loss_fn that avoids the branch."
    lowered = str(exc).lower()
    data_dependent = ("DataDependent" in type(exc).__name__ or "DynamicOutputShape" in type(exc).__name__
                      or "data-dependent" in lowered or "item()" in lowered
                      or (op is not None and "_local_scalar_dense" in str(op)))
    if data_dependent:
        hint = (
            "The model computes shapes or Python values from tensor contents (.item(), .tolist(), "
            "nonzero, boolean masking), which cannot be known without real data. Move that logic out of "
            "forward or pass a loss_fn that skips it."
        )
    elif "UnsupportedOperator" in type(exc).__name__ or ("fake" in lowered and ("kernel" in lowered or "meta" in lowered)):
        hint = (
            "A custom operator has no fake (meta) implementation. Register one with "
            "torch.library.register_fake so memguard can trace it."
        )
    if phase.endswith("optimizer") or phase.endswith("init"):
        hint = (
            "The optimizer could not run on shape-only tensors. Pass one of memguard's catalog names "
            "(memguard.optimizers.CATALOG) or an optimizer class that only uses tensor operations."
        )
    where = f"operation {op}" if op else "a Python call"
    op = str(op) if op is not None else None
    return f"memguard could not trace {phase}: {where} failed ({text}). {hint}"


def run_steps(
    model: nn.Module,
    batch: Any,
    make_optimizer: Callable[[list[nn.Parameter]], Any] | None,
    program: StepProgram,
    recorder: _Recorder,
    mode: _RecordingMode,
    reuse: _Slot | None = None,
) -> None:
    """Run ``program.steps`` training steps on an already-fake model, recording as it goes.

    Steps after the first repeat the first step's forward and backward exactly (same operators, same
    shapes, same frees); only what was alive before differs (optimizer state, old gradients). So when the
    first step left nothing behind but gradients, later forwards and backwards are replayed from its
    events instead of traced again, which halves the time for large models. The optimizer step is always
    traced, because step 1 creates the state lazily and step 2 does not. With ``reuse``, step 1's forward
    and backward are replayed from another trace's recording when it holds one, and recorded into it
    otherwise (see :class:`TraceCache`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    shadows = _Shadows(params, recorder) if make_optimizer is not None and params else None
    optimizer = None
    if shadows is not None:
        with _phase(recorder, mode, "optimizer.init"), unset_fake_temporarily(), mode.optimizer_running():
            optimizer = make_optimizer(shadows.params)
            _tag_optimizer_state(recorder, optimizer, mode)
    first: _StepRecord | None = None
    for step in range(1, program.steps + 1):
        # Micro-batches after the second repeat it exactly (gradients exist, each backward accumulates into
        # them), so two are traced: the peak of any longer accumulation is the same.
        for micro in range(min(program.accumulate, TRACED_MICRO_BATCHES)):
            label = f"step{step}" if program.accumulate == 1 else f"step{step}.micro{micro + 1}"
            zero_first = program.zero_grad_before_backward and micro == 0
            recorded = reuse.recording if reuse is not None and program.accumulate == 1 else None
            if first is None and recorded is not None:
                first = _replay_recording(recorded, label, params, optimizer, zero_first, recorder, mode)
            elif first is not None and first.replayable and program.accumulate == 1:
                _replay_forward_backward(first.forward, first.backward, first.grads, label, optimizer, zero_first,
                                         recorder, mode)
            else:
                record = _trace_forward_backward(model, batch, label, params, optimizer, program, zero_first,
                                                 recorder, mode)
                if first is None and reuse is not None and program.accumulate == 1 and record.replayable:
                    reuse.recording = _recording(record, params, recorder, mode.device)
                first = first or record
        if optimizer is not None:
            shadows.take_grads()
            with _phase(recorder, mode, f"step{step}.optimizer"), unset_fake_temporarily(), mode.optimizer_running():
                optimizer.step()
                _tag_optimizer_state(recorder, optimizer, mode)
            recorder.trace.unified_bytes = max(recorder.trace.unified_bytes,
                                               int(getattr(optimizer, "unified_bytes", 0)))
            if not program.zero_grad_before_backward:
                with _phase(recorder, mode, f"step{step}.zero_grad"):
                    optimizer.zero_grad(set_to_none=True)
    recorder.phase("end")


def _itself(t: torch.Tensor) -> torch.Tensor:
    return t


class _Shadows:
    """Meta-device stand-ins for the trainable parameters, for the optimizer to work on.

    The optimizer step needs no autocast and no model code, only shapes, and meta tensors run torch's
    optimizer kernels about twice as fast as fake ones. Each gradient's allocation id moves from the
    fake ``.grad`` to the shadow's ``.grad``, so the free at zero_grad is still recorded where it happens.
    ``local`` maps a parameter or gradient to the tensor that holds its memory (memguard.estimation.distributed passes
    a DTensor's local shard): the shadows take that tensor's shape. Gradients that are views of one buffer
    move its single allocation to the first shadow that takes one.
    """

    def __init__(self, params: list[nn.Parameter], recorder: _Recorder,
                 local: Callable[[torch.Tensor], torch.Tensor] = _itself) -> None:
        self.pairs = []
        self.recorder = recorder
        self.local = local
        with recorder.paused(), unset_fake_temporarily():
            for p in params:
                t = local(p)
                shadow = nn.Parameter(
                    torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
                )
                recorder.alias(shadow.untyped_storage(), t)
                recorder.same_owner(shadow, p)
                self.pairs.append((p, shadow))
        self.params = [s for _, s in self.pairs]

    def take_grads(self) -> None:
        rec = self.recorder
        with rec.paused(), unset_fake_temporarily():
            for p, shadow in self.pairs:
                if p.grad is None:
                    continue
                self._follow(p, shadow)
                g = self.local(p.grad)
                aid = rec.aid_of(g)
                grad = torch.empty_strided(tuple(g.shape), tuple(g.stride()), dtype=g.dtype, device="meta")
                rec.unbind(g.untyped_storage())
                p.grad = None
                if aid is not None:
                    rec.bind(grad.untyped_storage(), aid)
                shadow.grad = grad

    def _follow(self, p: nn.Parameter, shadow: nn.Parameter) -> None:
        """A module converted in its forward (``self.classifier.to(torch.float32)``) gave ``p`` a new storage
        and maybe a new dtype: its shadow takes them, so the optimizer's state has the dtype it has for real."""
        t = self.local(p)
        if shadow.dtype == t.dtype and tuple(shadow.shape) == tuple(t.shape):
            return
        shadow.data = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
        self.recorder.alias(shadow.untyped_storage(), t)
        self.recorder.tag(t, Category.PARAMETERS, "parameter", owner_of=p)


@dataclass
class _StepRecord:
    """The events of step 1's forward and backward, and the gradients that survived them."""

    forward: list[int]
    backward: list[int]
    grads: list[tuple[nn.Parameter, int, tuple, tuple, torch.dtype]]
    replayable: bool
    raw_forward: list[int] = field(default_factory=list)
    """The forward's events including allocations made once per process (kept), for :class:`Recording`."""
    raw_backward: list[int] = field(default_factory=list)


@dataclass
class Recording:
    """Step 1's forward and backward of one trace, replayable as step 1 of another trace of the same
    model, batch, precision and preparation: what the planner needs when only the optimizer changes.

    Allocation ids are the recording trace's; ``sizes`` and ``categories`` describe them. ``grads`` names
    each surviving gradient by its parameter's index among the trainable parameters, because the next
    trace runs on a new fake twin. ``device_state`` is what the device model learned meanwhile (cuBLAS
    handles created, notes), restored so the rest of the trace sees the same device.
    """

    forward: list[int]
    backward: list[int]
    sizes: dict[int, int]
    categories: dict[int, Category]
    kept: set[int]
    grads: list[tuple[int, int, tuple, tuple, torch.dtype]]
    device_state: Any
    holders: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Each allocation's ``(module path, kind)``, by name: ids into the other trace's table mean nothing."""


class TraceCache:
    """Recordings of step 1's forward and backward, keyed by everything that shapes them.

    One cache serves one model: estimates made with it that differ only in the optimizer (or in its
    offload) trace the optimizer and replay the model's forward and backward, which is most of a trace.
    A recording is kept only when replaying it is exact (see ``_trace_forward_backward``).
    """

    def __init__(self) -> None:
        self._slots: dict[Any, _Slot] = {}

    def slot(self, key: Any) -> _Slot:
        return self._slots.setdefault(key, _Slot())

    def __len__(self) -> int:
        return sum(1 for s in self._slots.values() if s.recording is not None)


@dataclass
class _Slot:
    recording: Recording | None = None


def _trace_forward_backward(model, batch, label, params, optimizer, program, zero_first, recorder, mode) -> _StepRecord:  # noqa: ANN001
    events = recorder.trace.events
    live_before = set(recorder._live)
    with _phase(recorder, mode, f"{label}.forward"):
        f0 = len(events)
        with _autocast(program.autocast_dtype):
            loss = program.loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise TraceError(f"loss_fn returned {type(loss).__name__}; it must return a scalar tensor.")
        recorder.tag_live_from_current_phase(Category.ACTIVATIONS)
        forward = events[f0:]
    if zero_first and optimizer is not None:
        with _phase(recorder, mode, f"{label}.zero_grad"):
            optimizer.zero_grad(set_to_none=True)
    with _phase(recorder, mode, f"{label}.backward"):
        b0 = len(events)
        if loss.requires_grad:
            with recorder.paused():
                mode.in_place.calibrate()
            mode.in_place.watch(loss)
            try:
                loss.backward()
            finally:
                mode.in_place.close()
            recorder.note_saved(events[b0:])
        del loss
        grads = []
        for p in params:
            if p.grad is not None:
                recorder.tag(p.grad, Category.GRADIENTS, "gradient", owner_of=p)
                aid = recorder.aid_of(p.grad)
                grads.append((p, aid, tuple(p.grad.shape), tuple(p.grad.stride()), p.grad.dtype))
        backward = events[b0:]
    kept = recorder.kept
    raw_forward, raw_backward = list(forward), list(backward)
    forward = [ev for ev in forward if abs(ev) - 1 not in kept]
    backward = [ev for ev in backward if abs(ev) - 1 not in kept]
    # Replaying is exact only if every free in the segment frees something the segment allocated and
    # the only survivors are the gradients, one storage each, exactly the gradient's size.
    made = {ev - 1 for ev in forward + backward if ev > 0}
    freed_outside = any(ev < 0 and (-ev - 1) not in made for ev in forward + backward)
    survivors = (recorder._live - live_before) & made
    grad_aids = [g[1] for g in grads]
    exact_sizes = all(
        recorder.trace.sizes[aid] == p.grad.untyped_storage().nbytes() == p.grad.numel() * p.grad.element_size()
        for p, aid, *_ in grads
    )
    replayable = (
        not freed_outside
        and len(set(grad_aids)) == len(grad_aids)
        and survivors == set(grad_aids)
        and exact_sizes
    )
    return _StepRecord(forward, backward, grads, replayable, raw_forward, raw_backward)


def _replay_forward_backward(forward, backward, grads, label, optimizer, zero_first, recorder, mode,  # noqa: ANN001
                             sizes=None, categories=None, holders=None) -> tuple[_StepRecord, dict[int, int]]:
    """Append a recorded forward and backward again under this step's phases and bind each surviving
    gradient (``(parameter, old id, shape, stride, dtype)``) to its parameter. ``sizes`` / ``categories`` /
    ``holders`` describe the old ids when they come from another trace. Returns the step in this trace's ids (kept
    allocations included) and the old -> new id map."""
    remap: dict[int, int] = {}
    events = recorder.trace.events
    with _phase(recorder, mode, f"{label}.forward"):
        f0 = len(events)
        recorder.replay(forward, remap, sizes, categories, holders)
        new_forward = events[f0:]
    if zero_first and optimizer is not None:
        with _phase(recorder, mode, f"{label}.zero_grad"):
            optimizer.zero_grad(set_to_none=True)
    new_grads = []
    with _phase(recorder, mode, f"{label}.backward"):
        b0 = len(events)
        recorder.replay(backward, remap, sizes, categories, holders)
        new_backward = events[b0:]
        with recorder.paused():
            for p, aid, shape, stride, dtype in grads:
                grad = torch.empty_strided(shape, stride, dtype=dtype, device="cpu")
                recorder.bind(grad.untyped_storage(), remap[aid])
                p.grad = grad
                new_grads.append((p, remap[aid], shape, stride, dtype))
    return _StepRecord(new_forward, new_backward, new_grads, True), remap


def _recording(record: _StepRecord, params: list[nn.Parameter], recorder: _Recorder, device: DeviceModel) -> Recording:
    index = {id(p): i for i, p in enumerate(params)}
    aids = {abs(ev) - 1 for ev in record.raw_forward + record.raw_backward}
    return Recording(
        forward=list(record.raw_forward),
        backward=list(record.raw_backward),
        sizes={aid: recorder.trace.sizes[aid] for aid in aids},
        categories={aid: recorder.trace.categories[aid] for aid in aids},
        holders={aid: recorder.trace.holder_of(aid) for aid in aids},
        kept=aids & recorder.kept,
        grads=[(index[id(p)], aid, shape, stride, dtype) for p, aid, shape, stride, dtype in record.grads],
        device_state=device.state(),
    )


def _replay_recording(rec: Recording, label, params, optimizer, zero_first, recorder,  # noqa: ANN001
                      mode) -> _StepRecord:  # noqa: ANN001
    """Step 1's forward and backward from another trace's recording; returns the step's record in this
    trace's ids, so later steps replay it as usual."""
    grads = [(params[i], aid, shape, stride, dtype) for i, aid, shape, stride, dtype in rec.grads]
    step, remap = _replay_forward_backward(rec.forward, rec.backward, grads, label, optimizer, zero_first,
                                           recorder, mode, rec.sizes, rec.categories, rec.holders)
    kept = {remap[aid] for aid in rec.kept}
    recorder.kept |= kept
    mode.device.restore(rec.device_state)
    return _StepRecord([ev for ev in step.forward if abs(ev) - 1 not in kept],
                       [ev for ev in step.backward if abs(ev) - 1 not in kept], step.grads, True)


def _tag_optimizer_state(recorder: _Recorder, optimizer: Any, mode: _RecordingMode) -> None:
    state = getattr(optimizer, "state", None)
    if not state:
        return
    for param, per_param in state.items():
        items = per_param.items() if isinstance(per_param, dict) else [("optimizer state", per_param)]
        owner = param if isinstance(param, torch.Tensor) else None
        for key, v in items:
            if isinstance(v, torch.Tensor) and not (mode.skip_host_tensors and v.device.type == "cpu"):
                recorder.tag(v, Category.OPTIMIZER_STATE, str(key), owner_of=owner)


@contextlib.contextmanager
def _counted_rng_states(recorder: _Recorder) -> Iterator[None]:
    """torch.utils.checkpoint keeps a copy of the CPU generator's state (5056 bytes) per checkpointed call
    until its backward. The copy is made outside the dispatcher; on a CPU target it is device memory."""
    original = torch.get_rng_state

    def get_rng_state() -> torch.Tensor:
        state = original()
        if not recorder.is_paused:
            recorder.track(state, Category.ACTIVATIONS, kind="rng state")
        return state

    torch.get_rng_state = get_rng_state
    try:
        yield
    finally:
        torch.get_rng_state = original


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


def trace_training(
    model: nn.Module,
    batch: Any,
    make_optimizer: Callable[[list[nn.Parameter]], Any] | None,
    program: StepProgram,
    *,
    param_dtype: torch.dtype | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    device: DeviceModel | None = None,
    shared: tuple = (),
    reuse: _Slot | None = None,
) -> Trace:
    """Trace ``program`` on a fake twin of ``model``; the user's model and batch are left untouched.

    ``prepare`` runs on the twin before tracing (enable checkpointing, train mode...). ``device`` adds
    the target's hidden kernel memory per operator and swaps in its kernels (see device.py). ``reuse``
    (a :meth:`TraceCache.slot`) replays step 1's forward and backward from an earlier trace of the same
    model, batch, precision and preparation, or records them for the next one.
    """
    device = device or DeviceModel()
    fake_mode = fake_rules.fake_mode()
    twin = fake_model_copy(model, fake_mode, param_dtype, shared)
    twin.train()
    if prepare is not None:
        with fake_mode:  # layers the preparation creates (quantized stand-ins) must be fake too
            prepare(twin)
    fbatch = fake_batch(batch, fake_mode, param_dtype)

    recorder = _Recorder()
    recorder.phase("setup")
    recorder.watch(twin)
    track_model_and_batch(recorder, twin, fbatch)

    mode = _RecordingMode(recorder, device)
    rng_states = _counted_rng_states(recorder) if device.host_is_device else contextlib.nullcontext()
    with fake_mode, mode, device.kernel_mode(), rng_states, eager_branches(), eager_module_conversion():
        run_steps(twin, fbatch, make_optimizer, program, recorder, mode, reuse)
    trace = recorder.finish()
    trace.notes.extend(mode.assumptions.notes)
    trace.assumed_routing = mode.assumptions.routed
    del twin, fbatch
    return trace
