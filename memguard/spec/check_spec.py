"""The result of loading a config: :class:`CheckSpec` (what ``memguard check`` checks) and the command-line
:class:`Options` that replace config values."""

from __future__ import annotations


from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memguard.plan import DEFAULT_MARGIN, TrainingConfig
from memguard.trace.compiled import CompileSpec


# ---------------------------------------------------------------------------------------------------------
# The result of loading


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters to add with peft before estimating (QLoRA when ``quantization`` is set too)."""

    r: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0


@dataclass
class CheckSpec:
    """Everything ``memguard check`` needs, validated.

    ``model_factory`` builds the model on the meta device (once; later calls return the same module, which
    memguard never modifies) and ``batch`` is the example batch on meta. ``training`` holds the knobs the
    planner may turn; ``optimizer`` / ``optimizer_kwargs`` are what :func:`memguard.estimate` gets for the
    configured optimizer (a catalog name, or a class memguard has no catalog entry for).
    """

    path: str
    kind: str
    """"native", "lightningcli" or "hf-config"."""
    model_label: str
    model_factory: Callable[[], nn.Module]
    batch: Any
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    training: TrainingConfig
    optimizer: str | type
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool | None = None
    zero_grad_before_backward: bool = True
    quantization: str | None = None
    lora: LoraSpec | None = None
    gpus: tuple[str, ...] = ()
    devices: int | None = 1
    """Devices per node; None when the config says "auto" (decided by the machine at run time)."""
    num_nodes: int = 1
    strategy: str = "auto"
    allow: tuple[str, ...] | None = None
    """Fallback knobs the planner may turn (None: all); an empty tuple forbids every change."""
    margin: float = DEFAULT_MARGIN
    fallback: bool = True
    notes: list[str] = field(default_factory=list)
    """What was assumed where the config was silent, and what the check cannot model."""
    compile: CompileSpec | None = None
    """torch.compile of the whole model (``compile:``); None: eager."""
    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    """A tensor-parallel strategy's mesh (None: Lightning's "auto", decided from devices and nodes)."""

    @property
    def world_size(self) -> int | None:
        return None if self.devices is None else self.devices * self.num_nodes


def _cached(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A zero-argument factory that builds once: the meta model is never modified, so one is enough."""
    box: list[nn.Module] = []

    def factory() -> nn.Module:
        if not box:
            box.append(build())
        return box[0]

    return factory


@dataclass(frozen=True)
class Options:
    """Command-line values that replace the config's (None: keep the config's)."""

    gpus: tuple[str, ...] = ()
    devices: int | None = None
    num_nodes: int | None = None
    allow: str | Sequence[str] | None = None
    """Knobs as a list or "precision,optimizer"; an empty string or list forbids every change."""
    margin: float | None = None
    fallback: bool | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    image_size: int | None = None
