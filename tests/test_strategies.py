"""memguard.strategies: the one table of strategy names, against what the estimation does with each name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from memguard import InvalidArgumentError, strategies
from memguard.estimation.distributed import STRATEGY_NAMES, Strategy, TPOptions, estimate_distributed, parse_strategy
from memguard.strategies import Kind

CPU = "cpu"


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(4, 16)


def test_the_table_is_what_the_estimation_accepts() -> None:
    assert strategies.names() == sorted(strategies.TABLE) == STRATEGY_NAMES
    assert len(strategies.names()) == 25
    for name in strategies.names():
        row = strategies.lookup(name)
        assert row.name == name
        if row.kind is None:
            assert strategies.is_single_process(name)
            with pytest.raises(InvalidArgumentError, match="not a data-parallel strategy"):
                parse_strategy(name)
            continue
        spec = parse_strategy(name)
        assert (spec.kind, spec.name) == (row.kind, name)
        assert strategies.is_replicated(name) == (row.kind is Kind.DDP)
        assert strategies.is_sharded(name) == (row.kind is not Kind.DDP)


@pytest.mark.parametrize("name", ["dp", "deepspeed_stage_3_offload_nvme", "xla", "fsdp1"])
def test_names_memguard_cannot_predict_are_not_in_the_table(name: str) -> None:
    assert strategies.find(name) is None
    assert not (strategies.is_replicated(name) or strategies.is_sharded(name) or strategies.is_single_process(name))
    with pytest.raises(InvalidArgumentError, match=f"unknown strategy '{name}'"):
        strategies.lookup(name)
    with pytest.raises(InvalidArgumentError, match=f"unknown strategy '{name}'"):
        parse_strategy(name)


def test_an_unknown_name_lists_the_closest_valid_ones() -> None:
    with pytest.raises(InvalidArgumentError,
                       match=r"Did you mean 'deepspeed_stage_3_offload'.*Valid: auto, ddp,") as info:
        strategies.lookup("deepspeed_stage_3_offload_nvme")
    assert "deepspeed_stage_3_offload_nvme'" in str(info.value)
    with pytest.raises(InvalidArgumentError, match=r"Did you mean 'fsdp', 'fsdp2'"):
        strategies.lookup("fsdp3")


def test_rows_say_what_each_name_is() -> None:
    auto, single = strategies.lookup("auto"), strategies.lookup("single_device")
    assert (auto.kind, auto.several, single.kind, single.several) == (None, "ddp", None, None)
    assert strategies.is_replicated("auto") and not strategies.is_replicated("single_device")
    assert strategies.lookup(" DDP_Spawn ").name == "ddp_spawn"
    unused = {n for n, r in strategies.TABLE.items() if r.find_unused_parameters}
    assert unused == {f"{launcher}_find_unused_parameters_true"
                      for launcher in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")}
    assert {n for n, r in strategies.TABLE.items() if r.cpu_offload} == {"fsdp_cpu_offload"}
    zero = {n: (r.stage, r.offload_optimizer, r.offload_parameters)
            for n, r in strategies.TABLE.items() if r.kind is Kind.DEEPSPEED}
    assert zero == {"deepspeed": (2, False, False), "deepspeed_stage_1": (1, False, False),
                    "deepspeed_stage_2": (2, False, False), "deepspeed_stage_2_offload": (2, True, False),
                    "deepspeed_stage_3": (3, False, False), "deepspeed_stage_3_offload": (3, True, True)}
    for name, row in strategies.TABLE.items():
        if row.kind is Kind.DEEPSPEED:
            opts = parse_strategy(name).options
            assert (opts.stage, opts.offload_optimizer, opts.offload_parameters) == zero[name]


def test_lightning_class_names() -> None:
    assert strategies.from_class_name("lightning.pytorch.strategies.FSDPStrategy") == "fsdp"
    assert strategies.from_class_name("DeepSpeedStrategy") == "deepspeed"
    assert strategies.from_class_name("ModelParallelStrategy") == "model_parallel"
    assert strategies.from_class_name("XLAStrategy") is None
    assert all(name in strategies.TABLE for name in strategies.CLASS_NAMES.values())


def test_the_sharding_knob_switches_to_table_names() -> None:
    from memguard.plan import _SHARDING

    assert all(strategies.is_sharded(name) for name in _SHARDING)


@pytest.mark.parametrize("name", strategies.names())
def test_every_name_estimates_two_ranks_on_the_cpu(name: str) -> None:
    model, batch = _tiny()
    if name == "single_device":
        with pytest.raises(InvalidArgumentError, match="runs one process"):
            estimate_distributed(model, batch, strategy=name, world_size=2, device=CPU)
        est = estimate_distributed(model, batch, strategy=name, world_size=1, device=CPU)
        assert est.peak_bytes > 0
        return
    if strategies.is_sharded(name) and strategies.lookup(name).kind is not Kind.DEEPSPEED \
            and not torch.distributed.is_available():
        pytest.skip("FSDP is traced on a fake process group: needs torch.distributed")
    if strategies.lookup(name).kind is Kind.TP:  # a plain Sequential has no plan of its own: one is given
        with pytest.raises(InvalidArgumentError, match="needs a plan"):
            estimate_distributed(model, batch, strategy=name, world_size=2, device=CPU)
        name = Strategy(Kind.TP, name, TPOptions(plan={"0": "colwise", "2": "rowwise"}))
    est = estimate_distributed(model, batch, strategy=name, world_size=2, device=CPU)
    assert est.peak_bytes > 0 and len(est.per_rank) == 2


def test_the_table_is_a_bottom_layer_module() -> None:
    path = Path(strategies.__file__)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert {m for m in imported if m.startswith("memguard") or m.startswith("torch")} == {"memguard.errors"}
