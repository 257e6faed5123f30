"""The published GPU measurements (benchmarks/data/gpu_measurements.yaml) and the benchmark that predicts them.

Fast checks only: the data file, its published numbers, the helpers that reproduce the sources' training
code, and a few cheap points run through the whole prediction pipeline. The full comparison is
``python benchmarks/gpu_measurements.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_measurements as gm  # noqa: E402

DATA = gm.load()
MEASUREMENTS = {e["id"]: e for e in DATA["measurements"]}
OOMS = {e["id"]: e for e in DATA["oom_observations"]}
CALIBRATION = {e["id"]: e for e in DATA["calibration_points"]}
DEV_SET = ROOT.parent / "shared" / "data" / "gpu_measurements_dev.yaml"
RESULTS_JSON = ROOT / "benchmarks" / "results" / "gpu_measurements.json"

PUBLISHED_FIELDS = ("id", "source", "quote", "model", "batch_size", "seq_len_or_image", "precision", "optimizer",
                    "grad_checkpointing", "peft", "gpus", "strategy", "gpu_model", "measured_original",
                    "measured_gib", "measurement_method")


# ---------------------------------------------------------------------------------------------------------
# The data file


def test_every_point_is_decided_and_well_formed() -> None:
    from memguard import gpu_catalog, presets

    ids = [e["id"] for e in DATA["measurements"] + DATA["oom_observations"] + DATA["calibration_points"]]
    assert len(ids) == len(set(ids))
    assert len(DATA["measurements"]) >= 80
    for entry in DATA["measurements"]:
        for key in ("id", "source", "quote", "measured_original", "measurement_method", "memguard"):
            assert entry.get(key) not in (None, ""), (entry["id"], key)
        spec = entry["memguard"]
        if spec["use"]:
            assert spec["compare"] in ("allocated", "active", "reserved", "nvml"), entry["id"]
            presets.get(spec["model"]["preset"])
            gpu_catalog.lookup(spec["gpu"])
            assert spec.get("assumed"), f"{entry['id']}: say what was assumed"
        else:
            assert len(spec["skip"]) > 20, f"{entry['id']}: say why the point is skipped"
    for entry in DATA["oom_observations"]:
        assert entry["outcome"] == "OOM" and entry["memguard"]["use"]
        gpu_catalog.lookup(entry["memguard"]["gpu"])


def test_comparisons_follow_the_measurement_method() -> None:
    for entry in DATA["measurements"]:
        spec, method = entry["memguard"], entry["measurement_method"]
        if not spec["use"]:
            continue
        if spec["compare"] == "allocated":
            assert "max_memory_allocated" in method, entry["id"]
        elif spec["compare"] == "active":
            assert "active_bytes" in method, entry["id"]
        elif spec["compare"] == "reserved":
            assert "max_memory_reserved" in method, entry["id"]
        else:
            assert "NVML" in method and spec.get("context_from") == "hf_cal_context", entry["id"]


def test_multi_gpu_points_are_left_to_the_distributed_benchmark() -> None:
    for entry in DATA["measurements"]:
        if int(entry["gpus"]) > 1:
            assert not entry["memguard"]["use"] and "distributed" in entry["memguard"]["skip"], entry["id"]


def _spellings(value: float) -> set[str]:
    out = {repr(value), f"{value:g}", f"{value:.2f}", f"{value:.1f}"}
    if float(value).is_integer():
        out.add(str(int(value)))
    return out


@pytest.mark.parametrize("section", ["measurements", "calibration_points"])
def test_published_values_appear_in_their_quotes(section: str) -> None:
    for entry in DATA[section]:
        value = entry["measured_original"]["value"]
        assert any(s in entry["quote"] for s in _spellings(value)), (entry["id"], value, entry["quote"])


def test_a_few_published_values_are_unchanged() -> None:
    expected = {
        "hf_bert_01": (14949.0, "MiB"), "hf_bert_09": (5363.0, "MiB"),
        "litgpt_hub_llama-2-7b_lora": (19.77, "GB"), "litgpt_hub_gemma2-9b_qlora": (20.92, "GB"),
        "tt3b_02": (60.0, "GiB"), "rasbt_vitl_01": (26.79, "GB"), "optbench_gpt2_rocm": (2506.73664, "MB"),
    }
    for pid, (value, unit) in expected.items():
        published = MEASUREMENTS[pid]["measured_original"]
        assert published["value"] == value and published["unit"].split()[0] == unit, pid
    assert CALIBRATION["hf_cal_context"]["measured_original"]["value"] == 1343
    assert gm.published_bytes({"value": 1343, "unit": "MiB (printed as 'MB')"}) == 1343 * 2**20
    assert gm.published_bytes({"value": 19.77, "unit": "GB (decimal, bytes/1e9)"}) == pytest.approx(19.77e9)
    assert gm.published_bytes({"value": 60.0, "unit": "GiB (bytes/1024**3)"}) == 60 * 2**30
    assert gm.published_bytes({"value": 2506.73664, "unit": "MB (decimal)"}) == pytest.approx(2506.73664e6)


@pytest.mark.skipif(not DEV_SET.exists(), reason="the development set is not next to this checkout")
def test_published_fields_match_the_development_set() -> None:
    dev = yaml.safe_load(DEV_SET.read_text())
    for section in ("measurements", "oom_observations", "calibration_points"):
        source = {e["id"]: e for e in dev[section]}
        for entry in DATA[section]:
            for key, value in entry.items():
                if key != "memguard" and (section != "measurements" or key in PUBLISHED_FIELDS):
                    assert source[entry["id"]][key] == value, (entry["id"], key)


# ---------------------------------------------------------------------------------------------------------
# What the benchmark reproduces of the sources' code


def test_softmax_saving_its_input_has_the_same_gradient() -> None:
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, dtype=torch.float64)
    (torch.softmax(x, -1) * g).sum().backward()
    expected, x.grad = x.grad.clone(), None
    with gm._softmax_before_1_11():
        (torch.nn.functional.softmax(x, dim=-1) * g).sum().backward()
    torch.testing.assert_close(x.grad, expected)


def test_old_foreach_adam_updates_like_torch_adam() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = gm.ForeachAdamBefore104780(a, lr=0.1), torch.optim.Adam(b, lr=0.1, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)


def test_shared_dropout_applies_one_mask_per_input() -> None:
    drop = gm.SharedDropout(0.5).train()
    x = torch.ones(64)
    first = drop(x)
    assert drop(x) is first
    assert drop(torch.ones(64)) is not first


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("chunk_head", [True, False])
def test_litgpt_loss_is_the_shifted_cross_entropy(chunk_head: bool) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 40))
    loss = gm.LitGPTLoss(chunk_head=chunk_head, chunk=16)(model, {"input_ids": ids, "labels": ids})
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)


# ---------------------------------------------------------------------------------------------------------
# The pipeline on cheap points


def _recorded() -> dict[str, dict]:
    if not RESULTS_JSON.exists():
        return {}
    return {p["id"]: p for p in json.loads(RESULTS_JSON.read_text())["points"]}


@pytest.mark.parametrize("pid", ["optbench_gpt2_rocm", "rasbt_vitl_05"])
def test_cheap_points_are_predicted_within_the_bound(pid: str) -> None:
    result = gm.predict(MEASUREMENTS[pid], DATA)
    assert result.status == "compared", result.reason
    assert abs(result.error) <= gm.BOUND, result.error
    recorded = _recorded().get(pid)
    if recorded is not None:  # the committed table was made by this code
        assert result.predicted_bytes == pytest.approx(recorded["predicted_bytes"], rel=0.005)


def test_an_oom_observation_is_predicted_above_capacity() -> None:
    check = gm.check_oom(OOMS["peft_oom_full_bloomz7b1"])
    assert check["status"] == "PASS", check
    assert check["predicted_device_bytes"] > check["usable_bytes"]


def test_skipped_points_say_why() -> None:
    result = gm.predict(MEASUREMENTS["tt3b_05"], DATA)
    assert result.status == "skipped" and "compile" in result.reason
