"""torch.compile: memguard's compiled and eager predictions against the real compiled and eager CPU peaks.

Each model trains two AdamW steps on the CPU, eagerly and compiled with inductor; the truth is the peak of
live tensor bytes (tests/groundtruth.py, torch.profiler allocator events). Then the time of a compiled and
an eager estimate of Llama-2-7B (batch 1 x 512, bf16-mixed, AdamW, device "cuda", on the meta device), the
compiled one both with its 32 identical blocks analysed once (the default) and with every block analysed.

Usage: python benchmarks/compiled.py [--skip-llama]      Writes benchmarks/results/compiled.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
warnings.filterwarnings("ignore")

import memguard  # noqa: E402
from _common import llama_on_meta, write_table  # noqa: E402
from memguard.estimation import EstimateRequest, estimate_one  # noqa: E402
from groundtruth import measure_compiled_peak, measure_peak  # noqa: E402
from test_compiled import TOKENS, ConvNet, Decoder, GatedBlock, decoder_loss  # noqa: E402


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def per_block(model: nn.Module) -> nn.Module:
    for layer in model.layers:
        layer.compile()
    return model


def hf_loss(model, batch):
    return model(**batch).loss


def _llama_tiny(layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def _gpt2_tiny(layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=128, n_layer=layers, n_head=4, n_positions=256))


def _hf_batch() -> dict:
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


CASES = [
    # name, model factory, batch, loss_fn, compile_fn, precision
    ("gated MLP stack (fused pointwise chain)", lambda: nn.Sequential(GatedBlock(), GatedBlock()),
     lambda: torch.randn(8, 64, 64), None, torch.compile, "32-true"),
    ("4-block LayerNorm/MLP stack, batch 4096", lambda: nn.Sequential(*[nn.Sequential(
        nn.LayerNorm(256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)) for _ in range(4)]),
     lambda: torch.randn(4096, 256), None, torch.compile, "32-true"),
    ("decoder with SDPA", Decoder, lambda: TOKENS, decoder_loss, torch.compile, "32-true"),
    ("conv net with BatchNorm", ConvNet, lambda: torch.randn(8, 3, 32, 32), None, torch.compile, "32-true"),
    ("gated MLP stack, bf16-mixed", lambda: nn.Sequential(GatedBlock(), GatedBlock()),
     lambda: torch.randn(8, 64, 64), None, torch.compile, "bf16-mixed"),
    ("decoder, checkpointed blocks", lambda: Decoder(checkpointed=True), lambda: TOKENS, decoder_loss,
     torch.compile, "32-true"),
    ("decoder (2 layers), per-block compile", lambda: Decoder(layers=2), lambda: TOKENS, decoder_loss, per_block,
     "32-true"),
    ("decoder (2 layers) with a graph break", lambda: Decoder(layers=2, graph_break=True), lambda: TOKENS, decoder_loss,
     torch.compile, "32-true"),
    ("transformers Llama (2 layers, d=128)", _llama_tiny, _hf_batch, hf_loss, torch.compile, "32-true"),
    ("transformers GPT-2 (2 layers, d=128)", _gpt2_tiny, _hf_batch, hf_loss, torch.compile, "32-true"),
    # deep enough for identical blocks to be analysed once (memguard/estimation/repeated.py)
    ("decoder (8 layers)", lambda: Decoder(layers=8), lambda: TOKENS, decoder_loss, torch.compile, "32-true"),
    ("transformers Llama (8 layers, d=128)", lambda: _llama_tiny(8), _hf_batch, hf_loss, torch.compile, "32-true"),
    ("transformers GPT-2 (8 layers, d=128), bf16-mixed", lambda: _gpt2_tiny(8), _hf_batch, hf_loss, torch.compile,
     "bf16-mixed"),
]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _err(pred: int, truth: int) -> str:
    return f"{100 * (pred - truth) / truth:+.2f}%"


def accuracy_rows() -> list[list[str]]:
    rows = []
    for name, make, make_batch, loss_fn, compile_fn, precision in CASES:
        torch.manual_seed(0)
        model, batch = make(), make_batch()
        autocast = torch.bfloat16 if precision == "bf16-mixed" else None
        eager_truth = measure_peak(model, batch, adamw, loss_fn=loss_fn, autocast_dtype=autocast)
        compiled_truth = measure_compiled_peak(model, batch, adamw, compile_fn=compile_fn, loss_fn=loss_fn,
                                               autocast_dtype=autocast)
        kwargs = dict(optimizer="adamw", device="cpu", loss_fn=loss_fn, precision=precision)
        eager = memguard.estimate(model, batch, **kwargs)
        compiled = memguard.estimate(compile_fn(copy.deepcopy(model)), batch, **kwargs)
        rows.append([name, _mib(eager_truth), _mib(eager.peak_bytes), _err(eager.peak_bytes, eager_truth),
                     _mib(compiled_truth), _mib(compiled.peak_bytes), _err(compiled.peak_bytes, compiled_truth),
                     (compiled.compiled.removeprefix("compiled ") or "eager (fallback)")
                     + ("; blocks analysed once" if _extended(compiled) else "")])
        print(rows[-1], flush=True)
    return rows


def _extended(est: memguard.Estimate) -> bool:
    return any(n.startswith("identical blocks analysed once") for n in est.notes)


def llama_rows() -> list[list[str]]:
    model = llama_on_meta("llama-2-7b")
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    kwargs = dict(optimizer="adamw", precision="bf16-mixed", device="cuda", gpu="H100",
                  loss_fn=lambda m, b: m(input_ids=b, labels=b).loss)
    whole_graph = lambda: estimate_one(model, ids, EstimateRequest(compile=True, **kwargs))  # noqa: E731
    runs = (("eager", lambda: memguard.estimate(model, ids, compile=False, **kwargs)),
            ("compiled (inductor), identical blocks analysed once", lambda: memguard.estimate(model, ids, compile=True,
                                                                                             **kwargs)),
            ("compiled (inductor), every block analysed", whole_graph))
    rows = []
    for label, run in runs:
        started = time.perf_counter()
        est = run()
        rows.append([label, f"{time.perf_counter() - started:.1f}", f"{est.peak_bytes / 2**30:.3f}",
                     f"{est.reserved_bytes / 2**30:.3f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-llama", action="store_true")
    args = parser.parse_args()
    llama = [] if args.skip_llama else llama_rows()  # first: a fresh process, nothing compiled before
    rows = accuracy_rows()
    notes = ["MiB of live tensor bytes at the peak of two AdamW steps on the CPU; error = (predicted - real) / real.",
             "Eager columns: the model run and estimated without compile. Compiled columns: the real step compiled "
             "with inductor (compiled at its first forward, inside the measured window) and memguard's estimate of "
             "the compiled model. Each real compiled run starts from reset dynamo caches, as a training process "
             "that compiles its model once.",
             ""]
    if llama:
        notes += ["Llama-2-7B on the meta device, batch 1 x 512, bf16-mixed, AdamW, device cuda (H100): seconds "
                  "per estimate on this machine, run first in a fresh process (the compiled estimates after the eager "
                  "one; the first pays for loading inductor).", "",
                  "| estimate | seconds | predicted peak (GiB) | predicted reserved (GiB) |", "|---|---|---|---|"]
        notes += ["| " + " | ".join(r) + " |" for r in llama]
    print(write_table("compiled.md", "torch.compile: compiled and eager predictions against the real CPU peaks",
                      ["model", "eager real", "eager predicted", "error", "compiled real", "compiled predicted",
                       "error", "predicted as"], rows, notes))


if __name__ == "__main__":
    main()
