"""Quantized base weights (bitsandbytes nf4 / fp4 / int8), as QLoRA and Lightning's BitsandbytesPrecision
use them, in a form the tracer can run.

bitsandbytes kernels cannot run on fake or meta tensors, so inside the trace each quantized linear layer
is a stand-in that holds exactly the storages bitsandbytes keeps (packed weights, absmax statistics,
codebooks) and allocates what its autograd function allocates: the weight dequantized to the compute dtype
for the matmul, freed right after, in forward and again in backward (bitsandbytes' MatMul4Bit saves only
the input). Nothing here imports bitsandbytes: existing bitsandbytes layers are recognised by class name.
"""

from __future__ import annotations

import math
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


class _DequantMatmul(torch.autograd.Function):
    """The memory behaviour of bitsandbytes' MatMul4Bit / MatMul8bitLt with a frozen weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int]):  # noqa: ANN001, ANN205
        weight = torch.empty(shape, dtype=x.dtype, device=x.device)  # dequantized copy, freed on return
        out = nn.functional.linear(x, weight, bias)
        ctx.shape = shape
        ctx.save_for_backward(packed)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        weight = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ weight, None, None, None


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
        return _DequantMatmul.apply(x, self.packed, bias, (self.out_features, self.in_features))


def quantize_linears(model: nn.Module, scheme: QuantScheme, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace plain nn.Linear layers (except ``skip`` names, as bitsandbytes integrations keep the output
    head) by :class:`QuantizedLinear`, in place; returns how many were replaced.

    When some linear layers are frozen and others train (LoRA adapters are linear layers too), only the
    frozen ones are quantized, as in QLoRA; otherwise all are, as Lightning's BitsandbytesPrecision does.
    """
    linears = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children()) if type(child) is nn.Linear and name not in skip]
    frozen = [item for item in linears if not item[2].weight.requires_grad]
    chosen = frozen if frozen else linears
    for parent, name, child in chosen:
        setattr(parent, name, _stand_in(child, scheme))
    return len(chosen)


def _stand_in(linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
    return QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                           device=linear.weight.device)


def bnb_layer_scheme(module: nn.Module) -> QuantScheme | None:
    """The scheme of an existing bitsandbytes layer (Linear4bit, LinearNF4, Linear8bitLt), else None."""
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        weight = module.weight
        kind = getattr(weight, "quant_type", None) or ("nf4" if name == "LinearNF4" else "fp4")
        dq = bool(getattr(weight, "compress_statistics", False))
        dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
        return QuantScheme(kind, dq, dtype)
    if name == "Linear8bitLt":
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
