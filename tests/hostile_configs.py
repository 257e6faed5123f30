"""Careless and hostile ``memguard check`` configs, generated from a seed: random structures, types, sizes,
unicode and nesting around the keys memguard reads, plus class paths that must never run. Used by the
property-based tests (tests/test_property_inputs.py) and the fuzz benchmark (benchmarks/fuzz_inputs.py).

A generated config is a plain Python mapping written as YAML; models are a tiny transformers Llama config
(so a config that happens to be valid is checked in about a second), a preset name, a class path, or junk.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "max_position_embeddings": 64}
MARKER = "hostile_marker"
"""A file that only a class memguard must never build would create, next to the config."""

SECTIONS = ("model", "data", "optimizer", "trainer", "gpu", "lora", "quantization", "compile", "memguard",
            "lr_scheduler", "seed_everything", "ckpt_path")
WORDS = ("adamw", "sgd", "bf16-mixed", "16-mixed", "fp16", "32-true", "ddp", "fsdp", "tp", "auto", "A100-80GB",
         "H100", "T4", "nf4", "precision", "optimizer", "checkpointing", "gpt2", "llama-2-7b", "q_proj", "c_attn",
         "", " ", "∞", "бf16", "🚀", "null", "~", "${data.batch_size}", "${nope}", "0x10", "5%", "1e9", "-1",
         "nan", ".inf", "a" * 300)
DANGEROUS = ("subprocess.Popen", "os.system", "builtins.exec", "shutil.rmtree", "pathlib.Path")


def scalar(rng: random.Random) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([0, 1, 2, -1, 7, 64, 2**31, 2**63, 10**30, -(10**12)])
    if kind == 1:
        return rng.choice([0.0, 0.05, -0.5, 1.0, 1e9, float("nan"), float("inf"), 1e-300])
    if kind == 2:
        return rng.choice([True, False, None])
    return rng.choice(WORDS)


def value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10)
    if depth < 4 and kind == 0:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 4 and kind == 1:
        return {rng.choice(WORDS + ("batch_size", "seq_len", "name", "init_args")): value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return scalar(rng)


def model_section(rng: random.Random, marker: Path) -> Any:
    kind = rng.randrange(6)
    if kind <= 1:
        return {"hf_config": "tiny.json"}
    if kind == 2:
        return {"preset": rng.choice(["gpt2x", "", "llama", 3])}
    if kind == 3:  # a class memguard must refuse to build, nested or at the top
        attack = {"class_path": rng.choice(DANGEROUS), "init_args": {"args": ["touch", str(marker)]}}
        return {"class_path": "torch.nn.Linear", "init_args": {"in_features": attack}} if rng.random() < 0.5 \
            else attack
    if kind == 4:
        return value(rng)
    return {"hf_config": "tiny.json", rng.choice(WORDS): value(rng)}


def config(rng: random.Random, marker: Path) -> Any:
    if rng.random() < 0.05:
        return value(rng)  # not even a mapping
    careless = rng.random() < 0.5  # half the configs are nearly right, with one or two slips at most
    out: dict[Any, Any] = {"model": model_section(rng, marker) if not careless or rng.random() < 0.3
                           else {"hf_config": "tiny.json"}}
    sizes = ([1, 2, 4], [16, 32]) if careless and rng.random() < 0.7 else (
        [1, 2, 0, -3, 2**40, "4", 10**9, None], [16, 32, 1000, 0, "x", None, 2**62])
    out["data"] = {"batch_size": rng.choice(sizes[0]), "seq_len": rng.choice(sizes[1])}
    for section in rng.sample(SECTIONS[2:], 0 if careless else rng.randrange(4)):
        out[section] = value(rng)
    if not careless and rng.random() < 0.3:
        out[rng.choice(WORDS)] = value(rng)
    trainer = {"precision": rng.choice(["bf16-mixed", "16-mixed", "32-true", "fp16", "16", 32, "x"]),
               "devices": rng.choice([1, 2, 8, 0, "auto", [0, 1], "0,1"]),
               "num_nodes": rng.choice([1, 2, 100000, -1]),
               "strategy": rng.choice(["auto", "ddp", "fsdp", "tp", "fsdp3", {"name": "tp"}, 7])}
    if careless:
        trainer = {k: v for k, v in trainer.items() if rng.random() < 0.3 and k != "num_nodes"}
    out["trainer"] = trainer
    return out


def write(seed: int, folder: Path) -> Path:
    """Config number ``seed`` as ``folder/config.yaml`` (with the tiny model's config.json beside it)."""
    rng = random.Random(seed)
    (folder / "tiny.json").write_text(json.dumps(TINY_LLAMA))
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config(rng, folder / MARKER), allow_unicode=True, sort_keys=False))
    return path


__all__ = ["MARKER", "write"]
