"""``memguard gpus``: output, JSON, exit codes, and the report helpers it prints with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpus import MIG_2G, NVMLError_LibraryNotFound, install, machine

import memguard.device.gpus
from memguard.cli import _HANDLERS, _build_parser, main
from memguard.errors import InvalidArgumentError
from memguard.device.catalog import CATALOG
from memguard.report import format_bytes, render_table

MiB = 2**20
GiB = 2**30


@pytest.fixture
def four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    install(monkeypatch, machine())


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    install(monkeypatch, [], init_error=NVMLError_LibraryNotFound)


def test_gpus_table(four: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["index", "name", "total", "free", "used", "other", "processes", "compute", "bf16",
                                "MIG"]
    idle, busy, mig, lost = lines[2:]
    assert idle.split() == ["0", "NVIDIA", "A100-SXM4-80GB", "80.00", "GiB", "79.35", "GiB", "669.00", "MiB",
                            "0", "B", "8.0", "yes", "off"]
    assert "31.00 GiB" in busy
    assert mig.endswith("on (2 instances)")
    assert "error: NVML query failed: GPU is lost" in lost
    assert err == "GPU 3 (NVIDIA H100 80GB HBM3): NVML query failed: GPU is lost\n"


def test_gpus_table_shows_the_selected_mig_device(four: None, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG_2G.uuid)
    assert main(["gpus"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert "9.50 GiB" in row and row.endswith("NVIDIA A100-SXM4-40GB MIG 2g.10gb")


def test_gpus_json(four: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--json"]) == 0
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert data["error"] is None and len(data["gpus"]) == 4
    first = data["gpus"][0]
    assert first == {
        "index": 0, "nvml_index": 0, "name": "NVIDIA A100-SXM4-80GB",
        "uuid": "GPU-aaaa1111-2222-3333-4444-555555555555",
        "total_bytes": 81920 * MiB, "free_bytes": 81251 * MiB, "used_bytes": 669 * MiB, "other_process_bytes": 0,
        "compute_capability": [8, 0], "bf16": True, "mig_mode": False, "mig": [], "selected_mig": None, "error": None,
    }
    assert [m["uuid"] for m in data["gpus"][2]["mig"]] == ["MIG-1111aaaa-0000-5000-8000-000000000001", MIG_2G.uuid]
    assert data["gpus"][3]["error"] == "NVML query failed: GPU is lost"


def test_no_gpu_is_a_message_not_an_error(no_gpu: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", "no NVIDIA GPU visible: NVML library not found\n")


def test_no_gpu_json(no_gpu: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"gpus": [], "error": "no NVIDIA GPU visible: NVML library not found"}
    assert err == "no NVIDIA GPU visible: NVML library not found\n"


def test_empty_cuda_visible_devices(four: None, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["gpus"]) == 0
    assert capsys.readouterr().err == "no NVIDIA GPU visible: CUDA_VISIBLE_DEVICES is empty\n"


def test_catalog_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--catalog"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["name", "arch", "compute", "total", "usable", "context", "bf16", "attention", "NVML"]
    assert [line.split()[0] for line in lines[2:]] == [g.name for g in CATALOG]
    a100 = next(line for line in lines if line.startswith("A100-80GB"))
    assert a100.split() == ["A100-80GB", "ampere", "8.0", "80.00", "GiB", "79.25", "GiB", "400.00", "MiB", "yes",
                            "flash,mem_efficient,math", "yes"]
    assert err == ""


def test_catalog_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--catalog", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["catalog"]
    assert [d["name"] for d in data] == [g.name for g in CATALOG]
    h200 = next(d for d in data if d["name"] == "H200")
    assert h200["total_bytes"] == 143771 * MiB and h200["compute_capability"] == [9, 0]
    assert next(d for d in data if d["name"] == "MI300X")["nvml"] is False


@pytest.mark.parametrize("argv", [["gpus", "--bogus"], ["nope"], []])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: memguard" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "gpus" in capsys.readouterr().out


def _raise_invalid(*args: object, **kwargs: object) -> None:
    raise InvalidArgumentError("devices=[7] asks for GPU 7 but only 1 is visible")


def test_invalid_argument_exits_2_without_traceback(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(memguard.device.gpus, "discover", _raise_invalid)
    assert main(["gpus"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "memguard: error: devices=[7] asks for GPU 7 but only 1 is visible\n"


@pytest.mark.parametrize("argv", [["--debug", "gpus"], ["gpus", "--debug"]])
def test_debug_shows_the_traceback(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(memguard.device.gpus, "discover", _raise_invalid)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InvalidArgumentError" in err


def test_every_subcommand_has_a_handler() -> None:
    subparsers = next(a for a in _build_parser()._actions if a.dest == "command")
    assert set(subparsers.choices) == set(_HANDLERS)  # type: ignore[attr-defined]


def test_console_script_on_this_machine() -> None:
    script = shutil.which("memguard", path=str(Path(sys.executable).parent))
    assert script is not None, "pip install -e . installs the memguard command"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run([script, "gpus"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # Without a GPU (as on CPU-only machines) the command says why; with one it prints the table.
    assert "no NVIDIA GPU visible: " in done.stderr or done.stdout.startswith("index")


# ---------------------------------------------------------------------------------------------------------
# report helpers


@pytest.mark.parametrize(
    ("n", "unit", "text"),
    [(0, "auto", "0 B"), (512, "auto", "512 B"), (1536, "auto", "1.50 KiB"), (669 * MiB, "auto", "669.00 MiB"),
     (81920 * MiB, "auto", "80.00 GiB"), (3 * 2**40, "auto", "3.00 TiB"), (-2 * GiB, "auto", "-2.00 GiB"),
     (81920 * MiB, "MiB", "81920.00 MiB"), (GiB, "B", "1073741824 B"), (MiB, "GiB", "0.00 GiB")],
)
def test_format_bytes(n: int, unit: str, text: str) -> None:
    assert format_bytes(n, unit) == text


def test_format_bytes_rejects_decimal_units() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown unit 'GB'\. Did you mean .*'GiB'"):
        format_bytes(1, "GB")


def test_render_table_aligns_columns() -> None:
    table = render_table(["name", "bytes"], [["a", 5], ["long name", 12345]])
    assert table.splitlines() == [
        "name       bytes",
        "---------  -----",
        "a              5",
        "long name  12345",
    ]
    assert render_table(["x", "y"], [["1", "2"]], align="><").splitlines()[2] == "1  2"
    assert render_table(["only"], []) == "only\n----"


def test_render_table_checks_its_input() -> None:
    with pytest.raises(ValueError, match="has 1 cells; the table has 2 columns"):
        render_table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="align must be 2 characters"):
        render_table(["a", "b"], [["x", "y"]], align="<")
