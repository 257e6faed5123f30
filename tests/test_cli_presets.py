"""``memguard presets`` and ``memguard --version``."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import memguard
from memguard import cli, presets
from memguard.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_presets_json_lists_every_preset_with_its_count_and_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["presets"]
    assert [r["name"] for r in rows] == presets.names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["llama-2-7b"] == {
        "name": "llama-2-7b", "parameters": 6_738_415_616, "kind": "causal-lm", "input": "tokens", "seq_len": 4096,
        "image_size": None, "hub_id": "meta-llama/Llama-2-7b-hf", "aliases": []}
    assert by_name["vit-b-16"]["kind"] == "image-classification" and by_name["vit-b-16"]["image_size"] == 224
    assert all(r["parameters"] == presets.PRESETS[r["name"]].params for r in rows)
    assert err == ""


def test_presets_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "parameters", "kind", "input", "hub", "id", "aliases"]
    assert len(lines) == 2 + len(presets.PRESETS)
    row = next(line for line in lines if line.startswith("gpt2 "))
    assert row.split()[:6] == ["gpt2", "124,439,808", "causal-lm", "1024", "tokens", "openai-community/gpt2"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"memguard {metadata.version('memguard')}\n"


def test_version_without_package_metadata_falls_back_to_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == memguard.__version__


def test_version_from_the_installed_command() -> None:
    done = subprocess.run([sys.executable, "-m", "memguard", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("memguard ") and done.stderr == ""
