"""torch.compile against a published compiled run: torchtune's Llama-3.2-3B full fine-tune on an A100-80GB,
eager ("+ Packed Dataset", 60.0 GiB) and with compile ("+ Compile", 51.0 GiB), both from the same table.

torchtune's ``compile=True`` compiles each transformer layer (``training.compile_model``: every
``TransformerSelfAttentionLayer`` gets ``.compile()``) and the loss separately. memguard predicts the same
model with each decoder layer compiled (its identical blocks analysed once) and the loss eager: the
compiled loss is not modelled. Every other input is the eager point's (benchmarks/data/gpu_measurements.yaml,
tt3b_02, with its stated assumptions).

Usage: python benchmarks/compiled_published.py      Writes benchmarks/results/compiled_published.md.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

import gpu_measurements as gm  # noqa: E402
from _common import write_table  # noqa: E402

EAGER, COMPILED = "tt3b_02", "tt3b_03"


def _per_layer(build):
    """torchtune's compile_model: each decoder layer compiled on its own."""

    def compiled(mspec, lora=None):
        model = build(mspec, lora)
        for layer in model.model.layers:
            layer.compile()
        return model

    return compiled


def main() -> None:
    points = {p["id"]: p for p in gm.load()["measurements"]}
    spec = dict(points[EAGER]["memguard"])
    rows = []
    for point_id, build in ((EAGER, gm.build_model), (COMPILED, _per_layer(gm.build_model))):
        entry = points[point_id]
        gm_build, gm.build_model = gm.build_model, build
        try:
            started = time.perf_counter()
            est = gm.estimate_point(spec)
            seconds = time.perf_counter() - started
        finally:
            gm.build_model = gm_build
        measured = gm.published_bytes(entry["measured_original"])
        predicted = est.peak_bytes  # the table's "Peak Memory Active" is torch's allocated peak
        rows.append([point_id, entry["quote"].split("|")[1].strip(), f"{measured / 2**30:.2f}", f"{predicted / 2**30:.2f}",
                     f"{100 * (predicted - measured) / measured:+.1f}%", est.compiled or "eager", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    notes = [f"Source: {points[COMPILED]['source']}.",
             "GiB = 2**30 bytes; the published column is torch.cuda.memory_stats()['active_bytes.all.peak'], compared "
             "with memguard's allocated peak. Inputs and assumptions: the eager point's memguard block in "
             "benchmarks/data/gpu_measurements.yaml (batch 2 x 4096 packed, bf16-true, AdamW fused, A100-80GB). "
             "Not modelled: torchtune also compiles the loss."]
    print(write_table("compiled_published.md", "torch.compile: a published compiled run (torchtune, Llama-3.2-3B)",
                      ["point", "published row", "measured GiB", "predicted GiB", "error", "predicted as",
                       "seconds"], rows, notes))


if __name__ == "__main__":
    main()
