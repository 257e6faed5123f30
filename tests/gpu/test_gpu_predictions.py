"""memguard's predictions against real training steps on this machine's GPU.

For each case the prediction is made first, on the CPU, from a meta-device copy of the model
(``memguard.estimate(device=<this GPU>)``). Then two real training steps (forward, backward, optimizer
step, zero_grad) run on the GPU with random weights and synthetic data, in a fresh process so that the
caching allocator starts empty and NVML's "used" can be read before and after, and the measured
``torch.cuda.max_memory_allocated``, ``max_memory_reserved`` and NVML used (this process's share) are
compared with ``peak_bytes``, ``reserved_bytes`` and ``device_bytes``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)"),
]

HERE = Path(__file__).resolve().parent
ALLOCATED_TOLERANCE = 0.05
RESERVED_TOLERANCE = 0.10
DEVICE_SHORTFALL = 0.05
"""device_bytes may be below NVML's used by at most this fraction."""

SMALL_LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)

# model -> (batch size, sequence length or image size)
SHAPES = {"gpt2": (4, 512), "llama-small": (2, 1024), "vit-b-16": (8, 224)}
CASES = [(model, precision, optimizer) for model in SHAPES for precision in ("32-true", "bf16-mixed")
         for optimizer in ("adamw", "sgd")]


def build(model: str, device: str) -> torch.nn.Module:
    """The case's model with random weights: on ``meta`` for the prediction, on the CPU for the real run."""
    import transformers

    from memguard import presets

    if model == "llama-small":
        config, cls = transformers.LlamaConfig(**SMALL_LLAMA), transformers.LlamaForCausalLM
    else:
        preset = presets.get(model)
        config = getattr(transformers, preset.config_class)(**preset.config_kwargs())
        cls = getattr(transformers, preset.model_class)
    with torch.device(device):
        return cls(config)


def batch(model: str, device: str) -> dict[str, torch.Tensor]:
    size, length = SHAPES[model]
    if model == "vit-b-16":
        return {"pixel_values": torch.randn(size, 3, length, length, device=device) if device != "meta"
                else torch.empty(size, 3, length, length, device="meta"),
                "labels": torch.zeros(size, dtype=torch.long, device=device)}
    ids = (torch.randint(0, 32000, (size, length), device=device) if device != "meta"
           else torch.zeros(size, length, dtype=torch.long, device="meta"))
    return {"input_ids": ids, "labels": ids}


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return torch.optim.SGD(params, lr=1e-2, foreach=True)


def measure(model: str, precision: str, optimizer: str) -> dict[str, int]:
    """Two real training steps on cuda:0; runs in a child process (see module docstring)."""
    from memguard.device.gpus import discover

    before = discover([0]).gpus[0].used_bytes
    torch.manual_seed(0)
    net = build(model, "cpu").to("cuda")
    data = {k: v.to("cuda") for k, v in batch(model, "cpu").items()}
    opt = _optimizer(optimizer, net.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    mixed = precision == "bf16-mixed"
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            loss = net(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del loss
    torch.cuda.synchronize()
    after = discover([0]).gpus[0].used_bytes
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "nvml_used": after - before}


def _measure_in_child(model: str, precision: str, optimizer: str) -> dict[str, int]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_gpu_predictions as t; "
            "print('RESULT ' + json.dumps(t.measure(sys.argv[2], sys.argv[3], sys.argv[4])))")
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # the prediction below assumes the default allocator
    out = subprocess.run([sys.executable, "-c", code, str(HERE), model, precision, optimizer], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _device_model() -> Any:
    """memguard's model of cuda:0: its catalog entry, or its compute capability when the catalog lacks it."""
    from memguard.device.allocator import AllocatorConfig
    from memguard.device.models import CUDADevice
    from memguard.device.catalog import match_device
    from memguard.device.gpus import discover

    found = discover([0])
    entry = match_device(found.gpus[0]) if found.gpus else None
    if entry is not None:
        return CUDADevice.for_gpu(entry, alloc_conf=AllocatorConfig())
    major, minor = torch.cuda.get_device_capability(0)
    return CUDADevice(compute_capability=(major, minor), attention="flash" if major >= 8 else "efficient",
                      alloc_conf=AllocatorConfig())


@pytest.mark.parametrize(("model", "precision", "optimizer"), CASES)
def test_prediction_matches_two_real_steps(model: str, precision: str, optimizer: str) -> None:
    import memguard

    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    predicted = memguard.estimate(build(model, "meta"), batch(model, "meta"), optimizer=optimizer,
                                  optimizer_impl="foreach", precision=precision, device=_device_model())
    real = _measure_in_child(model, precision, optimizer)
    report = (f"{model} {precision} {optimizer}: allocated {real['allocated']:,} vs {predicted.peak_bytes:,}; "
              f"reserved {real['reserved']:,} vs {predicted.reserved_bytes:,}; "
              f"NVML used {real['nvml_used']:,} vs device {predicted.device_bytes:,}")
    assert abs(predicted.peak_bytes / real["allocated"] - 1) <= ALLOCATED_TOLERANCE, report
    assert abs(predicted.reserved_bytes / real["reserved"] - 1) <= RESERVED_TOLERANCE, report
    assert predicted.device_bytes >= (1 - DEVICE_SHORTFALL) * real["nvml_used"], report
