"""Wrapping memguard's fake copy of the model as the strategy does, and what sets one rank apart.

FSDP1 as Lightning's ``FSDPStrategy`` wraps it (then activation checkpointing), FSDP2 the torchtitan way
(``fully_shard`` on each repeated block, then on the root); the wrappers are run by
:func:`memguard.estimation.sharded_trace.trace_wrapped`. Ranks differ when shards are uneven: the layout
functions give each rank a key, so that ranks with the same key are traced once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memguard import checkpointing
from memguard.estimation.strategy_options import HALF_DTYPES, FSDP2Options, FSDPOptions
from memguard.precision import Precision

# ---------------------------------------------------------------------------------------------------------
# Wrapping the fake copy as the strategy does


def _lightning_mixed_precision(precision: Precision) -> Any:
    """``FSDPPrecision.mixed_precision_config`` of Lightning: param, reduce and buffer dtype all the half
    dtype for "16-*" / "bf16-*" (mixed or true), none for "32-true"."""
    from torch.distributed.fsdp import MixedPrecision

    half = HALF_DTYPES.get(precision)
    return MixedPrecision(param_dtype=half, reduce_dtype=half, buffer_dtype=half) if half is not None else None


def _module_policy(policy: Any) -> Any:
    """Lightning accepts a set (or list) of module classes where torch wants a ``ModuleWrapPolicy``."""
    if isinstance(policy, (set, frozenset, list, tuple)):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return ModuleWrapPolicy(set(policy))
    if isinstance(policy, type) and issubclass(policy, nn.Module):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return ModuleWrapPolicy({policy})
    return policy


def _checkpointing_kwargs(policy: Any) -> dict:
    """``apply_activation_checkpointing`` keywords from what Lightning or the user gave: a dict of them
    (Lightning's ``_activation_checkpointing_kwargs``), module classes or a torch wrap policy (which modules
    to checkpoint), or a ``check_fn(module) -> bool``."""
    from torch.distributed.fsdp.wrap import _Policy

    if isinstance(policy, dict):
        out = dict(policy)
        if "auto_wrap_policy" in out:
            out["auto_wrap_policy"] = _module_policy(out["auto_wrap_policy"])
        return out
    if isinstance(policy, (_Policy, set, frozenset, list, tuple, type)):
        return {"auto_wrap_policy": _module_policy(policy)}
    return {"check_fn": policy}


def fsdp1_wrapper(opts: FSDPOptions, precision: Precision,
                   layout: dict | None = None) -> Callable[[nn.Module], nn.Module]:
    """``FullyShardedDataParallel(model, ...)`` as Lightning's ``FSDPStrategy._setup_model`` calls it, then
    activation checkpointing as ``_setup_activation_checkpointing`` applies it (after wrapping). HYBRID
    strategies are wrapped as their single-group counterpart: the trace's world is the shard group, and
    the replication across nodes is an in-place all-reduce of the gradient shard."""
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    sharding = {"HYBRID_SHARD": "FULL_SHARD", "_HYBRID_SHARD_ZERO2": "SHARD_GRAD_OP"}.get(
        opts.sharding_strategy, opts.sharding_strategy)
    mixed = opts.mixed_precision if opts.mixed_precision is not None else _lightning_mixed_precision(precision)
    prefetch = opts.backward_prefetch
    if isinstance(prefetch, str):
        prefetch = BackwardPrefetch[prefetch]

    def wrap(module: nn.Module) -> nn.Module:
        wrapped = FSDP(
            module,
            auto_wrap_policy=_module_policy(opts.auto_wrap_policy),
            sharding_strategy=ShardingStrategy[sharding],
            mixed_precision=mixed,
            use_orig_params=opts.use_orig_params,
            limit_all_gathers=opts.limit_all_gathers,
            forward_prefetch=opts.forward_prefetch,
            backward_prefetch=prefetch,
            device_id=torch.device("cpu"),
        )
        if opts.activation_checkpointing is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
                checkpoint_wrapper,
            )

            apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                           **_checkpointing_kwargs(opts.activation_checkpointing))
        if layout is not None:
            layout["flat"] = [
                (tuple(h.flat_param._numels_with_padding), tuple(h.flat_param._is_padding_mask),
                 int(h.flat_param._sharded_size.numel()) * h.world_size)
                for h in (m._handle for m in FSDP.fsdp_modules(wrapped)) if h is not None
            ]
        return wrapped

    return wrap


def fsdp2_blocks(model: nn.Module, block_classes: tuple[type, ...]) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: those of ``block_classes``, else the model's repeated blocks."""
    if block_classes:
        return [m for m in model.modules() if isinstance(m, block_classes) and m is not model]
    return checkpointing.repeated_blocks(model)


def fsdp2_policy(precision: Precision, param_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype | None = None) -> Any:
    """FSDP2's ``MixedPrecisionPolicy``: as given, else following ``precision``: half parameters for the
    compute, gradients reduced in float32 (torchtitan's default ``reduce_dtype``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = HALF_DTYPES.get(precision) if precision in (Precision.FP16_MIXED, Precision.BF16_MIXED) else None
    param_dtype = param_dtype or half
    reduce_dtype = reduce_dtype or (torch.float32 if param_dtype is not None else None)
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def shard_blocks(module: nn.Module, mesh: Any, policy: Any, block_classes: tuple[type, ...] = (),
                 reshard_after_forward: bool = True) -> None:
    """``fully_shard`` on each repeated block, then on the root (torchtitan's ``apply_fsdp``)."""
    from torch.distributed.fsdp import fully_shard

    blocks = fsdp2_blocks(module, block_classes)
    for i, block in enumerate(blocks):
        # torchtitan does not reshard the last block after forward: backward needs it first
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def fsdp2_wrapper(opts: FSDP2Options, precision: Precision, world_size: int,
                   layout: dict | None = None) -> Callable[[nn.Module], nn.Module]:
    """:func:`shard_blocks` on a 1-D "cpu" mesh of the trace's world, with :func:`fsdp2_policy`."""
    from torch.distributed.device_mesh import init_device_mesh

    policy = fsdp2_policy(precision, opts.param_dtype, opts.reduce_dtype)

    def wrap(module: nn.Module) -> nn.Module:
        with unset_fake_temporarily():
            mesh = init_device_mesh("cpu", (world_size,))
        shard_blocks(module, mesh, policy, opts.block_classes, opts.reshard_after_forward)
        if layout is not None:
            layout["dims"] = [int(p.shape[0]) if p.dim() else 1 for p in module.parameters()]
        return module

    return wrap


# ---------------------------------------------------------------------------------------------------------
# Which ranks differ


def fsdp1_rank_layout(layout: list[tuple[tuple[int, ...], tuple[bool, ...], int]], rank: int, world_size: int,
                      use_orig_params: bool) -> tuple[int, ...]:
    """What sets one FSDP1 rank apart: with ``use_orig_params`` the number of elements of each original
    parameter that fall inside the rank's shard (``FlatParamHandle._get_shard_metadata``: the padded flat
    parameter is cut into ``world_size`` equal shards), since the optimizer keeps state per original
    parameter view. Without it every rank holds one equal, padded shard per flat parameter."""
    if not use_orig_params:
        return ()
    out: list[int] = []
    for numels, padding, padded in layout:
        shard = padded // world_size
        lo, hi, offset = rank * shard, (rank + 1) * shard, 0
        for numel, is_padding in zip(numels, padding):
            if not is_padding:
                out.append(max(0, min(hi, offset + numel) - max(lo, offset)))
            offset += numel
    return tuple(out)


def fsdp2_rank_layout(dims: list[int], rank: int, world_size: int) -> tuple[int, ...]:
    """What sets one FSDP2 rank apart: the dim-0 rows of each parameter it holds. ``fully_shard`` cuts dim 0
    with ``torch.chunk`` (``FSDPParam._init_sharded_param``): chunks of ceil(rows / world) rows, so the last
    ranks get fewer rows or none (a (1, 256, d) position table lives on rank 0 alone)."""
    out = []
    for rows in dims:
        chunk = -(-rows // world_size)
        out.append(max(0, min(chunk, rows - rank * chunk)))
    return tuple(out)


__all__ = ["fsdp2_blocks", "fsdp2_policy", "shard_blocks", "fsdp1_rank_layout", "fsdp1_wrapper", "fsdp2_rank_layout", "fsdp2_wrapper"]
