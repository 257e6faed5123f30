"""memguard's per-rank prediction for DDP, FSDP1, FSDP2 and tensor parallelism against real multi-process training on the CPU.

Every case of tests/test_distributed.py runs for real on 2 and 4 gloo ranks (one process per rank, each
measuring its own peak of live tensor bytes with torch.profiler's allocator events, without memguard), and
memguard.estimation.distributed.estimate_distributed(device="cpu") predicts each rank. The "single-process" column is
what a strategy-blind estimate would say for every rank: memguard.estimate() of the same model, batch,
precision and checkpointing on one process.

Usage: python benchmarks/distributed_accuracy.py      Writes benchmarks/results/distributed_accuracy.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

import memguard  # noqa: E402
from _common import write_table  # noqa: E402
from test_distributed import BATCH, CASES, MODEL, case_model, measured_runs, predicted  # noqa: E402
from zoo import _ids  # noqa: E402

WORLDS = {2: list(CASES), 4: list(CASES)}
RUNS = 2
"""Runs of every case on every rank: the table shows the lowest (test_distributed.runs_of says why); the notes
say how far the runs differ."""


def single_process(name: str) -> int:
    kwargs = dict(CASES[name][2])
    if "checkpointing" in name:
        kwargs["gradient_checkpointing"] = True
    return memguard.estimate(case_model(name), _ids(*BATCH), device="cpu", **kwargs).peak_bytes


def main() -> None:
    rows, errors, spreads = [], [], []
    for world, names in WORLDS.items():
        t0 = time.perf_counter()
        runs = measured_runs(world, names, repeat=RUNS, timeout=3600)
        print(f"{world} ranks measured in {time.perf_counter() - t0:.0f} s", flush=True)
        for name in names:
            t0 = time.perf_counter()
            est = predicted(name, world)
            seconds = time.perf_counter() - t0
            single = single_process(name)
            spreads += [max(peaks) - min(peaks) for peaks in runs[name]]
            real = [min(peaks) for peaks in runs[name]]
            for rank, (pred, meas) in enumerate(zip(est.per_rank, real)):
                err = (pred - meas) / meas
                errors.append(abs(err))
                rows.append([name, world, rank, f"{meas:,}", f"{pred:,}", f"{err:+.2%}",
                             f"{(single - meas) / meas:+.1%}", f"{seconds:.1f}" if rank == 0 else ""])
                print(rows[-1], flush=True)
    rows.append(["**max abs error**", "", "", "", "", f"{max(errors):.2%}", "", ""])
    print(write_table(
        "distributed_accuracy.md",
        "Per-rank accuracy under DDP / FSDP / FSDP2 / tensor parallel (CPU, gloo, two training steps, peak of live tensor bytes)",
        ["case", "ranks", "rank", "measured B", "memguard B", "memguard error", "single-process error",
         "estimate s"],
        rows,
        [f"Model: tests/zoo.py Decoder({', '.join(f'{k}={v}' for k, v in MODEL.items())}), batch {BATCH}, AdamW.",
         f"Measured: each rank's torch.profiler CPU allocator events (tests/dist_worker.py), {RUNS} runs per case, the "
         f"lower shown (a late release on gloo's worker thread can only add); largest difference between the "
         f"runs of one rank: {max(spreads):,} bytes.",
         "Frees made on gloo's worker threads (the input copy of a reduce-scatter) are counted through c10's "
         "caffe2_report_cpu_memory_usage flag; without it the profiler's running total keeps such a block for "
         "the rest of the run, which showed as one to three extra FSDP-unit buffers on a rank, changing from run "
         "to run (tests/dist_worker.py explains).",
         "FSDP cases wrap each Block (Lightning FSDPStrategy(auto_wrap_policy={Block})); FSDP2 is fully_shard per "
         "block then the root.",
         "Tensor-parallel cases (tp*) use tests/zoo.py LlamaLike with the same sizes and torchtitan's plan "
         "(tests/zoo.py tp_plan): tp = every rank in one tensor-parallel group; tp_sequence_parallel adds "
         "sequence parallelism (norms on sequence shards, vocabulary-sharded embedding); tp2_fsdp2 is a "
         "(ranks/2) x 2 mesh, FSDP2 on the data-parallel dimension (on 2 ranks: tensor parallel alone).",
         "Rerun: python benchmarks/distributed_accuracy.py"],
    ))


if __name__ == "__main__":
    main()
