"""The optimizer catalog against the real optimizers: state kept (byte for byte, by running the real class
on CPU tensors), what the trace records, the analytic what-ifs, class mapping, swapping and errors."""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import memguard
from groundtruth import measure_peak
from memguard import Category, InvalidArgumentError
from memguard import optimizers as O
from memguard.device.models import DeviceModel, device_model
from memguard.plan import OPTIMIZER_CHOICES
from memguard.trace import StepProgram, trace_training

# Sizes that exercise every rule: under 4096 elements (bitsandbytes keeps 32-bit state, torchao a plain
# tensor), large and not divisible by 256 (torchao keeps it plain), divisible by every block size, bf16.
SHAPES = [
    ((300, 500), torch.float32),
    ((10,), torch.float32),
    ((64, 64), torch.bfloat16),
    ((300, 512), torch.float32),
    ((1000,), torch.bfloat16),
    ((256, 64), torch.bfloat16),
]

TORCH = ["sgd", "sgd_momentum", "adam", "adamw", "rmsprop", "adagrad", "adafactor"]
BNB = ["adamw8bit", "adam8bit", "paged_adamw8bit", "paged_adamw"]
TORCHAO = ["ao_adamw8bit", "ao_adamw4bit", "ao_adamw_fp8"]


def _library(name: str) -> None:
    lib = O.entry(name).library
    if lib == "bitsandbytes":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    elif lib == "torchao":
        pytest.importorskip("torchao.optim", reason="torchao is not installed")
    elif lib == "lion-pytorch":
        pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed")


@pytest.fixture
def eager_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao compiles each parameter's update (seconds per shape on the CPU); the state it creates does
    not depend on compiling, so the tests run the update eagerly."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def _leaves(t: torch.Tensor):
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for attr in attrs:
            yield from _leaves(getattr(t, attr))
    else:
        yield t


def real_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the unique storages of every tensor in ``opt.state`` (subclasses unpacked, shared
    tensors such as bitsandbytes' quantization maps counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                for leaf in _leaves(value):
                    st = leaf.untyped_storage()
                    seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
    return sum(seen.values())


def real_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    plan = O.swap_plan(name)
    assert plan.name == name  # the first-choice library is installed here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers warn that the CPU has no paging
        return plan.cls(params, **plan.defaults)


def run_real_step(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(shape).to(dtype)) for shape, dtype in SHAPES]


# ---------------------------------------------------------------------------------------------------------
# The real optimizer's state, byte for byte


@pytest.mark.parametrize("name", TORCH + BNB + TORCHAO)
def test_state_bytes_equal_the_real_optimizers_state(name: str, eager_torchao: None) -> None:
    _library(name)
    params = _params()
    opt = real_optimizer(name, params)
    run_real_step(opt, params)
    assert O.state_bytes(name, params, "for-loop", device="cpu") == real_state_bytes(opt)


def test_catalog_covers_the_known_names() -> None:
    assert O.names() == sorted(TORCH + BNB + TORCHAO + ["lion"])
    assert set(O.names()) == set(O.CATALOG)


def test_lion_keeps_one_momentum_per_parameter() -> None:
    params = _params()
    assert O.state_bytes("lion", params) == sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "paged_adamw"])
def test_bitsandbytes_layout_follows_its_rules(name: str) -> None:
    big = O.ParamSpec((300, 500), torch.bfloat16)  # 150000 elements: paged on CUDA, 586 blocks of 256
    small = O.ParamSpec((64, 63), torch.bfloat16)  # 4032 < 4096: 32-bit state
    quantized = name != "paged_adamw"
    per_big = 2 * 150000 + 2 * 4 * 586 if quantized else 2 * 4 * 150000
    qmaps = 2 * 4 * 256 if quantized else 0
    paged = O.entry(name).paged
    assert O.state_bytes(name, [big], device="cpu") == per_big + qmaps
    assert O.state_bytes(name, [small]) == 2 * 4 * 4032
    # Paged moments of large parameters live in unified memory on CUDA; absmax and maps stay on the device.
    assert O.unified_state_bytes(name, [big, small]) == (2 * 150000 * (1 if quantized else 4) if paged else 0)
    assert O.unified_state_bytes(name, [big, small], device="cpu") == 0
    assert O.state_bytes(name, [big, small]) + O.unified_state_bytes(name, [big, small]) == (
        O.state_bytes(name, [big, small], device="cpu")
    )


def test_nominal_bytes_per_parameter() -> None:
    nominal = {n: O.entry(n).state_bytes_per_param for n in O.names()}
    assert nominal["adamw"] == pytest.approx({4: 8.0, 2: 4.0})  # plus one 4-byte step counter per tensor
    assert nominal["sgd_momentum"] == {4: 4.0, 2: 2.0}
    assert nominal["paged_adamw"] == {4: 8.0, 2: 8.0}  # bitsandbytes keeps fp32 moments for any dtype
    assert nominal["adamw8bit"][4] == pytest.approx(2 + 8 / 256, abs=1e-3)
    assert nominal["ao_adamw4bit"][2] == pytest.approx(1 + 8 / 128, abs=1e-3)
    assert nominal["adafactor"][4] < 0.01


# ---------------------------------------------------------------------------------------------------------
# What the estimate records


class Net(nn.Module):
    """Activations dominate, so the peak is in the second step, when every parameter has its state."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 300), nn.ReLU(),
                                    nn.Linear(300, 500), nn.ReLU(), nn.Linear(500, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def _cpu_optimizer(name: str) -> str | O.Factory:
    # Paged optimizers fall back to ordinary memory on the CPU; the factory is told the target device.
    return O.make_factory(name, "for-loop", device="cpu")[0] if O.entry(name).paged else name


@pytest.mark.parametrize("name", TORCH + BNB + TORCHAO)
def test_estimate_records_the_real_state(name: str, eager_torchao: None) -> None:
    _library(name)
    torch.manual_seed(0)
    model, batch = Net(), torch.randn(1024, 64)
    est = memguard.estimate(model, batch, optimizer=_cpu_optimizer(name), device="cpu")
    params = list(copy.deepcopy(model).parameters())
    opt = real_optimizer(name, params)
    run_real_step(opt, params)
    assert est.breakdown[Category.OPTIMIZER_STATE] == real_state_bytes(opt)
    assert est.breakdown[Category.OPTIMIZER_STATE] == O.state_bytes(name, model, device="cpu")


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged_adamw", "ao_adamw4bit", "lion"])
def test_estimate_state_in_bf16_true(name: str) -> None:
    torch.manual_seed(0)
    model = Net()
    est = memguard.estimate(model, torch.randn(1024, 64), optimizer=_cpu_optimizer(name), device="cpu",
                            precision="bf16-true")
    bf16 = [(tuple(p.shape), torch.bfloat16) for p in model.parameters()]
    assert est.breakdown[Category.OPTIMIZER_STATE] == O.state_bytes(name, bf16, device="cpu")


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw"])
def test_bitsandbytes_cpu_peak_matches_the_measured_one(name: str, precision: str) -> None:
    """End to end on the CPU backend: the stand-in's state and modelled step scratch give the measured
    peak, bitsandbytes' two 1 KiB quantization maps that the constructor makes (8-bit only) included."""
    _library(name)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 300), nn.ReLU(), nn.Linear(300, 10))

    batch = torch.randn(2, 512)

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m(b).square().mean()

    dtype = torch.bfloat16 if precision == "bf16-true" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = measure_peak(build(), batch, lambda ps: O.real_class(name)(ps), loss_fn=loss_fn, param_dtype=dtype)
    factory, _ = O.make_factory(name, "for-loop", device="cpu")
    est = memguard.estimate(build(), batch, loss_fn=loss_fn, optimizer=factory, device="cpu", precision=precision)
    assert est.peak_phase == "step2.optimizer"
    assert est.peak_bytes == real


# ---------------------------------------------------------------------------------------------------------
# The analytic what-ifs agree with the trace


def _curve(trace, round_up) -> list[int]:
    live, out = 0, []
    for ev in trace.events:
        live += round_up(trace.sizes[ev - 1]) if ev > 0 else -round_up(trace.sizes[-ev - 1])
        out.append(live)
    return out


def _traced(factory: O.Factory, device: str, model: nn.Module) -> tuple[int, int, Callable[[int], int]]:
    """The step-2 optimizer transient and the optimizer state as the trace records them. The CPU rows use
    the exact-bytes device model: the CPU model adds the hidden scratch its probes find in half-precision
    kernels, which belongs to the device, not to the optimizer's program."""
    dev = device_model(device) if device == "cuda" else DeviceModel()
    trace = trace_training(model, torch.randn(4, 64), factory, StepProgram(), device=dev)
    curve = _curve(trace, dev.round_up)
    bounds = [start for start, _ in trace.phases] + [len(trace.events)]
    (start, end), = [(s, e) for (s, n), e in zip(trace.phases, bounds[1:]) if n == "step2.optimizer"]
    transient = max(curve[start:end], default=curve[start - 1]) - curve[start - 1]
    state = sum(dev.round_up(n) for n, c in zip(trace.sizes, trace.categories) if c == Category.OPTIMIZER_STATE)
    return transient, state, dev.round_up


class Mixed(nn.Module):
    """Parameters of several sizes and two dtypes, so the foreach groups and per-parameter carries show."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 300)
        self.b = nn.Linear(300, 500).to(torch.bfloat16)
        self.c = nn.Linear(500, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).bfloat16()).float()).sum()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "adam", "rmsprop", "adagrad", "adafactor", "lion",
                                  "adamw8bit", "ao_adamw4bit"])
def test_analytic_state_and_transient_match_the_trace(name: str, impl: str, device: str) -> None:
    model = Mixed()
    transient, state, round_up = _traced(O.make_factory(name, impl, device=device)[0], device, model)
    assert O.step_transient_bytes(name, model, impl, device=device, round_up=round_up) == transient
    assert O.state_bytes(name, model, impl, device=device, round_up=round_up) == state


def test_for_loop_and_foreach_transients_follow_torch() -> None:
    """AdamW's for-loop holds sqrt and quotient of one parameter next to the previous one's denominator;
    foreach holds one copy of every parameter; fused nothing."""
    sizes = [4 * 300 * 64, 4 * 300, 2 * 500 * 300, 2 * 500, 4 * 7 * 500, 4 * 7]
    model = Mixed()
    assert O.step_transient_bytes("adamw", model, "for-loop") == 2 * sizes[2] + sizes[1]
    assert O.step_transient_bytes("adamw", model, "foreach") == sum(sizes)
    assert O.step_transient_bytes("adamw", model, "fused") == 0
    assert O.step_transient_bytes("sgd_momentum", model, "foreach") == 0


# ---------------------------------------------------------------------------------------------------------
# Building stand-ins, mapping classes, unified memory


def _meta_params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")) for shape, dtype in SHAPES]


@pytest.mark.parametrize("name", BNB + TORCHAO + ["lion"])
def test_stand_in_keeps_the_layout_and_reports_unified_bytes(name: str) -> None:
    factory, label = O.make_factory(name, "foreach")
    params = _meta_params()
    opt = factory(params)
    assert isinstance(opt, O.ShapeOnlyOptimizer) and label == name
    assert not opt.state  # state is created lazily, on the first step
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    device = sum(t.untyped_storage().nbytes() for t in {id(v): v for s in opt.state.values()
                                                       for v in s.values() if isinstance(v, torch.Tensor)}.values())
    parts = O.state_breakdown(name, params)
    assert device == parts["device"] + parts["host"]  # the stand-in keeps host counters too; the trace skips them
    assert opt.unified_bytes == O.unified_state_bytes(name, params)
    assert (opt.unified_bytes > 0) == O.entry(name).paged


def test_torch_fused_runs_as_a_stand_in_and_others_are_traced() -> None:
    fused, _ = O.make_factory("adamw", "fused")
    assert isinstance(fused(_meta_params()), O.ShapeOnlyOptimizer)
    foreach, label = O.make_factory(torch.optim.AdamW, "foreach")
    assert type(foreach(_meta_params())) is torch.optim.AdamW and label == "AdamW"
    rms, _ = O.make_factory("rmsprop", "fused")  # torch has no fused RMSprop: the for-loop is traced
    assert type(rms(_meta_params())) is torch.optim.RMSprop
    sgd, _ = O.make_factory(torch.optim.SGD, "fused", {"momentum": 0.9})
    assert isinstance(sgd(_meta_params()), O.ShapeOnlyOptimizer)


def test_library_classes_map_to_their_stand_ins() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    ao = pytest.importorskip("torchao.optim")
    for cls, name in [(bnb.optim.AdamW8bit, "adamw8bit"), (bnb.optim.PagedAdamW8bit, "paged_adamw8bit"),
                      (bnb.optim.PagedAdamW, "paged_adamw"), (bnb.optim.Adam8bit, "adam8bit"),
                      (ao.AdamW8bit, "ao_adamw8bit"), (ao.AdamW4bit, "ao_adamw4bit"), (ao.AdamWFp8, "ao_adamw_fp8")]:
        assert O.entry_for_class(cls) is O.entry(name)
        factory, label = O.make_factory(cls, "foreach")
        assert isinstance(factory(_meta_params()), O.ShapeOnlyOptimizer) and label == cls.__name__
    est = memguard.estimate(Net(), torch.randn(8, 64), optimizer=bnb.optim.AdamW8bit, device="cuda")
    assert est.breakdown[Category.OPTIMIZER_STATE] == O.state_bytes(
        "adamw8bit", Net(), round_up=device_model("cuda").round_up)


def test_lion_pytorch_classes_map_by_name() -> None:
    def lion_class(module: str) -> type:
        return type("Lion", (torch.optim.Optimizer,), {"__module__": module})

    assert O.entry_for_class(lion_class("lion_pytorch.lion_pytorch")) is O.entry("lion")
    model = Mixed()
    for module, kwargs, impl in [("lion_pytorch.lion_pytorch", {}, "for-loop"),
                                 ("lion_pytorch.foreach", {}, "foreach"),
                                 ("lion_pytorch.lion_pytorch", {"use_triton": True}, "fused")]:
        transient, _, _ = _traced(O.make_factory(lion_class(module), "foreach", kwargs)[0], "cpu", model)
        assert transient == O.step_transient_bytes("lion", model, impl), module


def test_paged_state_is_not_on_the_device_for_cuda() -> None:
    model = Net()
    cuda = memguard.estimate(model, torch.randn(8, 64), optimizer="paged_adamw", device="cuda")
    rnd = device_model("cuda").round_up
    assert cuda.breakdown[Category.OPTIMIZER_STATE] == O.state_bytes("paged_adamw", model, round_up=rnd)
    # Only the moments of parameters under 100000 elements stay in device memory.
    small = [p for p in model.parameters() if p.numel() < O.PAGED_MIN_NUMEL]
    assert O.state_bytes("paged_adamw", model) == sum(8 * p.numel() for p in small)
    assert O.unified_state_bytes("paged_adamw", model) == sum(8 * p.numel() for p in model.parameters()) - sum(
        8 * p.numel() for p in small)


# ---------------------------------------------------------------------------------------------------------
# Swapping the real class in, and errors


def test_swap_plan_rebuilds_over_the_old_groups() -> None:
    pytest.importorskip("bitsandbytes")
    params = _params()[:4]
    old = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05, foreach=False)
    old.param_groups[0]["initial_lr"] = 3e-4  # what an LR scheduler adds
    plan = O.swap_plan("adamw8bit")
    new = plan.build(old)
    group = new.param_groups[0]
    assert type(new).__name__ == "AdamW8bit" and group["params"] == params
    assert (group["lr"], group["weight_decay"], group["initial_lr"]) == (3e-4, 0.05, 3e-4)
    assert "decoupled_weight_decay" not in group and "foreach" not in group
    run_real_step(new, params)
    momentum = O.swap_plan("sgd_momentum").build(old)
    assert momentum.param_groups[0]["momentum"] == 0.9 and momentum.param_groups[0]["lr"] == 3e-4


PLANNER_OPTIMIZERS = OPTIMIZER_CHOICES
"""Every optimizer the planner can switch a run to: each swap must survive real training steps."""


@pytest.mark.parametrize("name", PLANNER_OPTIMIZERS)
def test_every_planner_swap_trains_and_keeps_what_means_the_same(name: str) -> None:
    if not O.available(name):
        pytest.skip(f"{name} is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 64))  # 8-bit state from 4096 elements
    old = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                            amsgrad=True, foreach=False)
    scheduler = torch.optim.lr_scheduler.StepLR(old, step_size=1, gamma=0.5)  # adds initial_lr to the groups
    new = O.rebuild_optimizer(old, name)
    group = new.param_groups[0]
    assert group["params"] == list(model.parameters())
    assert float(group["lr"]) == pytest.approx(3e-4) and group["weight_decay"] == 0.1 and group["initial_lr"] == 3e-4
    assert "amsgrad" not in group or group["amsgrad"] is False  # a feature of AdamW, not carried over
    if "betas" in group:
        assert tuple(group["betas"]) == (0.8, 0.95)
    if isinstance(group.get("eps"), float):
        assert group["eps"] == 1e-6
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        loss = model(torch.randn(16, 96)).pow(2).mean()
        loss.backward()
        new.step()
        new.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert new.state  # the new class keeps its own state
    del scheduler


def test_adafactor_keeps_its_own_pair_of_eps() -> None:
    """AdamW's eps is a float, torch.optim.Adafactor's a pair: carried over, the first step would fail."""
    params = [nn.Parameter(torch.randn(32, 32))]
    new = O.rebuild_optimizer(torch.optim.AdamW(params, eps=1e-8), "adafactor")
    assert isinstance(new, torch.optim.Adafactor) and isinstance(new.param_groups[0]["eps"], tuple)
    params[0].grad = torch.randn(32, 32)
    new.step()


def test_a_repointed_scheduler_drives_the_rebuilt_optimizer() -> None:
    """The callback's swap: the scheduler moves to the new optimizer and sees its steps (no warning that the
    scheduler stepped before the optimizer, and the learning rate it sets lands in the new groups)."""
    params = [nn.Parameter(torch.randn(8, 8))]
    old = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.StepLR(old, step_size=1, gamma=0.5)
    new = O.rebuild_optimizer(old, "adafactor")
    O.repoint_scheduler(scheduler, new)
    assert scheduler.optimizer is new and getattr(new.step, "_wrapped_by_lr_sched", False)
    params[0].grad = torch.randn(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new.step()
        scheduler.step()
    assert new.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_missing_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    needs = r"optimizer 'paged_adamw8bit' needs bitsandbytes: pip install bitsandbytes"
    with pytest.raises(InvalidArgumentError, match=needs):
        O.real_class("paged_adamw8bit")
    assert not O.available("paged_adamw8bit")
    if O.available("ao_adamw8bit"):  # torchao stands in for bitsandbytes' 8-bit AdamW
        assert O.swap_plan("adamw8bit").name == "ao_adamw8bit"
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(InvalidArgumentError, match=r"optimizer 'adamw8bit' needs bitsandbytes: pip install "
                                                   r"bitsandbytes \(or torchao: pip install torchao\)"):
        O.real_class("adamw8bit")
    # Tracing needs no library: the stand-in is memguard's own.
    assert O.make_factory("adamw8bit", "foreach")[1] == "adamw8bit"


def test_lion_needs_lion_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(InvalidArgumentError, match=r"optimizer 'lion' needs lion-pytorch: pip install lion-pytorch"):
        O.real_class("lion")


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown optimizer 'adamw9bit'\. Did you mean 'adamw8bit'"):
        O.entry("adamw9bit")
    with pytest.raises(InvalidArgumentError, match=r"unknown optimizer implementation 'fusd'\. Did you mean 'fused'"):
        O.make_factory("adamw", "fusd")
    with pytest.raises(InvalidArgumentError, match=r"unknown optimizer 'pagedadam'"):
        memguard.estimate(Net(), torch.randn(2, 64), optimizer="pagedadam", device="cpu")
    assert O.entry("Paged-AdamW8bit") is O.entry("paged_adamw8bit")
