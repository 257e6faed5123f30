"""Tensor parallelism as the run applies it: DTensor's ``parallelize_module`` (ColwiseParallel, RowwiseParallel,
SequenceParallel, PrepareModuleInput...) on the tensor-parallel dimension of a 2-D mesh, then FSDP2 on the
data-parallel one, applied to memguard's fake copy of the model on a fake process group.

The parallelisation is the run's own code wherever there is some (the LightningModule's ``configure_model``,
a torchtitan-style ``parallelize(model, mesh)``), so what each rank holds (its shards of weights, gradients
and optimizer state; activations split along heads and hidden units, or along the sequence under sequence
parallelism; the outputs of each all-reduce and all-gather) comes from DTensor itself, not from a formula.
A transformers model is parallelised by transformers' own code (``apply_tensor_parallelism`` with the plan
``from_pretrained(tp_plan="auto")`` resolves: ``config.base_model_tp_plan`` and the head's ``_tp_plan``);
where that code is not installed, its plan's words are read as the DTensor styles that shard the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memguard.errors import InvalidArgumentError, unknown_name
from memguard.estimation.fsdp_wrap import fsdp2_policy, shard_blocks
from memguard.estimation.strategy_options import TPOptions
from memguard.precision import Precision

MESH_DIMS = ("data_parallel", "tensor_parallel")
"""The mesh Lightning's ``ModelParallelStrategy`` gives ``configure_model`` (``self.device_mesh``)."""


def _hf_styles() -> dict[str, Any]:
    """transformers' tensor-parallel words, as the DTensor style that shards a layer the same way (weights
    split the same way, the same collective on the output)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    return {
        "colwise": ColwiseParallel(), "local_colwise": ColwiseParallel(), "packed_colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(), "local_rowwise": RowwiseParallel(), "packed_rowwise": RowwiseParallel(),
        "embedding_rowwise": RowwiseParallel(),
        "colwise_gather_output": ColwiseParallel(output_layouts=Replicate()),
        "colwise_rep": ColwiseParallel(output_layouts=Replicate()),
        "rowwise_rep": RowwiseParallel(input_layouts=Replicate()),
        "sequence_parallel": SequenceParallel(),
        "replicated_with_grad_allreduce": None,  # replicated: nothing to shard
    }


def styles(plan: Mapping[str, Any]) -> dict[str, Any]:
    """A ``parallelize_module`` plan from ``plan``: DTensor styles pass through, transformers' words are
    translated; an unknown word is an error naming it and the words memguard reads."""
    words = None
    out: dict[str, Any] = {}
    for pattern, style in plan.items():
        if isinstance(style, str):
            words = words or _hf_styles()
            if style not in words:
                raise unknown_name(f"tensor-parallel style for {pattern!r}", style, words)
            style = words[style]
        if style is not None:
            out[pattern] = style
    return out


def model_plan(model: nn.Module) -> dict[str, Any]:
    """The model's own plan: transformers' ``config.base_model_tp_plan`` (patterns under the base model, e.g.
    ``model.layers.*.self_attn.q_proj``) and the head's class-level ``_tp_plan`` (``lm_head``)."""
    plan: dict[str, Any] = {}
    config = getattr(model, "config", None)
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    lead = f"{prefix}." if isinstance(inner, nn.Module) and inner is not model else ""
    plan.update({f"{lead}{k}": v for k, v in base.items()})
    plan.update(dict(getattr(model, "_tp_plan", None) or {}))
    return plan


def _transformers_tp(model: nn.Module) -> bool:
    """A transformers model that applies tensor parallelism itself (transformers 5: ``_resolve_parallel_plans``
    and ``transformers.distributed.tensor_parallel``), with a plan."""
    if not hasattr(model, "_resolve_parallel_plans"):
        return False
    try:
        importlib.import_module("transformers.distributed.tensor_parallel")
    except ImportError:
        return False
    return bool(model_plan(model))


def _own_configure_model(module: nn.Module) -> bool:
    """A LightningModule whose class defines ``configure_model`` (Lightning's own is a no-op)."""
    if not hasattr(module, "_device_mesh"):
        return False
    for cls in type(module).__mro__:
        if "configure_model" in vars(cls):
            return not cls.__module__.startswith(("pytorch_lightning.", "lightning."))
    return False


ROUTES = {
    "parallelize": "the run's parallelize function",
    "configure_model": "the LightningModule's configure_model",
    "transformers": "transformers' own tensor parallelism and plan",
    "plan": "the given plan",
    "model_plan": "the model's plan",
}
"""The ways a model is parallelised (see :class:`TPOptions`), and how the estimate's notes say each."""


def route(opts: TPOptions, model: nn.Module) -> str:
    """Which way ``model`` is parallelised, first that applies (a key of :data:`ROUTES`)."""
    if opts.parallelize is not None:
        return "parallelize"
    if opts.plan is not None:
        return "plan"
    if _own_configure_model(model):
        return "configure_model"
    return "transformers" if _transformers_tp(model) else "model_plan"


def memguard_shards_data(how: str, data_parallel_size: int) -> bool:
    """Whether memguard applies FSDP2 over the data-parallel dimension itself: a plan (given, the model's or
    transformers') and more than one data-parallel rank. Its mixed-precision policy then casts the
    parameters, so the run has no autocast, as under FSDP2; a parallelize function or configure_model shards
    as it likes."""
    return data_parallel_size > 1 and how in ("transformers", "plan", "model_plan")


def tp_wrapper(opts: TPOptions, precision: Precision, world_size: int, num_nodes: int,
               layout: dict | None = None) -> Callable[[nn.Module], nn.Module]:
    """Parallelise a module the way the run does (:func:`route`), on a ("data_parallel", "tensor_parallel")
    "cpu" mesh of the fake world. ``layout["even"]`` records whether every sharded parameter divides evenly
    over the mesh (every rank then holds the same bytes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    dp, tp = opts.sizes(world_size, num_nodes)

    def wrap(module: nn.Module) -> nn.Module:
        with unset_fake_temporarily():
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=MESH_DIMS)
        how = route(opts, module)
        if how == "parallelize":
            out = opts.parallelize(module, mesh)
            module = out if isinstance(out, nn.Module) else module
        elif how == "configure_model":
            module._device_mesh = mesh
            module.configure_model()
        elif how == "transformers":  # transformers' own code, as from_pretrained runs it
            from transformers.distributed.configuration_utils import DistributedConfig
            from transformers.distributed.tensor_parallel import apply_tensor_parallelism

            plan = module._resolve_parallel_plans(DistributedConfig(tp_size=tp))[0]
            module._mesh_manager = getattr(module, "_mesh_manager", None)
            apply_tensor_parallelism(module, mesh["tensor_parallel"], plan)
        else:
            parallelize_module(module, mesh["tensor_parallel"],
                               styles(opts.plan if opts.plan is not None else model_plan(module)))
        if memguard_shards_data(how, dp):
            shard_blocks(module, mesh["data_parallel"], fsdp2_policy(precision))
        if layout is not None:
            layout["even"] = all(_even(p) for p in module.parameters())
        return module

    return wrap


def check_plan(opts: TPOptions, model: nn.Module) -> None:
    """Fail before any tracing when there is no way to parallelise ``model``, or the plan has an unknown
    word."""
    if route(opts, model) not in ("plan", "model_plan"):
        return
    plan = opts.plan if opts.plan is not None else model_plan(model)
    if not plan:
        raise InvalidArgumentError(
            f"tensor parallelism needs a plan: {type(model).__name__} has no tensor-parallel plan of its own "
            "(transformers' base_model_tp_plan) and no configure_model; pass one (TPOptions(plan=...) or "
            "parallelize=...)")
    styles(plan)


def head_counts(model: nn.Module) -> dict[str, int]:
    """The model's attention head counts (transformers' ``num_attention_heads`` / ``num_key_value_heads``):
    each rank computes whole heads, so a tensor-parallel size must divide every one of them."""
    config = getattr(model, "config", None)
    counts = {attr: getattr(config, attr, None) for attr in ("num_attention_heads", "num_key_value_heads")}
    return {attr: n for attr, n in counts.items() if isinstance(n, int) and not isinstance(n, bool) and n > 0}


def parallelizable(model: nn.Module) -> bool:
    """Whether ``model`` can be tensor-parallelised without being told how: its own plan (transformers) or
    a LightningModule's ``configure_model``."""
    return _own_configure_model(model) or bool(model_plan(model))


def _even(p: torch.Tensor) -> bool:
    """A DTensor parameter whose shards are equal on every rank (``torch.chunk`` gives the first ranks more
    when a sharded dimension does not divide); plain tensors are replicated, hence even."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return True
    shape = list(p.shape)
    for i, placement in enumerate(placements):
        if placement.is_shard():
            ranks = p.device_mesh.size(i)
            if shape[placement.dim] % ranks:
                return False
            shape[placement.dim] //= ranks
    return True


__all__ = ["MESH_DIMS", "ROUTES", "check_plan", "head_counts", "memguard_shards_data", "model_plan", "parallelizable", "route", "styles",
           "tp_wrapper"]
