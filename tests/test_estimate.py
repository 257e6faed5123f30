"""estimate(): the public contract beyond accuracy (no side effects, inputs, errors, devices)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memguard
from memguard import Category, InvalidArgumentError, TraceError, checkpointing
from zoo import Decoder, _hf_llama, _ids, _lm_batch


def _snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "params": {n: (p.data_ptr(), p.dtype, p.device, p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    assert before["training"] == after["training"]
    assert before["params"].keys() == after["params"].keys()
    for name, (ptr, dtype, device, rg, grad) in before["params"].items():
        ptr2, dtype2, device2, rg2, grad2 = after["params"][name]
        assert (ptr, dtype, device, rg) == (ptr2, dtype2, device2, rg2), name
        assert grad2 is grad, name
        assert torch.equal(before["values"][name], after["values"][name]), name
    for name, value in before["buffers"].items():
        assert torch.equal(value, dict(model.named_buffers())[name]), name
    assert before["hooks"] == after["hooks"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("ckpt", [None, True])
def test_user_model_is_never_modified(precision: str, ckpt: bool | None) -> None:
    model = Decoder().eval()  # eval mode must survive: the trace switches only its own copy to train()
    before = _snapshot(model)
    memguard.estimate(model, _ids(2, 32), precision=precision, gradient_checkpointing=ckpt, device="cpu")
    _assert_same(before, model)


def test_hf_model_checkpointing_flag_is_left_alone() -> None:
    model = _hf_llama()
    before = _snapshot(model)
    memguard.estimate(model, _lm_batch(), gradient_checkpointing=True, device="cuda")
    _assert_same(before, model)
    assert not checkpointing.is_enabled(model)


def test_batch_is_not_modified() -> None:
    batch = _lm_batch()
    kept = copy.deepcopy(batch)
    memguard.estimate(_hf_llama(), batch, device="cpu", precision="bf16-true")
    assert all(torch.equal(batch[k], kept[k]) for k in batch)


def test_meta_model_and_meta_batch_give_the_same_answer_as_real_ones() -> None:
    torch.manual_seed(0)
    real = memguard.estimate(Decoder(), _ids(2, 32), device="cuda")
    with torch.device("meta"):
        meta_model = Decoder()
    meta = memguard.estimate(meta_model, _ids(2, 32).to("meta"), device="cuda")
    assert meta.peak_bytes == real.peak_bytes
    assert meta.breakdown == real.breakdown


def test_breakdown_covers_the_peak_and_categories_make_sense() -> None:
    model = Decoder()
    est = memguard.estimate(model, _ids(4, 64), device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(v for k, v in est.breakdown.items() if k not in (Category.ALLOCATOR, Category.CONTEXT)) == est.peak_bytes
    assert est.breakdown[Category.PARAMETERS] >= 4 * n_params
    # AdamW keeps two fp32 moments per trainable parameter (plus a scalar step per tensor).
    assert 8 * n_params <= est.breakdown[Category.OPTIMIZER_STATE] <= 8 * n_params + 4 * 64
    assert est.peak_phase.startswith("step")
    assert est.timeline and max(p.allocated_bytes for p in est.timeline) == est.peak_bytes


def test_frozen_parameters_get_no_gradient_or_state() -> None:
    model = Decoder()
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = memguard.estimate(model, _ids(2, 32), device="cpu", optimizer="adam")
    assert est.breakdown[Category.OPTIMIZER_STATE] <= 8 * trainable + 4 * 16


def test_sgd_has_no_state_and_less_memory_than_adamw() -> None:
    sgd = memguard.estimate(Decoder(), _ids(2, 32), optimizer="sgd", device="cpu")
    adamw = memguard.estimate(Decoder(), _ids(2, 32), optimizer="adamw", device="cpu")
    assert sgd.breakdown[Category.OPTIMIZER_STATE] == 0
    assert sgd.peak_bytes < adamw.peak_bytes


def test_optimizer_class_and_factory_are_accepted() -> None:
    by_name = memguard.estimate(Decoder(), _ids(2, 32), optimizer="adamw", device="cpu")
    by_class = memguard.estimate(Decoder(), _ids(2, 32), optimizer=torch.optim.AdamW, device="cpu")
    by_factory = memguard.estimate(
        Decoder(), _ids(2, 32), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False), device="cpu"
    )
    assert by_name.peak_bytes == by_class.peak_bytes == by_factory.peak_bytes


def test_cuda_target_uses_foreach_and_512_byte_blocks() -> None:
    cpu = memguard.estimate(Decoder(), _ids(2, 32), device="cpu")
    cuda = memguard.estimate(Decoder(), _ids(2, 32), device="cuda")
    assert "foreach" in cuda.optimizer and "for-loop" in cpu.optimizer
    assert cuda.peak_bytes % 512 == 0
    assert cuda.peak_bytes > cpu.peak_bytes  # foreach keeps a whole copy of the second moments


def test_cuda_dropout_keeps_a_one_byte_mask() -> None:
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(self.lin(x), 0.5, self.training).sum()

    x = torch.randn(512, 256)
    cpu = memguard.estimate(Drop(), x, device="cpu", optimizer="sgd", steps=1)
    cuda = memguard.estimate(Drop(), x, device="cuda", optimizer="sgd", steps=1)
    # CPU keeps a float32 noise tensor for backward, CUDA a bool mask: 3 bytes per element less.
    assert cpu.breakdown[Category.ACTIVATIONS] - cuda.breakdown[Category.ACTIVATIONS] >= 3 * 512 * 256 - 4096


def test_lightning_order_keeps_old_gradients_alive_through_the_forward() -> None:
    plain = memguard.estimate(Decoder(), _ids(4, 64), device="cpu")
    lightning = memguard.estimate(Decoder(), _ids(4, 64), device="cpu", zero_grad_before_backward=True)
    assert lightning.phase_peaks["step2.forward"] > plain.phase_peaks["step2.forward"]


class ItemInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.sum().item()) % 4 + 1
        return self.lin(x)[:n].sum()


def test_item_on_batch_values_is_read_exactly() -> None:
    x = torch.randn(4, 8)
    est = memguard.estimate(ItemInForward(), x, device="cpu", optimizer=None)
    assert not any(note.startswith("assumed:") for note in est.notes)
    assert est.breakdown[memguard.Category.INPUTS] == x.numel() * 4


class UnboundedRepeat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeats = (self.lin(x)[:, 0] > 0).long() + 1  # from the weights, and no bound on the output
        return self.lin(x.repeat_interleave(repeats, 0)).sum()


def test_data_dependent_model_without_a_bound_gets_a_clear_trace_error() -> None:
    with pytest.raises(TraceError, match=r"(?s)step1.forward.*repeat_interleave") as info:
        memguard.estimate(UnboundedRepeat(), torch.randn(4, 8), device="cpu")
    assert info.value.phase == "step1.forward"
    assert "repeat_interleave" in info.value.operation


def test_custom_op_without_fake_kernel_names_the_operation() -> None:
    lib = torch.library.Library("memguard_test", "FRAGMENT")
    lib.define("opaque(Tensor x) -> Tensor")
    lib.impl("opaque", lambda x: x * 2, "CPU")

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.memguard_test.opaque(self.lin(x)).sum()

    with pytest.raises(TraceError, match=r"memguard_test.opaque.*register_fake"):
        memguard.estimate(Opaque(), torch.randn(4, 8), device="cpu")


def test_bad_arguments_name_the_valid_values() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown precision 'bf17-mixed'.*bf16-mixed"):
        memguard.estimate(Decoder(), _ids(2, 8), precision="bf17-mixed")
    with pytest.raises(InvalidArgumentError, match=r"unknown optimizer 'adamw9'.*adamw"):
        memguard.estimate(Decoder(), _ids(2, 8), optimizer="adamw9")
    with pytest.raises(InvalidArgumentError, match=r"unknown device 'tpu'.*cpu, cuda"):
        memguard.estimate(Decoder(), _ids(2, 8), device="tpu")
    with pytest.raises(InvalidArgumentError, match="torch.nn.Module"):
        memguard.estimate("not a model", _ids(2, 8))
    with pytest.raises(InvalidArgumentError, match="no repeated blocks"):
        memguard.estimate(nn.Linear(4, 4), torch.randn(2, 4), gradient_checkpointing=True)


class ValueReadingOptimizer(torch.optim.Optimizer):
    """Reads a gradient's value to decide what to do: impossible on shape-only tensors."""

    def __init__(self, params) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None) -> None:  # noqa: ANN001
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.norm().item() > 0:
                    self.state[p]["m"] = torch.zeros_like(p)
                    p.add_(p.grad.nonzero().float().sum())


def test_untraceable_optimizer_raises_or_gives_an_approximate_bound() -> None:
    with pytest.raises(TraceError, match="optimizer"):
        memguard.estimate(Decoder(), _ids(2, 32), optimizer=ValueReadingOptimizer, device="cpu")
    bound = memguard.estimate(Decoder(), _ids(2, 32), optimizer=ValueReadingOptimizer, device="cpu",
                              on_untraceable="bound")
    adamw = memguard.estimate(Decoder(), _ids(2, 32), optimizer="adamw", device="cpu")
    assert bound.approximate and not adamw.approximate
    assert any("approximate" in n for n in bound.notes)
    assert bound.peak_bytes >= adamw.peak_bytes * 0.98


class _Counted(nn.Module):
    """A decoder whose forward counts its calls (the fake twin shares the class-level counter)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.inner = Decoder()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return self.inner(ids)


_SAME_FIELDS = ("peak_bytes", "reserved_bytes", "device_bytes", "breakdown", "phase_peaks", "phase_breakdowns",
                "peak_phase", "unified_bytes", "notes")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trace_cache_replays_the_forward_and_backward_exactly(device: str, precision: str) -> None:
    """Estimates that differ only in the optimizer reuse one trace of the model, with the same answer."""
    from memguard.trace import TraceCache

    torch.manual_seed(0)
    model, batch = _Counted(), _ids(2, 32)
    cache = TraceCache()
    runs = [("adamw", False), ("sgd", False), ("adafactor", False), ("adamw", True)]
    for i, (optimizer, offload) in enumerate(runs):
        kwargs = dict(optimizer=optimizer, optimizer_offload=offload, precision=precision, device=device,
                      zero_grad_before_backward=True)
        plain = memguard.estimate(model, batch, **kwargs)
        _Counted.calls = 0
        cached = memguard.estimate(model, batch, trace_cache=cache, **kwargs)
        assert _Counted.calls == (1 if i == 0 else 0), optimizer  # traced once, then replayed
        for name in _SAME_FIELDS:
            assert getattr(cached, name) == getattr(plain, name), (optimizer, offload, name)
    assert len(cache) == 1


def test_trace_cache_traces_again_when_the_model_program_changes() -> None:
    from memguard.trace import TraceCache

    torch.manual_seed(0)
    model, cache = _Counted(), TraceCache()
    for precision, batch in [("32-true", _ids(2, 32)), ("bf16-mixed", _ids(2, 32)), ("32-true", _ids(1, 32))]:
        _Counted.calls = 0
        est = memguard.estimate(model, batch, precision=precision, device="cpu", trace_cache=cache)
        assert _Counted.calls == 1
        assert est.peak_bytes == memguard.estimate(model, batch, precision=precision, device="cpu").peak_bytes
    assert len(cache) == 3
