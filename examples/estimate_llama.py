"""Predict the GPU memory of fine-tuning a Llama-2-7B-shaped model, on any laptop, in a few seconds.

The model is built on the meta device (no weights, no download), then memguard traces two training steps
on fake tensors: batch 1 x 4096 tokens, bf16 mixed precision, AdamW.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memguard

config = LlamaConfig(  # the published Llama-2-7B hyperparameters
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
)
with torch.device("meta"):
    model = LlamaForCausalLM(config)

ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
for checkpointing in (False, True):
    est = memguard.estimate(
        model, {"input_ids": ids, "labels": ids},
        optimizer="adamw", precision="bf16-mixed", device="cuda", gradient_checkpointing=checkpointing,
    )
    print(f"example: gradient_checkpointing={checkpointing}: peak {est.peak_bytes / 2**30:.1f} GiB "
          f"(at {est.peak_phase}, traced in {est.seconds:.1f} s)")
    for category, nbytes in est.breakdown.items():
        if nbytes:
            print(f"example:   {category.value:16s} {nbytes / 2**30:8.2f} GiB")
