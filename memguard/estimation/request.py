"""What an estimate is asked: every keyword of :func:`memguard.estimate`, typed, in one object.

The request travels unchanged from the public function to the single-process core and to every rank of
a distributed estimate (which replaces only the fields it decides, such as the shared device model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from memguard.precision import Precision
from memguard.trace.compiled import CompileSpec

if TYPE_CHECKING:
    from memguard.device.models import DeviceModel
    from memguard.trace import TraceCache


@dataclass(frozen=True)
class EstimateRequest:
    """The training settings of one estimate; :func:`memguard.estimate` documents each field."""

    loss_fn: Callable[[nn.Module, Any], Any] | None = None
    optimizer: str | type | Callable | None = "adamw"
    optimizer_kwargs: dict[str, Any] | None = None
    optimizer_impl: str | None = None
    precision: Precision = Precision.FP32_TRUE
    device: str | DeviceModel = "cuda"
    gpu: str | Any | None = None
    gradient_checkpointing: bool | None = None
    zero_grad_before_backward: bool = False
    steps: int = 2
    on_untraceable: str = "raise"
    quantization: str | None = None
    accumulate_grad_batches: int = 1
    optimizer_offload: bool = False
    prepare_model: Callable[[nn.Module], None] | None = None
    shared: tuple = ()
    strategy: Any = None
    world_size: int = 1
    num_nodes: int = 1
    trace_cache: TraceCache | None = None
    compile: CompileSpec | bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.compile is not None and self.compile is not False:
            object.__setattr__(self, "compile", CompileSpec.parse(self.compile))

    @property
    def distributed(self) -> bool:
        """Whether a strategy other than one process was asked for ("auto" on one rank is one process)."""
        one_process = isinstance(self.strategy, str) and self.strategy == "auto" and self.world_size == 1
        return self.strategy is not None and not one_process
