"""Quantized base weights (bitsandbytes nf4 / fp4 / int8), as QLoRA and Lightning's BitsandbytesPrecision
use them, in a form the tracer can run.

bitsandbytes kernels cannot run on fake or meta tensors, so inside the trace each quantized linear layer
is a stand-in that holds exactly the storages bitsandbytes keeps (packed weights, absmax statistics,
codebooks) and allocates what its autograd function allocates: the weight dequantized to the compute dtype
for the matmul, freed right after, in forward and again in backward. What the 4-bit matmul keeps for
backward follows the installed bitsandbytes: the packed weight only from 0.43.3 on; before, the layer's
input as well (MatMul4Bit ``ctx.tensors = (A, B)``, removed by bitsandbytes PR #1270). Nothing here imports
bitsandbytes: its version comes from the package metadata, and existing bitsandbytes layers are recognised
by class name.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from memguard.errors import unknown_name

BLOCKSIZE_4BIT = 64
"""bitsandbytes' default blocksize for nf4 / fp4 weights (Linear4bit, Params4bit)."""
NESTED_BLOCKSIZE = 256
"""Double quantization (``compress_statistics``) quantizes the absmax values in blocks of 256."""


@dataclass(frozen=True)
class QuantScheme:
    """How the base weights are stored: ``kind`` "nf4", "fp4" or "int8"; ``double_quant`` stores the 4-bit
    absmax values in 8 bits (QLoRA's "double quantization", Lightning's "nf4-dq")."""

    kind: str
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def parse(cls, text: str, compute_dtype: torch.dtype = torch.bfloat16) -> QuantScheme:
        """Lightning's BitsandbytesPrecision modes: "nf4", "nf4-dq", "fp4", "fp4-dq", "int8"."""
        key = text.strip().lower()
        valid = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
        if key not in valid:
            raise unknown_name("quantization", text, valid)
        return cls(key.split("-")[0], key.endswith("-dq"), compute_dtype)

    def storage_bytes(self, out_features: int, in_features: int) -> list[int]:
        """Bytes of each tensor the quantized weight keeps, as bitsandbytes allocates them."""
        numel = out_features * in_features
        if self.kind == "int8":
            return [numel, out_features * 4]  # int8 weight, float32 row scales (SCB)
        blocks = math.ceil(numel / BLOCKSIZE_4BIT)
        sizes = [math.ceil(numel / 2)]  # two 4-bit values per byte
        if self.double_quant:
            sizes += [blocks, math.ceil(blocks / NESTED_BLOCKSIZE) * 4, 256 * 4, 4]  # uint8 absmax, absmax2, code, offset
        else:
            sizes += [blocks * 4]
        sizes.append(16 * 4)  # the 16-entry nf4 / fp4 codebook
        return sizes


KEEPS_INPUT_BEFORE = (0, 43, 3)
"""bitsandbytes releases before this one keep each 4-bit matmul's input for backward."""


@functools.lru_cache(maxsize=1)
def bnb_keeps_input() -> bool:
    """Whether the installed bitsandbytes keeps a 4-bit layer's input for backward (False when it is not
    installed: memguard then models the current releases)."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    return parts < KEEPS_INPUT_BEFORE


class _DequantMatmul(torch.autograd.Function):
    """The memory behaviour of bitsandbytes' MatMul4Bit / MatMul8bitLt with a frozen weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int],  # noqa: ANN001, ANN205
                keep_input: bool = False):
        weight = torch.empty(shape, dtype=x.dtype, device=x.device)  # dequantized copy, freed on return
        out = nn.functional.linear(x, weight, bias)
        ctx.shape = shape
        if keep_input:
            ctx.save_for_backward(x, packed)
        else:
            ctx.save_for_backward(packed)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        weight = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ weight, None, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen quantized linear layer for tracing: bitsandbytes' storages and its matmul's temporaries."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        sizes = scheme.storage_bytes(out_features, in_features)
        self.packed = nn.Parameter(torch.empty(sizes[0], dtype=torch.uint8, device=device), requires_grad=False)
        for i, n in enumerate(sizes[1:]):
            self.register_buffer(f"quant_state_{i}", torch.empty(n, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=scheme.compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scheme.compute_dtype) if x.is_floating_point() else x
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        keep = self.scheme.kind != "int8" and bnb_keeps_input()
        return _DequantMatmul.apply(x, self.packed, bias, (self.out_features, self.in_features), keep)


def quantize_linears(model: nn.Module, scheme: QuantScheme, skip: tuple[str, ...] = (),
                     ignore_modules: Collection[str] = ()) -> int:
    """Replace linear layers by :class:`QuantizedLinear`, in place, the way Lightning's BitsandbytesPrecision
    converts a model (``_convert_layers``): every ``nn.Linear``, subclasses and the output head included;
    returns how many were replaced.

    ``ignore_modules`` are qualified-name prefixes whose linear layers stay as they are, as Lightning's
    argument of that name (``{"lm_head"}``, ``{"transformer.h.0"}``); ``skip`` leaves layers of these attribute
    names alone wherever they sit. A model that already holds bitsandbytes layers is left as it is, as
    Lightning leaves it. When some linear layers are frozen and others train, only the frozen ones are
    quantized: the trainable ones are adapters (PEFT's LoRA layers are linear layers), and a quantized layer
    cannot train. Lightning quantizes before LoRA freezes the base, so its models reach memguard with every
    linear layer frozen and the two rules agree.
    """
    if any(isinstance(m, QuantizedLinear) or bnb_layer_scheme(m) is not None for m in model.modules()):
        return 0
    linears = list(_linears(model, tuple(ignore_modules), skip))
    frozen = [item for item in linears if not item[2].weight.requires_grad]
    chosen = frozen if frozen else linears
    for parent, name, child in chosen:
        setattr(parent, name, _stand_in(child, scheme))
    return len(chosen)


def _linears(module: nn.Module, ignore: tuple[str, ...], skip: tuple[str, ...],
             prefix: str = "") -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for each linear layer Lightning's ``_convert_layers`` would replace."""
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Linear) and name not in skip and not qualified.startswith(ignore):
            yield module, name, child
        else:
            yield from _linears(child, ignore, skip, qualified)


def _stand_in(linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
    return QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                           device=linear.weight.device)


_LIGHTNING_4BIT = {"_NF4Linear": ("nf4", False), "_NF4DQLinear": ("nf4", True), "_FP4Linear": ("fp4", False),
                   "_FP4DQLinear": ("fp4", True)}
"""The layer classes Lightning's BitsandbytesPrecision converts to, per mode (subclasses of Linear4bit)."""


def bnb_layer_scheme(module: nn.Module) -> QuantScheme | None:
    """The scheme of an existing bitsandbytes layer (Linear4bit, LinearNF4, Linear8bitLt, or a subclass such
    as the ones Lightning's BitsandbytesPrecision converts to), else None."""
    names = [cls.__name__ for cls in type(module).__mro__]
    if any(n in ("Linear4bit", "LinearNF4", "LinearFP4") for n in names):
        weight = module.weight
        mode = next((_LIGHTNING_4BIT[n] for n in names if n in _LIGHTNING_4BIT), None)
        kind = getattr(weight, "quant_type", None) or (mode[0] if mode else "nf4" if "LinearNF4" in names else "fp4")
        dq = getattr(weight, "compress_statistics", None)
        dq = bool(dq) if dq is not None else bool(mode and mode[1])
        dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
        return QuantScheme(kind, dq, dtype)
    if "Linear8bitLt" in names:
        return QuantScheme("int8", False, torch.float16)
    return None


def replace_bnb_layers(model: nn.Module) -> int:
    """Swap bitsandbytes layers already in a model for stand-ins of the same scheme and shape, in place
    (called inside the fake mode, so the CPU tensors it creates are fake)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            scheme = bnb_layer_scheme(child)
            if scheme is None:
                continue
            setattr(parent, name, QuantizedLinear(child.in_features, child.out_features, child.bias is not None,
                                                  scheme, device="cpu"))
            count += 1
    return count
