"""The memory categories every report speaks in.

One enum, so a breakdown computed by the tracer, the device model and the planner always uses the same
words, and the report can order them consistently.
"""

from __future__ import annotations

from enum import Enum


class Category(str, Enum):
    PARAMETERS = "parameters"
    """Model weights and buffers (BatchNorm statistics, registered constants). Alive for the whole run."""

    GRADIENTS = "gradients"
    """Storages that end up in a parameter's ``.grad``, counted from the moment backward creates them."""

    OPTIMIZER_STATE = "optimizer_state"
    """Tensors the optimizer keeps between steps (Adam moments, momentum buffers, 8-bit quantization maps)."""

    ACTIVATIONS = "activations"
    """Tensors created in the forward pass that are still alive when it ends: saved for backward, the
    loss, autocast's cached half-precision weight copies."""

    TEMPORARIES = "temporaries"
    """Everything else an operation allocates and soon frees: forward intermediates, gradients of
    activations, recomputed checkpoint segments, optimizer step scratch."""

    INPUTS = "inputs"
    """The example batch as it sits in memory before the step."""

    WORKSPACE = "workspace"
    """Scratch memory kernels allocate internally, invisible to PyTorch's dispatcher (oneDNN convolution
    scratchpads, cuBLAS / cuDNN workspaces)."""

    ALLOCATOR = "allocator"
    """Reserved minus allocated: memory the CUDA caching allocator holds in segments but not in tensors."""

    CONTEXT = "context"
    """The CUDA context, kernel images and library handles: device memory outside PyTorch's allocator."""

    OTHER = "other"
    """Anything memguard could not attribute to a category above."""

    def __str__(self) -> str:
        return self.value


#: The categories that make up allocated memory, in report order.
ALLOCATED_CATEGORIES = (
    Category.PARAMETERS,
    Category.GRADIENTS,
    Category.OPTIMIZER_STATE,
    Category.ACTIVATIONS,
    Category.TEMPORARIES,
    Category.INPUTS,
    Category.WORKSPACE,
    Category.OTHER,
)
