"""Device models: what a traced allocation sequence costs on a given device.

The tracer (trace.py) records device-neutral storage sizes in program order. A device model adds what
the device itself does on top:

- ``round_up``: how the device's allocator rounds each block (CUDA: 512 bytes; CPU: exact);
- ``op_memory``: memory kernels allocate that the dispatcher never sees (oneDNN convolution scratch and
  LSTM workspaces on the CPU, measured on this machine's real kernels; cuBLAS/cuDNN workspaces on CUDA);
- ``kernel_mode``: CUDA kernels whose memory differs from the CPU kernels the fake trace runs (fused
  dropout keeps a 1-byte mask, flash attention saves only a log-sum-exp) and CUDA autocast's op lists
  (softmax and layer_norm in float32), swapped in while tracing;
- ``optimizer_impl``: which implementation torch optimizers default to there (for-loop on CPU,
  foreach on CUDA).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from memguard.device.allocator import AllocatorConfig, simulate
from memguard.errors import InvalidArgumentError, unknown_name
from memguard.device.catalog import CatalogGPU, lookup
from memguard.quiet import quiet
from memguard.device.cuda_kernels import _CudaKernels

CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every block up to a multiple of 512 bytes."""


@dataclass(frozen=True)
class OpMemory:
    """What a kernel really allocates beyond what its fake outputs show."""

    transient: int = 0
    """Peak scratch bytes the kernel holds on top of its outputs, freed when it returns."""
    output_bytes: tuple[int | None, ...] = ()
    """Real storage size of each tensor output where the fake kernel reports another (None: keep)."""
    persistent: int = 0
    """Bytes the kernel's library allocates once and keeps (cuBLAS workspace of a new handle)."""


NO_EXTRA = OpMemory()


class DeviceModel:
    """Base device model: exact bytes, no hidden kernel memory, no kernel substitutions."""

    name = "generic"
    optimizer_impl = "foreach"
    host_is_device = True
    """Whether host (CPU) tensors are the target device's memory: True for the CPU target; on a GPU they
    are host memory (torch's optimizer step counters, the CPU generator state kept by checkpointing)."""

    def round_up(self, nbytes: int) -> int:
        return nbytes

    def op_memory(self, func: Any, args: tuple, kwargs: dict, outputs: list) -> OpMemory:
        return NO_EXTRA

    def kernel_mode(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def fresh(self) -> DeviceModel:
        """A copy ready for a new trace (per-trace state reset, measurement caches shared)."""
        return self

    def reserved(self, sizes: list[int], events: list[int], peak: int) -> int:
        """Bytes the allocator holds at its high-water mark (no cache: exactly the allocated peak)."""
        return peak

    def context_bytes(self) -> int:
        """Device memory outside the tensor allocator (the CUDA context); none on the CPU."""
        return 0

    def notes(self) -> list[str]:
        return []

    def state(self) -> Any:
        """What tracing taught this model that later operators depend on, for a replayed trace to restore
        (see trace.TraceCache)."""
        return None

    def restore(self, state: Any) -> None:
        """Take back a :meth:`state` captured after the same program segment in another trace."""


# ---------------------------------------------------------------------------------------------------------
# CPU: probe the real kernels of this machine


def _real_like(x: Any, resized: WeakIdKeyDictionary | None = None) -> Any:
    """A real zero-filled CPU tensor shaped like fake ``x`` (with its real size where a probe found one)."""
    if not isinstance(x, torch.Tensor):
        return x
    real_bytes = resized.get(x.untyped_storage()) if resized is not None else None
    if real_bytes is not None and x.dim() == 1:
        return torch.zeros(real_bytes // x.element_size(), dtype=x.dtype)
    return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="cpu").zero_()


def _signature(func: Any, args: tuple, kwargs: dict) -> tuple:
    def key(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
        return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype)) else repr(x)

    flat, spec = tree_flatten((args, kwargs))
    return (str(func), str(spec), tuple(key(x) for x in flat))


def start_profiler_here() -> None:
    """Use torch's profiler once on the calling thread. Kineto registers its client on the first thread
    that profiles and prints an error (from C++, to the terminal) when a later profile starts on another;
    memguard traces distributed steps on a thread of its own, where the CPU kernel probes profile."""
    from torch.autograd.profiler import profile

    with quiet(native_output=True), profile(profile_memory=True, use_cpu=True):
        torch.empty(1)


def _allocator_events(prof: Any) -> list[tuple[int, int, int]]:
    out = []
    stack = list(prof.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        fields = ev.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            out.append((ev.start_time_ns, fields.alloc_size, fields.total_allocated))
    out.sort()
    return out


# Kernels seen keeping scratch the dispatcher cannot see, in any precision: oneDNN convolutions and LSTMs
# reorder into blocked layouts or keep workspaces; attention, normalization, softmax and embedding
# backward kernels keep per-thread accumulation buffers.
_ALWAYS_PROBED = {
    "aten.convolution.default", "aten.convolution_backward.default",
    "aten.mkldnn_rnn_layer.default", "aten.mkldnn_rnn_layer_backward.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
    "aten.native_layer_norm.default", "aten.native_layer_norm_backward.default",
    "aten.native_batch_norm.default", "aten.native_batch_norm_backward.default",
    "aten._native_batch_norm_legit.default", "aten._native_batch_norm_legit_functional.default",
    "aten.native_group_norm.default", "aten.native_group_norm_backward.default",
    "aten._fused_rms_norm.default", "aten._fused_rms_norm_backward.default",
    "aten._safe_softmax.default", "aten._softmax.default", "aten._log_softmax.default",
    "aten._softmax_backward_data.default", "aten._log_softmax_backward_data.default",
    "aten.embedding_dense_backward.default", "aten.nll_loss_forward.default", "aten.nll_loss_backward.default",
}
_HALF = (torch.bfloat16, torch.float16)


_MATMULS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "addbmm"))
"""The operators that run through cuBLAS (compared by identity: this check runs on every traced op)."""


_OPERANDS = {"addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}
"""Which arguments are the multiplied matrices (the rest: mm, bmm, _scaled_mm take them first)."""


def _gemm_ready(x: torch.Tensor) -> bool:
    """Whether BLAS reads this matrix (its last two dimensions) as it is: row-major (strides (ld, 1)) or
    column-major ((1, ld)) with the leading dimension at least the row length. Anything else, a gradient
    broadcast from a scalar (strides 0) above all, is cloned contiguous first (addmm_impl_cpu_ on the CPU,
    prepare_matrix_for_cublas on CUDA)."""
    rows, cols = x.shape[-2], x.shape[-1]
    stride_r, stride_c = x.stride(-2), x.stride(-1)
    return (stride_c == 1 and stride_r >= max(1, cols)) or (stride_r == 1 and stride_c >= max(1, rows))


def gemm_copy_bytes(func: Any, args: tuple) -> int:
    """Bytes a matrix product copies because BLAS cannot read an operand as it is (see _gemm_ready)."""
    if func not in _MATMULS:
        return 0
    first, second = _OPERANDS.get(func.overloadpacket.__name__, (0, 1))
    operands = [args[i] for i in (first, second) if i < len(args) and isinstance(args[i], torch.Tensor)]
    return sum(x.numel() * x.element_size() for x in operands if x.dim() >= 2 and not _gemm_ready(x))


def _may_hide_memory(func: Any, args: tuple, kwargs: dict, outputs: list) -> bool:
    """Kernels that may allocate scratch the dispatcher cannot see: oneDNN ones, and any kernel that
    computes in half precision (it converts to float32 internally). Views and in-place ops never do."""
    name = str(func)
    if name in _ALWAYS_PROBED or gemm_copy_bytes(func, args):
        return True
    if getattr(func, "is_view", False) or name.endswith("_.Tensor") or name.endswith("_.Scalar"):
        return False
    if not name.startswith("aten.") or not outputs:
        return False
    inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    if not any(x.dtype in _HALF for x in inputs):
        return False
    ins = {id(x.untyped_storage()) for x in inputs}
    return not any(isinstance(o, torch.Tensor) and id(o.untyped_storage()) in ins for o in outputs)


@dataclass
class CPUDevice(DeviceModel):
    """The CPU of this machine. Hidden kernel memory is measured by running the real kernel once per
    distinct shape (cached), because oneDNN picks formats and scratch sizes per CPU instruction set.

    ``probe_limit`` caps the bytes a probe may allocate; above it memguard falls back to a conservative
    rule (scratch as large as the op's inputs plus outputs) and says so in the notes.
    """

    probe_limit: int = 1 << 30
    name: str = "cpu"
    optimizer_impl: str = "for-loop"
    _cache: dict = field(default_factory=dict)
    _notes: list = field(default_factory=list)
    _resized: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)

    def fresh(self) -> CPUDevice:
        return replace(self, _notes=[], _resized=WeakIdKeyDictionary())

    def op_memory(self, func: Any, args: tuple, kwargs: dict, outputs: list) -> OpMemory:
        if not _may_hide_memory(func, args, kwargs, outputs):
            return NO_EXTRA
        key = _signature(func, args, kwargs)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._probe(func, args, kwargs, outputs)
        for out, real in zip(outputs, hit.output_bytes):
            if real is not None and isinstance(out, torch.Tensor):
                # a later kernel (the LSTM backward) reads this output: probe it with its real size
                self._resized[out.untyped_storage()] = real
        return hit

    def _probe(self, func: Any, args: tuple, kwargs: dict, outputs: list) -> OpMemory:
        flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        fake_out = sum(o.untyped_storage().nbytes() for o in outputs if isinstance(o, torch.Tensor))
        inputs = sum(x.untyped_storage().nbytes() for x in flat)
        need = inputs + 2 * fake_out  # the real inputs and outputs, and as much again for the kernel's scratch
        if need > self.probe_limit:
            self._notes.append(f"{func}: kernel scratch bounded by inputs + outputs (too large to probe)")
            return OpMemory(transient=inputs + fake_out)
        with _disable_current_modes(), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            rargs, rkwargs = tree_map(lambda x: _real_like(x, self._resized), (args, kwargs))
            try:
                from torch.autograd.profiler import profile

                # kineto prints profiler_start/profiler_stop lines to stderr from C++ for every profile
                with quiet(native_output=True), profile(profile_memory=True, use_cpu=True) as prof:
                    real = func(*rargs, **rkwargs)
                    real_flat = [o for o in tree_flatten(real)[0]]
            except RuntimeError as exc:  # profiler already running, or the kernel refuses the shapes
                self._notes.append(f"{func}: could not measure kernel scratch ({exc}); bounded instead")
                return OpMemory(transient=fake_out + sum(x.untyped_storage().nbytes() for x in flat))
            events = _allocator_events(prof)
        real_sizes = [o.untyped_storage().nbytes() if isinstance(o, torch.Tensor) else None for o in real_flat]
        real_out = sum(s for s in real_sizes if s is not None)
        if events:
            start = events[0][2] - events[0][1]
            peak = max(total for _, _, total in events) - start
        else:
            peak = real_out
        fake_sizes = [o.untyped_storage().nbytes() if isinstance(o, torch.Tensor) else None for o in outputs]
        resized = tuple(r if r != f else None for r, f in zip(real_sizes, fake_sizes))
        if all(r is None for r in resized):
            resized = ()
        return OpMemory(transient=max(0, peak - real_out), output_bytes=resized)

    def notes(self) -> list[str]:
        return list(dict.fromkeys(self._notes))

    def state(self) -> Any:
        return list(self._notes)

    def restore(self, state: Any) -> None:
        self._notes.extend(state)


# ---------------------------------------------------------------------------------------------------------
# CUDA: allocator rounding and library workspaces (the kernels CUDA runs instead of the CPU's:
# cuda_kernels.py)


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    """torch's default cuBLAS workspace per (handle, stream): CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8"
    (2 x 4 MiB + 8 x 16 KiB) before Hopper, 32 MiB from Hopper on (NVIDIA's recommendation for sm90)."""
    return 32 * 2**20 if compute_capability >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


@dataclass
class CUDADevice(DeviceModel):
    """A CUDA GPU as torch.cuda.max_memory_allocated sees it.

    The cuBLAS workspace is allocated through the caching allocator the first time a thread runs a
    matmul, so it counts in max_memory_allocated; the forward runs on the Python thread and the backward
    on autograd's device thread, each with its own cuBLAS handle and therefore its own workspace.
    """

    compute_capability: tuple[int, int] = (8, 0)
    attention: str = "flash"
    autocast_lists: bool = True
    """Trace mixed precision with CUDA autocast's op lists (False: CPU autocast's, which the trace runs)."""
    context: int = 400 * 2**20
    """CUDA context and kernel images outside the allocator (see memguard/device/catalog.py for the basis)."""
    alloc_conf: AllocatorConfig = field(default_factory=lambda: AllocatorConfig.parse(
        os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
    name: str = "cuda"
    optimizer_impl: str = "foreach"
    host_is_device: bool = False
    _workspaces: set = field(default_factory=set)

    @classmethod
    def for_gpu(cls, gpu: CatalogGPU, **overrides: Any) -> CUDADevice:
        """The device model of a catalog GPU: its kernels, cuBLAS workspace size and context."""
        attention = "flash" if "flash" in gpu.attention else "efficient" if "mem_efficient" in gpu.attention else "math"
        fields = dict(compute_capability=gpu.compute_capability, attention=attention, context=gpu.context_bytes,
                      name=f"cuda ({gpu.name})")
        fields.update(overrides)
        return cls(**fields)

    def fresh(self) -> CUDADevice:
        return replace(self, _workspaces=set())

    def reserved(self, sizes: list[int], events: list[int], peak: int) -> int:
        """Replay the allocations through the caching allocator model: its peak of reserved segments."""
        return max(peak, simulate(sizes, events, self.alloc_conf).peak_reserved)

    def context_bytes(self) -> int:
        return self.context

    def state(self) -> Any:
        return frozenset(self._workspaces)

    def restore(self, state: Any) -> None:
        self._workspaces |= state

    def round_up(self, nbytes: int) -> int:
        return 0 if nbytes == 0 else -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK

    def kernel_mode(self) -> contextlib.AbstractContextManager:
        return _CudaKernels(self.attention, self.autocast_lists)

    def op_memory(self, func: Any, args: tuple, kwargs: dict, outputs: list) -> OpMemory:
        if func not in _MATMULS:
            return NO_EXTRA
        copies = gemm_copy_bytes(func, args)  # freed when the kernel returns
        thread = "backward" if torch._C._current_autograd_node() is not None else "forward"
        if thread in self._workspaces:
            return OpMemory(transient=copies) if copies else NO_EXTRA
        self._workspaces.add(thread)
        return OpMemory(transient=copies, persistent=cublas_workspace_bytes(self.compute_capability))


def device_model(device: str | torch.device | DeviceModel, gpu: str | CatalogGPU | None = None) -> DeviceModel:
    """The device model for a target device name (and, for CUDA, a catalog GPU name)."""
    if isinstance(device, DeviceModel):
        return device
    if gpu is not None:
        if str(device).split(":")[0] != "cuda":
            raise InvalidArgumentError(f"gpu={gpu!r} needs device='cuda', got device={device!r}")
        return CUDADevice.for_gpu(gpu if isinstance(gpu, CatalogGPU) else lookup(gpu))
    try:
        kind = torch.device(device).type if not isinstance(device, str) or ":" in device or device in (
            "cpu", "cuda") else device
    except (RuntimeError, TypeError) as exc:  # torch's own message lists every device type it was built with
        raise unknown_name("device", str(device), ["cpu", "cuda"]) from exc
    if kind == "cpu":
        return CPUDevice()
    if kind == "cuda":
        return CUDADevice()
    raise unknown_name("device", str(device), ["cpu", "cuda"])


Workspace = Callable[[Any, tuple, dict, list], OpMemory]
