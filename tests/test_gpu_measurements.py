"""The published GPU measurements (benchmarks/data/gpu_measurements.yaml) and the benchmark that predicts them.

Fast checks only: the data file, its published numbers, the helpers that reproduce the sources' training
code, and a few cheap points run through the whole prediction pipeline. The full comparison is
``python benchmarks/gpu_measurements.py``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
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
    from memguard import presets
    from memguard.device import catalog as gpu_catalog

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


# ---------------------------------------------------------------------------------------------------------
# The peers beside memguard (benchmarks/peers.py)

GPT2_PARAMS = 124_439_808
"""openai-community/gpt2: 124.44 M parameters, the output head tied to the token embedding."""


@pytest.fixture(scope="module")
def bench_peers():
    import peers

    peers._DEEPSPEED.update(loaded=True)  # the copied formulas; checked against DeepSpeed's in a subprocess below
    return peers


def test_peers_on_gpt2_give_the_documented_bytes(bench_peers) -> None:
    pytest.importorskip("torchinfo")
    got = gm.peer_predictions(MEASUREMENTS["optbench_gpt2_rocm"])  # full fine-tuning, fp32, AdamW, 1 GPU
    assert all(p["bytes"] is not None for p in got.values()), got
    assert got["24 B/param"]["bytes"] == 24 * GPT2_PARAMS  # the tied head counted once
    assert got["deepspeed-zero2"]["bytes"] == 20 * GPT2_PARAMS  # 2 P + 18 P / 1 GPU
    model = gm.build_model(MEASUREMENTS["optbench_gpt2_rocm"]["memguard"]["model"])
    fp32_bytes = sum(t.numel() * 4 for t in list(model.parameters()) + list(model.buffers()))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert largest == 50257 * 768  # the token embedding
    assert got["deepspeed-zero3"]["bytes"] == 18 * GPT2_PARAMS + 4 * largest
    assert got["accelerate"]["bytes"] == 4 * fp32_bytes  # "Training using Adam", float32
    # torchinfo: inputs + 2 x leaf outputs + parameters, from shapes on the meta device; more than the weights
    assert got["torchinfo"]["bytes"] > 4 * GPT2_PARAMS


def test_torchinfo_on_the_meta_model_equals_the_real_one(bench_peers) -> None:
    pytest.importorskip("torchinfo")
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 16))
    real = bench_peers.torchinfo_total(model, {"input_ids": ids, "labels": ids}, "adamw", "bf16-true")
    meta_ids = ids.to("meta")
    meta = bench_peers.torchinfo_total(model.to("meta"), {"input_ids": meta_ids, "labels": meta_ids}, "adamw",
                                       "bf16-true", meta_ok=True)
    assert meta == real
    result = bench_peers.call(bench_peers.torchinfo_total, model, {"input_ids": meta_ids}, "adamw", "32-true")
    assert result.bytes is None and "real model" in result.reason  # without meta_ok, as accuracy_cpu.py calls it


def test_peers_apply_only_where_their_rule_does() -> None:
    def scope(pid: str) -> dict[str, str]:
        return {tool: why for tool, (why, _options) in gm.peer_scope(MEASUREMENTS[pid]["memguard"]).items()}

    lora = scope("litgpt_hub_llama-2-7b_lora")
    assert "LoRA" in lora["24 B/param"] and "full fine-tuning" in lora["24 B/param"]
    assert lora["accelerate"] and lora["deepspeed-zero2"] and lora["deepspeed-zero3"]
    assert lora["torchinfo"] == ""  # it sizes the forward pass of whatever model it is given
    qlora = scope("litgpt_hub_llama-2-7b_qlora")
    assert all(qlora.values()) and "QLoRA" in qlora["24 B/param"]
    adafactor = scope("hf_bert_06")
    assert "adafactor" in adafactor["24 B/param"] and "adafactor" in adafactor["accelerate"]
    assert adafactor["torchinfo"] == ""
    assert not any(scope("hf_bert_08").values())  # bitsandbytes 8-bit Adam is of the Adam family
    assert not any(scope("tt3b_02").values())


def test_multi_gpu_points_get_deepspeeds_per_gpu_figure(bench_peers) -> None:
    zero2 = gm.peer_predictions(MEASUREMENTS["rasbt_distilbert_01"])  # DeepSpeed ZeRO-2 on 4 GPUs
    model = gm.build_model(MEASUREMENTS["rasbt_distilbert_01"]["memguard"]["distributed"]["spec"]["model"])
    params = sum(p.numel() for p in model.parameters())
    assert zero2["deepspeed-zero2"]["bytes"] == 2 * params + int(18 * params / 4)
    assert "ZeRO-2" in zero2["deepspeed-zero3"]["reason"]
    for tool in ("accelerate", "torchinfo", "24 B/param"):
        assert zero2[tool]["bytes"] is None and "4-GPU" in zero2[tool]["reason"], tool
    offload = gm.peer_predictions(MEASUREMENTS["rasbt_vitl_09"])  # FSDP FULL_SHARD with CPUOffload on 4 GPUs
    model = gm.build_model(MEASUREMENTS["rasbt_vitl_09"]["memguard"]["distributed"]["spec"]["model"])
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert offload["deepspeed-zero3"]["bytes"] == 4 * largest  # parameters and optimizer offloaded
    assert "ZeRO-3" in offload["deepspeed-zero2"]["reason"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_copied_deepspeed_formulas_match_deepspeed_per_gpu_and_offloaded() -> None:
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2\n"
        "from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3\n"
        "import peers\n"
        "for p, big in [(66_955_010, 23_440_896), (304_336_394, 4_198_400), (123, 7)]:\n"
        "    for gpus in (1, 3, 4):\n"
        "        for off in (False, True):\n"
        "            ours = peers._zero2_gpu_bytes(p, gpus, 1, off)\n"
        "            assert z2(p, num_gpus_per_node=gpus, cpu_offload=off)[1] == ours\n"
        "            for off_params in (False, True):\n"
        "                ds = z3(p, big, num_gpus_per_node=gpus, cpu_offload=off, cpu_offload_params=off_params)[1]\n"
        "                assert ds == peers._zero3_gpu_bytes(p, big, gpus, 1, off, off_params)\n"
        "print('same')\n" % str(ROOT / "benchmarks")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


def _fake(pid: str, method: str, error: float, peers: dict[str, float | None], status: str = "compared") -> gm.Result:
    measured = 10 * 2**30
    return gm.Result(pid, status, method=method, measured_bytes=measured, predicted_bytes=measured * (1 + error),
                     error=error, peers={t: {"bytes": None if e is None else int(measured * (1 + e)),
                                             "reason": "" if e is not None else f"no rule for {pid}", "seconds": 0.0}
                                         for t, e in peers.items()})


def test_peer_statistics_compare_on_the_same_points() -> None:
    results = [
        _fake("a", "allocated", -0.02, {"24 B/param": 0.30, "torchinfo": -0.50}),
        _fake("b", "reserved", 0.01, {"24 B/param": -0.10, "torchinfo": None}),
        _fake("c", "nvml", -0.40, {"24 B/param": None, "torchinfo": None}),
        _fake("d", "allocated", 0.90, {"24 B/param": -0.90, "torchinfo": 0.0}, status="inconsistent"),
    ]
    st = gm.peer_stats(results)
    rule = st["24 B/param"]["all"]
    assert rule["points"] == ["a", "b"] and rule["count"] == 2
    assert rule["median_abs_error"] == pytest.approx(0.20) and rule["max_abs_error"] == pytest.approx(0.30)
    assert rule["under"] == 1 and rule["under_share"] == pytest.approx(0.5)
    assert rule["memguard"]["max_abs_error"] == pytest.approx(0.02)  # memguard on a and b only, not c
    assert st["24 B/param"]["allocated_type"]["points"] == ["a"]
    assert st["torchinfo"]["all"]["points"] == ["a"] and st["torchinfo"]["all"]["under"] == 1
    assert st["memguard"]["all"]["count"] == 3 and st["memguard"]["all"]["under"] == 2
    assert st["accelerate"]["all"]["count"] == 0

    lines = gm.render_peers(results, st)
    table = [line for line in lines if line.startswith("| a |")]
    assert table and "13.00 (+30.0%)" in table[0] and "5.00 (-50.0%)" in table[0]
    b_cells = next(line for line in lines if line.startswith("| b |")).strip("| ").split(" | ")
    torchinfo_cell = b_cells[4 + gm.PEER_TOOLS.index("torchinfo")]
    assert torchinfo_cell.startswith("n/a [")
    assert f"- {torchinfo_cell.removeprefix('n/a ')} no rule for b" in lines  # the reason, under its number
    assert any(line.startswith("| d (not counted) |") for line in lines)
    summary = next(line for line in lines if line.startswith("| 24 B/param | every compared point"))
    assert "| 2 | 20.0% | 30.0% | 1/2 (50%) | 1.5% | 2.0% | 1/2 (50%) |" in summary
    assert gm.render_peers([_fake("e", "allocated", 0.0, {})], st) == []  # no peers computed: no section
