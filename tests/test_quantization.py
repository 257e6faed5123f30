"""Quantized base weights: memguard's stand-ins hold exactly what bitsandbytes stores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memguard
from memguard import Category, InvalidArgumentError
from memguard.quantization import QuantizedLinear, QuantScheme, quantize_linears

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402


def _real_4bit_bytes(out_f: int, in_f: int, kind: str, dq: bool) -> int:
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    q, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=kind)
    tensors = [q, st.absmax, st.code]
    if st.state2 is not None:
        tensors += [st.offset, st.state2.absmax, st.state2.code]
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(300, 512), (64, 100), (4096, 11008 // 8)])
def test_4bit_storage_matches_bitsandbytes(kind: str, dq: bool, shape: tuple[int, int]) -> None:
    scheme = QuantScheme(kind, dq)
    assert sum(scheme.storage_bytes(*shape)) == _real_4bit_bytes(*shape, kind, dq)


def test_int8_storage_matches_bitsandbytes() -> None:
    w = torch.randn(300, 512, dtype=torch.float16)
    cb, scb, _ = bnbF.int8_vectorwise_quant(w)
    assert sum(QuantScheme("int8").storage_bytes(300, 512)) == cb.untyped_storage().nbytes() + scb.untyped_storage().nbytes()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(256, 1024), nn.Linear(1024, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x))))).sum()


def test_quantization_stores_frozen_linears_packed_and_trains_the_rest() -> None:
    model = MLP()
    model.up.requires_grad_(False)
    model.down.requires_grad_(False)
    x = torch.randn(8, 256)
    plain = memguard.estimate(model, x, precision="bf16-true", device="cuda")
    quant = memguard.estimate(model, x, precision="bf16-true", device="cuda", quantization="nf4-dq")
    stored = sum(QuantScheme("nf4", True).storage_bytes(1024, 256)) * 2
    # the two frozen layers shrink from bf16 (2 B/weight) to their packed storage; the head is untouched
    weights_bf16 = 2 * 2 * 256 * 1024
    saved = plain.breakdown[Category.PARAMETERS] - quant.breakdown[Category.PARAMETERS]
    assert abs(saved - (weights_bf16 - stored)) < 8 * 512  # block rounding of the stand-in tensors
    assert quant.breakdown[Category.OPTIMIZER_STATE] == plain.breakdown[Category.OPTIMIZER_STATE]
    assert any("quantized to nf4-dq" in n for n in quant.notes)


def test_model_with_real_bitsandbytes_layers_is_traced() -> None:
    model = nn.Sequential(bnb.nn.Linear4bit(256, 512, compute_dtype=torch.bfloat16, quant_type="nf4"), nn.ReLU(),
                          nn.Linear(512, 8))
    model[0].weight = bnb.nn.Params4bit(torch.randn(512, 256), requires_grad=False, quant_type="nf4")._quantize("cpu")
    x = torch.randn(4, 256)
    est = memguard.estimate(model, x, loss_fn=lambda m, b: m(b).float().sum(), precision="bf16-true", device="cpu")
    assert any("bitsandbytes layers" in n for n in est.notes)
    packed = sum(QuantScheme("nf4").storage_bytes(512, 256))
    assert est.breakdown[Category.PARAMETERS] >= packed


def test_unknown_quantization_lists_the_modes() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown quantization 'nf3'.*nf4"):
        memguard.estimate(MLP(), torch.randn(2, 256), quantization="nf3")


class Scaled(nn.Linear):
    """A subclass of nn.Linear (as some libraries define): Lightning converts it like any linear layer."""


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(64, 64), "mlp": Scaled(64, 64)}) for _ in range(2))
        self.lm_head = nn.Linear(64, 32, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block["mlp"](torch.relu(block["attn"](h)))
        return self.lm_head(h)


def _quantized_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _lightning_converted(model: nn.Module, mode: str, ignore: set[str] | None = None) -> nn.Module:
    from lightning_fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision

    return BitsandbytesPrecision(mode, dtype=torch.bfloat16, ignore_modules=ignore).convert_module(model)


@pytest.mark.parametrize("ignore", [None, {"lm_head"}, {"blocks.1", "blocks.0.mlp"}])
def test_quantizes_the_layers_lightning_converts(ignore: set[str] | None) -> None:
    pytest.importorskip("lightning_fabric")
    ours = Tower()
    count = quantize_linears(ours, QuantScheme("nf4", True), ignore_modules=ignore or ())
    theirs = _lightning_converted(Tower(), "nf4-dq", ignore)
    converted = {name for name, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert _quantized_names(ours) == converted
    assert count == len(converted)
    if ignore is None:
        assert {"lm_head", "blocks.0.mlp"} <= converted  # the output head and the nn.Linear subclass


def test_skip_names_still_leave_those_layers() -> None:
    model = Tower()
    assert quantize_linears(model, QuantScheme("nf4"), skip=("lm_head",)) == 4
    assert type(model.lm_head) is nn.Linear


def test_frozen_base_with_trainable_adapters_quantizes_only_the_base() -> None:
    model = Tower()
    model.requires_grad_(False)
    model.blocks[0]["adapter"] = nn.Linear(64, 8)  # trainable, like a PEFT LoRA layer
    quantize_linears(model, QuantScheme("nf4"))
    assert type(model.blocks[0]["adapter"]) is nn.Linear
    assert _quantized_names(model) == {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "lm_head"}


def test_model_lightning_already_converted_is_traced_as_converted() -> None:
    pytest.importorskip("lightning_fabric")
    ids = torch.randint(0, 32, (2, 16))
    kwargs = dict(loss_fn=lambda m, b: m(b).float().sum(), precision="bf16-true", device="cuda", optimizer="sgd",
                  steps=1)
    converted = memguard.estimate(_lightning_converted(Tower(), "nf4-dq"), ids, **kwargs)
    quantized = memguard.estimate(Tower(), ids, quantization="nf4-dq", **kwargs)
    assert any("5 bitsandbytes layers" in n for n in converted.notes)
    assert converted.breakdown[Category.PARAMETERS] == quantized.breakdown[Category.PARAMETERS]
    # quantization= on a model that already holds bitsandbytes layers converts nothing more, as Lightning
    again = memguard.estimate(_lightning_converted(Tower(), "nf4-dq"), ids, quantization="nf4", **kwargs)
    assert any("0 linear layers quantized" in n for n in again.notes)
    assert again.breakdown[Category.PARAMETERS] == converted.breakdown[Category.PARAMETERS]


@pytest.mark.parametrize("version, keeps", [("0.42.0", True), ("0.43.2", True), ("0.43.3", False),
                                            ("0.50.2", False), ("0.41.3.post2", True)])
def test_bitsandbytes_version_decides_whether_the_input_is_kept(monkeypatch, version: str, keeps: bool) -> None:
    import importlib.metadata

    from memguard import quantization

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    quantization.bnb_keeps_input.cache_clear()
    try:
        assert quantization.bnb_keeps_input() is keeps
    finally:
        quantization.bnb_keeps_input.cache_clear()


def test_old_bitsandbytes_keeps_each_4bit_layers_input_for_backward(monkeypatch) -> None:
    """Before 0.43.3 MatMul4Bit kept its input: a frozen 4-bit layer fed by a trainable one then holds that
    input (cast to the compute dtype) until backward, exactly its bytes more at the end of the forward."""
    from memguard import quantization

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trained = nn.Linear(64, 256)
            self.base = nn.Linear(256, 128)
            self.base.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(self.trained(x)).float().sum()

    batch = torch.randn(32, 64)

    def activations(keep: bool) -> int:
        monkeypatch.setattr(quantization, "bnb_keeps_input", lambda: keep)
        est = memguard.estimate(Net(), batch, device="cpu", quantization="nf4", optimizer="sgd")
        return est.phase_breakdowns["step1.forward"][Category.ACTIVATIONS]

    assert activations(True) - activations(False) == 32 * 256 * torch.bfloat16.itemsize
