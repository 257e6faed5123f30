"""estimate_distributed(): per-rank peaks against real multi-process training on the CPU (gloo), strategy
parsing, the fake process group's isolation, and the DeepSpeed model against DeepSpeed's own estimators.

The real runs start one process per rank (tests/dist_worker.py) with a free port, a timeout on the process
group and on every join, and kill every rank if one fails; each rank measures its own peak of live tensor
bytes with torch.profiler's allocator events, without memguard. All cases of one world size share one set
of processes (module-scoped fixture), so the whole file costs two launches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from memguard import Category, InvalidArgumentError
from memguard.device.models import device_model
from memguard.estimation.distributed import (
    NCCL_DEVICE_BYTES,
    DDPOptions,
    DeepSpeedOptions,
    FSDP2Options,
    FSDPOptions,
    Kind,
    Strategy,
    TPOptions,
    estimate_distributed,
    fake_world,
    largest_layer_params,
    parse_strategy,
    zero_model_states,
)
from zoo import Block, Decoder, LlamaLike, _ids, hf_llama_for_tp, tp_plan

WORKER = Path(__file__).with_name("dist_worker.py")
MODEL = {"d": 64, "layers": 4}
BATCH = (8, 128)
TOLERANCE = 0.03


def _gloo() -> bool:
    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available")


def _fsdp_strategy(**kwargs: Any) -> Any:
    """A Lightning FSDPStrategy when Lightning is installed (what users pass), else memguard's own value."""
    try:
        from pytorch_lightning.strategies import FSDPStrategy
    except ImportError:
        policy = kwargs.pop("auto_wrap_policy", None)
        return Strategy(Kind.FSDP, "fsdp", FSDPOptions(auto_wrap_policy=policy, **kwargs))
    return FSDPStrategy(**kwargs)


def _ddp_strategy(**kwargs: Any) -> Any:
    try:
        from pytorch_lightning.strategies import DDPStrategy
    except ImportError:
        return Strategy(Kind.DDP, "ddp", DDPOptions(**kwargs))
    return DDPStrategy(**kwargs)


# name -> (what the worker runs, the strategy memguard is given, other estimate() arguments)
CASES: dict[str, tuple[dict, Any, dict]] = {
    "ddp": ({"kind": "ddp"}, "ddp", {}),
    "ddp_bucket_view": ({"kind": "ddp", "gradient_as_bucket_view": True},
                        lambda: _ddp_strategy(gradient_as_bucket_view=True), {}),
    "fsdp_full_shard": ({"kind": "fsdp"}, lambda: _fsdp_strategy(auto_wrap_policy={Block}), {}),
    "fsdp_shard_grad_op_flat": ({"kind": "fsdp", "sharding": "SHARD_GRAD_OP", "use_orig_params": False},
                                lambda: _fsdp_strategy(auto_wrap_policy={Block}, sharding_strategy="SHARD_GRAD_OP",
                                                       use_orig_params=False), {}),
    "fsdp_checkpointing": ({"kind": "fsdp", "checkpoint_blocks": True},
                           lambda: _fsdp_strategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block}),
                           {}),
    "fsdp_bf16_mixed": ({"kind": "fsdp", "mixed": "bf16", "autocast": "bf16"},
                        lambda: _fsdp_strategy(auto_wrap_policy={Block}), {"precision": "bf16-mixed"}),
    "fsdp2": ({"kind": "fsdp2"}, "fsdp2", {}),
    "fsdp2_bf16_mixed": ({"kind": "fsdp2", "mixed": "bf16"}, "fsdp2", {"precision": "bf16-mixed"}),
    # tensor parallel (torchtitan's plan for a Llama-shaped decoder), alone, with sequence parallelism, and
    # with FSDP2 on the data-parallel dimension of a 2 x 2 mesh
    "tp": ({"kind": "tp", "tp": 0, "arch": "llama"}, lambda w: _tp(w), {}),
    "tp_sequence_parallel": ({"kind": "tp", "tp": 0, "arch": "llama", "sequence_parallel": True},
                             lambda w: _tp(w, sequence_parallel=True), {}),
    "tp2_fsdp2": ({"kind": "tp", "tp": 2, "arch": "llama"}, lambda w: _tp(w, tp=2), {}),
    "tp_loss_parallel": ({"kind": "tp", "tp": 0, "arch": "llama", "loss_parallel": True},
                         lambda w: _tp(w, loss_parallel=True), {}),
    # a transformers Llama parallelised by transformers' own code with its own plan (strategy "tp")
    "tp_transformers_llama": ({"kind": "tp", "tp": 0, "arch": "hf_llama"}, lambda w: "tp",
                              {"loss_fn": lambda m, b: m(input_ids=b, labels=b).loss}),
}


def _tp(world_size: int, tp: int = 0, sequence_parallel: bool = False, loss_parallel: bool = False) -> Strategy:
    return Strategy(Kind.TP, "tp", TPOptions(tensor_parallel_size=tp or world_size, loss_parallel=loss_parallel,
                                             plan=tp_plan(sequence_parallel, loss_parallel)))
# What the tests run for real (all of CASES run in benchmarks/distributed_accuracy.py); DDP does not depend
# on the number of ranks, so it runs on 2 only; on 4, FSDP2's uneven shards (rank 0 holds more), tensor
# parallelism over 4 and the 2 x 2 mesh.
WORLDS = {2: ["ddp", "fsdp_full_shard", "fsdp_shard_grad_op_flat", "fsdp_checkpointing", "fsdp_bf16_mixed", "fsdp2",
              "tp", "tp_sequence_parallel", "tp_loss_parallel", "tp_transformers_llama"],
          4: ["fsdp2", "tp", "tp2_fsdp2"]}
TP_TOLERANCE = 0.02
"""Tensor parallelism is checked to 2%: every rank's prediction against its real peak."""
CPU = device_model("cpu")  # one device model: kernel measurements are shared by every estimate here


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cases: list[dict], world_size: int, timeout: float = 300.0) -> list[dict]:
    """Run ``cases`` on ``world_size`` real gloo ranks; each rank's ``{case: {"peak", "start"}}``.

    Every rank is a subprocess; if one fails or the whole run passes ``timeout`` seconds, all are killed,
    so nothing can hang the test run.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "cases.json")
        spec.write_text(json.dumps(cases))
        port = _free_port()
        procs = []
        for rank in range(world_size):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       MEMGUARD_TEST_THREADS=str(torch.get_num_threads()))
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec), str(Path(tmp, f"rank{rank}.json"))],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        outputs: list[str] = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                outputs.append(out.decode(errors="replace"))
                if proc.returncode != 0:
                    raise RuntimeError(f"a rank failed (exit {proc.returncode}):\n{outputs[-1][-4000:]}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(world_size)]


def runs_of(name: str) -> int:
    """How many times the tests run a case: twice for tensor parallelism, once for the rest.

    Gloo runs a collective on a worker thread, whose work object holds the collective's tensors until that
    thread lets go of it. On an idle machine that happens before the caller moves on; on a loaded one it can
    happen later, and the tensor is then really held longer: once, in CI, a tensor-parallel rank measured its
    1 MiB logits shard (gathered for the loss) on top of the loss's own peak. A late release can only add to a
    peak, never take from it, so the lower of two runs is still a real run's peak, the program's own. Tensor
    parallelism gathers activations right at the loss, where the peak is, and is checked to 2%, so its cases
    run twice. The other cases are checked to 3%: what their collectives hold is one block's parameters or
    gradients (under 1% of these peaks), so a late release of it cannot fail them.
    """
    return 2 if CASES[name][0]["kind"] == "tp" else 1


def measured_runs(world_size: int, names: list[str], repeat: int | None = None,
                  timeout: float = 300.0) -> dict[str, list[list[int]]]:
    """Each case's measured peaks per rank, one per run (``repeat`` runs, by default :func:`runs_of`: see
    dist_worker.run_case)."""
    cases = [dict(CASES[name][0], name=name, model=MODEL, batch=BATCH, repeat=repeat or runs_of(name))
             for name in names]
    for case in cases:
        if case["kind"] == "tp" and not case["tp"]:
            case["tp"] = world_size
    ranks = run_ranks(cases, world_size, timeout)
    return {name: [ranks[r][name]["peaks"] for r in range(world_size)] for name in names}


def measured_world(world_size: int, names: list[str], repeat: int | None = None,
                   timeout: float = 300.0) -> dict[str, list[int]]:
    """Each case's measured peak per rank: the lowest of its runs (:func:`runs_of` says why)."""
    runs = measured_runs(world_size, names, repeat, timeout)
    return {name: [min(peaks) for peaks in per_rank] for name, per_rank in runs.items()}


def case_model(name: str) -> nn.Module:
    """The model of case ``name``, with the weights every rank builds (seed 0)."""
    arch = CASES[name][0].get("arch")
    torch.manual_seed(0)
    return hf_llama_for_tp() if arch == "hf_llama" else (LlamaLike if arch == "llama" else Decoder)(**MODEL)


def predicted(name: str, world_size: int) -> Any:
    case, strategy, kwargs = CASES[name]
    if callable(strategy):
        strategy = strategy(world_size) if case["kind"] == "tp" else strategy()
    return estimate_distributed(case_model(name), _ids(*BATCH), strategy=strategy, world_size=world_size,
                                device=CPU, optimizer="adamw", **kwargs)


@pytest.fixture(scope="module")
def measured() -> dict[int, dict[str, list[int]]]:
    # With every free counted, wherever gloo's threads make it (dist_worker's module docstring), a rank's
    # measurement repeats to the byte on an idle machine (benchmarks/distributed_accuracy.py checks that);
    # tensor-parallel cases run twice for the late releases of a loaded one (runs_of).
    return {world: measured_world(world, names) for world, names in WORLDS.items()}


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("world_size,name", [(w, n) for w, names in WORLDS.items() for n in names],
                         ids=[f"{n}-{w}ranks" for w, names in WORLDS.items() for n in names])
def test_every_rank_within_3_percent(measured: dict, world_size: int, name: str) -> None:
    real = measured[world_size][name]
    est = predicted(name, world_size)
    assert len(est.per_rank) == world_size
    assert est.peak_bytes == max(est.per_rank)
    for rank, (pred, meas) in enumerate(zip(est.per_rank, real)):
        error = (pred - meas) / meas
        assert abs(error) <= (TP_TOLERANCE if name.startswith("tp") else TOLERANCE), (
            f"{name}, rank {rank} of {world_size}: predicted {pred:,} vs measured {meas:,} ({error:+.2%})")


def test_frees_on_other_threads_are_counted() -> None:
    """The ground truth of the real runs counts a free made on a thread the profiler does not follow, as
    gloo's worker threads free the input copy of a reduce-scatter. Without dist_worker's flag the CPU
    allocator's running total keeps such a block for good (``ProfiledCPUMemoryReporter::Delete`` only
    updates it on a profiled thread), and the measured peak after it is too high by its size."""
    code = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from torch.autograd.profiler import profile
if sys.argv[1] == "flag":
    import dist_worker  # sets the flag on import
from groundtruth import _allocation_totals

held = []
with profile(profile_memory=True, use_cpu=True) as prof:
    held.append(torch.empty(1 << 20, dtype=torch.uint8))
    thread = threading.Thread(target=held.clear)
    thread.start()
    thread.join()
    after = torch.empty(64, dtype=torch.uint8)
events = _allocation_totals(prof)
print(events[-1][1] - (events[0][1] - events[0][0]))
"""
    out = {}
    for mode in ("flag", "plain"):
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120,
                             check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        out[mode] = int(run.stdout.split()[-1])
    assert out["flag"] == 64  # only the block still alive when the profile ends
    # the scenario does exercise the problem: without the flag the freed block stays in the total (if a
    # torch release counts such frees itself, the flag is no longer needed and this line says so)
    assert out["plain"] == 64 + (1 << 20), out


# ---------------------------------------------------------------------------------------------------------
# What the estimate says without running anything


def test_names_and_unknown_names() -> None:
    assert parse_strategy("ddp_spawn").kind is Kind.DDP
    assert parse_strategy("ddp_find_unused_parameters_true").options.find_unused_parameters
    assert parse_strategy("fsdp").kind is Kind.FSDP
    assert parse_strategy("fsdp_cpu_offload").options.cpu_offload
    assert parse_strategy("fsdp2").kind is Kind.FSDP2
    ds = parse_strategy("deepspeed_stage_3_offload").options
    assert (ds.stage, ds.offload_optimizer, ds.offload_parameters) == (3, True, True)
    assert parse_strategy("deepspeed_stage_2_offload").options.offload_optimizer
    with pytest.raises(InvalidArgumentError,
                       match=r"unknown strategy 'deepspeed_stage_4'.*Did you mean.*deepspeed_stage_"):
        parse_strategy("deepspeed_stage_4")
    with pytest.raises(InvalidArgumentError, match="strategy must be one of"):
        parse_strategy(42)


def test_lightning_strategy_objects_are_read() -> None:
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

    ddp = parse_strategy(DDPStrategy(gradient_as_bucket_view=True, static_graph=True, bucket_cap_mb=50))
    assert ddp.options == DDPOptions(gradient_as_bucket_view=True, static_graph=True, bucket_cap_mb=50)
    fsdp = parse_strategy(FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block},
                                       sharding_strategy="HYBRID_SHARD", cpu_offload=True, use_orig_params=False))
    opts = fsdp.options
    assert (opts.sharding_strategy, opts.cpu_offload, opts.use_orig_params) == ("HYBRID_SHARD", True, False)
    assert opts.auto_wrap_policy is not None and opts.activation_checkpointing is not None


def test_deepspeed_config_is_read() -> None:
    class FakeDeepSpeedStrategy:  # DeepSpeedStrategy needs deepspeed installed; memguard reads only .config
        config = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "reduce_bucket_size": 5e7, "stage3_max_live_parameters": 1e8}}

    opts = parse_strategy(FakeDeepSpeedStrategy()).options
    assert (opts.stage, opts.offload_optimizer, opts.offload_parameters) == (3, True, False)
    assert (opts.reduce_bucket_size, opts.stage3_max_live_parameters) == (50_000_000, 100_000_000)


def test_auto_is_one_process_or_ddp() -> None:
    model, batch = _small()
    single = estimate_distributed(model, batch, strategy="auto", world_size=1, device=CPU)
    assert single.per_rank == [single.peak_bytes]
    auto = estimate_distributed(model, batch, strategy="auto", world_size=2, device=CPU)
    assert auto.per_rank[0] > single.peak_bytes and any(n.startswith("DDP") for n in auto.notes)
    with pytest.raises(InvalidArgumentError, match="'single_device' runs one process"):
        estimate_distributed(model, batch, strategy="single_device", world_size=2, device=CPU)


def test_arguments_are_validated() -> None:
    with pytest.raises(InvalidArgumentError, match="world_size must be a positive int"):
        estimate_distributed(Decoder(), _ids(), strategy="ddp", world_size=0, device=CPU)
    with pytest.raises(InvalidArgumentError, match="num_nodes must be a positive int dividing"):
        estimate_distributed(Decoder(), _ids(), strategy="ddp", world_size=4, num_nodes=3, device=CPU)


def _small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Decoder(d=32, layers=2, vocab=128), _ids(2, 32, 128)


def test_fake_group_leaves_no_trace_and_the_model_untouched() -> None:
    model, batch = _small()
    before = {name: (p, p.device, p.shape) for name, p in model.named_parameters()}
    was_initialized = dist.is_initialized()
    est = estimate_distributed(model, batch, strategy="fsdp2", world_size=4, device=CPU)
    assert len(est.per_rank) == 4
    assert dist.is_initialized() == was_initialized
    after = {name: (p, p.device, p.shape) for name, p in model.named_parameters()}
    assert all(before[n][0] is after[n][0] and before[n][1:] == after[n][1:] for n in before)
    assert not any(type(m).__name__.startswith(("FSDP", "FullySharded")) for m in model.modules())


@needs_gloo
def test_an_existing_default_group_survives() -> None:
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        model, batch = _small()
        estimate_distributed(model, batch, strategy=_fsdp_strategy(auto_wrap_policy={Block}), world_size=2,
                             device=CPU)
        assert dist.group.WORLD is group and dist.get_world_size() == 1 and dist.get_rank() == 0
        t = torch.ones(3)
        dist.all_reduce(t)  # the user's group still works
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_fake_world_restores_state_on_error() -> None:
    was, hook = dist.is_initialized(), sys.excepthook
    with pytest.raises(RuntimeError, match="boom"), fake_world(8, 3):
        assert dist.get_world_size() == 8 and dist.get_rank() == 3
        raise RuntimeError("boom")
    assert dist.is_initialized() == was
    assert sys.excepthook is hook  # init_process_group's "[rank3]:" traceback prefix is gone


def test_meta_model_and_cuda_target_add_nccl_to_device_bytes_only() -> None:
    with torch.device("meta"):
        model = Decoder(d=32, layers=2, vocab=128)
    est = estimate_distributed(model, _ids(2, 32, 128), strategy="fsdp2", world_size=2, device="cuda")
    assert est.device_bytes >= est.reserved_bytes + NCCL_DEVICE_BYTES
    assert est.breakdown[Category.CONTEXT] >= NCCL_DEVICE_BYTES
    assert sum(v for k, v in est.breakdown.items() if k not in (Category.ALLOCATOR, Category.CONTEXT)) == est.peak_bytes
    cpu = estimate_distributed(model, _ids(2, 32, 128), strategy="fsdp2", world_size=2, device=CPU)
    assert cpu.device_bytes == cpu.reserved_bytes  # no NCCL on a CPU target
    assert any("NCCL" in n for n in est.notes) and any("FSDP2" in n for n in est.notes)


def test_sharding_shrinks_and_hybrid_shards_within_a_node() -> None:
    model, batch = _small()
    fsdp = _fsdp_strategy(auto_wrap_policy={Block})
    two = estimate_distributed(model, batch, strategy=fsdp, world_size=2, device=CPU)
    four = estimate_distributed(model, batch, strategy=fsdp, world_size=4, device=CPU)
    ddp = estimate_distributed(model, batch, strategy="ddp", world_size=4, device=CPU)
    assert four.peak_bytes < two.peak_bytes < ddp.peak_bytes
    hybrid = estimate_distributed(model, batch, strategy=_fsdp_strategy(auto_wrap_policy={Block},
                                                                        sharding_strategy="HYBRID_SHARD"),
                                  world_size=4, num_nodes=2, device=CPU)
    assert hybrid.per_rank == two.per_rank * 2
    assert any("HYBRID_SHARD" in n for n in hybrid.notes)


def test_many_layouts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import memguard.estimation.distributed as md

    monkeypatch.setattr(md, "MAX_TRACED_RANKS", 2)
    model, batch = _small()
    # use_orig_params: every rank owns different slices of the original parameters
    est = estimate_distributed(model, batch, strategy=_fsdp_strategy(auto_wrap_policy={Block}), world_size=8,
                               device=CPU)
    assert len(est.per_rank) == 8 and est.approximate
    assert any("not traced" in n for n in est.notes)
    assert est.per_rank.count(est.peak_bytes) >= 2  # untraced ranks are bounded by the largest traced one


def test_a_group_larger_than_traced_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP over more ranks than memguard runs FSDP's code for: traced smaller, every rank bounded by it
    plus the padding a larger group adds, never below the exact per-rank prediction."""
    import memguard.estimation.distributed as md

    model, batch = _small()
    strategy = _fsdp_strategy(auto_wrap_policy={Block}, use_orig_params=False)  # one layout: fast
    exact = estimate_distributed(model, batch, strategy=strategy, world_size=4, device=CPU)
    monkeypatch.setattr(md, "MAX_TRACED_GROUP", 2)
    bounded = estimate_distributed(model, batch, strategy=strategy, world_size=4, device=CPU)
    assert bounded.approximate and any("traced as 2" in n for n in bounded.notes)
    assert bounded.per_rank == [bounded.peak_bytes] * 4
    assert bounded.peak_bytes >= max(exact.per_rank)
    assert bounded.peak_bytes <= 1.5 * max(exact.per_rank)


def test_ddp_bucket_views_never_cost_more() -> None:
    model, batch = _small()
    plain = estimate_distributed(model, batch, strategy="ddp", world_size=2, device=CPU)
    views = Strategy(Kind.DDP, "ddp", DDPOptions(gradient_as_bucket_view=True))
    view = estimate_distributed(model, batch, strategy=views, world_size=2, device=CPU)
    single = sum(p.numel() * 4 for p in model.parameters())
    assert view.peak_bytes <= plain.peak_bytes
    assert any(f"{single:,} bytes" in n for n in plain.notes)


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed: model states against DeepSpeed's own estimators
#
# DeepSpeed needs a CUDA build to install, so its estimators (0.19.8: deepspeed/runtime/zero/stage_1_and_2.py
# estimate_zero2_model_states_mem_needs, deepspeed/runtime/zero/stage3.py estimate_zero3_model_states_mem_needs
# and model_to_params) are reimplemented once, in benchmarks/peers.py, where tests/test_gpu_measurements.py
# checks them against DeepSpeed itself wherever it is installed.

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import _zero2_gpu_bytes as ds_zero2_gpu_bytes  # noqa: E402
from peers import _zero3_gpu_bytes as ds_zero3_gpu_bytes  # noqa: E402


SIZES = [(125_000_000, 40_000_000), (1_300_000_000, 260_000_000), (6_738_415_616, 131_072_000),
         (68_976_648_192, 1_048_576_000)]


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
def test_zero_model_states_match_deepspeeds_estimators(total: int, largest: int, gpus: int) -> None:
    for offload in (False, True):
        ours = zero_model_states(total, largest, stage=2, world_size=gpus, offload_optimizer=offload)
        assert abs(ours.device - ds_zero2_gpu_bytes(total, gpus, cpu_offload=offload)) <= 4
    for offload, params in ((False, False), (True, False), (True, True)):
        ours = zero_model_states(total, largest, stage=3, world_size=gpus, offload_optimizer=offload,
                                 offload_parameters=params)
        theirs = ds_zero3_gpu_bytes(total, largest, gpus, cpu_offload=offload, cpu_offload_params=params)
        assert abs(ours.device - theirs) <= 4
    # stage 1 has no DeepSpeed estimator: full 16-bit weights and gradients, partitioned fp32 state
    stage1 = zero_model_states(total, largest, stage=1, world_size=gpus)
    assert abs(stage1.device - (4 * total + 16 * total / gpus)) <= 4


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero_model_states_match_installed_deepspeed() -> None:
    """The same comparison against DeepSpeed's own functions, in a subprocess: importing DeepSpeed is slow and
    changes global state (logging, accelerator selection)."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3, model_to_params
from memguard.estimation.distributed import largest_layer_params, zero_model_states
from zoo import Decoder
for total, largest in {SIZES!r}:
    for per_node, nodes in ((1, 1), (8, 1), (8, 4)):
        n = per_node * nodes
        for off in (False, True):
            ours = zero_model_states(total, largest, stage=2, world_size=n, offload_optimizer=off).device
            assert abs(ours - z2(total, per_node, nodes, cpu_offload=off)[1]) <= 4, (total, n, off)
        for off, par in ((False, False), (True, False), (True, True)):
            ours = zero_model_states(total, largest, stage=3, world_size=n, offload_optimizer=off,
                                     offload_parameters=par).device
            theirs = z3(total, largest, per_node, nodes, cpu_offload=off, cpu_offload_params=par)[1]
            assert abs(ours - theirs) <= 4, (total, n, off, par)
model = Decoder(tied=True)
assert model_to_params(model)[1] == largest_layer_params(model)
print("same")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-3000:]


def test_largest_layer_is_the_module_owning_the_most_parameters_directly() -> None:
    """ZeRO-3 gathers parameters module by module, so the largest layer is the most parameters one module
    owns itself (DeepSpeed's model_to_params), counted here by hand for zoo.Decoder(tied=True): vocab 512,
    d 128, 3 blocks.

    Directly owned, per module:
    - the Decoder itself: ``pos``, 1 * 256 * 128 = 32,768 (its children's parameters are not its own);
    - ``emb``, and ``head`` (bias-free, its weight tied to ``emb``'s): 512 * 128 = 65,536 each;
    - ``ln`` and each block's ``ln1``/``ln2``: 2 * 128 = 256; ``attn`` owns nothing (qkv and proj are children);
    - ``attn.qkv``: 128 * 384 + 384 = 49,536; ``attn.proj``: 128 * 128 + 128 = 16,512;
    - ``mlp[0]``: 128 * 512 + 512 = 66,048; ``mlp[2]``: 512 * 128 + 128 = 65,664.
    The largest is ``mlp[0]``, 4 * d * d + 4 * d = 66,048: above the embedding only through its bias, so
    leaving biases out or counting a module's children with it would both give another number.
    """
    d = 128
    assert largest_layer_params(Decoder(tied=True)) == 4 * d * d + 4 * d == 66_048
    # a model without parameters has no layer to gather
    assert largest_layer_params(nn.Sequential(nn.ReLU())) == 0


def test_zero_stages_order_and_offload() -> None:
    torch.manual_seed(0)
    model, batch = Decoder(d=256, layers=4, vocab=2048), _ids(2, 64, 2048)
    # buckets and ZeRO-3 prefetch sized for a small model (the defaults would gather it whole)
    small = {"reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000,
             "stage3_prefetch_bucket_size": 200_000, "stage3_param_persistence_threshold": 10_000}

    def peak(stage: int, **kw: Any) -> Any:
        opts = DeepSpeedOptions(stage=stage, **small, **kw)
        return estimate_distributed(model, batch, strategy=Strategy(Kind.DEEPSPEED, f"zero{stage}", opts),
                                    world_size=8, device="cuda", precision="bf16-mixed")

    z1, z2, z3 = peak(1), peak(2), peak(3)
    assert z3.peak_bytes < z2.peak_bytes < z1.peak_bytes
    assert peak(2, offload_optimizer=True).peak_bytes < z2.peak_bytes
    assert peak(3, offload_optimizer=True, offload_parameters=True).peak_bytes < z3.peak_bytes
    assert z2.per_rank == [z2.peak_bytes] * 8
    assert any("ZeRO stage 2" in n for n in z2.notes)
    # the named strategies use Lightning's defaults (2e8-element buckets)
    named = estimate_distributed(model, batch, strategy="deepspeed_stage_2", world_size=8, device="cuda",
                                 precision="bf16-mixed")
    assert named.peak_bytes > 2 * 200_000_000 * 2


def test_deepspeed_leaves_a_trace_cache_to_the_users_program() -> None:
    """A trace cache slot is keyed by the user's program; DeepSpeed's trace runs another one (16-bit weights,
    no autocast), so it must neither fill the slot nor read from it."""
    from memguard import estimate
    from memguard.trace import TraceCache

    model, batch = _small()
    cache = TraceCache()
    estimate_distributed(model, batch, strategy="deepspeed_stage_2", world_size=2, device=CPU,
                         precision="bf16-mixed", trace_cache=cache)
    assert len(cache) == 0
    plain = estimate(model, batch, device=CPU, precision="bf16-mixed")
    assert estimate(model, batch, device=CPU, precision="bf16-mixed", trace_cache=cache).peak_bytes == plain.peak_bytes
    # DDP's trace is the user's program: it may fill the slot, and what it records replays exactly
    ddp_cache = TraceCache()
    estimate_distributed(model, batch, strategy="ddp", world_size=2, device=CPU, precision="bf16-mixed",
                         trace_cache=ddp_cache)
    assert estimate(model, batch, device=CPU, precision="bf16-mixed",
                    trace_cache=ddp_cache).peak_bytes == plain.peak_bytes


def test_fsdp2_options_object() -> None:
    model, batch = _small()
    strategy = Strategy(Kind.FSDP2, "fsdp2", FSDP2Options(block_classes=(Block,)))
    est = estimate_distributed(model, batch, strategy=strategy, world_size=2, device=CPU, precision="bf16-mixed")
    assert len(est.per_rank) == 2 and est.precision == "bf16-mixed"


@needs_gloo
def test_model_parallel_strategy_runs_the_modules_own_configure_model() -> None:
    """Lightning's ModelParallelStrategy: the LightningModule's configure_model parallelises memguard's copy
    over a fake (data_parallel, tensor_parallel) mesh; the same plan given directly predicts the same bytes
    (that path is checked against real runs above), and the user's module is left as it was."""
    pl_strategies = pytest.importorskip("pytorch_lightning.strategies")
    from lit_models import LitTensorParallel

    torch.manual_seed(0)
    lit = LitTensorParallel(**MODEL)
    est = estimate_distributed(lit, _ids(*BATCH), strategy=pl_strategies.ModelParallelStrategy(tensor_parallel_size=2),
                               world_size=4, device=CPU, optimizer="adamw", loss_fn=lambda m, b: m.training_step(b, 0))
    assert est.peak_bytes == predicted("tp2_fsdp2", 4).peak_bytes
    assert est.per_rank == [est.peak_bytes] * 4 and "2 ranks per tensor-parallel group x 2" in est.notes[0]
    assert lit.device_mesh is None and not any(hasattr(p, "placements") for p in lit.parameters())


def test_tensor_parallel_sizes_are_checked() -> None:
    model = LlamaLike(**MODEL)
    for options, words in ((TPOptions(tensor_parallel_size=3), "divisors of 4: 1, 2, 4"),
                           (TPOptions(tensor_parallel_size=2, data_parallel_size=3), "must equal the number of ranks")):
        with pytest.raises(InvalidArgumentError, match=words):
            estimate_distributed(model, _ids(2, 16), strategy=Strategy(Kind.TP, "tp", options), world_size=4, device=CPU)
    with pytest.raises(InvalidArgumentError, match="tensor-parallel plan"):  # no plan of its own, none given
        estimate_distributed(model, _ids(2, 16), strategy="tp", world_size=2, device=CPU)
    with pytest.raises(InvalidArgumentError, match="did you mean 'colwise'|Did you mean 'colwise'"):
        estimate_distributed(model, _ids(2, 16), strategy=Strategy(Kind.TP, "tp", TPOptions(plan={"blocks.*.attn.q": "colwse"})),
                             world_size=2, device=CPU)


def test_fsdp2_beyond_the_traced_group_is_refused_and_one_tp_rank_is_one_process() -> None:
    model, batch = _small()
    with pytest.raises(InvalidArgumentError, match="FSDP2 over 2,048 ranks: memguard traces groups of up to 1,024"):
        estimate_distributed(model, batch, strategy="fsdp2", world_size=2048, device=CPU)
    one = estimate_distributed(model, batch, strategy=Strategy(Kind.TP, "tp", TPOptions(plan={"0": "colwise"})),
                               world_size=1, device=CPU)
    assert one.peak_bytes == estimate_distributed(model, batch, strategy="auto", world_size=1, device=CPU).peak_bytes
