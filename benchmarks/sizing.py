"""Sizing without a GPU: what the largest-batch search costs, against one estimate and against Lightning's
BatchSizeFinder.

1. Search cost: ``memguard.max_batch_size`` / ``max_seq_len`` (and ``memguard check --max-batch-size``'s
   search) on models of several kinds; the search's wall time divided by the time of one estimate of the
   same model at the answer's size (the goal: at most 4x), the real estimates it made and the sizes it
   guessed. Each timing runs in a fresh process that first estimates a small unrelated model on the same
   device (so neither side pays the library's first-call costs, and neither finds the other's kernels
   warm); each is the best of three such processes.
2. BatchSizeFinder: Lightning's ``Tuner.scale_batch_size`` finds the batch size by running real training
   steps at growing sizes until out-of-memory. There is no out-of-memory on the CPU, so the module raises
   torch's ``OutOfMemoryError`` in ``training_step`` whenever its batch is larger than the size memguard
   found (what a GPU of that budget would do, by memguard's prediction); the finder's trial steps and
   wall time are counted against memguard's search (zero trial steps). Both modes: "power" and
   "binsearch".

Usage: python benchmarks/sizing.py      Writes benchmarks/results/sizing.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
warnings.filterwarnings("ignore")

import memguard  # noqa: E402
from _common import llama_on_meta, write_table  # noqa: E402
from lit_models import LitDecoder, pl  # noqa: E402
from memguard.act.callback import MemGuard  # noqa: E402
from zoo import CNN, LSTMLM, Decoder  # noqa: E402


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


CASES = [
    # name, model, make_batch, estimate options, budget, knob
    ("CNN with BatchNorm (CPU)", CNN, lambda n: (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))),
     dict(device="cpu", loss_fn=lambda m, b: m(*b)), "200MiB", "batch_size"),
    ("decoder with SDPA, bf16-mixed (CPU)", lambda: Decoder(layers=2), lambda n: torch.randint(0, 512, (n, 64)),
     dict(device="cpu", precision="bf16-mixed"), "200MiB", "batch_size"),
    ("LSTM (CPU)", LSTMLM, lambda n: torch.randint(0, 1000, (n, 32)), dict(device="cpu"), "200MiB", "batch_size"),
    ("decoder, sequence length (CPU)", lambda: Decoder(layers=2, positions=4096),
     lambda t: torch.randint(0, 512, (2, t)), dict(device="cpu"), "40MiB", "seq_len"),
    ("decoder with 256 positions, sequence length (CPU; the positions bind)", lambda: Decoder(layers=2),
     lambda t: torch.randint(0, 512, (2, t)), dict(device="cpu"), "40MiB", "seq_len"),
    ("Llama-2-7B bf16-mixed, 8-bit AdamW, checkpointing (H100)", lambda: llama_on_meta("llama-2-7b"),
     lambda n: torch.zeros(n, 2048, dtype=torch.long, device="meta"),
     dict(gpu="H100", precision="bf16-mixed", optimizer="adamw8bit", gradient_checkpointing=True,
          loss_fn=lambda m, b: m(input_ids=b, labels=b).loss), None, "batch_size"),
]


def _warm_up(options: dict) -> None:
    """The library's first-call costs (imports, the profiler, the allocator model), on an unrelated model."""
    small = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    device = {k: v for k, v in options.items() if k in ("device", "gpu")}
    memguard.estimate(small, torch.randn(4, 16), **device)


def measure(index: int, what: str) -> dict:
    """One timing in this (fresh) process: ``what`` is "search" or the size to estimate once."""
    name, build, make_batch, options, budget, knob = CASES[index]
    torch.manual_seed(0)
    model = build()
    _warm_up(options)
    if what == "search":
        search = memguard.max_batch_size if knob == "batch_size" else memguard.max_seq_len
        result, seconds = _timed(lambda: search(model, make_batch, budget=budget, **options))
        return {"answer": result.value, "real": [s for s, _ in result.tried], "guessed": result.guessed,
                "seconds": seconds}
    _, seconds = _timed(lambda: memguard.estimate(model, make_batch(int(what)), **options))
    return {"seconds": seconds}


def _in_fresh_process(index: int, what: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(index), what], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def search_rows(repeats: int = 3) -> list[list[str]]:
    rows = []
    for index, (name, *_, knob) in enumerate(CASES):
        searches = [_in_fresh_process(index, "search") for _ in range(repeats)]
        found = min(searches, key=lambda r: r["seconds"])
        one = min(_in_fresh_process(index, str(found["answer"]))["seconds"] for _ in range(repeats))
        rows.append([name, knob, str(found["answer"]), ", ".join(map(str, found["real"])), str(found["guessed"]),
                     f"{found['seconds']:.1f}", f"{one:.2f}", f"{found['seconds'] / one:.1f}x"])
        print(rows[-1], flush=True)
    return rows


class EmulatedGPU(LitDecoder):
    """Raises torch's OutOfMemoryError above ``limit`` samples, as a GPU of that budget would; counts steps."""

    def __init__(self, limit: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.limit, self.trial_steps = limit, 0

    def training_step(self, batch, batch_idx):
        self.trial_steps += 1
        if batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (emulated)")
        return super().training_step(batch, batch_idx)


def _quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def finder_rows(budget: str = "60MiB") -> tuple[list[list[str]], int]:
    from torch.utils.data import DataLoader

    import lit_models

    big = lit_models.Tokens(n=4096)
    guard = MemGuard(batch_size="max", budget=budget)
    model = LitDecoder()
    model.train_dataloader = lambda: DataLoader(big, batch_size=model.batch_size)  # type: ignore[method-assign]
    _, seconds = _timed(lambda: _quiet_trainer(max_steps=1, callbacks=[guard]).fit(model))
    found = guard.found_batch_size
    rows = [["memguard MemGuard(batch_size=\"max\")", str(found), "0", f"{seconds:.1f} (the whole 1-step fit)"]]
    for mode in ("power", "binsearch"):
        emulated = EmulatedGPU(found)
        emulated.train_dataloader = lambda e=emulated: DataLoader(big, batch_size=e.batch_size)  # type: ignore
        tuner = pl.tuner.Tuner(_quiet_trainer(max_steps=1))
        answer, seconds = _timed(lambda: tuner.scale_batch_size(emulated, mode=mode, init_val=2))
        rows.append([f"Lightning BatchSizeFinder, mode={mode}", str(answer), str(emulated.trial_steps),
                     f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    return rows, found


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3])))
        return
    rows = search_rows()
    finder, found = finder_rows()
    notes = ["Seconds on this machine, each the best of three fresh processes (see the script's docstring). ratio = the "
             "search's seconds / one estimate's seconds at the answer's size. real estimates: the sizes the search "
             "traced, in order (the answer and the next size among them; a size the run refuses, longer than its "
             "positions, stops at the first operation that cannot take it and is not listed); guessed: other sizes "
             "drawn from those traces (an allocator replay each, milliseconds).", "",
             f"Against Lightning's BatchSizeFinder on the CPU (tests/lit_models.py LitDecoder, 64 tokens per sample, "
             f"AdamW, budget 60 MiB; the finder's out-of-memory emulated above memguard's answer, {found}):", "",
             "| how | batch size | trial training steps | seconds |", "|---|---|---|---|"]
    notes += ["| " + " | ".join(r) + " |" for r in finder]
    notes += ["", "The finder's trial steps are real training steps at each trial size (3 per trial by default) "
              "and each out-of-memory costs a GPU step that fails; on a GPU those are minutes, and they cannot run "
              "on a login node. memguard's search runs no step."]
    print(write_table("sizing.md", "Sizing without a GPU: the largest batch and sequence, and what the search costs",
                      ["model", "knob", "answer", "real estimates", "guessed", "search (s)", "one estimate (s)",
                       "ratio"], rows,
                      notes))


if __name__ == "__main__":
    main()
