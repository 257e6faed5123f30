"""One rank of a real multi-process training run on the CPU (gloo), measuring its own peak of live tensor bytes.

Run by tests/test_distributed.py and benchmarks/distributed_accuracy.py, one process per rank, with the usual
environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). ``argv[1]`` is a JSON file with a list of cases,
``argv[2]`` the JSON file this rank writes its results to: ``{case name: {"peak": bytes, "start": bytes}}``.

Each case builds a zoo model, wraps it the way the strategy does (DDP, FSDP1 ``FullyShardedDataParallel``,
FSDP2 ``fully_shard``), and trains it for two steps under torch.profiler's CPU allocator tracking, the same
ground truth as tests/groundtruth.py, but measured inside the rank and without memguard: everything from the
model's construction on is profiled, so what the rank holds when training starts (its shards, buckets,
batch) is counted from the allocator's own events. A sentinel allocation of an unusual size marks the
start of the training steps; the result is the highest live total after it, above the total before the
case began.

Frees on gloo's worker threads. The running total the profiler reports (``total_allocated``) is c10's
``ProfiledCPUMemoryReporter::allocated_``, which ``New`` and ``Delete`` (c10/core/CPUAllocator.cpp) update
only when memory profiling is enabled on the calling thread or c10's ``caffe2_report_cpu_memory_usage``
flag is set. Gloo runs collectives on worker threads, with the profiler's state only while the collective
runs; a buffer whose last reference those threads drop afterwards (the input copy of a reduce-scatter,
which gloo's allreduce work still holds: ``ProcessGroupGloo::reduce_scatter_tensor_coalesced``) is then
freed without the total ever learning of it, and the rank seems to hold it for the rest of the run.
Which thread drops the last reference is a race, so one rank or another, in one run or another, showed one
to three unit-sized buffers too many. The flag is set when this module loads, before any case runs, so every
free is counted wherever it happens; a free on an unprofiled thread shows in the total of the next event.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import warnings
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.autograd.profiler import profile  # noqa: E402

from groundtruth import allocation_events  # noqa: E402  (the same ground truth, per rank)
from zoo import Block, Decoder, LlamaLike, _ids, tp_plan  # noqa: E402


def _count_every_free() -> None:
    """Set c10's ``caffe2_report_cpu_memory_usage`` flag (an exported ``bool`` of libc10): the CPU allocator's
    running total then counts allocations and frees on every thread, not only on profiled ones. Its other
    effect, an INFO log line per allocation, is below c10's default log level and prints nothing."""
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*c10.*"))
    for path in libs:
        try:
            flag = ctypes.c_bool.in_dll(ctypes.CDLL(path), "FLAGS_caffe2_report_cpu_memory_usage")
        except (OSError, ValueError):
            continue
        flag.value = True
        return
    raise RuntimeError(f"c10's caffe2_report_cpu_memory_usage flag not found in {libs}: without it, frees on "
                       "gloo's worker threads are missing from the measurement")


_count_every_free()

SENTINEL = 7_654_321
"""Bytes of the marker allocation made right before the first training step (no model makes one this size)."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _named_events(events: list) -> list[tuple[int, str]]:
    """(alloc_size, the operators it happened in, innermost first) of each of ``events``
    (groundtruth.allocation_events, so the list lines up with the measurement's)."""
    out = []
    for ev in events:
        chain, p = [], ev.parent
        while p is not None and len(chain) < 4:
            chain.append(p.name)
            p = p.parent
        out.append((ev.extra_fields.alloc_size, " < ".join(chain)))
    return out


def _wrap(case: dict, model: torch.nn.Module) -> torch.nn.Module:
    kind = case["kind"]
    mixed = DTYPES.get(case.get("mixed") or "")
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, gradient_as_bucket_view=case.get("gradient_as_bucket_view", False),
                   find_unused_parameters=case.get("find_unused_parameters", False),
                   static_graph=case.get("static_graph", False))
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({Block}) if case.get("wrap_blocks", True) else None
        mp = MixedPrecision(param_dtype=mixed, reduce_dtype=mixed, buffer_dtype=mixed) if mixed else None
        sharding = ShardingStrategy[case.get("sharding", "FULL_SHARD")]
        wrapped = FSDP(model, auto_wrap_policy=policy, sharding_strategy=sharding,
                       use_orig_params=case.get("use_orig_params", True), mixed_precision=mp,
                       device_id=torch.device("cpu"))
        if case.get("checkpoint_blocks"):
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
                checkpoint_wrapper,
            )

            apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                           check_fn=lambda m: isinstance(m, Block))
        return wrapped
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
        reshard = case.get("reshard_after_forward", True)
        for i, block in enumerate(model.blocks):  # torchtitan keeps the last block unsharded after forward
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(model.blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        return model
    if kind == "tp":  # Lightning ModelParallelStrategy's mesh; torchtitan's apply_tp, then apply_fsdp on the dp dim
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        tp = case["tp"]
        mesh = init_device_mesh("cpu", (dist.get_world_size() // tp, tp), mesh_dim_names=("data_parallel",
                                                                                         "tensor_parallel"))
        if case.get("arch") == "hf_llama":  # transformers' own tensor parallelism, as from_pretrained applies it
            from transformers.distributed.configuration_utils import DistributedConfig
            from transformers.distributed.tensor_parallel import apply_tensor_parallelism

            model._mesh_manager = None
            apply_tensor_parallelism(model, mesh["tensor_parallel"],
                                     model._resolve_parallel_plans(DistributedConfig(tp_size=tp))[0])
            return model
        parallelize_module(model, mesh["tensor_parallel"], tp_plan(case.get("sequence_parallel", False),
                                                                    case.get("loss_parallel", False)))
        if mesh["data_parallel"].size() > 1:
            mp = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
            for i, block in enumerate(model.blocks):
                fully_shard(block, mesh=mesh["data_parallel"], mp_policy=mp,
                            reshard_after_forward=i < len(model.blocks) - 1)
            fully_shard(model, mesh=mesh["data_parallel"], mp_policy=mp)
        return model
    raise ValueError(f"unknown kind {kind!r}")


def _loss_context(case: dict) -> Any:
    if not case.get("loss_parallel"):
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def build(case: dict) -> torch.nn.Module:
    """The case's model: the zoo Decoder, its Llama-shaped sibling, or a small transformers Llama."""
    if case.get("arch") == "hf_llama":
        from zoo import hf_llama_for_tp

        return hf_llama_for_tp()
    return (LlamaLike if case.get("arch") == "llama" else Decoder)(**case.get("model", {}))


def measure(case: dict) -> dict[str, int]:
    """One measurement of ``case`` on this rank: {"peak": bytes, "start": bytes}."""
    gc.collect()
    torch.manual_seed(0)
    steps = case.get("steps", 2)
    autocast = DTYPES.get(case.get("autocast") or "")
    with profile(profile_memory=True, use_cpu=True) as prof:
        model = build(case)
        ids = _ids(*case.get("batch", (4, 64)))
        wrapped = _wrap(case, model)
        del model
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        marker = torch.empty(SENTINEL, dtype=torch.uint8)
        del marker
        for _ in range(steps):
            with _loss_context(case):  # torchtitan's train context: loss and backward on vocabulary shards
                with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
                    loss = wrapped(input_ids=ids, labels=ids).loss if case.get("arch") == "hf_llama" else wrapped(ids)
                loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        del opt, wrapped, ids
        gc.collect()
    raw = allocation_events(prof)
    events = [(ev.extra_fields.alloc_size, ev.extra_fields.total_allocated) for ev in raw]
    base = events[0][1] - events[0][0]
    mark = next(i for i, (size, _) in enumerate(events) if size == -SENTINEL)
    start = events[mark][1] - base
    peak = max([start] + [total - base for _, total in events[mark + 1:]])
    dump = os.environ.get("MEMGUARD_TEST_DUMP")
    if dump:  # for debugging a mismatch: every allocation after the marker with the operator that made it
        named = _named_events(raw)
        with open(f"{dump}.{case['name']}.{dist.get_rank()}", "w") as f:
            json.dump({"named": named[mark + 1:]}, f)
    return {"peak": peak, "start": start}


def run_case(case: dict) -> dict[str, Any]:
    """``repeat`` measurements (default 1): the first one's ``peak`` and ``start``, and every run's peak in
    ``peaks``. With every free counted (:func:`_count_every_free`) a rank's runs agree to the byte on an idle
    machine; on a loaded one gloo's worker thread can let go of a collective's tensor late
    (test_distributed.runs_of). The benchmark repeats each case and reports how far its runs differ."""
    runs = []
    for _ in range(case.get("repeat", 1)):
        runs.append(measure(case))
        dist.barrier()
    return {**runs[0], "peaks": [r["peak"] for r in runs]}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(int(os.environ.get("MEMGUARD_TEST_THREADS", torch.get_num_threads())))
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results = {}
    try:
        for case in cases:
            results[case["name"]] = run_case(case)
    finally:
        dist.destroy_process_group()
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
