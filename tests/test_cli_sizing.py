"""``memguard check --max-batch-size / --max-seq-len``: each answer N is the size the exit-code contract
agrees with (``--batch-size N --no-fallback`` exits 0, N+1 exits 1, on the same GPU), per GPU when several
are given, and after each change of the plan when the configuration needs one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataclasses import replace

from memguard.act import check
from memguard.act.check import run_check, size_check
from memguard.cli import main
from memguard.report import render_check, to_json
from memguard.spec.check_spec import Options
from memguard.spec.config import load_config

TINY_GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 1000, "n_embd": 128,
             "n_layer": 2, "n_head": 4, "n_positions": 1024}


@pytest.fixture
def config(tmp_path: Path) -> str:
    """A two-layer GPT-2 (its estimates take a fraction of a second), 256 tokens per sample, float32."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_GPT2))
    path = tmp_path / "tiny.yaml"
    path.write_text("model: {hf_config: tiny.json}\ndata: {batch_size: 8, seq_len: 256}\noptimizer: adamw\n"
                    "trainer: {precision: 32-true}\n")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _exit_code(capsys, *argv: str) -> int:
    return run(capsys, *argv, "--no-fallback")[0]


def test_max_batch_size_per_gpu_agrees_with_the_exit_codes(capsys, config):
    code, out, err = run(capsys, config, "--gpu", "T4", "--gpu", "A10G", "--max-batch-size", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert "max_batch_size" not in doc  # several GPUs: per GPU only
    answers = {t["gpu"]["name"]: t["max_batch_size"] for t in doc["targets"]}
    assert 8 < answers["T4"] < answers["A10G"]
    for target in doc["targets"]:
        search = target["max_batch_size_search"]
        assert search["value"] == target["max_batch_size"] and len(search["tried"]) <= 6
    for gpu, n in answers.items():
        assert _exit_code(capsys, config, "--gpu", gpu, "--batch-size", str(n)) == 0
        assert _exit_code(capsys, config, "--gpu", gpu, "--batch-size", str(n + 1)) == 1


def test_answers_after_each_change_of_the_plan(capsys, config):
    code, out, err = run(capsys, config, "--gpu", "A10G", "--max-batch-size", "--json")
    configured = json.loads(out)["max_batch_size"]
    options = Options(gpus=("A10G",), batch_size=configured + 1, allow="precision")
    result = run_check(load_config(config, (), options))
    size_check(result, "batch_size", lambda n: load_config(config, (), replace(options, batch_size=n)))
    assert result.exit_code == 3
    doc = to_json(result)
    assert doc["max_batch_size"] == configured  # the size searched replaces the configured one
    (with_bf16,) = doc["max_batch_size_with_plan"]
    assert with_bf16["changes"] == "bf16-mixed" and with_bf16["max_batch_size"] > configured
    bf16 = [config, "--gpu", "A10G", "--set", "trainer.precision=bf16-mixed"]
    assert _exit_code(capsys, *bf16, "--batch-size", str(with_bf16["max_batch_size"])) == 0
    assert _exit_code(capsys, *bf16, "--batch-size", str(with_bf16["max_batch_size"] + 1)) == 1
    assert f"as configured: {configured}; with bf16-mixed: {with_bf16['max_batch_size']}" in render_check(result)


def test_max_seq_len_stops_at_memory_or_at_the_model_positions(capsys, config):
    code, out, err = run(capsys, config, "--gpu", "T4", "--batch-size", "512", "--max-seq-len", "--json")
    n = json.loads(out)["max_seq_len"]
    assert 1 < n < 1024, err
    base = [config, "--gpu", "T4", "--batch-size", "512"]
    assert _exit_code(capsys, *base, "--seq-len", str(n)) == 0
    assert _exit_code(capsys, *base, "--seq-len", str(n + 1)) == 1
    code, out, err = run(capsys, config, "--gpu", "T4", "--batch-size", "1", "--max-seq-len")
    assert "as configured: 1024 (the most the run takes)" in out, out[-600:]


WIDE_GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 4096,
             "n_layer": 2, "n_head": 32, "n_positions": 1024}


def test_min_gpus_per_strategy_agrees_with_the_exit_codes(capsys, tmp_path, monkeypatch):
    """A 0.6B-parameter model in float32 with AdamW (about 10 GiB of weights, gradients and state) on T4s.
    DDP and one sharded strategy: the search is the same for every strategy (each one's per-rank estimate
    is tested in tests/test_distributed.py)."""
    monkeypatch.setattr(check, "MIN_GPU_STRATEGIES", ("ddp", "deepspeed_stage_3"))
    (tmp_path / "wide.json").write_text(json.dumps(WIDE_GPT2))
    config = tmp_path / "wide.yaml"
    config.write_text("model: {hf_config: wide.json}\ndata: {batch_size: 1, seq_len: 128}\noptimizer: adamw\n"
                      "trainer: {precision: 32-true}\n")
    code, out, err = run(capsys, str(config), "--gpu", "T4", "--min-gpus", "--devices", "4", "--json")
    found = json.loads(out)["min_gpus"]
    per = found["per_strategy"]
    assert per["ddp"] is None, "DDP replicates everything: more GPUs never help"
    assert list(per) == ["ddp", "deepspeed_stage_3"]
    sharded = {k: v for k, v in per.items() if v is not None}
    assert sharded and found["count"] == min(v["count"] for v in sharded.values()) > 1, err
    for name, answer in sharded.items():
        layout = ["--devices", str(answer["devices"]), "--num-nodes", str(answer["num_nodes"])]
        fewer = (["--devices", str(answer["devices"] - 1)] if answer["num_nodes"] == 1 else
                 ["--devices", "4", "--num-nodes", str(answer["num_nodes"] - 1)])
        assert _exit_code(capsys, str(config), "--gpu", "T4", "--set", f"trainer.strategy={name}", *layout) == 0
        assert _exit_code(capsys, str(config), "--gpu", "T4", "--set", f"trainer.strategy={name}", *fewer) == 1


@pytest.mark.parametrize("first", [0, 1, 2, 5, 16, 70, 71, None])
def test_first_fitting_count_is_found_and_confirmed(first):
    from memguard.act.check import _first_fitting

    asked: list[int] = []

    def fits(i: int) -> bool:
        asked.append(i)
        return first is not None and i >= first

    assert _first_fitting(fits, 71) == (first if first is not None and first < 71 else None)
    if first not in (None, 0, 71):
        assert first in asked and first - 1 in asked
    assert len(asked) <= 16
