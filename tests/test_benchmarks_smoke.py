"""Smoke tests of the benchmark scripts: the peers answer plausibly, gpu_validate.py runs without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groundtruth import measure_peak
from zoo import Decoder, FrozenBackbone, _ids

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GPU_VALIDATE = BENCH / "gpu_validate.py"


@pytest.fixture(scope="module")
def peers():
    pytest.importorskip("accelerate")
    pytest.importorskip("torchinfo")
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    # DeepSpeed's import is slow and changes global state: the copied formulas are compared with it in a
    # subprocess below, so this process uses the copies.
    module._DEEPSPEED.update(loaded=True)
    return module


def test_peers_plausible_on_a_small_decoder(peers) -> None:
    torch.manual_seed(0)
    model, batch = Decoder(layers=1), _ids(2, 32)
    params = sum(p.numel() for p in model.parameters())
    fp32_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    got = {name: peers.call(peer, model, batch, "adamw", "32-true") for name, peer in peers.PEERS.items()}
    for name, result in got.items():
        assert result.bytes is not None and result.bytes > 0, (name, result.reason)
    assert got["24 B/param"].bytes == 24 * params
    assert got["accelerate"].bytes == 4 * fp32_bytes  # "Training using Adam" for float32
    assert got["deepspeed-zero2"].bytes == 20 * params
    assert got["deepspeed-zero3"].bytes == 18 * params + 4 * largest
    assert got["torchinfo"].bytes > fp32_bytes  # parameters plus inputs and activations
    real = measure_peak(model, batch, lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    assert abs(got["MemTracker"].bytes - real) <= 0.02 * real  # it tracks the real steps
    half = peers.call(peers.accelerate_estimate, model, batch, "adamw", "bf16-mixed")
    assert half.bytes == 2 * fp32_bytes


def test_a_failing_peer_is_not_applicable(peers) -> None:
    model, batch = FrozenBackbone(), (torch.randn(4, 256), torch.randint(0, 10, (4,)))
    result = peers.call(peers.memtracker_peak, model, batch, "adamw", "32-true")
    assert result.bytes is None and result.reason
    meta = peers.call(peers.torchinfo_total, Decoder().to("meta"), _ids(2, 8), "adamw", "32-true")
    assert meta.bytes is None and "real model" in meta.reason


def _results_state() -> dict:
    files = [BENCH / "results" / "gpu_validate.json", BENCH / "results" / "gpu_validate.md"]
    return {f.name: f.stat().st_mtime_ns if f.exists() else None for f in files}


def test_gpu_validate_dry_run_writes_nothing() -> None:
    before = _results_state()
    names = ["gpt2_bf16-mixed_adamw8bit_b8_s512", "llama_bf16-mixed_adamw-fused_b4_s2048"]
    out = subprocess.run([sys.executable, str(GPU_VALIDATE), "--dry-run", "--tiny", "--only", *names],
                         capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-2000:]
    for name in names:
        assert f"{name}_tiny: params" in out.stdout, out.stdout
    assert "no results written" in out.stdout
    assert _results_state() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_gpu_validate_without_cuda_exits_0() -> None:
    out = subprocess.run([sys.executable, str(GPU_VALIDATE)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA GPU: nothing to validate" in out.stdout


COVERAGE = BENCH / "coverage.py"


def test_coverage_traces_two_small_architectures(tmp_path) -> None:
    """coverage.py end to end on two small architectures, written to a temporary folder: both instantiate,
    both trace, both within 2% of their real CPU peak, and the table says so."""
    import json

    only = "gpt2/causal-lm,bert/masked-lm"
    out = subprocess.run([sys.executable, str(COVERAGE), "--only", only, "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "coverage.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    assert set(rows) == set(only.split(","))
    for row in rows.values():
        assert row["instantiable"] and row["traced"], row
        assert row["real_peak"] > 0 and abs(row["error"]) < 0.02, row
    table = (tmp_path / "coverage.md").read_text()
    assert "traced by memguard: **2 / 2 (100.0%)**" in table
    assert "| gpt2/causal-lm | GPT2LMHeadModel |" in table
