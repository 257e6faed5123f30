"""Identical blocks analysed once (memguard/estimation/repeated.py): a deep compiled model's estimate from
two shallow compiled analyses must be the estimate of the whole compiled model, and a model whose blocks
behave differently by position must not be extended."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memguard.estimation import EstimateRequest, estimate, estimate_one, repeated
from test_compiled import TOKENS, Attention, Decoder, decoder_loss


@pytest.fixture
def short_stacks(monkeypatch):
    """Extend stacks of 2 blocks, so the whole analysis to compare with stays cheap."""
    monkeypatch.setattr(repeated, "MIN_BLOCKS", 2)


def _request(**kwargs) -> EstimateRequest:
    return EstimateRequest(optimizer="adamw", device="cpu", loss_fn=decoder_loss, **kwargs)


def test_extended_estimate_is_the_whole_compiled_analysis(short_stacks):
    model = Decoder(layers=2)
    before = [id(layer) for layer in model.layers]
    req = _request(compile=True)
    whole = estimate_one(model, TOKENS, req)
    extended = estimate(model, TOKENS, optimizer="adamw", device="cpu", loss_fn=decoder_loss, compile=True)
    assert any("identical blocks analysed once" in n for n in extended.notes)
    assert not any("identical blocks" in n for n in whole.notes)
    assert extended.compiled == whole.compiled == "compiled (inductor): whole model"
    assert extended.peak_bytes == whole.peak_bytes
    assert extended.peak_phase == whole.peak_phase
    assert extended.phase_peaks == whole.phase_peaks
    assert sum(h.bytes for h in extended.holders) == extended.peak_bytes
    assert [id(layer) for layer in model.layers] == before and len(model.layers) == 2


def test_per_block_compile_is_extended(short_stacks):
    model = Decoder(layers=2)
    for layer in model.layers:
        layer.compile()
    extended = estimate(model, TOKENS, optimizer="adamw", device="cpu", loss_fn=decoder_loss)
    assert any("identical blocks analysed once" in n for n in extended.notes)
    assert extended.compiled == "compiled (inductor): layers.0, layers.1"
    assert extended.phase_peaks and sum(h.bytes for h in extended.holders) == extended.peak_bytes


class PositionalBlock(Attention):
    """Identical parameters, different work by position: every third block keeps a wide extra activation."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.wide = index % 3 == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x + torch.tanh(x.repeat(1, 1, 8)).mean(-1, keepdim=True) if self.wide else x


def test_blocks_that_differ_by_position_are_analysed_whole(short_stacks):
    model = Decoder(layers=1)
    model.layers = nn.ModuleList(PositionalBlock(i) for i in range(6))
    assert repeated.find_block_stack(model) == repeated.BlockStack("layers", 6)
    assert repeated.estimate_by_depth(model, TOKENS, _request(compile=True), estimate_one) is None


def test_eager_short_and_non_models_are_not_extended():
    model = Decoder(layers=3)
    assert repeated.estimate_by_depth(model, TOKENS, _request(compile=False), estimate_one) is None
    assert repeated.estimate_by_depth(model, TOKENS, _request(compile=True), estimate_one) is None  # 3 < MIN_BLOCKS
    assert repeated.estimate_by_depth("not a model", TOKENS, _request(compile=True), estimate_one) is None


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(8))


def test_the_stack_is_the_one_holding_most_parameters():
    model = nn.Module()
    model.layers = nn.ModuleList(Experts() for _ in range(6))
    model.head = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)), nn.ReLU())
    assert repeated.find_block_stack(model) == repeated.BlockStack("layers", 6)
    odd = copy.deepcopy(model)
    odd.layers[3].experts[0] = nn.Linear(8, 9)
    assert repeated.find_block_stack(odd) == repeated.BlockStack("layers.0.experts", 8)


def test_shallow_view_shares_blocks_and_leaves_the_model_alone():
    model = Decoder(layers=4)
    view = repeated.shallow_view(model, repeated.BlockStack("layers", 4), 2)
    assert len(view.layers) == 2 and view.layers[1] is model.layers[1]
    assert view.embed is model.embed and len(model.layers) == 4
    seq = nn.Sequential(*(nn.Linear(4, 4) for _ in range(6)))
    assert len(repeated.shallow_view(seq, repeated.BlockStack("", 6), 0)) == 0 and len(seq) == 6
