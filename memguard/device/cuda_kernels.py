"""The kernels CUDA runs where they differ from the CPU's in what they allocate, swapped in while memguard
traces for a CUDA target: fused dropout, flash / memory-efficient attention, CUDA autocast's op lists
(softmax, normalization, ``exp`` / ``log`` / ``pow``, reductions in float32 from half-precision inputs),
cross-entropy, interpolation and grid sampling. Patches are process-wide and reference-counted, so nested
and concurrent traces share one installation."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F



_active = threading.local()


class _CudaKernels:
    """Swap CPU code paths for calls whose memory matches what CUDA runs, while tracing.

    - dropout: CUDA runs the fused ``native_dropout`` (1-byte mask saved for backward); the CPU path
      multiplies by a full-precision noise tensor.
    - scaled_dot_product_attention: on CUDA flash / memory-efficient attention save the output and a
      float32 log-sum-exp, never the L x L score matrix, also with dropout; the CPU falls back to the math
      path whenever dropout is on. ``attention`` selects the CUDA kernel family ("flash",
      "efficient" or "math"). A trainable mask takes the memory-efficient kernel, the fused one that
      returns its gradient.
    - autocast: the trace stands CPU autocast in for CUDA autocast, but the two have different op lists.
      With ``autocast_lists`` the ops whose CUDA policy differs follow CUDA's (see ``_autocast_swaps``):
      softmax, layer_norm and friends produce float32 from half-precision inputs, as on the GPU.

    The functions are swapped on ``torch.nn.functional`` (and, where models call them as tensor methods or
    ``torch.*`` functions, there too) rather than through a TorchFunctionMode because torch.utils.checkpoint
    recomputes the forward during backward with function modes disabled, and the recomputation must take
    the same path. The swap is active only on the tracing thread; other threads get the originals.
    """

    def __init__(self, attention: str = "flash", autocast_lists: bool = True) -> None:
        self.attention = attention
        self.autocast_lists = autocast_lists

    def __enter__(self) -> _CudaKernels:
        global _users
        with _patch_lock:
            if _users == 0:
                try:
                    _install()
                except BaseException:
                    _uninstall()
                    raise
            _users += 1
            _active.kernels = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _users
        with _patch_lock:
            _active.kernels = None
            _users -= 1
            if _users == 0:
                _uninstall()


_patch_lock = threading.Lock()
_users = 0
"""Traces running with the swap installed, on any thread: the last one out restores the originals."""
_installed: list[tuple[Any, str, Any]] = []
"""(owner, name, what the owner itself held under that name or _INHERITED) for each swapped function."""
_INHERITED = object()


def _install() -> None:
    for owner, name, make in _swaps():
        if not hasattr(owner, name):  # an op this torch does not have
            continue
        own = vars(owner).get(name, _INHERITED)
        _installed.append((owner, name, own))
        setattr(owner, name, make(getattr(owner, name)))


def _uninstall() -> None:
    while _installed:
        owner, name, own = _installed.pop()
        if own is _INHERITED:
            delattr(owner, name)  # a tensor method TensorBase defines: drop the shadowing wrapper
        else:
            setattr(owner, name, own)


def _kernels() -> _CudaKernels | None:
    return getattr(_active, "kernels", None)


def _make_dropout(original: Callable) -> Callable:
    def dropout(input, p=0.5, training=True, inplace=False):  # noqa: ANN001, ANN202, A002
        if _kernels() is None or not training or p == 0.0 or not input.is_floating_point():
            return original(input, p, training, inplace)
        return torch.ops.aten.native_dropout.default(input, p, True)[0]

    return dropout


def _make_sdpa(original: Callable) -> Callable:
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,  # noqa: ANN001, ANN202
                                     scale=None, enable_gqa=False):
        kernels = _kernels()
        if kernels is None or kernels.attention == "math":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        guard = contextlib.nullcontext()
        if torch.is_autocast_enabled("cpu"):
            # scaled_dot_product_attention is on both autocast lists (inputs, mask included, cast to the
            # autocast dtype); the aten kernels standing in for CUDA's are on neither, so cast here.
            low = torch.get_autocast_dtype("cpu")
            query, key, value, attn_mask = (
                x.to(low) if x is not None and x.is_floating_point() and x.dtype != torch.float64 else x
                for x in (query, key, value, attn_mask))
            guard = _without_cpu_autocast()
        with guard:
            if enable_gqa and key.shape[-3] != query.shape[-3]:
                rep = query.shape[-3] // key.shape[-3]
                key = key.repeat_interleave(rep, dim=-3)
                value = value.repeat_interleave(rep, dim=-3)
            if (attn_mask is not None and attn_mask.requires_grad and attn_mask.is_floating_point()
                    and torch.is_grad_enabled()):
                return _efficient_attention_with_bias(query, key, value, attn_mask, dropout_p, is_causal, scale)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
                query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
            )[0]

    return scaled_dot_product_attention


_MEM_EFFICIENT_ALIGNMENT = 8
"""The memory-efficient kernel reads its bias with every stride but the last a multiple of 8 elements."""


def _efficient_attention_with_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   bias: torch.Tensor, dropout_p: float, is_causal: bool,
                                   scale: float | None) -> torch.Tensor:
    """A trainable additive mask (T5-style position bias) on CUDA: flash attention takes no mask, so
    torch picks the memory-efficient kernel, the one fused kernel that returns the mask's gradient. As
    torch's dispatcher does before calling it, a misaligned mask is padded (a copy the kernel keeps for
    backward) and broadcast to (batch, heads, L, S); the kernel's backward then allocates that full
    gradient, last dimension aligned to 16, which autograd sums back to the mask's shape."""
    aligned = bias.stride(-1) == 1 and all(s % _MEM_EFFICIENT_ALIGNMENT == 0 for s in bias.stride()[:-1])
    if not aligned:
        last = bias.shape[-1]
        bias = F.pad(bias, (0, _MEM_EFFICIENT_ALIGNMENT - last % _MEM_EFFICIENT_ALIGNMENT))[..., :last]
    bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention.default(
        query, key, value, bias, True, dropout_p, is_causal, scale=scale
    )[0]


# ---------------------------------------------------------------------------------------------------------
# CUDA's autocast op lists (torch/csrc autocast_mode: the "fp32" and "fp32_set_opt_dtype" policies)

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _follows_cuda_autocast() -> bool:
    """Whether this call is traced for a CUDA target inside an autocast region."""
    kernels = _kernels()
    return kernels is not None and kernels.autocast_lists and torch.is_autocast_enabled("cpu")


def _without_cpu_autocast() -> contextlib.AbstractContextManager:
    """What CUDA's autocast wrappers do around the op they wrap: nothing inside is autocast again (and
    ``torch.is_autocast_enabled`` reads False there, so nested swapped functions pass straight through)."""
    return torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU)


def _to_fp32(x: Any) -> Any:
    """CUDA autocast's cast for its float32 list: every floating tensor but float32 / float64."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
        return x.to(torch.float32)
    return x


def _fp32_policy(original: Callable) -> Callable:
    """CUDA's "fp32" policy: the op runs on float32 copies of its half-precision inputs."""

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        if "out" in kwargs or not _follows_cuda_autocast():
            return original(*args, **kwargs)
        with _without_cpu_autocast():
            return original(*(_to_fp32(a) for a in args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    return run


def _fp32_dtype_policy(original: Callable, dtype_at: int | None = None,
                       half_to_float: Callable | None = None) -> Callable:
    """CUDA's "fp32_set_opt_dtype" policy (softmax, sum, cumsum...): when the caller gives no ``dtype``
    and the first input is a floating tensor, the op runs with ``dtype=torch.float32``: the output is
    float32 without a float32 copy of the input. ``dtype_at`` is where ``dtype`` may come positionally."""

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        given = kwargs.get("dtype") is not None or (dtype_at is not None and len(args) > dtype_at
                                                     and args[dtype_at] is not None)
        first = args[0] if args else kwargs.get("input")
        if (given or "out" in kwargs or not isinstance(first, torch.Tensor) or not first.is_floating_point()
                or first.dtype == torch.float64 or not _follows_cuda_autocast()):
            return original(*args, **kwargs)
        if dtype_at is not None:
            args = args[:dtype_at]
        with _without_cpu_autocast():
            if half_to_float is not None:
                return _softmax_kernel(original, half_to_float, args, kwargs)
            return original(*args, **{**kwargs, "dtype": torch.float32})

    return run


def _softmax_kernel(original: Callable, half_to_float: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """softmax / log_softmax asked for float32 output: for a float16 input CUDA's kernel writes float32
    directly (``half_to_float``; its backward returns float16), where the CPU path first copies the input
    to float32."""
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if x.dtype == torch.float16 and isinstance(dim, int) and set(kwargs) <= {"input", "dim", "dtype"}:
        return half_to_float(x, dim, True)
    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    return original(*args, **kwargs, dtype=torch.float32)


def _make_softmax(half_to_float: Callable) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        autocast = _fp32_dtype_policy(original, dtype_at=2, half_to_float=half_to_float)

        @functools.wraps(original)
        def run(*args: Any, **kwargs: Any) -> Any:
            # float16 in, float32 asked for: CUDA's kernel, with or without autocast
            dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
            if dtype == torch.float32 and _kernels() is not None and args and isinstance(args[0], torch.Tensor):
                return _softmax_kernel(original, half_to_float, args[:2], {k: v for k, v in kwargs.items()})
            return autocast(*args, **kwargs)

        return run

    return make


def _without_cpu_autocast_policy(original: Callable) -> Callable:
    """Ops CPU autocast runs in float32 and CUDA autocast leaves alone (reflection / replication padding,
    3-d pooling): they keep their input dtype, as on the GPU."""

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not _follows_cuda_autocast():
            return original(*args, **kwargs)
        with _without_cpu_autocast():
            return original(*args, **kwargs)

    return run


def _make_interpolate(original: Callable) -> Callable:
    @functools.wraps(original)
    def interpolate(input, size=None, scale_factor=None, mode="nearest", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202, A002
        if not _follows_cuda_autocast():
            return original(input, size, scale_factor, mode, *args, **kwargs)
        with _without_cpu_autocast():
            # every upsampling kernel is on CUDA's float32 list; "area" is adaptive average pooling, on none
            return original(input if mode == "area" else _to_fp32(input), size, scale_factor, mode, *args, **kwargs)

    return interpolate


def _make_grid_sample(original: Callable) -> Callable:
    @functools.wraps(original)
    def grid_sample(input, grid, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202, A002
        if not _follows_cuda_autocast() or not (input.is_floating_point() and grid.is_floating_point()):
            return original(input, grid, *args, **kwargs)
        # CUDA's "promote" policy (CPU runs grid_sampler in float32): both in the wider of the two dtypes
        wide = torch.promote_types(input.dtype, grid.dtype)
        with _without_cpu_autocast():
            return original(input.to(wide), grid.to(wide), *args, **kwargs)

    return grid_sample


def _make_cross_entropy(original: Callable) -> Callable:
    @functools.wraps(original)
    def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,  # noqa: ANN001, ANN202, A002
                      reduction="mean", label_smoothing=0.0):
        call = functools.partial(original, input, target, weight, size_average, ignore_index, reduce, reduction,
                                 label_smoothing)
        if (not _follows_cuda_autocast() or not isinstance(input, torch.Tensor) or not input.is_floating_point()
                or input.dtype in (torch.float32, torch.float64) or input.numel() == 0
                or size_average is not None or reduce is not None):
            return call()
        return _cuda_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, call)

    return cross_entropy


def _cuda_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                        reduction: str, label_smoothing: float, fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """cross_entropy under CUDA autocast. CPU autocast lists ``cross_entropy_loss`` itself (a float32 copy
    of the logits, then log_softmax in float32); CUDA does not, so torch's composite runs: log_softmax in
    the logits' dtype (the dtype is given explicitly, so autocast keeps it), then nll_loss, on CUDA's
    float32 list, on a float32 copy of the log-probabilities that it keeps for backward. The branches
    follow aten's cross_entropy_loss; the label-smoothed one with class weights falls back."""
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    soft = input.shape == target.shape
    if (soft and not target.is_floating_point()) or (label_smoothing > 0 and not soft and weight is not None):
        return fallback()
    logp = torch.log_softmax(input, class_dim, dtype=input.dtype)
    if soft:
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / n_classes
        prod = logp * target
        if weight is not None:
            shape = [1] * input.dim()
            shape[class_dim] = n_classes
            prod = prod * (weight.view(shape) if input.dim() > 1 else weight)
        if reduction == "mean":
            return -prod.sum() / (input.numel() // n_classes)
        return -prod.sum() if reduction == "sum" else -prod.sum(class_dim)
    nll = F.nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)
    if label_smoothing <= 0:
        return nll
    smooth = -logp.sum(class_dim)
    ignored = target == ignore_index
    smooth.masked_fill_(ignored, 0.0)
    if reduction == "mean":
        kept = (~ignored).sum()
        smooth = smooth.sum() / kept
    elif reduction == "sum":
        smooth = smooth.sum()
    return (1 - label_smoothing) * nll + smooth * (label_smoothing / n_classes)


_FP32_OPS = ("exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "cosh", "tan", "acos",
             "asin", "erfinv", "pow", "logsumexp", "dist", "renorm")
"""On CUDA's float32 list, called as ``torch.*`` functions and tensor methods alike."""
_FP32_DTYPE_OPS = ("sum", "prod", "cumsum", "cumprod")
"""CUDA's fp32_set_opt_dtype list beyond softmax (prod: CPU autocast casts the input to float32 instead)."""


def _autocast_swaps() -> list[tuple[Any, str, Callable[[Callable], Callable]]]:
    """The ops whose CUDA autocast policy differs from CPU autocast's in the way they allocate. Ops both
    lists treat alike (the matmuls and convolutions, the losses but cross_entropy, cdist) are left alone.
    Not modelled: aliases (arccos...), the lower-precision CUDA ops CPU autocast skips (mv, addmv, addr,
    dot, the RNN cells), and ops a model reaches through ``torch._VF``."""
    T = torch.Tensor
    swaps: list[tuple[Any, str, Callable[[Callable], Callable]]] = []
    for name in _FP32_OPS:
        swaps += [(torch, name, _fp32_policy), (T, name, _fp32_policy)]
    swaps.append((T, "__pow__", _fp32_policy))  # ``x ** 2`` calls TensorBase.pow directly; ``2 ** x`` calls torch.pow
    for name in ("layer_norm", "group_norm", "rms_norm", "cosine_similarity", "pdist"):
        swaps.append((torch, name, _fp32_policy))  # torch.nn.functional calls these torch.* functions
    for name in ("softplus", "cosine_similarity", "pdist"):
        swaps.append((F, name, _fp32_policy))  # builtins bound into torch.nn.functional
    for name in _FP32_DTYPE_OPS:
        swaps += [(torch, name, _fp32_dtype_policy), (T, name, _fp32_dtype_policy)]
    for name in ("vector_norm", "matrix_norm"):  # torch.norm, Tensor.norm and F.normalize call these
        swaps.append((torch.linalg, name, _fp32_dtype_policy))
    for name, half_to_float in (("softmax", torch._softmax), ("log_softmax", torch._log_softmax)):
        swaps += [(torch, name, _make_softmax(half_to_float)), (T, name, _make_softmax(half_to_float))]
    for name in ("pad", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d"):
        swaps.append((F, name, _without_cpu_autocast_policy))
    swaps += [(F, "interpolate", _make_interpolate), (F, "grid_sample", _make_grid_sample),
              (F, "cross_entropy", _make_cross_entropy)]
    return swaps


def _swaps() -> list[tuple[Any, str, Callable[[Callable], Callable]]]:
    return [(F, "dropout", _make_dropout), (F, "scaled_dot_product_attention", _make_sdpa)] + _autocast_swaps()
