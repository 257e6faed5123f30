"""What a distributed estimate is asked, as one value: a :class:`Strategy` (kind, the options that change
memory, the name to report), parsed from a Lightning strategy name (the table of :mod:`memguard.strategies`)
or read from a Lightning strategy object, and the library defaults those options start from.

Nothing here traces; :mod:`memguard.estimation.distributed` acts on the parsed value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memguard import strategies
from memguard.errors import InvalidArgumentError
from memguard.precision import Precision
from memguard.strategies import Kind

# ---------------------------------------------------------------------------------------------------------
# Constants that stand for what the libraries do by default (each says where it comes from)

DDP_BUCKET_CAP_MB = 25
"""``DistributedDataParallel(bucket_cap_mb=None)`` -> 25 MiB buckets (``torch/nn/parallel/distributed.py``)."""

DDP_FIRST_BUCKET_BYTES = 1024 * 1024
"""``dist._DEFAULT_FIRST_BUCKET_BYTES``: the first bucket is capped at 1 MiB so communication starts early."""

LIGHTNING_DS_BUCKET = 200_000_000
"""Lightning's ``DeepSpeedStrategy`` sets ``allgather_bucket_size`` and ``reduce_bucket_size`` to 2e8 elements
(DeepSpeed's own default is 5e8)."""

DS_DEFAULTS = {
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000_000,  # Lightning's default (DeepSpeed's is 1e9)
}
"""DeepSpeed's ``DeepSpeedZeroConfig`` defaults in elements (``deepspeed/runtime/zero/config.py``)."""

HALF_DTYPES = {Precision.FP16_MIXED: torch.float16, Precision.FP16_TRUE: torch.float16,
               Precision.BF16_MIXED: torch.bfloat16, Precision.BF16_TRUE: torch.bfloat16}
"""The 16-bit dtype of each half precision (FSDP's mixed precision, DeepSpeed's training dtype)."""


# ---------------------------------------------------------------------------------------------------------
# What the user asked for, as one value


@dataclass(frozen=True)
class DDPOptions:
    """The ``DistributedDataParallel`` arguments that change memory."""

    gradient_as_bucket_view: bool = False
    find_unused_parameters: bool = False
    static_graph: bool = False
    bucket_cap_mb: float = DDP_BUCKET_CAP_MB
    broadcast_buffers: bool = True


@dataclass(frozen=True)
class FSDPOptions:
    """The ``FullyShardedDataParallel`` arguments (as Lightning's ``FSDPStrategy`` passes them) that change memory.

    ``auto_wrap_policy``: a set of module classes (Lightning's shorthand for ``ModuleWrapPolicy``) or any
    torch wrap policy; None wraps only the root, so the whole model is one unit. ``mixed_precision``: a
    torch ``MixedPrecision`` or None (then derived from ``precision`` as Lightning's ``FSDPPrecision`` does).
    ``activation_checkpointing``: module classes, a torch wrap policy, a ``check_fn(module) -> bool`` or a
    dict of ``apply_activation_checkpointing`` keywords; applied after wrapping, as Lightning does.
    """

    sharding_strategy: str = "FULL_SHARD"
    auto_wrap_policy: Any = None
    mixed_precision: Any = None
    cpu_offload: bool = False
    activation_checkpointing: Any = None
    use_orig_params: bool = True
    limit_all_gathers: bool = True
    forward_prefetch: bool = False
    backward_prefetch: Any = "BACKWARD_PRE"


@dataclass(frozen=True)
class FSDP2Options:
    """``fully_shard`` the torchtitan way: each repeated block (or each module of ``block_classes``), then the
    root. ``param_dtype`` / ``reduce_dtype``: ``MixedPrecisionPolicy``; ``cpu_offload``: ``CPUOffloadPolicy``."""

    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cpu_offload: bool = False
    block_classes: tuple[type, ...] = ()


@dataclass(frozen=True)
class TPOptions:
    """Tensor parallelism on a 2-D ("data_parallel", "tensor_parallel") mesh, as Lightning's
    ``ModelParallelStrategy`` builds it. How the model is parallelised, first that applies:

    - ``parallelize(model, mesh)``: a function doing it (torchtitan's ``parallelize_*``), given the 2-D mesh;
    - a LightningModule's own ``configure_model`` (it reads ``self.device_mesh``);
    - ``plan``: a ``parallelize_module`` plan ({module pattern: ParallelStyle}, or transformers' words such as
      "colwise"), applied on the tensor-parallel dimension;
    - the model's own plan (transformers' ``base_model_tp_plan`` and ``_tp_plan``).

    With a plan (given or the model's), FSDP2 shards each repeated block and the root over the data-parallel
    dimension when it has more than one rank (torchtitan's ``apply_fsdp``). ``None`` sizes are Lightning's
    "auto": tensor parallel across a node's devices, data parallel across nodes."""

    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    plan: Any = None
    parallelize: Any = None
    loss_parallel: bool = False
    """The loss and backward run under DTensor's ``loss_parallel()`` (the head's logits sharded over the
    vocabulary, torchtitan's ``train_context``)."""

    def sizes(self, world_size: int, num_nodes: int) -> tuple[int, int]:
        """(data-parallel, tensor-parallel) sizes for ``world_size`` ranks on ``num_nodes`` nodes, checked:
        their product must be the world size."""
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        for name, value in (("tensor_parallel_size", tp), ("data_parallel_size", dp)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        divisors = ", ".join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)
        if tp is None:
            tp = world_size // (dp or num_nodes) if world_size % (dp or num_nodes) == 0 else world_size
        if world_size % tp:
            raise InvalidArgumentError(f"tensor_parallel_size ({tp}) must divide the number of ranks ({world_size}); "
                                       f"divisors of {world_size}: {divisors}")
        dp = world_size // tp if dp is None else dp
        if dp * tp != world_size:
            raise InvalidArgumentError(f"data_parallel_size ({dp}) x tensor_parallel_size ({tp}) must equal the number "
                                       f"of ranks ({world_size})")
        return dp, tp


@dataclass(frozen=True)
class DeepSpeedOptions:
    """The ZeRO settings that change device memory (names as in DeepSpeed's ``zero_optimization`` config)."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket_size: int = LIGHTNING_DS_BUCKET
    allgather_bucket_size: int = LIGHTNING_DS_BUCKET
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    stage3_max_live_parameters: int = DS_DEFAULTS["stage3_max_live_parameters"]
    stage3_prefetch_bucket_size: int = DS_DEFAULTS["stage3_prefetch_bucket_size"]
    stage3_param_persistence_threshold: int = DS_DEFAULTS["stage3_param_persistence_threshold"]
    sub_group_size: int = DS_DEFAULTS["sub_group_size"]


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: its kind, the options that matter for memory, and the name to report."""

    kind: Kind
    name: str
    options: Any = None


STRATEGY_NAMES = strategies.names()
"""Every strategy name :func:`parse_strategy` and :func:`estimate_distributed` accept (memguard.strategies)."""


def parse_strategy(strategy: str | Strategy | Any) -> Strategy:
    """A Lightning strategy name or object (``DDPStrategy``, ``FSDPStrategy``, ``DeepSpeedStrategy``) as a
    :class:`Strategy`. Objects are read, never called: memguard only needs their settings."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        row = strategies.lookup(strategy)
        if row.kind is Kind.DDP:
            return Strategy(Kind.DDP, row.name, DDPOptions(find_unused_parameters=row.find_unused_parameters))
        if row.kind is Kind.FSDP:
            return Strategy(Kind.FSDP, row.name, FSDPOptions(cpu_offload=row.cpu_offload))
        if row.kind is Kind.FSDP2:
            return Strategy(Kind.FSDP2, row.name, FSDP2Options())
        if row.kind is Kind.TP:
            return Strategy(Kind.TP, row.name, TPOptions())
        if row.kind is Kind.DEEPSPEED:
            return Strategy(Kind.DEEPSPEED, row.name, DeepSpeedOptions(
                stage=row.stage, offload_optimizer=row.offload_optimizer, offload_parameters=row.offload_parameters))
        raise InvalidArgumentError(f"strategy {row.name!r} is not a data-parallel strategy; estimate_distributed() "
                                   "handles it itself (one process for one rank)")
    cls = type(strategy).__name__
    if cls == "DDPStrategy":
        return _from_ddp_strategy(strategy)
    if cls == "FSDPStrategy":
        return _from_fsdp_strategy(strategy)
    if cls == "ModelParallelStrategy":
        return Strategy(Kind.TP, cls, TPOptions(
            tensor_parallel_size=_auto(getattr(strategy, "_tensor_parallel_size", "auto"), "tensor_parallel_size"),
            data_parallel_size=_auto(getattr(strategy, "_data_parallel_size", "auto"), "data_parallel_size")))
    if cls == "DeepSpeedStrategy" or isinstance(getattr(strategy, "config", None), dict):
        return _from_deepspeed_config(getattr(strategy, "config", None) or {}, "deepspeed")
    raise InvalidArgumentError(
        f"strategy must be one of {', '.join(STRATEGY_NAMES)} or a Lightning DDPStrategy, FSDPStrategy, "
        f"ModelParallelStrategy or DeepSpeedStrategy; got {cls}"
    )


def _auto(value: Any, name: str) -> int | None:
    """A ``ModelParallelStrategy`` size: "auto" is None (decided from the devices and nodes)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return value


def _from_ddp_strategy(s: Any) -> Strategy:
    kw = dict(getattr(s, "_ddp_kwargs", {}) or {})
    opts = DDPOptions(
        gradient_as_bucket_view=bool(kw.get("gradient_as_bucket_view", False)),
        find_unused_parameters=bool(kw.get("find_unused_parameters", False)),
        static_graph=bool(kw.get("static_graph", False)),
        bucket_cap_mb=float(kw.get("bucket_cap_mb") or DDP_BUCKET_CAP_MB),
        broadcast_buffers=bool(kw.get("broadcast_buffers", True)),
    )
    return Strategy(Kind.DDP, "DDPStrategy", opts)


def _from_fsdp_strategy(s: Any) -> Strategy:
    kw = dict(getattr(s, "kwargs", {}) or {})
    sharding = getattr(s, "sharding_strategy", "FULL_SHARD")
    sharding = getattr(sharding, "name", str(sharding)).upper()
    offload = getattr(s, "cpu_offload", None)
    ac = getattr(s, "_activation_checkpointing_kwargs", {}) or {}
    mixed = getattr(s, "mixed_precision", None)  # else derived from ``precision=`` as FSDPPrecision does
    bp = kw.get("backward_prefetch", "BACKWARD_PRE")
    opts = FSDPOptions(
        sharding_strategy=sharding,
        auto_wrap_policy=kw.get("auto_wrap_policy"),
        mixed_precision=mixed,
        cpu_offload=bool(getattr(offload, "offload_params", offload) or False),
        activation_checkpointing=dict(ac) or None,
        use_orig_params=bool(kw.get("use_orig_params", True)),
        limit_all_gathers=bool(kw.get("limit_all_gathers", True)),
        forward_prefetch=bool(kw.get("forward_prefetch", False)),
        backward_prefetch=getattr(bp, "name", bp),
    )
    return Strategy(Kind.FSDP, "FSDPStrategy", opts)


def _from_deepspeed_config(config: dict, name: str) -> Strategy:
    zero = dict(config.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        value = zero.get(key)
        return isinstance(value, dict) and str(value.get("device", "none")).lower() not in ("none", "")

    def number(key: str, default: int) -> int:
        return int(float(zero.get(key, default)))

    opts = DeepSpeedOptions(
        stage=stage,
        offload_optimizer=offloaded("offload_optimizer"),
        offload_parameters=offloaded("offload_param"),
        reduce_bucket_size=number("reduce_bucket_size", 500_000_000),
        allgather_bucket_size=number("allgather_bucket_size", 500_000_000),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        stage3_max_live_parameters=number("stage3_max_live_parameters", DS_DEFAULTS["stage3_max_live_parameters"]),
        stage3_prefetch_bucket_size=number("stage3_prefetch_bucket_size", DS_DEFAULTS["stage3_prefetch_bucket_size"]),
        stage3_param_persistence_threshold=number("stage3_param_persistence_threshold",
                                                  DS_DEFAULTS["stage3_param_persistence_threshold"]),
        sub_group_size=number("sub_group_size", 1_000_000_000),
    )
    return Strategy(Kind.DEEPSPEED, f"{name} (stage {stage})", opts)


__all__ = ["DDP_BUCKET_CAP_MB", "DDP_FIRST_BUCKET_BYTES", "DS_DEFAULTS", "HALF_DTYPES", "LIGHTNING_DS_BUCKET",
           "STRATEGY_NAMES", "DDPOptions", "DeepSpeedOptions", "FSDP2Options", "FSDPOptions", "Kind", "Strategy",
           "TPOptions", "parse_strategy"]
