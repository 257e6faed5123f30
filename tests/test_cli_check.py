"""``memguard check``: exit codes 0/1/2/3, the JSON contract, golden terminal reports, plots, the installed
console script, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import memguard.act.check
from memguard.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
GPT2 = "examples/gpt2-small.yaml"
SMALL = ["--set", "data.batch_size=2", "--set", "data.seq_len=64"]
"""Most tests shrink the bundled example: the verdict logic does not need a big batch."""
FP32_ON_A10G = ["--gpu", "A10G", "--set", "trainer.precision=32-true", "--set", "data.batch_size=23",
                "--allow", "precision"]
"""GPT-2 at 23 x 512 in fp32 needs about 23.5 GiB, more than an A10G's 22 GiB; bf16 mixed precision needs about
21.4 GiB: a configuration that fits only by switching to bf16."""


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the report prints the config path as given; keep it relative and stable


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------
# Exit codes


def test_fits_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT2, "--gpu", "H100-80GB", *SMALL)
    assert code == 0, err
    assert "FITS on H100-80GB" in out and out.rstrip().endswith("Exit code 0: fits as configured.")
    assert "Traceback" not in err


def test_nothing_fits_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "llama.yaml"
    config.write_text("model: {preset: llama-2-7b}\ndata: {batch_size: 1, seq_len: 256}\n"
                      "optimizer: adamw\ntrainer: {precision: 32-true}\n")
    code, out, err = run(capsys, str(config), "--gpu", "T4", "--no-fallback")
    assert code == 1, err
    assert re.search(r"DOES NOT FIT on T4 as configured: needs \d+\.\d\d GiB .* of 14\.75 GiB; [\d.]+ GiB short\.", out)
    assert "Plan" not in out  # --no-fallback: nothing searched


def test_fits_only_with_bf16_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT2, *FP32_ON_A10G)
    assert code == 3, err
    assert "The plan below fits" in out
    assert re.search(r"precision\s+32-true\s+bf16-mixed\s+Trainer\(precision='bf16-mixed'\)\s+1", out)


def test_replicated_multi_gpu_run_is_sharded_when_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-2 medium in fp32 under DDP on 4 x T4 misses by about 1 GiB per GPU; ZeRO-2 over the same GPUs fits."""
    argv = [GPT2, "--set", "model.preset=gpt2-medium", "--set", "trainer.devices=4", "--set", "trainer.strategy=ddp",
            "--set", "trainer.precision=32-true", "--set", "data.batch_size=4", "--gpu", "T4", "--allow", "sharding"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 3, err
    document = json.loads(out)
    validate(document)
    assert [c["how"] for c in document["plan"]["changes"]] == ["Trainer(strategy='deepspeed_stage_2')"]
    assert document["plan"]["device_bytes"] < document["as_configured"]["device_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["examples/nope.yaml"], r"examples/nope.yaml: no such file"),
    ([GPT2, "--gpu", "Z100"], r"command line: --gpu: unknown GPU 'Z100'"),
    ([GPT2, "--set", "trainer.precision=bf17"], r"trainer.precision: Lightning's Trainer does not accept precision 'bf17'. Did you mean"),
    ([GPT2, "--margin", "-1"], r"--margin: must be >= 0"),
    ([GPT2, "--plot", "out.svg"], r"--plot out.svg: the file must end in .png, .html or .htm"),
    ([GPT2, "--gpu"], r"argument --gpu: expected one argument"),
])
def test_invalid_input_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_no_traceback_without_debug(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(memguard.act.check, "run_check", broken)
    code, out, err = run(capsys, GPT2, *SMALL)
    assert code == 2 and out == ""
    assert err == "memguard: error: RuntimeError: something inside broke (run with --debug for the traceback)\n"
    assert main(["--debug", "check", GPT2, *SMALL]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_several_gpus_compare_and_the_worst_decides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT2, *FP32_ON_A10G, "--gpu", "H100-80GB", "--gpu", "T4", "--no-fallback")
    assert code == 1, err  # T4 fits nothing when no fallback may be searched
    table = out[out.index("gpu "):].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["A10G", "H100-80GB", "T4"]
    assert "fits " in table[3] and "does not fit" in table[2] and "does not fit" in table[4]
    assert out.count("Margin policy") == 1
    assert "T4 has no native bfloat16" not in out  # 32-true as configured


# ---------------------------------------------------------------------------------------------------------
# JSON


def _schema() -> dict[str, Any]:
    integer, number, boolean, string = {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "string"}
    nullable_string = {"type": ["string", "null"]}
    breakdown = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                 "required": ["parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs",
                              "workspace", "other", "allocator", "context"]}
    memory = {"peak_bytes": integer, "reserved_bytes": integer, "device_bytes": integer, "required_bytes": integer,
              "headroom_bytes": integer, "breakdown": breakdown, "peak_phase": string, "precision": string,
              "optimizer": string, "approximate": boolean,
              "timeline": {"type": "array", "items": {
                  "type": "object", "required": ["index", "phase", "allocated_bytes"],
                  "properties": {"index": integer, "phase": string, "allocated_bytes": integer}}}}
    group = {"type": "object", "required": ["name", "bytes", "count", "category", "parts"],
             "properties": {"name": string, "bytes": integer, "count": integer, "category": nullable_string,
                            "parts": {"type": "array", "items": {"type": "object", "required": ["name", "bytes"],
                                                                 "properties": {"name": string, "bytes": integer}}}}}
    holder = {"type": "object", "required": ["module", "kind", "category", "bytes", "count"],
              "properties": {"module": string, "kind": string, "category": string, "bytes": integer, "count": integer}}
    memory["holders"] = {"type": "object", "required": ["by_module", "by_kind", "all"],
                         "properties": {"by_module": {"type": "array", "items": group},
                                        "by_kind": {"type": "array", "items": group},
                                        "all": {"type": "array", "items": holder}}}
    estimate = {"type": "object", "required": list(memory), "properties": memory}
    change = {"type": "object", "required": ["knob", "before", "after", "how", "cost", "why"],
              "properties": {"knob": {"enum": ["precision", "optimizer", "micro_batch", "checkpointing",
                                               "sharding", "offload"]},
                             "before": string, "after": string, "how": string, "cost": number, "why": string}}
    plan = {"type": ["object", "null"], "required": ["fits", "changes", "cost", "tried", *memory],
            "properties": {"fits": boolean, "changes": {"type": "array", "items": change}, "cost": number,
                           "tried": integer, **memory}}
    gpu = {"type": "object", "required": ["name", "source", "catalog", "index", "bf16", "capacity_bytes"],
           "properties": {"name": string, "source": string, "catalog": nullable_string,
                          "index": {"type": ["integer", "null"]}, "bf16": boolean, "capacity_bytes": integer}}
    target = {"type": "object", "required": ["gpu", "capacity_bytes", "fits", "exit_code", "as_configured", "plan",
                                             "notes"],
              "properties": {"gpu": gpu, "capacity_bytes": integer, "fits": boolean,
                             "exit_code": {"enum": [0, 1, 3]}, "as_configured": estimate, "plan": plan,
                             "notes": {"type": "array", "items": string}}}
    config = {"type": "object", "required": ["path", "kind", "model", "parameters", "trainable_parameters", "batch",
                                             "training", "devices", "num_nodes", "world_size", "strategy"],
              "properties": {"path": string, "kind": {"enum": ["native", "lightningcli", "hf-config"]},
                             "model": string, "parameters": integer, "trainable_parameters": integer,
                             "strategy": string}}
    return {"type": "object",
            "required": ["fits", "exit_code", "margin", "capacity_bytes", "gpu", "as_configured", "plan", "notes",
                         "config", "targets"],
            "properties": {"fits": boolean, "exit_code": {"enum": [0, 1, 3]}, "margin": number,
                           "capacity_bytes": integer, "gpu": gpu, "as_configured": estimate, "plan": plan,
                           "notes": {"type": "array", "items": string}, "config": config,
                           "targets": {"type": "array", "items": target}}}


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """The subset of JSON Schema used above (type, enum, required, properties, items, additionalProperties,
    minimum), for environments without the jsonschema package."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any((isinstance(value, int) and not isinstance(value, bool)) if t == "integer"
                 else (isinstance(value, (int, float)) and not isinstance(value, bool)) if t == "number"
                 else isinstance(value, _TYPES[t]) for t in types)
        assert ok, f"{where}: {value!r} is not {types}"
    if value is None:
        return
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                _check(item, extra, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]")


def validate(document: Any) -> None:
    try:
        import jsonschema
    except ImportError:
        _check(document, _schema())
    else:
        jsonschema.validate(document, _schema())


def test_json_without_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT2, "--gpu", "H100", *SMALL, "--json")
    assert code == 0, err
    doc = json.loads(out)
    validate(doc)
    assert doc["fits"] is True and doc["exit_code"] == 0 and doc["plan"] is None and doc["margin"] == 0.05
    assert doc["gpu"]["name"] == "H100-80GB" and doc["capacity_bytes"] == 81089 * 2**20
    mem = doc["as_configured"]
    assert sum(mem["breakdown"][k] for k in ("allocator", "context")) == mem["device_bytes"] - mem["peak_bytes"]
    assert mem["required_bytes"] == int(mem["device_bytes"] * 1.05)
    assert doc["config"]["batch"] == {"input_ids": {"shape": [2, 64], "dtype": "int64"},
                                      "labels": {"shape": [2, 64], "dtype": "int64"}}


def test_json_with_plan_and_several_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, GPT2, *FP32_ON_A10G, "--gpu", "H100-80GB", "--json")
    assert code == 3, err
    doc = json.loads(out)
    validate(doc)
    assert [t["gpu"]["name"] for t in doc["targets"]] == ["A10G", "H100-80GB"]
    assert [t["exit_code"] for t in doc["targets"]] == [3, 0]
    assert doc["gpu"]["name"] == "A10G"  # the top level is the GPU that decides the exit code
    assert doc["fits"] is False and doc["plan"]["fits"] is True
    assert [c["after"] for c in doc["plan"]["changes"]] == ["bf16-mixed"]
    assert doc["plan"]["required_bytes"] <= doc["capacity_bytes"] < doc["as_configured"]["required_bytes"]


# ---------------------------------------------------------------------------------------------------------
# Golden reports (regenerate with MEMGUARD_UPDATE_GOLDEN=1 after an intended change to the estimates)


@pytest.mark.parametrize("name, argv", [
    ("check_gpt2_small_h100.txt", [GPT2, "--gpu", "H100-80GB"]),
    ("check_gpt2_fp32_a10g_plan.txt", [GPT2, *FP32_ON_A10G]),
])
def test_golden_report(capsys: pytest.CaptureFixture[str], name: str, argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code in (0, 3), err
    golden = GOLDEN / name
    if os.environ.get("MEMGUARD_UPDATE_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text()


# ---------------------------------------------------------------------------------------------------------
# Plots and the installed console script


def test_plot_png_and_html(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png, page = tmp_path / "check.png", tmp_path / "check.html"
    assert run(capsys, GPT2, *FP32_ON_A10G, *SMALL, "--set", "data.batch_size=24", "--plot", str(png))[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run(capsys, GPT2, *FP32_ON_A10G, "--plot", str(page), "--json")
    assert code == 3 and f"memguard: wrote {page}" in err
    json.loads(out)  # the notice went to stderr, stdout stays JSON
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 2
    assert "allocated, with plan" in text and "A10G capacity" in text
    assert not re.search(r"(src|href)=|https?://(?!www\.w3\.org/2000/svg)", text)  # self-contained


def test_installed_console_script() -> None:
    script = Path(sys.executable).with_name("memguard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "memguard"]
    done = subprocess.run([*command, "check", GPT2, "--gpu", "RTX-4090", *SMALL, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpu"]["name"] == "RTX-4090"
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
