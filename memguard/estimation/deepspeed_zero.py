"""DeepSpeed ZeRO, modelled (DeepSpeed needs CUDA to train): one rank's model states by the formulas of
``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py`` (:func:`zero_model_states`, which reduce to
DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``), and
the rank's allocations built around a single-process trace of the 16-bit model (:func:`deepspeed_trace`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from memguard.categories import Category
from memguard.device.models import DeviceModel
from memguard.errors import InvalidArgumentError
from memguard.estimation.rewrites import Rewriter, setup_allocations
from memguard.estimation.strategy_options import DeepSpeedOptions
from memguard.trace import Trace
from memguard.trace.recording import _Recorder, _RecordingMode

# ---------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (modelled: DeepSpeed needs CUDA to train)


@dataclass(frozen=True)
class ZeroModelStates:
    """What one rank keeps of the model under ZeRO, in bytes, on the device and on the host.

    Formulas from ``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py`` (DeepSpeed 0.19), for P
    parameters of ``h`` bytes in the training dtype (2 for fp16/bf16), N ranks, an optimizer keeping ``s``
    bytes of fp32 state per parameter (8 for Adam) and L parameters in the largest layer:

    - stage 1: 16-bit parameters h*P and gradients h*P in full; fp32 master partition 4P/N; optimizer
      state s*P/N; the fp32 gradient partition made for the step 4P/N.
    - stage 2: as stage 1, but gradients reduced into a partition of h*P/N (``grads_in_partition``).
    - stage 3: 16-bit parameter partitions h*P/N (``ds_tensor``); fp32 gradient partitions 4P/N
      (``grad_partitions_flat_buffer``, float32 ``gradient_accumulation_dtype``); master 4P/N; state s*P/N;
      plus the gathered largest layer, its parameters and gradients: 2*h*L.
    - ``offload_optimizer`` moves master, state and fp32 gradients (and in stage 2 the reduced gradients)
      to the host; stage 3 ``offload_parameters`` moves the parameter partitions too.

    With h=2, s=8 these are DeepSpeed's own estimators exactly: ``estimate_zero2_model_states_mem_needs``
    gives 2P + 18P/N (2P with offload), ``estimate_zero3_model_states_mem_needs`` 4L + 18P/N (4L + 2P/N
    with optimizer offload, 4L with both).
    """

    parameters: int
    gradients: int
    master_parameters: int
    optimizer_state: int
    fp32_gradients: int
    gathered: int
    host: int

    @property
    def device(self) -> int:
        return (self.parameters + self.gradients + self.master_parameters + self.optimizer_state
                + self.fp32_gradients + self.gathered)


def zero_model_states(
    total_params: int,
    largest_layer_params: int,
    *,
    stage: int,
    world_size: int,
    param_bytes: int = 2,
    state_bytes_per_param: float = 8.0,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
) -> ZeroModelStates:
    """Model-state bytes of one ZeRO rank; see :class:`ZeroModelStates` for the formulas and sources."""
    if stage not in (1, 2, 3):
        raise InvalidArgumentError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise InvalidArgumentError(f"world_size must be >= 1, got {world_size}")
    p, n, h = int(total_params), int(world_size), int(param_bytes)
    part = p / n
    master = int(4 * part)
    state = int(state_bytes_per_param * part)
    fp32_grads = int(4 * part)
    if stage == 3:
        params = int(h * part)
        grads = int(4 * part)  # fp32 partitions: the step works on them directly
        fp32_grads = 0
        gathered = 2 * h * int(largest_layer_params)
    else:
        params = h * p
        grads = h * p if stage == 1 else int(h * part)
        gathered = 0
    host = 0
    if offload_optimizer:
        host += master + state + fp32_grads
        master = state = fp32_grads = 0
        if stage >= 2:
            host += grads
            grads = 0
    if offload_parameters and stage == 3:
        host += params
        params = 0
    return ZeroModelStates(params, grads, master, state, fp32_grads, gathered, host)


def largest_layer_params(model: nn.Module) -> int:
    """The most parameters any single module owns directly (DeepSpeed's ``model_to_params`` in stage3.py:
    ZeRO-3 gathers parameters module by module)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]


def deepspeed_trace(
    act: Trace,
    model: nn.Module,
    opts: DeepSpeedOptions,
    *,
    world_size: int,
    param_bytes: int,
    state_bytes_per_param: float,
    step_scratch: int,
) -> Trace:
    """One ZeRO rank's allocations, built around a single-process trace of the 16-bit model's forward and
    backward (``act``, no optimizer): what DeepSpeed holds (:func:`zero_model_states`) replaces the traced
    parameters and gradients, activations and temporaries stay as traced.

    - Optimizer state and master weights exist from the start (``initialize_optimizer_states`` runs a
      zero-gradient step at init).
    - Stage 1 keeps the traced full gradients until the step; stages 2 and 3 reduce each gradient into
      the partition as soon as it is produced (the traced tensor is freed at once), stage 2's partition
      appearing at the first backward (``grads_in_partition`` is allocated lazily), stage 3's at init.
    - The reduce buckets (``contiguous_gradients``: ``reduce_bucket_size`` elements of the training dtype,
      stages 1-2 two of them with ``overlap_comm``) are allocated at each backward and released after the
      step (``setup_buckets`` / ``_release_ipg_buffers``; stage 3's ``ipg_buckets``).
    - Stage 3 gathers parameters module by module: at most ``stage3_max_live_parameters``, the largest
      layer plus ``stage3_prefetch_bucket_size`` prefetched elements, live during forward and backward;
      parameters under ``stage3_param_persistence_threshold`` elements stay gathered for good.
    - The step: the fp32 gradient partition (stages 1-2: a flattened 16-bit copy first), then the
      optimizer's own scratch (``step_scratch``), then the fp32 gradients are freed. The all-gather of
      the updated partitions (``allgather_bucket_size`` at a time) writes into the 16-bit flat buffer in
      place and adds nothing.
    """
    params = unique_trainable(model)
    total = sum(p.numel() for p in params)
    largest = largest_layer_params(model)
    states = zero_model_states(total, largest, stage=opts.stage, world_size=world_size, param_bytes=param_bytes,
                               state_bytes_per_param=state_bytes_per_param, offload_optimizer=opts.offload_optimizer,
                               offload_parameters=opts.offload_parameters)
    part = total / world_size
    out = Rewriter(act)
    setup = setup_allocations(act)
    grads = {aid for aid, cat in enumerate(act.categories) if cat == Category.GRADIENTS}
    drop = {aid for aid in setup if act.categories[aid] == Category.PARAMETERS}

    persistent_small = sum(p.numel() for p in params if p.numel() < opts.stage3_param_persistence_threshold)
    live_limit = opts.stage3_max_live_parameters
    gathered_elems = min(live_limit, largest + min(opts.stage3_prefetch_bucket_size, max(0, total - largest)))
    # stages 1-2: ``setup_buckets`` allocates one ipg buffer, two with overlap_comm; stage 3 one per dtype
    copies = 2 if opts.overlap_comm and opts.stage < 3 else 1
    buckets = opts.reduce_bucket_size * param_bytes * copies if opts.contiguous_gradients else 0

    lazily_partitioned = opts.stage == 2 and states.gradients > 0
    stage1_grads: list[int] = []
    gathered_aid = bucket_aid = None
    partition_made = False
    for name, events in out.segments():
        out.phase(name)
        if name == "setup":
            for ev in events:
                if abs(ev) - 1 not in drop:
                    out.events.append(ev)
            up_front = [(states.parameters, Category.PARAMETERS),
                        (states.master_parameters, Category.OPTIMIZER_STATE),
                        (states.optimizer_state, Category.OPTIMIZER_STATE)]
            if opts.stage == 3:
                up_front += [(states.gradients, Category.GRADIENTS),
                             (persistent_small * param_bytes, Category.PARAMETERS)]
            for nbytes, category in up_front:
                if nbytes > 0:
                    out.alloc(out.new(nbytes, category))
            continue
        if name.endswith(".forward") and opts.stage == 3 and gathered_aid is None:
            gathered_aid = out.new(gathered_elems * param_bytes, Category.PARAMETERS)
            out.alloc(gathered_aid)
        if name.endswith(".backward"):
            if lazily_partitioned and not partition_made:
                out.alloc(out.new(states.gradients, Category.GRADIENTS))
                partition_made = True
            if bucket_aid is None and buckets:
                bucket_aid = out.new(buckets, Category.GRADIENTS)
                out.alloc(bucket_aid)
        for ev in events:
            aid = abs(ev) - 1
            if aid in grads and opts.stage >= 2:
                if ev > 0:
                    out.alloc(aid)
                    out.free(aid)
                continue
            if aid in grads and ev > 0:
                stage1_grads.append(aid)
            out.events.append(ev)
        if name.endswith(".backward"):
            step = name[: -len(".backward")].split(".micro")[0]
            last_micro = ".micro" not in name or _is_last_micro(name, act)
            if not last_micro:
                continue
            if gathered_aid is not None:
                out.free(gathered_aid)
                gathered_aid = None
            out.phase(f"{step}.optimizer")
            if not opts.offload_optimizer:
                if opts.stage < 3:
                    out.transient(int(param_bytes * part), Category.TEMPORARIES)  # flatten before .float()
                fp32 = out.new(int(4 * part), Category.GRADIENTS)
                out.alloc(fp32)
                out.transient(step_scratch, Category.TEMPORARIES)
                out.free(fp32)
            for aid in stage1_grads:
                out.free(aid)
            stage1_grads.clear()
            if bucket_aid is not None:
                out.free(bucket_aid)
                bucket_aid = None
    return out.build()


def _is_last_micro(name: str, trace: Trace) -> bool:
    """Whether ``stepN.microK.backward`` is the last micro-batch of its step."""
    step, _, rest = name.partition(".micro")
    k = int(rest.split(".")[0])
    return not any(n == f"{step}.micro{k + 1}.forward" for _, n in trace.phases)


def optimizer_cost(make_optimizer: Callable | None, numel: int) -> tuple[float, int]:
    """(state bytes per element, step scratch bytes) of the optimizer ``make_optimizer`` builds, stepping one
    flat fp32 partition of ``numel`` elements as DeepSpeed does (one partition per parameter group).
    Measured by running two steps on a meta tensor under memguard's recorder: the state is what the first
    step leaves in ``optimizer.state`` on the device, the scratch the second step's peak above it."""
    if make_optimizer is None or numel <= 0:
        return 0.0, 0
    recorder = _Recorder()
    mode = _RecordingMode(recorder, DeviceModel())
    p = nn.Parameter(torch.empty(numel, device="meta"))
    p.grad = torch.empty(numel, device="meta")
    with mode, mode.optimizer_running():
        optimizer = make_optimizer([p])
        optimizer.step()
        start = len(recorder.trace.events)
        optimizer.step()
    state = sum(t.numel() * t.element_size() for per_param in optimizer.state.values()
                for t in (per_param.values() if isinstance(per_param, dict) else [])
                if isinstance(t, torch.Tensor) and t.device.type == "meta")
    peak = recorder.trace.peak_bytes(start)
    recorder.closed = True
    return state / numel, peak


__all__ = ["ZeroModelStates", "deepspeed_trace", "largest_layer_params", "optimizer_cost", "unique_trainable",
           "zero_model_states"]
