"""The Lightning strategy names memguard understands: one table, read by config validation and estimation.

A name is in :data:`TABLE` only if :mod:`memguard.estimation.distributed` can predict it, and each row says
what the estimation does with it: one process, replicated DDP-like ranks, FSDP, FSDP2, or DeepSpeed ZeRO at
a stage with or without offload. Validation (``trainer.strategy`` in a config) accepts exactly these names,
so a config that passes validation is one the estimate can run; a name Lightning knows but memguard cannot
predict (``dp``, ``deepspeed_stage_3_offload_nvme`` ...) is not here and is rejected.

Bottom layer: imports nothing from memguard but :mod:`memguard.errors`, and not torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memguard.errors import unknown_name


class Kind(str, Enum):
    """How the ranks of a data-parallel strategy hold the model."""

    DDP = "ddp"
    """DistributedDataParallel: full replica, gradients all-reduced in buckets."""
    FSDP = "fsdp"
    """FullyShardedDataParallel (FSDP1): flat parameters per wrapped unit, sharded across ranks."""
    FSDP2 = "fsdp2"
    """``torch.distributed.fsdp.fully_shard`` (FSDP2): per-parameter dim-0 shards as DTensors."""
    DEEPSPEED = "deepspeed"
    """DeepSpeed ZeRO stage 1, 2 or 3, optionally offloading optimizer and parameters."""
    TP = "tp"
    """Tensor parallelism (DTensor ``parallelize_module``) on a (data, tensor) mesh, FSDP2 on the data
    dimension: Lightning's ``ModelParallelStrategy``, torchtitan's 2-D parallelism."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StrategyName:
    """One row of the table: a Lightning strategy name and what it means for memory.

    ``kind`` is None for a one-process strategy; ``several`` is then the name it stands for on several
    devices (Lightning's "auto" picks DDP), or None where several devices are an error. The other fields
    are the name's settings: DDP's ``find_unused_parameters``, FSDP's ``cpu_offload``, DeepSpeed's ZeRO
    ``stage`` and what it offloads.
    """

    name: str
    kind: Kind | None
    description: str
    several: str | None = None
    find_unused_parameters: bool = False
    cpu_offload: bool = False
    stage: int | None = None
    offload_optimizer: bool = False
    offload_parameters: bool = False


def _ddp_rows() -> list[StrategyName]:
    """Lightning's registered DDP names (``pytorch_lightning.strategies.StrategyRegistry``): each launcher,
    alone and with ``find_unused_parameters`` set either way."""
    rows = []
    for launcher in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        how = "DDP" if launcher == "ddp" else f"DDP started by {launcher.partition('_')[2]}"
        rows.append(StrategyName(launcher, Kind.DDP, f"{how}: every rank holds a full replica"))
        for flag in ("false", "true"):
            rows.append(StrategyName(f"{launcher}_find_unused_parameters_{flag}", Kind.DDP,
                                     f"{how} with find_unused_parameters={flag.capitalize()}",
                                     find_unused_parameters=flag == "true"))
    return rows


TABLE: dict[str, StrategyName] = {row.name: row for row in [
    StrategyName("auto", None, "one process on one device; DDP on several, as Lightning chooses", several="ddp"),
    StrategyName("single_device", None, "one process on one device"),
    *_ddp_rows(),
    StrategyName("fsdp", Kind.FSDP, "FSDP (FullyShardedDataParallel), full sharding"),
    StrategyName("fsdp_cpu_offload", Kind.FSDP, "FSDP with parameters, gradients and optimizer state on the host",
                 cpu_offload=True),
    StrategyName("fsdp2", Kind.FSDP2, "FSDP2: fully_shard on each repeated block, then on the root"),
    StrategyName("model_parallel", Kind.TP, "ModelParallelStrategy: tensor parallel within a node (the model's "
                 "configure_model or tensor-parallel plan), FSDP2 across nodes"),
    StrategyName("tp", Kind.TP, "tensor parallel (the model's own tensor-parallel plan), FSDP2 on the data-parallel "
                 "dimension when there are more ranks than the tensor-parallel size"),
    StrategyName("deepspeed", Kind.DEEPSPEED, "DeepSpeed ZeRO stage 2 (DeepSpeedStrategy's default)", stage=2),
    StrategyName("deepspeed_stage_1", Kind.DEEPSPEED, "DeepSpeed ZeRO-1: optimizer state sharded", stage=1),
    StrategyName("deepspeed_stage_2", Kind.DEEPSPEED, "DeepSpeed ZeRO-2: gradients and optimizer state sharded",
                 stage=2),
    StrategyName("deepspeed_stage_2_offload", Kind.DEEPSPEED, "DeepSpeed ZeRO-2, optimizer offloaded to the host",
                 stage=2, offload_optimizer=True),
    StrategyName("deepspeed_stage_3", Kind.DEEPSPEED, "DeepSpeed ZeRO-3: parameters sharded too", stage=3),
    StrategyName("deepspeed_stage_3_offload", Kind.DEEPSPEED,
                 "DeepSpeed ZeRO-3, optimizer and parameters offloaded to the host",
                 stage=3, offload_optimizer=True, offload_parameters=True),
]}
"""Every strategy name memguard can predict, by name."""

CLASS_NAMES: dict[str, str] = {
    "DDPStrategy": "ddp",
    "FSDPStrategy": "fsdp",
    "DeepSpeedStrategy": "deepspeed",
    "ModelParallelStrategy": "model_parallel",
    "SingleDeviceStrategy": "single_device",
}
"""Lightning strategy classes memguard can predict, by class name, and the table name each stands for (an
object's own settings refine it: a ``DeepSpeedStrategy``'s stage and offload, a ``DDPStrategy``'s
keywords)."""


def names() -> list[str]:
    """Every name of the table, sorted."""
    return sorted(TABLE)


def find(name: str) -> StrategyName | None:
    """The row of ``name`` (case and surrounding spaces ignored), or None."""
    return TABLE.get(name.strip().lower()) if isinstance(name, str) else None


def lookup(name: str) -> StrategyName:
    """The row of ``name`` (case and surrounding spaces ignored); an unknown name raises
    :class:`~memguard.errors.InvalidArgumentError` naming the closest valid ones."""
    row = find(name)
    if row is None:
        raise unknown_name("strategy", str(name), TABLE)
    return row


def is_single_process(name: str) -> bool:
    """One process on one device ("auto", "single_device"); False for a name outside the table."""
    row = find(name)
    return row is not None and row.kind is None


def is_replicated(name: str) -> bool:
    """Every rank holds a full copy of the weights, gradients and optimizer state on several devices: the DDP
    names, and "auto" (which is DDP there); False for a name outside the table."""
    row = find(name)
    if row is not None and row.kind is None and row.several is not None:
        row = find(row.several)
    return row is not None and row.kind is Kind.DDP


def is_sharded(name: str) -> bool:
    """Some of the model's state is split across ranks (FSDP, FSDP2, DeepSpeed ZeRO, tensor parallel); False
    for a name outside the table."""
    row = find(name)
    return row is not None and row.kind in (Kind.FSDP, Kind.FSDP2, Kind.DEEPSPEED, Kind.TP)


def from_class_name(class_name: str) -> str | None:
    """The table name a Lightning strategy class stands for (a dotted ``class_path`` is read by its last
    part), or None for a class memguard cannot predict."""
    return CLASS_NAMES.get(class_name.rpartition(".")[2])


__all__ = ["CLASS_NAMES", "TABLE", "Kind", "StrategyName", "find", "from_class_name", "is_replicated",
           "is_sharded", "is_single_process", "lookup", "names"]
