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

from groundtruth import _allocation_totals as _events  # noqa: E402  (the same ground truth, per rank)
from zoo import Block, Decoder, _ids  # noqa: E402

SENTINEL = 7_654_321
"""Bytes of the marker allocation made right before the first training step (no model makes one this size)."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _named_events(prof: Any) -> list[tuple[int, str]]:
    """(alloc_size, the operators it happened in, innermost first) of every CPU allocator event, in time order."""
    out = []
    stack = list(prof.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        fields = ev.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            chain, p = [], ev.parent
            while p is not None and len(chain) < 4:
                chain.append(p.name)
                p = p.parent
            out.append((ev.start_time_ns, fields.alloc_size, " < ".join(chain)))
    out.sort()
    return [(size, name) for _, size, name in out]


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
    raise ValueError(f"unknown kind {kind!r}")


def measure(case: dict) -> dict[str, int]:
    """One measurement of ``case`` on this rank: {"peak": bytes, "start": bytes}."""
    gc.collect()
    torch.manual_seed(0)
    steps = case.get("steps", 2)
    autocast = DTYPES.get(case.get("autocast") or "")
    with profile(profile_memory=True, use_cpu=True) as prof:
        model = Decoder(**case.get("model", {}))
        ids = _ids(*case.get("batch", (4, 64)))
        wrapped = _wrap(case, model)
        del model
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        marker = torch.empty(SENTINEL, dtype=torch.uint8)
        del marker
        for _ in range(steps):
            with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
                loss = wrapped(ids)
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        del opt, wrapped, ids
        gc.collect()
    events = _events(prof)
    base = events[0][1] - events[0][0]
    mark = next(i for i, (size, _) in enumerate(events) if size == -SENTINEL)
    start = events[mark][1] - base
    peak = max([start] + [total - base for _, total in events[mark + 1:]])
    dump = os.environ.get("MEMGUARD_TEST_DUMP")
    if dump:  # for debugging a mismatch: every allocation after the marker with the operator that made it
        named = _named_events(prof)
        with open(f"{dump}.{case['name']}.{dist.get_rank()}", "w") as f:
            json.dump({"named": named[mark + 1:]}, f)
    return {"peak": peak, "start": start}


def run_case(case: dict) -> dict[str, int]:
    """The lowest of ``repeat`` measurements (default 2).

    Gloo runs collectives on worker threads, and the buffers of a reduce-scatter (FSDP's unsharded
    gradients and gloo's copy of them) are sometimes freed from there well after the rank has moved on,
    past its next forward, on a loaded machine (several ranks sharing two cores): a run may then show one
    to three extra unit-sized buffers, depending on scheduling. The lowest of a few runs is closest to the
    rank's own deterministic peak.
    """
    runs = []
    for _ in range(case.get("repeat", 2)):
        runs.append(measure(case))
        dist.barrier()
    return min(runs, key=lambda r: r["peak"])


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
