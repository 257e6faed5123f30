"""Data-dependent models traced, not refused: known values from the batch are exact (within 2% of the real
CPU peak), routing from the weights is assumed and stated, and ``bound_bytes`` is never below the real peak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memguard
from groundtruth import REAL_OPTIMIZERS, measure_peak

HALF = {"bf16-mixed": torch.bfloat16}


class Router(nn.Module):
    def __init__(self, d: int, experts: int, k: int) -> None:
        super().__init__()
        self.gate, self.k = nn.Linear(d, experts, bias=False), k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        weights, idx = probs.topk(self.k, -1)
        return weights / weights.sum(-1, keepdim=True), idx


class GroupedMoE(nn.Module):
    """Experts as one 3-d weight, run by torch._grouped_mm over tokens sorted by expert."""

    def __init__(self, d: int = 64, hidden: int = 256, experts: int = 8, k: int = 2) -> None:
        super().__init__()
        self.router = Router(d, experts, k)
        self.up = nn.Parameter(torch.randn(experts, d, hidden) * 0.02)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) * 0.02)
        self.experts, self.k = experts, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.router(x)
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.histc(flat[order].float(), bins=self.experts, min=0, max=self.experts - 1)
        offs = counts.cumsum(0).to(torch.int32)
        h = x[order // self.k]
        h = F.gelu(torch._grouped_mm(h, self.up, offs=offs))
        h = torch._grouped_mm(h, self.down, offs=offs) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(h).index_copy(0, order, h)
        return out.view(x.shape[0], self.k, -1).sum(1)


class EagerMoE(nn.Module):
    """The per-expert loop over routed tokens: torch.where on the routing one-hot, index_add."""

    def __init__(self, d: int = 64, hidden: int = 256, experts: int = 8, k: int = 2) -> None:
        super().__init__()
        self.router = Router(d, experts, k)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.router(x)
        mask = F.one_hot(idx, len(self.experts)).permute(2, 1, 0)  # experts x k x tokens
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(out.dtype))
        return out


class CapacityMoE(nn.Module):
    """Top-1 routing with a capacity factor: tokens past an expert's capacity are dropped."""

    def __init__(self, d: int = 64, hidden: int = 256, experts: int = 4, capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                     for _ in range(experts))
        self.capacity_factor = capacity_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        gate, choice = probs.max(-1)
        one_hot = F.one_hot(choice, len(self.experts))
        position = one_hot.cumsum(0) * one_hot
        capacity = int(self.capacity_factor * x.shape[0] / len(self.experts))
        keep = (position > 0) & (position <= capacity)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token = keep[:, e].nonzero().squeeze(1)
            out = out.index_add(0, token, (expert(x[token]) * gate[token, None]).to(out.dtype))
        return out


class MoEModel(nn.Module):
    """Layers of experts between a small embedding and head, so the experts' activations make the peak."""

    def __init__(self, make_moe: type, layers: int = 3, d: int = 64, vocab: int = 32) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.layers = nn.ModuleList(make_moe() for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids % self.emb.num_embeddings).flatten(0, 1)
        for moe in self.layers:
            x = x + moe(x)
        return F.cross_entropy(self.head(x), (ids % self.emb.num_embeddings).flatten())


class PaddedPooler(nn.Module):
    """Keeps only the real tokens of a padded batch (boolean indexing and masked_select on the mask)."""

    def __init__(self, d: int = 64, vocab: int = 256) -> None:
        super().__init__()
        self.emb, self.mlp = nn.Embedding(vocab, d), nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(self.emb(ids)[mask.bool()])  # real tokens only
        labels = ids.masked_select(mask.bool())
        return F.cross_entropy(self.head(tokens), labels)


class LengthCrop(nn.Module):
    """Crops the batch to its longest sequence, read with .item() from a lengths tensor."""

    def __init__(self, d: int = 64, vocab: int = 256) -> None:
        super().__init__()
        self.emb, self.mlp = nn.Embedding(vocab, d), nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        longest = int(lengths.max().item())
        ids = ids[:, :longest]
        return F.cross_entropy(self.head(self.mlp(self.emb(ids))).flatten(0, 1), ids.flatten())


class CausalEncoder(nn.Module):
    """nn.TransformerEncoder with a causal mask: torch checks whether the mask is causal from its values."""

    def __init__(self, d: int = 64, vocab: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        h = self.enc(self.emb(ids), mask=mask)
        return F.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def _ids(b: int = 4, t: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(0))


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = _ids(4, 64)
    mask = torch.zeros(4, 64, dtype=torch.long)
    for row, length in enumerate((64, 40, 17, 5)):
        mask[row, :length] = 1
    return ids, mask


def _lengths() -> tuple[torch.Tensor, torch.Tensor]:
    return _ids(4, 64), torch.tensor([12, 30, 7, 25])


def _mixtral(experts_implementation: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return AutoModelForCausalLM.from_config(cfg, **extra)


def _mixtral_batch() -> dict:
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


# name, model, batch, precision, whether routing is assumed
CASES = [
    ("grouped_mm_moe", lambda: MoEModel(GroupedMoE), lambda: _ids(8, 256), "32-true", True),
    ("grouped_mm_moe_bf16_mixed", lambda: MoEModel(GroupedMoE), lambda: _ids(8, 256), "bf16-mixed", True),
    ("eager_moe", lambda: MoEModel(EagerMoE), lambda: _ids(8, 256), "32-true", True),
    ("eager_moe_bf16_mixed", lambda: MoEModel(EagerMoE), lambda: _ids(8, 256), "bf16-mixed", True),
    ("capacity_top1_moe", lambda: MoEModel(CapacityMoE), lambda: _ids(8, 256), "32-true", True),
    ("padding_mask", PaddedPooler, _padded, "32-true", False),
    ("item_on_lengths", LengthCrop, _lengths, "32-true", False),
    ("causal_transformer_encoder", CausalEncoder, lambda: _ids(4, 32), "32-true", False),
    ("hf_mixtral", _mixtral, _mixtral_batch, "32-true", True),
    ("hf_mixtral_eager", lambda: _mixtral("eager"), _mixtral_batch, "32-true", True),
]


def _run(build, batch, precision: str) -> tuple[int, memguard.Estimate]:
    torch.manual_seed(0)
    real = measure_peak(build(), batch(), REAL_OPTIMIZERS["adamw"], autocast_dtype=HALF.get(precision))
    torch.manual_seed(0)
    est = memguard.estimate(build(), batch(), optimizer="adamw", precision=precision, device="cpu")
    return real, est


@pytest.mark.parametrize("name,build,batch,precision,routed", CASES, ids=[c[0] for c in CASES])
def test_against_real_cpu_peak(name, build, batch, precision, routed) -> None:  # noqa: ANN001
    real, est = _run(build, batch, precision)
    error = (est.peak_bytes - real) / real
    assert est.bound_bytes >= est.peak_bytes
    if not routed:  # every value the shapes depend on comes from the batch or the model's constants
        assert abs(error) <= 0.02, f"{name}: predicted {est.peak_bytes:,} vs measured {real:,} ({error:+.2%})"
        assert est.bound_bytes == est.peak_bytes
        assert not any(n.startswith("assumed:") for n in est.notes), est.notes
    else:
        assert est.bound_bytes >= real, f"{name}: bound {est.bound_bytes:,} below measured {real:,}"
        assert abs(error) <= 0.05, f"{name}: balanced {est.peak_bytes:,} vs measured {real:,} ({error:+.2%})"


def test_notes_state_the_routing_assumption() -> None:
    est = memguard.estimate(MoEModel(EagerMoE), _ids(), device="cpu")
    assert any(n.startswith("assumed: routing decisions computed from the weights") and "balanced" in n
               for n in est.notes), est.notes
    assert any("bound_bytes" in n for n in est.notes)
    assert est.to_dict()["bound_bytes"] == est.bound_bytes


class UnknownMask(nn.Module):
    """Selects rows by a mask computed from the weights (not routing): every row is assumed selected."""

    def __init__(self) -> None:
        super().__init__()
        self.score, self.mlp = nn.Linear(64, 1), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.score(x).squeeze(-1) > 0
        if keep.any():
            return self.mlp(x[keep]).pow(2).mean()
        return x.sum() * 0


def test_unknown_mask_is_bounded_and_stated() -> None:
    x = torch.randn(256, 64)
    real = measure_peak(UnknownMask(), x, REAL_OPTIMIZERS["adamw"])
    est = memguard.estimate(UnknownMask(), x, device="cpu")
    assert est.peak_bytes >= real
    assert any("selects every element" in n for n in est.notes), est.notes
    assert any(".item() / bool()" in n for n in est.notes), est.notes


def test_meta_batch_without_values_still_traces() -> None:
    ids, mask = _padded()
    est = memguard.estimate(PaddedPooler(), (ids.to("meta"), mask.to("meta")), device="cpu")
    known = memguard.estimate(PaddedPooler(), (ids, mask), device="cpu")
    assert est.peak_bytes >= known.peak_bytes  # unknown mask: every token taken as real
    assert any("selects every element" in n for n in est.notes)


class InPlaceLabels(nn.Module):
    """Writes the batch's labels in place (padding -> ignore index): the values stay known, the user's
    tensor is untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(256, 32), nn.Linear(32, 256)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        labels = ids
        labels.masked_fill_(mask == 0, -100)
        kept = labels[labels != -100]
        return F.cross_entropy(self.head(self.emb(kept)), kept)


def test_batch_values_are_read_never_written() -> None:
    ids, mask = _padded()
    before = ids.clone()
    est = memguard.estimate(InPlaceLabels(), (ids, mask), device="cpu")
    assert torch.equal(ids, before)
    real = measure_peak(InPlaceLabels(), (ids.clone(), mask), REAL_OPTIMIZERS["adamw"])
    assert abs(est.peak_bytes - real) / real <= 0.02
    assert not any(n.startswith("assumed:") for n in est.notes)


def test_trace_cache_tells_batches_apart_by_their_values() -> None:
    from memguard.trace import TraceCache

    ids, mask = _padded()
    model, cache = PaddedPooler(), TraceCache()
    full = memguard.estimate(model, (ids, torch.ones_like(mask)), device="cpu", trace_cache=cache)
    padded = memguard.estimate(model, (ids, mask), device="cpu", trace_cache=cache)
    assert padded.peak_bytes < full.peak_bytes


class EqualCheck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if torch.equal(y, self.b(x)):
            return y.sum()
        return (y * y).sum()


def test_equal_on_unknown_values_is_stated() -> None:
    est = memguard.estimate(EqualCheck(), torch.randn(8, 16), device="cpu")
    assert any("torch.equal" in n for n in est.notes), est.notes


def test_fits_is_decided_on_the_routing_bound() -> None:
    from memguard.plan import required_bytes

    est = memguard.estimate(MoEModel(EagerMoE), _ids(8, 256), device="cpu")
    assert est.bound_bytes > est.peak_bytes  # the skewed routing's per-expert memory is larger
    assert required_bytes(est, 0.0) == est.device_bytes + est.bound_bytes - est.peak_bytes
    assert "routing bound" in str(est)


class LayerDropStack(nn.Module):
    """LayerDrop as translation models train it: each layer is skipped when a fresh draw falls under p."""

    def __init__(self, layers: int = 4, d: int = 128, p: float = 0.1) -> None:
        super().__init__()
        self.emb = nn.Embedding(512, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(layers))
        self.head, self.p = nn.Linear(d, 512), p

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.p:
                continue
            h = h + layer(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def test_layerdrop_keeps_the_layers_as_almost_every_step_does() -> None:
    """A random draw read by Python takes its mean (0.5), so ``rand < 0.1`` keeps every layer: the step that
    skips none, the likely one and the largest. Its real peak is measured with p=0 (no layer ever skipped);
    a real run with p=0.1 that skips some stays under the prediction."""
    torch.manual_seed(0)
    keeps_all = measure_peak(LayerDropStack(p=0.0), _ids(8, 64), REAL_OPTIMIZERS["adamw"])
    torch.manual_seed(0)
    real = measure_peak(LayerDropStack(), _ids(8, 64), REAL_OPTIMIZERS["adamw"])
    est = memguard.estimate(LayerDropStack(), _ids(8, 64), optimizer="adamw", device="cpu")
    assert abs(est.peak_bytes - keeps_all) / keeps_all <= 0.02, (est.peak_bytes, keeps_all)
    assert est.peak_bytes >= real
    assert any("random draws" in n for n in est.notes)
    skipping = memguard.estimate(LayerDropStack(p=0.9), _ids(8, 64), optimizer="adamw", device="cpu")
    assert skipping.peak_bytes < est.peak_bytes  # p above the mean: the likely step skips every layer


class ForcedGate(nn.Module):
    """A router gate whose real scores are pushed to a fixed routing by a large constant offset per token:
    the real run follows ``pattern`` while memguard, which cannot see through the sum, still assumes."""

    def __init__(self, gate: nn.Linear, pattern: torch.Tensor, k: int) -> None:
        super().__init__()
        self.gate = gate
        offset = torch.zeros(pattern.shape[0], gate.out_features)
        for choice in range(k):  # the first choice gets the largest push, so topk keeps the order
            offset[torch.arange(pattern.shape[0]), (pattern + choice) % gate.out_features] = 1e3 * (k - choice)
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) + self.offset[: x.shape[0]]


def _patterns(tokens: int, experts: int) -> dict[str, torch.Tensor]:
    """Routings a real router can fall into: all on one expert (first, last), two experts, a ramp where
    expert e gets a share proportional to e + 1, and random."""
    ramp = torch.repeat_interleave(torch.arange(experts), torch.arange(1, experts + 1) * tokens // sum(range(1, experts + 1)) + 1)
    return {
        "first": torch.zeros(tokens, dtype=torch.long),
        "last": torch.full((tokens,), experts - 1),
        "two": torch.arange(tokens) % 2 * (experts - 1),
        "ramp": ramp[:tokens],
        "random": torch.randint(0, experts, (tokens,), generator=torch.Generator().manual_seed(1)),
    }


def _force(model: MoEModel, pattern: torch.Tensor) -> MoEModel:
    for moe in model.layers:
        owner, k = (moe.router, moe.router.k) if hasattr(moe, "router") else (moe, 1)
        owner.gate = ForcedGate(owner.gate, pattern, k)
    return model


def _bound_and_real(moe: type, pattern_names: list[str]) -> tuple[int, dict[str, int]]:
    batch = _ids(8, 256)
    patterns = _patterns(batch.numel(), 8 if moe is not CapacityMoE else 4)
    torch.manual_seed(0)
    est = memguard.estimate(_force(MoEModel(moe), patterns["first"]), batch, optimizer="adamw", device="cpu")
    real = {}
    for name in pattern_names:
        torch.manual_seed(0)
        real[name] = measure_peak(_force(MoEModel(moe), patterns[name]), batch, REAL_OPTIMIZERS["adamw"])
    return est.bound_bytes, real


@pytest.mark.parametrize("moe", [EagerMoE, GroupedMoE], ids=lambda c: c.__name__)
def test_routing_bound_covers_real_routings(moe: type) -> None:
    """Routers that keep every token: whatever way the real router sends them, the run stays under
    ``bound_bytes`` (the saved rows add up to the same total; one expert holding every token is the worst
    for the per-expert transients)."""
    bound, real = _bound_and_real(moe, ["first", "last", "two", "ramp", "random"])
    for name, peak in real.items():
        assert bound >= peak, f"{name}: bound {bound:,} below measured {peak:,}"


def test_capacity_routing_bound_covers_the_extremes() -> None:
    """A top-1 router with a capacity drops what an expert cannot take: the skewed routing keeps fewer
    rows than the balanced one, and the bound (the larger of the two) covers routings at either end."""
    bound, real = _bound_and_real(CapacityMoE, ["first", "last", "two", "ramp"])
    for name, peak in real.items():
        assert bound >= peak, f"{name}: bound {bound:,} below measured {peak:,}"


@pytest.mark.xfail(strict=True, reason="capacity routers: a routing that keeps every token and gives the last "
                   "expert more than its balanced share (up to the capacity) is above both traced routings")
def test_capacity_routing_bound_covers_a_random_routing() -> None:
    bound, real = _bound_and_real(CapacityMoE, ["random"])
    assert bound >= real["random"], f"bound {bound:,} below measured {real['random']:,}"
