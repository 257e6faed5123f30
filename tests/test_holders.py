"""Where the memory goes: each allocation's holder (module path and kind), the holders at the peak, their
roll-ups, and how reports show them."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

import memguard
from memguard import report
from memguard.report.json_report import _estimate_json
from memguard.report.plot import _timeline_svg
from memguard.text import HOLDER_ROWS
from memguard.categories import ALLOCATED_CATEGORIES, Category
from memguard.results import Estimate
from memguard.trace import SAVED, StepProgram, TraceCache, trace_training


class Block(nn.Module):
    """A residual MLP block: the repeated unit of the stack."""

    def __init__(self, width: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, blocks: int = 3, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width, bias=False)
        self.blocks = nn.ModuleList([Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class BlowUp(nn.Module):
    """Makes a 1024x wider copy of its input and squares it: ``h * h`` saves ``h`` for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(-1).expand(*x.shape, 1024).contiguous()
        return (h * h).mean(-1)


class Lopsided(nn.Module):
    """Small layers around one that saves a huge intermediate."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 32, bias=False)
        self.blowup = BlowUp()
        self.last = nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.blowup(self.first(x)))


class Mixed(nn.Module):
    """Two differently sized layers, so each one's optimizer state has its own size."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(64, 128, bias=False)  # 32 KiB of fp32 weights
        self.big = nn.Linear(128, 1024, bias=False)  # 512 KiB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(self.small(x))


def _by(holders: list, category: Category) -> dict[tuple[str, str], int]:
    out: Counter = Counter()
    for h in holders:
        if h.category is category:
            out[(h.module, h.kind)] += h.bytes
    return dict(out)


# --- the holders add up ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_holders_sum_to_the_peak_and_to_each_category(device: str) -> None:
    est = memguard.estimate(Stack(), torch.randn(32, 16), device=device)
    assert est.holders
    assert sum(h.bytes for h in est.holders) == est.peak_bytes
    for cat in ALLOCATED_CATEGORIES:
        assert sum(h.bytes for h in est.holders if h.category is cat) == est.breakdown[cat], cat
    for by in ("module", "kind", "category"):
        assert sum(g.bytes for g in est.top_holders(None, by=by)) == est.peak_bytes, by
    assert all(h.bytes > 0 for h in est.holders)
    sizes = [h.bytes for h in est.holders]
    assert sizes == sorted(sizes, reverse=True)


def test_repeated_blocks_collapse_and_are_counted() -> None:
    est = memguard.estimate(Stack(blocks=5), torch.randn(32, 16), device="cpu")
    modules = {h.module for h in est.holders}
    assert {"blocks.*.up", "blocks.*.down", "embed", "head"} <= modules
    assert not any(part.isdigit() for m in modules for part in m.split("."))
    params = {h.module: h for h in est.holders if h.kind == "parameter"}
    assert params["blocks.*.up"].count == 5
    assert params["blocks.*.up"].bytes == 5 * 64 * 256 * 4  # the five blocks' weights, summed
    assert params["head"].count == 1
    top = {g.name: g for g in est.top_holders(None, by="module", depth=2)}
    assert top["blocks.*"].count == 5
    assert top["blocks.*"].bytes == sum(h.bytes for h in est.holders if h.module.startswith("blocks.*"))
    assert {g.name for g in est.top_holders(None, by="module", depth=1)} >= {"blocks", "embed", "head"}


def test_nested_repeats_count_each_level() -> None:
    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(e(x) for e in self.experts)

    model = nn.Sequential(*[Experts() for _ in range(3)])
    est = memguard.estimate(model, torch.randn(4, 8), device="cpu")
    weights = next(h for h in est.holders if h.kind == "parameter")
    assert weights.module == "*.experts.*"
    assert weights.repeats == (3, 2) and weights.count == 6
    assert weights.bytes == 6 * 8 * 8 * 4
    assert est.top_holders(1, by="module", depth=1)[0].count == 3


# --- who holds what --------------------------------------------------------------------------------


def test_adamw_state_and_gradients_belong_to_their_parameters_modules() -> None:
    est = memguard.estimate(Mixed(), torch.randn(8, 64), optimizer="adamw", device="cuda")
    assert est.peak_phase.endswith("optimizer")  # the state is alive at the peak
    weights = {"small": 64 * 128 * 4, "big": 128 * 1024 * 4}
    state = _by(est.holders, Category.OPTIMIZER_STATE)
    for key in ("exp_avg", "exp_avg_sq"):
        assert {m: n for (m, k), n in state.items() if k == key} == weights, key
    grads = _by(est.holders, Category.GRADIENTS)
    assert grads == {("small", "gradient"): weights["small"], ("big", "gradient"): weights["big"]}
    params = _by(est.holders, Category.PARAMETERS)
    assert params == {("small", "parameter"): weights["small"], ("big", "parameter"): weights["big"]}
    kinds = {(g.name, g.category): g.bytes for g in est.top_holders(None, by="kind")}
    assert kinds[("exp_avg_sq", Category.OPTIMIZER_STATE)] == sum(weights.values())


def test_sgd_momentum_is_named_by_its_state_key() -> None:
    est = memguard.estimate(Mixed(), torch.randn(8, 64), optimizer="sgd", optimizer_kwargs={"momentum": 0.9},
                            device="cpu")
    state = _by(est.holders, Category.OPTIMIZER_STATE)
    assert state == {("small", "momentum_buffer"): 64 * 128 * 4, ("big", "momentum_buffer"): 128 * 1024 * 4}


def test_the_largest_activation_is_held_by_the_module_that_saves_it() -> None:
    x = torch.randn(64, 32)
    est = memguard.estimate(Lopsided(), x, device="cpu")
    acts = sorted((h for h in est.holders if h.category is Category.ACTIVATIONS), key=lambda h: -h.bytes)
    assert acts[0].module == "blowup"
    assert acts[0].kind.endswith(SAVED)
    assert acts[0].bytes == 64 * 32 * 1024 * 4
    top = est.top_holders(1, by="module")[0]
    assert top.name == "blowup"
    # the backward's big temporaries come from the node blowup's forward created (MulBackward)
    temps = sorted((h for h in est.holders if h.category is Category.TEMPORARIES), key=lambda h: -h.bytes)
    assert not temps or temps[0].module == "blowup" or temps[0].bytes < acts[0].bytes // 8


def test_backward_work_is_attributed_to_the_module_whose_forward_made_the_node() -> None:
    model = Lopsided()
    tr = trace_training(model, torch.randn(64, 32), None, StepProgram(steps=1))
    starts = dict((name, start) for start, name in tr.phases)
    made_in_backward = [ev - 1 for ev in tr.events[starts["step1.backward"]:starts["end"]] if ev > 0]
    by_module: Counter = Counter()
    for aid in made_in_backward:
        by_module[tr.holder_of(aid)[0]] += tr.sizes[aid]
    assert by_module.most_common(1)[0][0] == "blowup"
    grads = {tr.holder_of(aid) for aid in range(len(tr.sizes)) if tr.categories[aid] is Category.GRADIENTS}
    assert grads == {("first", "gradient"), ("last", "gradient")}


def test_checkpointed_recomputation_belongs_to_the_blocks() -> None:
    x = torch.randn(256, 16)
    est = memguard.estimate(Stack(blocks=4, width=256), x, device="cpu", gradient_checkpointing=True)
    assert any("checkpointing" in n for n in est.notes)
    tr_holders = [h for h in est.holders if h.category in (Category.ACTIVATIONS, Category.TEMPORARIES)]
    in_blocks = sum(h.bytes for h in tr_holders if h.module.startswith("blocks.*"))
    unknown = sum(h.bytes for h in tr_holders if h.module == "(backward)")
    assert in_blocks > 0
    assert unknown <= in_blocks // 10


def test_logits_and_their_float32_copy_are_findable() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, 32)
            self.lm_head = nn.Linear(32, 1000, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            logits = self.lm_head(self.embed(ids))
            return nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())

    ids = torch.randint(0, 1000, (4, 64))
    tr = trace_training(TinyLM(), ids, None, StepProgram(steps=1, autocast_dtype=torch.bfloat16))
    made = {tr.holder_of(aid) for aid in range(len(tr.sizes)) if tr.sizes[aid] >= 4 * 64 * 1000 * 2}
    assert ("lm_head", "aten.mm") in {(m, k.removesuffix(SAVED)) for m, k in made}
    assert any(m == "(model)" and k.startswith("aten._to_copy") for m, k in made)
    assert any(m == "(model)" and k.startswith("aten._log_softmax") for m, k in made)


# --- replays carry the holders -----------------------------------------------------------------------


def test_step_two_replay_holds_what_a_fresh_trace_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    import memguard.trace.steps as trace

    model, x = Stack(width=256), torch.randn(512, 16)
    replayed = memguard.estimate(model, x, device="cuda")
    assert replayed.peak_phase == "step2.backward"  # the peak is in the replayed step

    original = trace._trace_forward_backward

    def never_replayable(*args, **kwargs):  # noqa: ANN002, ANN003
        record = original(*args, **kwargs)
        record.replayable = False
        return record

    monkeypatch.setattr(trace, "_trace_forward_backward", never_replayable)
    fresh = memguard.estimate(model, x, device="cuda")
    assert fresh.peak_bytes == replayed.peak_bytes
    assert fresh.holders == replayed.holders


def test_replayed_step_allocations_keep_their_holders() -> None:
    tr = trace_training(Stack(), torch.randn(32, 16), None, StepProgram(steps=2))
    starts = {name: start for start, name in tr.phases}

    def made(first: str, last: str) -> list[tuple[tuple[str, str], int, Category]]:
        return [(tr.holder_of(ev - 1), tr.sizes[ev - 1], tr.categories[ev - 1])
                for ev in tr.events[starts[first]:starts[last]] if ev > 0]

    step1, step2 = made("step1.forward", "step2.forward"), made("step2.forward", "end")
    assert step1 == step2
    assert any(h[0].startswith("blocks.") for h, *_ in step2)


def test_trace_cache_replay_gives_the_holders_of_a_fresh_trace() -> None:
    model, x = Stack(), torch.randn(32, 16)
    cache = TraceCache()
    memguard.estimate(model, x, optimizer="adamw", device="cuda", trace_cache=cache)
    assert len(cache) == 1
    from_cache = memguard.estimate(model, x, optimizer="sgd", device="cuda", trace_cache=cache)
    fresh = memguard.estimate(model, x, optimizer="sgd", device="cuda")
    assert from_cache.peak_bytes == fresh.peak_bytes
    assert from_cache.holders == fresh.holders


# --- rendering ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_estimate() -> Estimate:
    return memguard.estimate(Stack(blocks=4), torch.randn(32, 16), device="cuda")


def test_repr_is_one_short_line_and_str_a_readable_summary(stack_estimate: Estimate) -> None:
    text = repr(stack_estimate)
    assert "\n" not in text and len(text) < 160
    assert text.startswith("Estimate(peak=") and "device=cuda" in text and "optimizer=adamw" in text
    summary = str(stack_estimate)
    assert report.format_bytes(stack_estimate.peak_bytes) in summary
    assert "blocks.*.up" in summary and "x4" in summary
    assert len(summary.splitlines()) < 30


def test_report_has_a_holders_section(stack_estimate: Estimate) -> None:
    text = report.render_report(stack_estimate, 80 * 2**30)
    section = text[text.index("Largest holders at the peak"):]
    assert "blocks.*.up" in section and "x4" in section
    assert "Largest kinds of tensors at the peak" in section
    assert "exp_avg" in section
    rows = section.split("Largest kinds")[0].splitlines()[3:]
    assert 1 <= len([r for r in rows if r.strip()]) <= HOLDER_ROWS


def test_json_carries_the_holders_in_bytes(stack_estimate: Estimate) -> None:
    data = json.loads(json.dumps(_estimate_json(stack_estimate, 80 * 2**30, 0.1)))
    holders = data["holders"]
    assert sum(h["bytes"] for h in holders["all"]) == stack_estimate.peak_bytes
    assert holders["by_module"][0]["bytes"] == stack_estimate.top_holders(1)[0].bytes
    assert {"name", "bytes", "count", "category", "parts"} <= set(holders["by_kind"][0])
    assert json.loads(json.dumps(stack_estimate.to_dict()))["holders"] == holders["all"]


def test_phase_spans_label_the_timeline(stack_estimate: Estimate) -> None:
    spans = report.phase_spans(stack_estimate)
    labels = [label for label, *_ in spans]
    for want in ("step1 forward", "step1 backward", "step1 optimizer", "step2 forward", "step2 backward"):
        assert want in labels
    assert all(a < b for _, a, b in spans)
    assert all(prev[2] <= nxt[1] for prev, nxt in zip(spans, spans[1:]))
    svg = _timeline_svg([("as configured", [(p.index, p.allocated_bytes / 2**30)
                                                   for p in stack_estimate.timeline])], [("cap", 1.0)], spans)
    assert "<title>step1 backward</title>" in svg
