"""Presets: each builds on the meta device, offline, with exactly the parameter count of the real model."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: any hub access would fail loudly

import pytest
import torch

from memguard import checkpointing, presets
from memguard.cli import main
from memguard.spec.config import load_config
from memguard.errors import InvalidArgumentError

# Parameter counts published for these models, written out independently of memguard/presets.py so that a
# wrong hyperparameter there cannot pass by changing ``params`` along with it. Tied weights count once.
PUBLISHED: dict[str, int] = {
    # GPT2LMHeadModel, lm_head tied to wte
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    # The hub's bert-base-uncased checkpoint (BertForPreTraining) has 110,106,428 parameters, including the
    # pooler (768*768 + 768) and the next-sentence head (768*2 + 2) that BertForMaskedLM does not have.
    "bert-base-uncased": 110_106_428 - (768 * 768 + 768) - (768 * 2 + 2),
    "bert-large-uncased": 335_174_458,  # BertForMaskedLM
    # DistilBertModel 66,362,880 + pre_classifier (768*768 + 768) + 2-label classifier (768*2 + 2)
    "distilbert-base-uncased": 66_362_880 + (768 * 768 + 768) + (768 * 2 + 2),
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "tinyllama-1.1b": 1_100_048_384,
    "mistral-7b": 7_241_732_096,
    "mistral-7b-v0.2": 7_241_732_096,
    "phi-2": 2_779_683_840,
    "phi-3-mini-4k": 3_821_079_552,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "falcon-7b": 6_921_720_704,
    "bloomz-7b1": 7_069_016_064,
    "t0-3b": 2_849_757_184,  # T5 v1.1 XL, lm_head not tied to the embeddings
    "mt0-xxl": 12_921_057_280,  # mT5-XXL, lm_head not tied
    # torchvision's published counts (1000 classes; vit_h_14 at 224 px, IMAGENET1K_SWAG_LINEAR_V1)
    "vit-b-16": 86_567_656,
    "vit-l-16": 304_326_632,
    "vit-h-14": 632_045_800,
    "resnet50": 25_557_032,
}

REQUIRED = [
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base-uncased", "bert-large-uncased", "llama-2-7b",
    "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b",
    "phi-2", "vit-b-16", "vit-l-16", "vit-h-14", "resnet50",
    # the accuracy benchmark's models
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b-v0.2", "gemma-2b", "gemma-7b", "gemma-2-2b",
    "gemma-2-9b", "phi-3-mini-4k", "tinyllama-1.1b", "falcon-7b", "stablelm-base-alpha-3b",
    "distilbert-base-uncased", "t0-3b", "mt0-xxl", "bloomz-7b1",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: presets must never reach a model hub."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_builds_on_meta_with_its_parameter_count(name: str) -> None:
    preset = presets.get(name)
    model = presets.build(preset)
    assert _count(model) == preset.params
    assert type(model).__name__ == preset.model_class
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_required_presets_exist() -> None:
    assert [n for n in REQUIRED if n not in presets.PRESETS] == []


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name: str) -> None:
    assert presets.PRESETS[name].params == PUBLISHED[name]


def test_tied_embeddings_count_once_and_t5_v1_1_heads_stay_untied() -> None:
    gpt2 = presets.build("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    t0 = presets.build("t0-3b")
    assert t0.lm_head.weight is not t0.shared.weight
    t0.tie_weights()  # what a later caller (PEFT, a trainer) may do: the published untied head survives
    assert _count(t0) == PUBLISHED["t0-3b"]


def test_every_preset_names_its_source_and_input() -> None:
    for preset in presets.PRESETS.values():
        assert "/" in preset.source, preset.name
        assert preset.input in ("tokens", "image")
        assert (preset.seq_len is not None) == (preset.input == "tokens"), preset.name
        assert (preset.image_size is not None) == (preset.input == "image"), preset.name


@pytest.mark.parametrize("spelling, name", [
    ("llama-2-7b", "llama-2-7b"),
    ("Llama-2-7B", "llama-2-7b"),
    ("llama2-7b", "llama-2-7b"),
    ("LLAMA_2_7B", "llama-2-7b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("Llama-3.2-1B", "llama-3.2-1b"),
    ("llama-3_1-405b", "llama-3.1-405b"),
    ("bigscience/T0_3B", "t0-3b"),
    ("vit_l_16", "vit-l-16"),
    ("microsoft/resnet-50", "resnet50"),
    ("GPT2-XL", "gpt2-xl"),
    ("google/gemma-2-9b-it", "gemma-2-9b"),
    (" phi-2 ", "phi-2"),
])
def test_get_forgives_spelling(spelling: str, name: str) -> None:
    assert presets.get(spelling).name == name


def test_get_passes_a_preset_through() -> None:
    preset = presets.get("gpt2")
    assert presets.get(preset) is preset


def test_unknown_preset_lists_the_closest() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown preset 'llama-2-8b'\. Did you mean .*'llama-2-7b'"):
        presets.get("llama-2-8b")
    with pytest.raises(InvalidArgumentError, match=r"Valid: .*resnet50"):
        presets.get("no-such-model")


def test_every_listed_preset_loads_from_a_config_by_its_hub_id(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The rows of ``memguard presets --json`` are what a user picks from, and each names a preset of the
    table once. A row's Hub id, written as a config's ``model.preset``, loads the preset of that row, with
    the parameter count the row prints and the preset's default input; its name and aliases find the same."""
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["presets"]
    listed = [row["name"] for row in rows]
    assert listed == sorted(set(listed)) == presets.names()
    assert set(listed) == {p.name for p in presets.PRESETS.values()}
    config = tmp_path / "config.yaml"
    for row in rows:
        config.write_text(f"model: {{preset: {json.dumps(row['hub_id'])}}}\n")
        spec = load_config(config)
        assert spec.model_label == row["name"], row["hub_id"]
        assert _count(spec.model_factory()) == row["parameters"], row["hub_id"]
        default = presets.example_batch(row["name"], 1)
        assert {k: v.shape for k, v in spec.batch.items()} == {k: v.shape for k, v in default.items()}, row["name"]
        assert [presets.get(s).name for s in (row["name"], *row["aliases"])] == [row["name"]] * (
            1 + len(row["aliases"]))


def test_presets_are_read_only() -> None:
    preset = presets.get("gpt2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.params = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        preset.hyperparameters["n_layer"] = 1  # type: ignore[index]
    kwargs = preset.config_kwargs()
    kwargs["n_layer"] = 1
    assert preset.hyperparameters["n_layer"] == 12


def test_num_labels_resizes_classification_heads() -> None:
    distilbert = presets.build("distilbert-base-uncased", num_labels=5)
    assert distilbert.classifier.out_features == 5
    assert _count(distilbert) == PUBLISHED["distilbert-base-uncased"] + 3 * (768 + 1)
    resnet = presets.build("resnet50", num_labels=10)
    assert _count(resnet) == PUBLISHED["resnet50"] - 990 * (2048 + 1)


def test_num_labels_is_refused_where_there_is_no_classifier() -> None:
    with pytest.raises(InvalidArgumentError, match="classification presets only"):
        presets.build("gpt2", num_labels=3)
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        presets.build("vit-b-16", num_labels=0)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "t0-3b", "resnet50"])
def test_gradient_checkpointing(name: str) -> None:
    assert checkpointing.is_enabled(presets.build(name, gradient_checkpointing=True))
    assert not checkpointing.is_enabled(presets.build(name))


@pytest.mark.parametrize("name, shapes", [
    ("llama-2-7b", {"input_ids": (2, 4096), "labels": (2, 4096)}),
    ("gpt2", {"input_ids": (2, 1024), "labels": (2, 1024)}),
    ("bert-base-uncased", {"input_ids": (2, 512), "labels": (2, 512)}),
    ("distilbert-base-uncased", {"input_ids": (2, 512), "labels": (2,)}),
    ("t0-3b", {"input_ids": (2, 512), "labels": (2, 512)}),
    ("vit-h-14", {"pixel_values": (2, 3, 224, 224), "labels": (2,)}),
    ("resnet50", {"pixel_values": (2, 3, 224, 224), "labels": (2,)}),
])
def test_example_batch_default_shapes(name: str, shapes: dict[str, tuple[int, ...]]) -> None:
    batch = presets.example_batch(name, 2)
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert all(v.is_meta for v in batch.values())
    assert batch["labels"].dtype == torch.long


def test_example_batch_overrides_and_devices() -> None:
    batch = presets.example_batch("llama-3-8b", 3, seq_len=128, device="cpu")
    assert batch["input_ids"].shape == (3, 128) and batch["input_ids"].device.type == "cpu"
    assert presets.example_batch("resnet50", 4, image_size=160)["pixel_values"].shape == (4, 3, 160, 160)


def test_example_batch_rejects_what_the_model_cannot_take() -> None:
    with pytest.raises(InvalidArgumentError, match="built for 224x224 images"):
        presets.example_batch("vit-b-16", 1, image_size=384)
    with pytest.raises(InvalidArgumentError, match="give image_size, not seq_len"):
        presets.example_batch("resnet50", 1, seq_len=128)
    with pytest.raises(InvalidArgumentError, match="give seq_len, not image_size"):
        presets.example_batch("gpt2", 1, image_size=224)
    with pytest.raises(InvalidArgumentError, match="batch_size must be a positive integer"):
        presets.example_batch("gpt2", 0)


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased", "distilbert-base-uncased", "t0-3b", "vit-b-16",
                                  "resnet50"])
def test_the_example_batch_trains_the_model_on_meta(name: str) -> None:
    """One preset of each kind: the batch is what the model's forward takes, and it yields a loss."""
    model = presets.build(name)
    batch = presets.example_batch(name, 2, seq_len=32 if presets.get(name).input == "tokens" else None)
    loss = model(**batch).loss
    assert loss.shape == () and loss.is_meta
