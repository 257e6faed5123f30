"""``memguard check`` on tensor-parallel configs: the strategy forms, the exit-code contract per rank, and
sizes that cannot work (not dividing the ranks or the model's heads) answered with exit 2 naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memguard.cli import main

pytest.importorskip("transformers")

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 256}


def _config(tmp_path: Path, strategy: str, devices: int, batch: int = 4, seq: int = 64,
            gpu: str = "A100-80GB") -> str:
    (tmp_path / "llama.json").write_text(json.dumps(LLAMA))
    path = tmp_path / "tp.yaml"
    path.write_text(f"model:\n  hf_config: llama.json\ndata:\n  batch_size: {batch}\n  seq_len: {seq}\n"
                    f"trainer:\n  devices: {devices}\n  strategy: {strategy}\ngpu: {gpu}\n")
    return str(path)


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_tp_config_is_predicted_per_rank_and_keeps_the_exit_code_contract(tmp_path, capsys) -> None:
    config = _config(tmp_path, "{name: tp, tensor_parallel_size: 2}", devices=4)
    code, out, _ = _check(capsys, config, "--json")
    assert code == 0
    report = json.loads(out)
    notes = " ".join(report["notes"])
    assert "2 ranks per tensor-parallel group x 2 data-parallel" in notes and "transformers' own" in notes
    assert (report["config"]["tensor_parallel_size"], report["config"]["data_parallel_size"]) == (2, 2)
    # the same run with a batch that cannot fit a 16 GB GPU: exit 1 without a plan
    code, _, _ = _check(capsys, config, "--gpu", "T4", "--batch-size", "60000", "--no-fallback")
    assert code == 1


def test_model_parallel_strategy_class_path_reads_its_sizes(tmp_path, capsys) -> None:
    strategy = ("{class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
                "init_args: {tensor_parallel_size: 4, data_parallel_size: 1}}")
    code, out, _ = _check(capsys, _config(tmp_path, strategy, devices=4), "--json")
    assert code == 0 and "4 ranks per tensor-parallel group x 1 data-parallel" in " ".join(json.loads(out)["notes"])


@pytest.mark.parametrize("strategy,devices,words", [
    ("{name: tp, tensor_parallel_size: 3}", 4, "tensor_parallel_size (3) must divide the number of ranks (4); "
                                               "divisors of 4: 1, 2, 4"),
    ("{name: tp, tensor_parallel_size: 8}", 8, "8 does not divide the model's num_attention_heads (4)"),
    ("{name: tp, tensor_parallel_size: 0}", 2, "tensor_parallel_size"),
    ("{name: ddp, tensor_parallel_size: 2}", 2, "need a tensor-parallel strategy"),
])
def test_bad_tensor_parallel_sizes_exit_2_naming_the_key(tmp_path, capsys, strategy, devices, words) -> None:
    code, out, err = _check(capsys, _config(tmp_path, strategy, devices))
    assert code == 2 and out == ""
    assert "trainer.strategy" in err and words in err and "Traceback" not in err


def test_the_planner_proposes_tensor_parallelism_when_sharding_alone_does_not_fit(tmp_path, capsys) -> None:
    """Activations dominate (a large batch of a small Llama on four 16 GB GPUs): ZeRO-2 and FSDP shard the
    model states but not the activations, tensor parallelism splits those too. The plan is tp, and the
    configuration it names keeps the exit-code contract (tp exits 0; ZeRO-2 and FSDP were tried first and
    did not fit)."""
    config = _config(tmp_path, "ddp", devices=4, batch=3500, seq=256, gpu="T4")
    code, out, _ = _check(capsys, config, "--allow", "sharding", "--json")
    report = json.loads(out)
    assert code == 3 and report["plan"]["fits"]
    assert [(c["knob"], c["after"]) for c in report["plan"]["changes"]] == [("sharding", "tp")]
    assert "ModelParallelStrategy" in report["plan"]["changes"][0]["how"]
    assert _check(capsys, config, "--set", "trainer.strategy=tp", "--no-fallback")[0] == 0

