"""What people use instead of memguard to size a training run, as functions with one signature.

Each peer takes ``(model, batch, optimizer, precision, **options)`` and returns its predicted peak memory
of training in bytes, or raises :class:`NotApplicable` with the reason it has no answer. ``optimizer`` is a
name of the test zoo ("adamw", "adam", "sgd_momentum", "rmsprop", "adafactor", "sgd"), ``precision`` a
Lightning precision string ("32-true", "bf16-mixed", "bf16-true", ...). ``options`` carries the rest of a
training step's description (``loss_fn``, ``gradient_checkpointing``, ``zero_grad_before_backward``,
``accumulate``); only the peer that runs the real step (MemTracker) uses them, the formulas ignore them,
as they do in their own tools.

The peers:

- :func:`accelerate_estimate`: ``accelerate estimate-memory``'s "Training using Adam" column
  (``accelerate/commands/estimate.py``: ``calculate_maximum_sizes`` for the float32 size of parameters
  and buffers, then ``max(estimate_training_usage(size, dtype).values())``: 4x the float32 size for
  float32, 2x for float16 / bfloat16 mixed precision). accelerate has no row for half-precision weights
  without fp32 masters, so "bf16-true" / "16-true" use its half-precision row.
- :func:`deepspeed_zero2` / :func:`deepspeed_zero3`: DeepSpeed's per-GPU model-state estimators, by default
  for one GPU without offload (``estimate_zero2_model_states_mem_needs`` in
  ``deepspeed/runtime/zero/stage_1_and_2.py``: 2 P + 18 P / GPUs; ``estimate_zero3_model_states_mem_needs``
  in ``deepspeed/runtime/zero/stage3.py``: 4 x largest layer + 18 P / GPUs), with P and the largest layer
  from ``model_to_params`` (stage3.py). The options ``num_gpus`` and ``cpu_offload`` (and, for ZeRO-3,
  ``cpu_offload_params``) give the per-GPU figure of a multi-GPU or offloaded run instead (ZeRO-2 with
  offload: 2 P; ZeRO-3 offloading the optimizer: 4 x largest layer + 2 P / GPUs, and the parameters too:
  4 x largest layer). DeepSpeed's own functions are called when ``deepspeed`` imports; otherwise the same
  formulas, copied below from DeepSpeed 0.19.8, are used (``deepspeed_source()`` says which).
- :func:`torchinfo_total`: torchinfo's "Estimated Total Size" (input size + forward/backward pass size +
  params size) from ``torchinfo.summary(model, input_data=batch)``. With the option ``meta_ok=True`` a
  model and batch on the meta device are summarized there (torchinfo reads only shapes and dtypes, so the
  sizes are those of the real model); by default a meta model is not applicable.
- :func:`memtracker_peak`: PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` around two real
  training steps of a copy of the model on the CPU; the peak "Total" of its peak snapshot.
- :func:`rule_of_thumb`: 24 bytes per parameter (fp32 Adam: 4 weights + 4 gradients + 8 moments + ~8 of
  activations and slack).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

RULE_OF_THUMB_BYTES_PER_PARAM = 24

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_TRUE_HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
_ACCELERATE_DTYPE = {"32-true": "float32", "32": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16",
                     "bf16-true": "bfloat16", "16-true": "float16"}


class NotApplicable(Exception):
    """The peer has no answer for this case; the message says why."""


@dataclass
class PeerResult:
    bytes: int | None
    seconds: float
    reason: str = ""


def call(peer: Callable[..., int], model: nn.Module, batch: Any, optimizer: str, precision: str,
         **options: Any) -> PeerResult:
    """Run one peer, timing it; a failure becomes ``bytes=None`` with the reason."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = peer(model, batch, optimizer, precision, **options)
    except NotApplicable as exc:
        return PeerResult(None, time.perf_counter() - started, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure of a peer is a result of the comparison
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return PeerResult(None, time.perf_counter() - started, f"{type(exc).__name__}: {text}"[:160])
    return PeerResult(int(value), time.perf_counter() - started)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # parameters() yields a tied weight once


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in _unique_params(model))


# -- (a) accelerate estimate-memory ------------------------------------------------------------------------

def accelerate_estimate(model: nn.Module, batch: Any, optimizer: str, precision: str, **_: Any) -> int:
    """``accelerate estimate-memory``'s "Training using Adam" for the run's dtype."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    dtype = _ACCELERATE_DTYPE.get(str(precision))
    if dtype is None:
        raise NotApplicable(f"accelerate has no training row for precision {precision}")
    # estimate-memory builds the model in float32 (create_empty_model: torch_dtype=torch.float32)
    fp32 = model if all(t.dtype == torch.float32 for t in _floating(model)) else copy.deepcopy(model).float()
    total_size, _largest = calculate_maximum_sizes(fp32)
    usage = estimate_training_usage(total_size, dtype)
    value = max(usage.values())  # what estimate_command prints as "Training using Adam"
    if value < 0:
        raise NotApplicable(f"accelerate prints N/A for {dtype}")
    return int(value)


def _floating(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]


# -- (b) DeepSpeed ZeRO model-state estimators ------------------------------------------------------------

def _zero2_gpu_bytes(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                     cpu_offload: bool = False) -> int:
    # deepspeed/runtime/zero/stage_1_and_2.py, estimate_zero2_model_states_mem_needs, the GPU figure:
    # 2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        return int(2 * total_params)
    return int(2 * total_params + int(18 * total_params / total_gpus))


def _zero3_gpu_bytes(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                     num_nodes: int = 1, cpu_offload: bool = False, cpu_offload_params: bool = False) -> int:
    # deepspeed/runtime/zero/stage3.py, estimate_zero3_model_states_mem_needs, the GPU figure
    total_gpus = num_nodes * num_gpus_per_node
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            return int(largest_layer_memory)
        return int(largest_layer_memory + int(2 * total_params / total_gpus))
    return int(largest_layer_memory + int(18 * total_params / total_gpus))


def _model_to_params(model: nn.Module) -> tuple[int, int]:
    # deepspeed/runtime/zero/stage3.py, model_to_params (shared parameters counted once)
    total_params = sum(dict((id(p), p.numel()) for p in model.parameters()).values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total_params, largest


@contextlib.contextmanager
def _quiet() -> Any:
    """DeepSpeed logs its accelerator choice on import; keep the benchmark output readable."""
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


_DEEPSPEED: dict[str, Any] = {}


def _deepspeed() -> dict[str, Any]:
    """DeepSpeed's own estimator functions, or {} when it is not importable."""
    if "loaded" not in _DEEPSPEED:
        _DEEPSPEED["loaded"] = True
        if os.environ.get("MEMGUARD_BENCH_NO_DEEPSPEED") != "1":
            try:
                with _quiet():
                    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
                    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
                import deepspeed

                _DEEPSPEED.update(zero2=estimate_zero2_model_states_mem_needs,
                                  zero3=estimate_zero3_model_states_mem_needs,
                                  model_to_params=model_to_params, version=deepspeed.__version__)
            except Exception:  # noqa: BLE001 - not installed, or its import needs what this machine lacks
                pass
    return _DEEPSPEED


def deepspeed_source() -> str:
    ds = _deepspeed()
    return f"deepspeed {ds['version']}" if "zero2" in ds else "formulas copied from deepspeed 0.19.8"


def _params(model: nn.Module) -> tuple[int, int]:
    ds = _deepspeed()
    if "model_to_params" in ds and not any(p.device.type == "meta" for p in model.parameters()):
        return ds["model_to_params"](model)
    return _model_to_params(model)  # data_ptr() is 0 for every meta tensor: count by identity instead


def deepspeed_zero2(model: nn.Module, batch: Any, optimizer: str, precision: str, *, num_gpus: int = 1,
                    cpu_offload: bool = False, **_: Any) -> int:
    """DeepSpeed's ZeRO-2 per-GPU model states (default: 1 GPU, no offload)."""
    total, _largest = _params(model)
    ds = _deepspeed()
    if "zero2" in ds:
        _cpu, gpu = ds["zero2"](total, num_gpus_per_node=num_gpus, num_nodes=1, cpu_offload=cpu_offload)
        return int(gpu)
    return _zero2_gpu_bytes(total, num_gpus, 1, cpu_offload)


def deepspeed_zero3(model: nn.Module, batch: Any, optimizer: str, precision: str, *, num_gpus: int = 1,
                    cpu_offload: bool = False, cpu_offload_params: bool = False, **_: Any) -> int:
    """DeepSpeed's ZeRO-3 per-GPU model states (default: 1 GPU, no offload)."""
    total, largest = _params(model)
    ds = _deepspeed()
    if "zero3" in ds:
        _cpu, gpu, _largest_mem = ds["zero3"](total, largest, num_gpus_per_node=num_gpus, num_nodes=1,
                                              cpu_offload=cpu_offload, cpu_offload_params=cpu_offload_params)
        return int(gpu)
    return _zero3_gpu_bytes(total, largest, num_gpus, 1, cpu_offload, cpu_offload_params)


# -- (c) torchinfo ----------------------------------------------------------------------------------------

def torchinfo_total(model: nn.Module, batch: Any, optimizer: str, precision: str, *, meta_ok: bool = False,
                    **_: Any) -> int:
    """torchinfo's "Estimated Total Size": input + forward/backward pass + params bytes."""
    import torchinfo

    half = _TRUE_HALF.get(str(precision))
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if on_meta and not meta_ok:
        raise NotApplicable("torchinfo runs the forward pass: needs a real model")
    net = copy.deepcopy(model)
    data = batch
    if half is not None:  # the user's model and inputs as they train them
        net = net.to(half)
        data = tree_map(lambda x: x.to(half) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch)
    if isinstance(data, tuple):
        data = list(data)
    stats = torchinfo.summary(net, input_data=data, verbose=0, mode="train", cache_forward_pass=False,
                              **({"device": "meta"} if on_meta else {}))
    return int(stats.total_input + stats.total_output_bytes + stats.total_param_bytes)


# -- (d) PyTorch MemTracker -------------------------------------------------------------------------------

def memtracker_peak(model: nn.Module, batch: Any, optimizer: str, precision: str, *, loss_fn: Callable | None = None,
                    gradient_checkpointing: bool | None = None, zero_grad_before_backward: bool = False,
                    accumulate: int = 1, steps: int = 2, **_: Any) -> int:
    """PyTorch's MemTracker around ``steps`` real training steps of a copy of the model on the CPU."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from groundtruth import REAL_OPTIMIZERS, run_real_steps  # tests/: the same real steps as the ground truth

    if any(p.device.type == "meta" for p in model.parameters()):
        raise NotApplicable("MemTracker runs the real step here: needs a real model")
    if optimizer not in REAL_OPTIMIZERS:
        raise NotApplicable(f"no torch optimizer for {optimizer!r}")
    if loss_fn is None:
        from memguard.trace import default_loss_fn as loss_fn  # the call convention only

    net = copy.deepcopy(model)
    half = _TRUE_HALF.get(str(precision))
    if half is not None:
        net = net.to(half)
        batch = tree_map(lambda x: x.to(half) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch)
    net.train()
    if gradient_checkpointing:
        from memguard import checkpointing

        checkpointing.enable(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = REAL_OPTIMIZERS[optimizer](params) if params else None
    autocast = _AUTOCAST.get(str(precision))
    tracker = MemTracker()
    inputs = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    tracker.track_external(net, *([opt] if opt is not None else []), *inputs)
    torch.manual_seed(0)
    with tracker:
        # MemTracker refuses a second forward of the root module unless its per-module stats are cleared
        # first; the device-wide peak survives the reset.
        run_real_steps(net, batch, loss_fn, opt, steps=steps, accumulate=accumulate, autocast_dtype=autocast,
                       zero_grad_before_backward=zero_grad_before_backward, after_backward=tracker.reset_mod_stats)
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(v.get("Total", 0) for v in peak.values()))


# -- (e) rule of thumb ------------------------------------------------------------------------------------

def rule_of_thumb(model: nn.Module, batch: Any, optimizer: str, precision: str, **_: Any) -> int:
    """24 bytes per parameter (fp32 Adam training), whatever the run."""
    return RULE_OF_THUMB_BYTES_PER_PARAM * param_count(model)


PEERS: dict[str, Callable[..., int]] = {
    "accelerate": accelerate_estimate,
    "deepspeed-zero2": deepspeed_zero2,
    "deepspeed-zero3": deepspeed_zero3,
    "torchinfo": torchinfo_total,
    "MemTracker": memtracker_peak,
    "24 B/param": rule_of_thumb,
}
"""Name -> peer, in the column order of the accuracy table."""

__all__ = ["PEERS", "NotApplicable", "PeerResult", "call", "param_count", "deepspeed_source",
           "accelerate_estimate", "deepspeed_zero2", "deepspeed_zero3", "torchinfo_total", "memtracker_peak",
           "rule_of_thumb"]
