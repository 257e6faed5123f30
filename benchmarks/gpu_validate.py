"""Validate memguard on this machine's GPU: real training runs against memguard's predictions.

One command trains a matrix of real runs on the local NVIDIA GPU (GPT-2 small, a ~134M-parameter
Llama-style decoder, ViT-B/16 and ResNet-50 from transformers; fp32, bf16-mixed and bf16-true; torch
AdamW foreach and fused, SGD with momentum, bitsandbytes 8-bit AdamW; with and without activation
checkpointing; several batch sizes). Each run is a fresh Python process that

1. predicts the run with ``memguard.estimate(..., device="cuda", gpu=<this GPU's catalog name>)`` on a
   meta copy of the model, before touching CUDA;
2. builds the model with random weights on the CPU, moves it to the GPU, makes a synthetic batch there,
   builds the optimizer, empties the cache and resets the peak statistics;
3. trains two steps (forward, backward, optimizer step, zero_grad) and reads
   ``torch.cuda.max_memory_allocated``, ``torch.cuda.max_memory_reserved`` and NVML's "used" memory (through
   ``memguard.device.gpus.discover``), the latter also as the growth over what NVML reported before the process
   touched CUDA (the process's own context plus its allocator segments).

Predicted ``peak_bytes`` is compared with max allocated, ``reserved_bytes`` with max reserved and
``device_bytes`` with the process's NVML growth. Results go to benchmarks/results/gpu_validate.json and
gpu_validate.md (rewritten after every run, so an interrupted validation keeps what it measured).

Nothing is downloaded (HF_HUB_OFFLINE=1): every model is built from hyperparameters in this repository.
The whole matrix is time-boxed (``--budget``, default 420 s, and ``--run-timeout`` per run); runs that do
not fit in the budget are reported as skipped. Without a CUDA GPU it prints "no CUDA GPU: nothing to
validate" and exits 0.

Usage:
  python benchmarks/gpu_validate.py                 # on a machine with one NVIDIA GPU
  python benchmarks/gpu_validate.py --dry-run       # anywhere: the matrix and memguard's predictions only
  python benchmarks/gpu_validate.py --list          # the matrix
  options: --only NAME ... | --limit N | --tiny | --budget S | --run-timeout S | --gpu NAME (for --dry-run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
NO_GPU_MESSAGE = "no CUDA GPU: nothing to validate"
DRY_RUN_GPU = "H100-80GB"
GiB = 2**30
MiB = 2**20

# The Llama-style decoder: the published 125M Llama shape (hidden 768, 12 layers, 32000 tokens): 134M params.
LLAMA_SMALL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096)


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    """"gpt2", "llama" (LLAMA_SMALL), "vit" (vit-b-16) or "resnet50"."""
    batch: int
    precision: str
    optimizer: str
    """memguard catalog name: adamw, sgd_momentum, adamw8bit."""
    impl: str | None = None
    """torch implementation: "foreach" or "fused" (None: the device's default)."""
    seq: int = 0
    """Tokens per sample (language models)."""
    checkpointing: bool = False
    tiny: bool = False
    """One layer (ResNet: one block per stage), batch <= 2, seq <= 64, 32-pixel images: a fast smoke test of
    the machinery, not a validation."""

    def shrunk(self) -> Run:
        return replace(self, name=f"{self.name}_tiny", batch=min(self.batch, 2), seq=min(self.seq, 64), tiny=True)


MATRIX: list[Run] = [
    Run("gpt2_fp32_adamw-foreach_b4_s512", "gpt2", 4, "32-true", "adamw", "foreach", seq=512),
    Run("gpt2_bf16-mixed_adamw-fused_b8_s1024", "gpt2", 8, "bf16-mixed", "adamw", "fused", seq=1024),
    Run("gpt2_bf16-mixed_adamw-foreach_b8_s1024_ckpt", "gpt2", 8, "bf16-mixed", "adamw", "foreach", seq=1024,
        checkpointing=True),
    Run("gpt2_bf16-true_adamw-foreach_b16_s512", "gpt2", 16, "bf16-true", "adamw", "foreach", seq=512),
    Run("gpt2_bf16-mixed_adamw8bit_b8_s512", "gpt2", 8, "bf16-mixed", "adamw8bit", seq=512),
    Run("llama_fp32_adamw-foreach_b2_s1024", "llama", 2, "32-true", "adamw", "foreach", seq=1024),
    Run("llama_bf16-mixed_adamw-fused_b4_s2048", "llama", 4, "bf16-mixed", "adamw", "fused", seq=2048),
    Run("llama_bf16-mixed_adamw-foreach_b8_s2048_ckpt", "llama", 8, "bf16-mixed", "adamw", "foreach", seq=2048,
        checkpointing=True),
    Run("llama_bf16-true_sgd-momentum_b8_s1024", "llama", 8, "bf16-true", "sgd_momentum", "foreach", seq=1024),
    Run("llama_bf16-mixed_adamw8bit_b4_s1024", "llama", 4, "bf16-mixed", "adamw8bit", seq=1024),
    Run("vit_fp32_adamw-foreach_b32", "vit", 32, "32-true", "adamw", "foreach"),
    Run("vit_bf16-mixed_adamw-fused_b64", "vit", 64, "bf16-mixed", "adamw", "fused"),
    Run("vit_bf16-mixed_sgd-momentum_b128_ckpt", "vit", 128, "bf16-mixed", "sgd_momentum", "foreach",
        checkpointing=True),
    Run("resnet50_fp32_sgd-momentum_b32", "resnet50", 32, "32-true", "sgd_momentum", "foreach"),
    Run("resnet50_bf16-mixed_adamw-foreach_b64", "resnet50", 64, "bf16-mixed", "adamw", "foreach"),
    Run("resnet50_bf16-true_adamw-fused_b32", "resnet50", 32, "bf16-true", "adamw", "fused"),
]

PRESET = {"gpt2": "gpt2", "vit": "vit-b-16", "resnet50": "resnet50"}
_TINY = {"gpt2": {"n_layer": 1}, "llama": {"num_hidden_layers": 1},
         "vit": {"num_hidden_layers": 1, "image_size": 32}, "resnet50": {"depths": [1, 1, 1, 1]}}
_AUTOCAST = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
_TRUE_HALF = {"bf16-true": "bfloat16", "16-true": "float16"}


# ---------------------------------------------------------------------------------------------------------
# Models, batches, optimizers (shared by the prediction and the real run)


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def build_model(run: Run, device: str):
    """The run's transformers model with random weights, built on ``device`` ("meta" or "cpu"), train mode."""
    import torch
    import transformers

    from memguard import presets

    if run.model == "llama":
        config = transformers.LlamaConfig(**{**LLAMA_SMALL, **_TINY["llama"]} if run.tiny else LLAMA_SMALL)
        cls = transformers.LlamaForCausalLM
    else:
        preset = presets.get(PRESET[run.model])
        if device == "meta" and not run.tiny:
            return presets.build(preset).train()
        kwargs = preset.config_kwargs()
        if run.tiny:
            kwargs.update(_TINY[run.model])
        config = getattr(transformers, preset.config_class)(**kwargs)
        cls = getattr(transformers, preset.model_class)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    return model.train()


def make_batch(run: Run, device: str) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, _TRUE_HALF[run.precision]) if run.precision in _TRUE_HALF else torch.float32
    if run.model in ("vit", "resnet50"):
        size = 32 if run.tiny else 224
        shape, labels = (run.batch, 3, size, size), (run.batch,)
        if device == "meta":
            return {"pixel_values": torch.zeros(shape, dtype=dtype, device="meta"),
                    "labels": torch.zeros(labels, dtype=torch.long, device="meta")}
        return {"pixel_values": torch.randn(shape, generator=gen).to(dtype).to(device),
                "labels": torch.randint(0, 1000, labels, generator=gen).to(device)}
    vocab = 50257 if run.model == "gpt2" else LLAMA_SMALL["vocab_size"]
    if device == "meta":
        ids = torch.zeros(run.batch, run.seq, dtype=torch.long, device="meta")
    else:
        ids = torch.randint(0, vocab, (run.batch, run.seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def make_optimizer(run: Run, params: list):
    import torch

    if run.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-3)
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(run.impl or "", {})
    if run.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, **impl)
    if run.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, **impl)
    raise ValueError(f"no real optimizer for {run.optimizer!r}")


def predict(run: Run, gpu: str | None) -> dict:
    """memguard's prediction of the run on a meta copy of the model (CPU only)."""
    import memguard

    _quiet_transformers()
    model = build_model(run, "meta")
    batch = make_batch(run, "meta")
    started = time.perf_counter()
    est = memguard.estimate(model, batch, optimizer=run.optimizer, optimizer_impl=run.impl, precision=run.precision,
                            device="cuda", gpu=gpu, gradient_checkpointing=True if run.checkpointing else None)
    return {"peak_bytes": est.peak_bytes, "reserved_bytes": est.reserved_bytes, "device_bytes": est.device_bytes,
            "context_bytes": int(est.breakdown.get(memguard.Category.CONTEXT, 0)), "peak_phase": est.peak_phase,
            "seconds": round(time.perf_counter() - started, 2), "gpu": gpu or "default (sm80-class)",
            "params": sum(p.numel() for p in model.parameters()), "notes": list(est.notes)}


# ---------------------------------------------------------------------------------------------------------
# The worker: one run in its own process


def _nvml_used() -> dict | None:
    from memguard.device.gpus import discover

    found = discover()
    if not found.gpus:
        return None
    g = found.gpus[0]
    return {"used": g.used_bytes, "other": g.other_process_bytes, "total": g.total_bytes, "name": g.name}


def worker(run: Run, gpu: str | None) -> dict:
    """Predict, then train for real; everything measured, as a dict (a failure of the real run is reported
    next to the prediction, not raised)."""
    out: dict[str, Any] = {"run": asdict(run)}
    out["predicted"] = predict(run, gpu)
    nvml_before = _nvml_used()  # before this process touches CUDA
    try:
        _train(run, out, nvml_before)
    except Exception as exc:  # noqa: BLE001 - the driver reports it and goes on with the next run
        out["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return out


def _train(run: Run, out: dict, nvml_before: dict | None) -> None:
    import torch

    from memguard import checkpointing

    model = build_model(run, "cpu")
    if run.precision in _TRUE_HALF:
        model = model.to(getattr(torch, _TRUE_HALF[run.precision]))
    model = model.to("cuda")
    if run.checkpointing:
        out["checkpointing"] = checkpointing.enable(model)
    batch = make_batch(run, "cuda")
    opt = make_optimizer(run, [p for p in model.parameters() if p.requires_grad])
    autocast = getattr(torch, _AUTOCAST[run.precision]) if run.precision in _AUTOCAST else None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out["allocated_before_steps"] = torch.cuda.memory_allocated()
    started = time.perf_counter()
    oom = None
    try:
        for _ in range(2):
            if autocast is not None:
                with torch.autocast("cuda", dtype=autocast):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:200]
    out["steps_seconds"] = round(time.perf_counter() - started, 2)
    stats = torch.cuda.memory_stats()
    nvml_after = _nvml_used()
    out["measured"] = {
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "nvml_used": nvml_after["used"] if nvml_after else None,
        "nvml_growth": (nvml_after["used"] - nvml_before["used"]) if nvml_after and nvml_before else None,
        "nvml_other_processes": nvml_after["other"] if nvml_after else None,
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "oom": oom,
    }
    out["device"] = {"torch_name": torch.cuda.get_device_name(0),
                     "total": torch.cuda.get_device_properties(0).total_memory,
                     "torch": torch.__version__, "cuda": torch.version.cuda,
                     "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    out["status"] = "OOM" if oom else "ok"


# ---------------------------------------------------------------------------------------------------------
# The driver


def _error(pred: int | None, real: int | None) -> float | None:
    if not pred or not real:
        return None
    return (pred - real) / real


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / GiB:.2f}"


def _pct(e: float | None) -> str:
    return "" if e is None else f"{e:+.1%}"


def summarize(result: dict) -> dict:
    m, p = result.get("measured") or {}, result.get("predicted") or {}
    if m.get("oom"):  # the peaks of a step that died are not the step's peaks
        m = {}
    result["errors"] = {
        "allocated": _error(p.get("peak_bytes"), m.get("max_allocated")),
        "reserved": _error(p.get("reserved_bytes"), m.get("max_reserved")),
        "nvml": _error(p.get("device_bytes"), m.get("nvml_growth")),
    }
    return result


def write_results(results: list[dict], meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_validate.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    lines = [f"# memguard against real training on {meta.get('gpu_name', '?')}", "",
             f"GPU: {meta.get('gpu_name')} (catalog entry: {meta.get('catalog')}), torch {meta.get('torch')}, "
             f"CUDA {meta.get('cuda')}. Two training steps per run, each in a fresh process; sizes in GiB.", "",
             "| run | params | measured allocated | measured reserved | NVML (process) | predicted allocated | "
             "predicted reserved | predicted device | error allocated | error reserved | error NVML | status |",
             "|" + "---|" * 12]
    for r in results:
        run, m, p, e = r["run"], r.get("measured") or {}, r.get("predicted") or {}, r.get("errors") or {}
        status = r.get("status", "")
        if m.get("oom"):
            status = "OOM"
        params = f"{p['params'] / 1e6:.0f}M" if p.get("params") else ""
        lines.append("| " + " | ".join([
            run["name"], params, _gib(m.get("max_allocated")), _gib(m.get("max_reserved")), _gib(m.get("nvml_growth")),
            _gib(p.get("peak_bytes")), _gib(p.get("reserved_bytes")), _gib(p.get("device_bytes")),
            _pct(e.get("allocated")), _pct(e.get("reserved")), _pct(e.get("nvml")), status]) + " |")
    for key, label in (("allocated", "allocated"), ("reserved", "reserved"), ("nvml", "NVML")):
        errs = [abs(r["errors"][key]) for r in results if (r.get("errors") or {}).get(key) is not None]
        if errs:
            lines.append(f"\n{label}: median abs error {statistics.median(errs):.1%}, max {max(errs):.1%} "
                         f"over {len(errs)} runs")
    lines += ["", "- measured allocated / reserved: torch.cuda.max_memory_allocated / max_memory_reserved after "
              "reset_peak_memory_stats (model, batch and optimizer already on the GPU), over two steps.",
              "- NVML (process): NVML \"used\" after the steps minus \"used\" before the process touched CUDA "
              "(its CUDA context plus the allocator's segments), compared with predicted device_bytes.",
              "- predicted: memguard.estimate(..., device=\"cuda\", gpu=<catalog entry>) on a meta copy, made in "
              "the same process before CUDA was touched.",
              f"- budget {meta.get('budget_s')} s; whole validation {meta.get('seconds', 0):.0f} s.",
              "", "Rerun: python benchmarks/gpu_validate.py"]
    (RESULTS / "gpu_validate.md").write_text("\n".join(lines) + "\n")


def _local_gpu() -> tuple[bool, str | None, dict]:
    """(a CUDA GPU is usable, its catalog name, facts) without creating a CUDA context in this process."""
    facts: dict[str, Any] = {}
    try:
        from memguard.device.catalog import match_device
        from memguard.device.gpus import discover

        found = discover()
        if found.gpus:
            info = found.gpus[0]
            facts["gpu_name"] = info.name
            facts["bf16"] = bool(info.bf16)
            entry = match_device(info)
            facts["catalog"] = entry.name if entry is not None else None
        else:
            facts["nvml_error"] = found.error
    except Exception as exc:  # noqa: BLE001 - NVML trouble only means we cannot name the GPU
        facts["nvml_error"] = f"{type(exc).__name__}: {exc}"
    # Ask NVML, not the CUDA runtime, whether a GPU is there: this process must hold no CUDA context while
    # the runs measure NVML's "used" memory.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
        facts["torch"], facts["cuda"] = torch.__version__, torch.version.cuda
    except Exception:  # noqa: BLE001
        cuda = False
    return cuda, facts.get("catalog"), facts


def _spawn_worker(run: Run, gpu: str | None, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(run))]
    if gpu:
        cmd += ["--gpu", gpu]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"run": asdict(run), "status": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"run": asdict(run), "status": f"failed (exit {proc.returncode}): {tail[-1][:200] if tail else ''}"}


def select(args: argparse.Namespace) -> list[Run]:
    runs = MATRIX
    if args.only:
        unknown = {n.removesuffix("_tiny") for n in args.only} - {r.name for r in MATRIX}
        if unknown:
            raise SystemExit(f"unknown run(s): {', '.join(sorted(unknown))}; see --list")
        runs = [r for r in MATRIX if r.name in args.only or f"{r.name}_tiny" in args.only]
    if args.limit is not None:
        runs = runs[: args.limit]
    if args.tiny:
        runs = [r.shrunk() for r in runs]
    return runs


def dry_run(runs: list[Run], gpu: str) -> int:
    """Build the matrix and make memguard's predictions on the CPU; write nothing."""
    print(f"dry run: {len(runs)} of {len(MATRIX)} runs, predictions for {gpu}, no GPU used, no results written")
    failures = 0
    for run in runs:
        try:
            p = predict(run, gpu)
        except Exception as exc:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"  {run.name}: prediction failed: {type(exc).__name__}: {exc}")
            continue
        print(f"  {run.name}: params {p['params'] / 1e6:.0f}M, allocated {_gib(p['peak_bytes'])} GiB, reserved "
              f"{_gib(p['reserved_bytes'])} GiB, device {_gib(p['device_bytes'])} GiB ({p['seconds']:.1f} s)",
              flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="build the matrix and predict only (CPU)")
    parser.add_argument("--list", action="store_true", help="print the matrix and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these entries")
    parser.add_argument("--limit", type=int, help="run only the first N entries (after --only)")
    parser.add_argument("--tiny", action="store_true",
                        help="shrink every run to one layer and a tiny batch (a fast smoke test, not a validation)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole matrix (default 420)")
    parser.add_argument("--run-timeout", type=float, default=150.0, help="seconds allowed to one run")
    parser.add_argument("--gpu", help=f"catalog name for the predictions (default: the local GPU's; "
                                      f"{DRY_RUN_GPU} in --dry-run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _quiet_transformers()
        result = worker(Run(**json.loads(args.worker)), args.gpu)
        print(json.dumps(result))
        return 0

    runs = select(args)
    if args.list:
        for r in runs:
            print(r.name)
        return 0
    if args.dry_run:
        return dry_run(runs, args.gpu or DRY_RUN_GPU)

    cuda, catalog, facts = _local_gpu()
    if not cuda:
        print(NO_GPU_MESSAGE)
        return 0
    gpu = args.gpu or catalog
    meta = {**facts, "catalog": gpu, "budget_s": args.budget, "matrix": len(runs)}
    if gpu is None:
        print(f"{facts.get('gpu_name')} is not in memguard's GPU catalog: predicting for the default GPU")
    print(f"validating {len(runs)} runs on {facts.get('gpu_name')} (catalog: {gpu}), budget {args.budget:.0f} s")
    started = time.perf_counter()
    results: list[dict] = []
    for run in runs:
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            results.append({"run": asdict(run), "status": "skipped: time budget spent"})
            print(f"  {run.name}: skipped (time budget spent)", flush=True)
            continue
        if not facts.get("bf16", True) and "bf16" in run.precision:
            results.append({"run": asdict(run), "status": "skipped: this GPU has no native bfloat16"})
            print(f"  {run.name}: skipped (no native bfloat16)", flush=True)
            continue
        result = summarize(_spawn_worker(run, gpu, min(args.run_timeout, left)))
        result.setdefault("status", "ok")
        results.append(result)
        e = result["errors"]
        print(f"  {run.name}: {result['status']}; errors allocated {_pct(e['allocated']) or '-'}, reserved "
              f"{_pct(e['reserved']) or '-'}, NVML {_pct(e['nvml']) or '-'}", flush=True)
        meta["seconds"] = time.perf_counter() - started
        write_results(results, meta)
    meta["seconds"] = time.perf_counter() - started
    write_results(results, meta)
    print(f"wrote {RESULTS / 'gpu_validate.md'} and gpu_validate.json ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
