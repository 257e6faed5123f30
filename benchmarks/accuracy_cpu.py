"""memguard and the tools people use instead, against the measured CPU peak of real training steps.

For each case the real steps run on the CPU under torch.profiler's allocator tracking (the ground truth of
tests/groundtruth.py: the peak of live tensor bytes over two training steps). memguard.estimate(device=
"cpu") predicts the same steps, and so does every peer of benchmarks/peers.py: accelerate's
estimate-memory, DeepSpeed's ZeRO-2 / ZeRO-3 model-state estimators (1 GPU), torchinfo's estimated total
size, PyTorch's MemTracker (run on the real steps) and the 24 bytes-per-parameter rule of thumb.

The cases are the test zoo (tests/zoo.py) plus larger ones built from memguard.presets' published shapes,
with fewer layers to keep the CPU time reasonable: a GPT-2 decoder at sequence 256, a ViT-B/16 at batch 2
and a ResNet-50 at batch 2.

Usage: python benchmarks/accuracy_cpu.py [--only NAME ...] [--no-extra]
Writes benchmarks/results/accuracy_cpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

import peers  # noqa: E402
from _common import write_table  # noqa: E402
from test_estimate_accuracy import measured, predicted  # noqa: E402
from zoo import CASES, Case  # noqa: E402

TOOLS = ["memguard", *peers.PEERS]


# -- larger cases from the presets' published shapes ------------------------------------------------------

def _preset_model(name: str, **overrides) -> torch.nn.Module:
    """A real (randomly initialised) transformers model with a preset's hyperparameters, some overridden."""
    import transformers

    from memguard import presets

    preset = presets.get(name)
    kwargs = preset.config_kwargs()
    kwargs.update(overrides)
    config = getattr(transformers, preset.config_class)(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, preset.model_class)(config)


def _tokens(batch: int, seq: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _images(batch: int, size: int = 224, classes: int = 1000) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen),
            "labels": torch.randint(0, classes, (batch,), generator=gen)}


EXTRA_CASES = [
    Case("gpt2_4layers_b2_seq256", lambda: _preset_model("gpt2", n_layer=4), lambda: _tokens(2, 256, 50257)),
    Case("vit_b16_4layers_b2", lambda: _preset_model("vit-b-16", num_hidden_layers=4), lambda: _images(2)),
    Case("resnet50_b2_sgd_momentum", lambda: _preset_model("resnet50"), lambda: _images(2),
         optimizer="sgd_momentum"),
]
"""Shapes from memguard.presets (gpt2: openai-community/gpt2 with 4 of its 12 layers; vit-b-16: google/
vit-base-patch16-224 with 4 of 12 layers; resnet50: microsoft/resnet-50 in full)."""


# ---------------------------------------------------------------------------------------------------------

def _warm_imports() -> None:
    """Import every tool once so that no tool's first estimate pays for imports."""
    import accelerate.commands.estimate  # noqa: F401
    import torchinfo  # noqa: F401
    from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401

    peers.deepspeed_source()


def run_case(case: Case) -> dict:
    """Measured peak and each tool's prediction (bytes or None, seconds, reason)."""
    out: dict = {"case": case, "measured": measured(case)}
    est = predicted(case)
    out["memguard"] = peers.PeerResult(est.peak_bytes, est.seconds)
    out["memguard_notes"] = est.notes
    torch.manual_seed(0)
    model, batch = case.build(), case.batch()
    out["params"] = peers.param_count(model)
    options = dict(loss_fn=case.loss_fn, gradient_checkpointing=case.gradient_checkpointing,
                   zero_grad_before_backward=case.zero_grad_before_backward, accumulate=case.accumulate)
    for name, peer in peers.PEERS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            out[name] = peers.call(peer, model, batch, case.optimizer, case.precision, **options)
    return out


def _error(result: peers.PeerResult, real: int) -> float | None:
    return None if result.bytes is None else (result.bytes - real) / real


def _pct(x: float, signed: bool = False) -> str:
    digits = 1 if abs(x) >= 0.1 else 2
    return f"{x:+.{digits}%}" if signed else f"{x:.{digits}%}"


def render(results: list[dict]) -> tuple[list[list[str]], list[str], list[list[str]]]:
    reasons: dict[str, int] = {}
    rows = []
    for r in results:
        row = [r["case"].name, f"{r['measured'] / 2**20:,.1f} MiB"]
        for tool in TOOLS:
            res: peers.PeerResult = r[tool]
            err = _error(res, r["measured"])
            if err is None:
                mark = reasons.setdefault(res.reason, len(reasons) + 1)
                row.append(f"n/a [{mark}]")
            else:
                row.append(_pct(err, signed=True))
        rows.append(row)
    summary = {"median": [], "max": [], "time": [], "answered": []}
    for tool in TOOLS:
        errs = [abs(e) for r in results if (e := _error(r[tool], r["measured"])) is not None]
        times = [r[tool].seconds for r in results if r[tool].bytes is not None]
        summary["median"].append(_pct(statistics.median(errs)) if errs else "n/a")
        summary["max"].append(_pct(max(errs)) if errs else "n/a")
        summary["time"].append(f"{statistics.mean(times):.3f}" if times else "n/a")
        summary["answered"].append(f"{len(errs)}/{len(results)}")
    rows.append(["**median abs error**", ""] + [f"**{v}**" for v in summary["median"]])
    rows.append(["**max abs error**", ""] + summary["max"])
    rows.append(["**mean s per estimate**", ""] + summary["time"])
    rows.append(["**cases answered**", ""] + summary["answered"])
    notes = [f"[{i}] {reason}" for reason, i in reasons.items()]
    details = [[r["case"].name, f"{r['params']:,}", r["case"].precision, r["case"].optimizer,
                "yes" if r["case"].gradient_checkpointing or "checkpointing" in r["case"].name else "",
                str(r["case"].accumulate)] for r in results]
    return rows, notes, details


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases")
    parser.add_argument("--no-extra", action="store_true", help="only the test zoo")
    parser.add_argument("--output", default="accuracy_cpu.md", help="file name under benchmarks/results")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cases = list(CASES) + ([] if args.no_extra else EXTRA_CASES)
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    _warm_imports()
    started = time.perf_counter()
    results = []
    for case in cases:
        t0 = time.perf_counter()
        r = run_case(case)
        results.append(r)
        cells = " ".join(f"{t}={_error(r[t], r['measured']):+.3f}" if r[t].bytes is not None else f"{t}=n/a"
                         for t in TOOLS)
        print(f"{case.name} ({time.perf_counter() - t0:.0f}s): measured {r['measured']:,} {cells}", flush=True)
    total = time.perf_counter() - started
    rows, reasons, details = render(results)
    memguard_notes = sorted({n for r in results for n in r["memguard_notes"] if "too large to probe" in n})
    notes = [
        "Errors are (predicted - measured) / measured. Measured: the peak of live tensor bytes over two "
        "training steps on the CPU, from torch.profiler's allocator events (tests/groundtruth.py).",
        "",
        "n/a reasons:", "",
        *[f"- {n}" for n in reasons],
        "",
        "What each column computes (benchmarks/peers.py):",
        "",
        "- memguard: `memguard.estimate(model, batch, optimizer=..., precision=..., device=\"cpu\")`.",
        "- accelerate: `accelerate estimate-memory`'s \"Training using Adam\" column for the run's dtype: "
        "`max(estimate_training_usage(size, dtype).values())` with `size` from `calculate_maximum_sizes` on the "
        "float32 model, i.e. 4x the float32 parameter+buffer bytes for float32, 2x for bf16/fp16 (used for "
        "bf16-mixed and bf16-true alike). Independent of the optimizer and of the batch.",
        f"- deepspeed-zero2 / deepspeed-zero3: per-GPU model states for 1 GPU without offload, "
        f"`estimate_zero2_model_states_mem_needs(P, cpu_offload=False)` = 20 P bytes and "
        f"`estimate_zero3_model_states_mem_needs(P, largest_layer, cpu_offload=False, cpu_offload_params=False)` "
        f"= 18 P + 4 x largest layer, P and largest layer from `model_to_params` ({peers.deepspeed_source()}). "
        "They count model states only (fp16 mixed-precision Adam), no activations.",
        "- torchinfo: \"Estimated Total Size\" = `total_input + total_output_bytes + total_param_bytes` of "
        "`torchinfo.summary(model, input_data=batch, mode=\"train\")` (inputs, 2x every leaf layer's output, "
        "parameters); no gradients of weights, no optimizer state.",
        "- MemTracker: `torch.distributed._tools.mem_tracker.MemTracker` around the same two real training "
        "steps of a copy of the model (model, optimizer and batch registered with `track_external`, "
        "`reset_mod_stats()` after each backward, which MemTracker needs before the model's next forward), "
        "peak `Total` of `get_tracker_snapshot(\"peak\")`. It runs the real step, so its time is a training "
        "step's, not a prediction's (see speed.md for it under fake tensors). It registers gradient hooks on "
        "every parameter and fails on models with frozen ones.",
        "- 24 B/param: 24 x the number of parameters (tied weights once, frozen ones included).",
        "",
        "Cases gpt2_4layers_b2_seq256, vit_b16_4layers_b2 and resnet50_b2_sgd_momentum are built with "
        "transformers from memguard.presets' hyperparameters (gpt2 and vit-b-16 with 4 layers), random weights.",
    ]
    if memguard_notes:
        from memguard.device.models import CPUDevice

        limit = CPUDevice().probe_limit / 2**20
        notes += ["", "memguard on the CPU probes hidden kernel scratch by running each kernel once; above its "
                  f"{limit:,.0f} MiB probe limit it falls back to a conservative bound (the kernel's inputs plus "
                  "outputs) and says so in its notes, which is where it over-predicts here:", "",
                  *[f"- {n}" for n in memguard_notes]]
    notes += ["", "Case details:", "",
              "| case | parameters | precision | optimizer | checkpointing | accumulate |",
              "|---|---|---|---|---|---|",
              *["| " + " | ".join(d) + " |" for d in details],
              "",
              f"Whole run: {total:.0f} s. Times are wall seconds of one call each, imports excluded, on a machine "
              "shared with other work: compare them with each other, not across runs.",
              "Rerun: python benchmarks/accuracy_cpu.py"]
    print(write_table(
        args.output,
        "Accuracy on the CPU ground truth: memguard and the tools people use instead",
        ["case", "measured", *TOOLS],
        rows,
        notes,
    ))


if __name__ == "__main__":
    main()
