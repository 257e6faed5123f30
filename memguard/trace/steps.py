"""Driving training steps on the twin: the step program (loss, autocast, order, accumulation), the
forward / backward / optimizer loop with its phases, replay of repeated steps, and :func:`trace_training`,
the entry point."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memguard.trace import fake_rules
from memguard.categories import Category
from memguard.device.models import DeviceModel
from memguard.errors import TraceError
from memguard.trace.library_branches import eager_branches, eager_module_conversion
from memguard.trace.recording import Trace, _Recorder, _RecordingMode
from memguard.trace.compiled import CompileSpec, analysable, compile_notes, describe_parts, inductor_on_fakes
from memguard.trace.twin import recorded_twin


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
    local: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Run ``program.steps`` training steps on an already-fake model, recording as it goes.

    Steps after the first repeat the first step's forward and backward exactly (same operators, same
    shapes, same frees); only what was alive before differs (optimizer state, old gradients). So when the
    first step left nothing behind but gradients, later forwards and backwards are replayed from its
    events instead of traced again, which halves the time for large models. The optimizer step is always
    traced, because step 1 creates the state lazily and step 2 does not. With ``reuse``, step 1's forward
    and backward are replayed from another trace's recording when it holds one, and recorded into it
    otherwise (see :class:`TraceCache`).

    ``local`` marks a sharded model (FSDP, DTensor): it maps a parameter or gradient to the tensor that
    holds the rank's memory. Then every step and every micro-batch is traced (FSDP frees storages it
    allocated in earlier phases, so nothing can be replayed), gradients are tagged by their local tensor,
    and the optimizer runs on local-size shadows.
    """
    sharded = local is not None
    params = [p for p in model.parameters() if p.requires_grad]
    shadows = (_Shadows(params, recorder, local=local or _itself)
               if make_optimizer is not None and params else None)
    optimizer = None
    if shadows is not None:
        with _phase(recorder, mode, "optimizer.init"), unset_fake_temporarily(), mode.optimizer_running():
            optimizer = make_optimizer(shadows.params)
            _tag_optimizer_state(recorder, optimizer, mode)
    first: _StepRecord | None = None
    for step in range(1, program.steps + 1):
        # Micro-batches after the second repeat it exactly (gradients exist, each backward accumulates into
        # them), so two are traced: the peak of any longer accumulation is the same.
        micro_batches = program.accumulate if sharded else min(program.accumulate, TRACED_MICRO_BATCHES)
        for micro in range(micro_batches):
            label = f"step{step}" if program.accumulate == 1 else f"step{step}.micro{micro + 1}"
            zero_first = program.zero_grad_before_backward and micro == 0
            if sharded:
                _trace_sharded_forward_backward(model, batch, label, params, optimizer, program, zero_first,
                                                recorder, mode, local)
                continue
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
    ``local`` maps a parameter or gradient to the tensor that holds its memory (memguard.estimation.sharded_trace passes
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
                # A DTensor gradient may be laid out unlike its parameter (replicated or partial for a sharded
                # or replicated parameter: sequence parallelism); its allocation stays as made, and the optimizer
                # works on the parameter's layout, as DTensor redistributes to it in the step.
                like = g if tuple(g.shape) == tuple(shadow.shape) else shadow
                grad = torch.empty_strided(tuple(like.shape), tuple(like.stride()), dtype=g.dtype, device="meta")
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


def _trace_sharded_forward_backward(model, batch, label, params, optimizer, program, zero_first, recorder,  # noqa: ANN001
                                    mode, local) -> None:
    """One forward and backward of a sharded model, traced as it runs. Unlike
    :func:`_trace_forward_backward` it neither follows autograd's in-place gradient accumulation nor
    records the step for replay: FSDP's hooks reshard and free parameters between phases."""
    with _phase(recorder, mode, f"{label}.forward"):
        with _autocast(program.autocast_dtype):
            loss = program.loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise TraceError(f"loss_fn returned {type(loss).__name__}; it must return a scalar tensor.")
        recorder.tag_live_from_current_phase(Category.ACTIVATIONS)
    if zero_first and optimizer is not None:
        with _phase(recorder, mode, f"{label}.zero_grad"):
            optimizer.zero_grad(set_to_none=True)
    with _phase(recorder, mode, f"{label}.backward"):
        if loss.requires_grad:
            loss.backward()
        del loss
        for p in params:
            if p.grad is not None:
                recorder.tag(local(p.grad), Category.GRADIENTS)


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


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection while tracing: a tensor held in a reference cycle (compiled code's
    runtime wrappers make some) is freed when the collector happens to run, which differs from run to run.
    Kept until the trace ends, it is never freed earlier than in the real run, and the trace repeats."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
    compile: CompileSpec | bool | None = False,
) -> Trace:
    """Trace ``program`` on a fake twin of ``model``; the user's model and batch are left untouched.

    ``prepare`` runs on the twin before tracing (enable checkpointing, train mode...). ``device`` adds
    the target's hidden kernel memory per operator and swaps in its kernels (see device.py). ``reuse``
    (a :meth:`TraceCache.slot`) replays step 1's forward and backward from an earlier trace of the same
    model, batch, precision and preparation, or records them for the next one. ``compile`` says which parts
    run compiled (see :func:`memguard.trace.twin.recorded_twin`); compiled parts run as torch.compile runs
    them (:mod:`memguard.trace.compiled`), and the trace's notes say which.
    """
    device = device or DeviceModel()
    fake_mode = fake_rules.fake_mode()
    twin, fbatch, recorder, parts = recorded_twin(model, batch, fake_mode, param_dtype, shared, prepare, compile)
    mode = _RecordingMode(recorder, device)
    recorder.trace.notes.extend(compile_notes(parts))
    parts = analysable(parts)
    mode.compiling = bool(parts)
    rng_states = _counted_rng_states(recorder) if device.host_is_device else contextlib.nullcontext()
    # The CUDA kernel swaps are Python-level patches dynamo would trace into the graph: a compiled step
    # runs the compiled code torch generates instead (see memguard/trace/compiled.py for what that means).
    kernels = device.kernel_mode() if not parts else contextlib.nullcontext()
    compiler = inductor_on_fakes() if parts else contextlib.nullcontext()
    with compiler, fake_mode, mode, kernels, rng_states, eager_branches(), eager_module_conversion(), _no_gc():
        run_steps(twin, fbatch, make_optimizer, program, recorder, mode, reuse)
    trace = recorder.finish()
    trace.compiled = describe_parts(parts)
    trace.notes.extend(mode.assumptions.notes)
    trace.assumed_routing = mode.assumptions.routed
    del twin, fbatch
    return trace
