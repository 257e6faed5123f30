"""Estimation: a typed request -> one process's trace (single.py) or every rank's (distributed.py).

:func:`estimate` is the public entry point; it only builds the request and chooses the path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memguard.device.models import DeviceModel, device_model
from memguard.errors import InvalidArgumentError
from memguard.estimation.distributed import estimate_ranks
from memguard.estimation.repeated import estimate_by_depth
from memguard.estimation.request import EstimateRequest
from memguard.estimation.single import estimate_one, step_order, summarize
from memguard.precision import Precision
from memguard.quiet import quiet
from memguard.results import Estimate
from memguard.trace import TraceCache


@quiet()
def estimate(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    optimizer: str | type | Callable | None = "adamw",
    optimizer_kwargs: dict[str, Any] | None = None,
    optimizer_impl: str | None = None,
    precision: str | Precision = "32-true",
    device: str | DeviceModel = "cuda",
    gpu: str | Any | None = None,
    gradient_checkpointing: bool | None = None,
    zero_grad_before_backward: bool = False,
    steps: int = 2,
    on_untraceable: str = "raise",
    quantization: str | None = None,
    accumulate_grad_batches: int = 1,
    optimizer_offload: bool = False,
    prepare_model: Callable[[nn.Module], None] | None = None,
    shared: tuple = (),
    strategy: Any = None,
    world_size: int = 1,
    num_nodes: int = 1,
    trace_cache: TraceCache | None = None,
    compile: bool | str | dict | None = None,
) -> Estimate:
    """Predict the peak memory of training ``model`` on ``batch``.

    The model may live on any device, ``meta`` included; it is never modified or materialized: memguard
    traces a fake copy. ``optimizer`` is a catalog name (see :mod:`memguard.optimizers`), an optimizer
    class, or a factory ``params -> optimizer``; ``optimizer_impl`` overrides the device's default
    implementation ("for-loop" on the CPU, "foreach" on CUDA, or "fused"). ``gradient_checkpointing``:
    None keeps what the model does, True turns it on (transformers' switch, else repeated blocks are
    wrapped), False turns transformers' switch off. ``zero_grad_before_backward`` follows Lightning's
    automatic optimization, where the previous step's gradients live through the next forward.
    ``quantization`` ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8", as Lightning's BitsandbytesPrecision)
    stores the frozen linear layers' weights as bitsandbytes does; bitsandbytes layers already in the model
    are recognised without it.
    ``accumulate_grad_batches``: micro-batches per optimizer step (the gradients of the first live through
    the others). ``optimizer_offload``: the optimizer's state and step live in host memory (as with
    torchao's CPUOffloadOptimizer or DeepSpeed's offload), so the device keeps none of it.
    ``gpu``: a GPU catalog name ("A100-80GB", "H100") or entry, for its attention kernels, cuBLAS workspace
    and CUDA context size (default: an sm80-class GPU).
    ``prepare_model`` runs on memguard's copy of the model before tracing (to silence logging, say);
    ``shared`` lists objects the model refers to that must not be copied (a Lightning Trainer).
    ``strategy`` / ``world_size`` / ``num_nodes``: a Lightning strategy name ("ddp", "fsdp", "fsdp2",
    "deepspeed_stage_2", ...) or object and the number of ranks: each rank's peak is predicted
    (:mod:`memguard.estimation.distributed`); ``peak_bytes`` is the largest, ``per_rank`` lists them all.
    ``on_untraceable="bound"``: when only the optimizer cannot be traced, return a conservative bound
    (Adam-sized state, foreach-sized step scratch) marked ``approximate`` instead of raising.
    ``trace_cache``: a :class:`memguard.trace.TraceCache` shared by estimates of the same ``model``; those
    that differ only in ``optimizer``, ``optimizer_kwargs`` or ``optimizer_offload`` replay the model's
    forward and backward from the first instead of tracing them again (the planner's optimizer candidates).
    ``compile``: None predicts the model as it is (its ``torch.compile``d parts compiled, the rest eager);
    True, a backend name ("inductor", "aot_eager"), a mode ("max-autotune"...) or a mapping with
    ``backend`` / ``mode`` / ``fullgraph`` / ``dynamic`` / ``options`` predicts the whole model compiled that
    way (as ``torch.compile(model)`` or transformers' ``torch_compile=True``) unless it has compiled parts of
    its own; False predicts eager execution. See :mod:`memguard.trace.compiled`.
    """
    req = EstimateRequest(
        loss_fn=loss_fn, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, optimizer_impl=optimizer_impl,
        precision=precision, device=device, gpu=gpu, gradient_checkpointing=gradient_checkpointing,
        zero_grad_before_backward=zero_grad_before_backward, steps=steps, on_untraceable=on_untraceable,
        quantization=quantization, accumulate_grad_batches=accumulate_grad_batches,
        optimizer_offload=optimizer_offload, prepare_model=prepare_model, shared=shared, strategy=strategy,
        world_size=world_size, num_nodes=num_nodes, trace_cache=trace_cache,
        compile=compile,
    )
    if on_untraceable not in ("raise", "bound"):
        raise InvalidArgumentError(f"on_untraceable must be 'raise' or 'bound', got {on_untraceable!r}")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"estimate(model=) must be a torch.nn.Module, got {type(model).__name__}")
    if batch is None:
        raise InvalidArgumentError("estimate(batch=) is None: give an example batch (a tensor, or a tuple, list or "
                                   "dict of tensors, on any device including meta), as the training step receives it")
    device_model(device, gpu)  # an unknown device is named here, before anything is traced
    if req.distributed:
        return estimate_ranks(model, batch, req)
    return estimate_by_depth(model, batch, req, estimate_one) or estimate_one(model, batch, req)


__all__ = ["Estimate", "EstimateRequest", "estimate", "estimate_one", "step_order", "summarize"]
