"""``memguard check``'s other inputs: a Hugging Face Hub id (resolved from the local cache or a preset,
never downloaded), a DeepSpeed JSON config, and overrides that reach the values interpolated from them."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from memguard import hub
from memguard.cli import main
from memguard.act.check import run_check
from memguard.spec.check_spec import Options
from memguard.spec.config import load_config
from memguard.spec.problems import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 256}
TINY_LLAMA_PARAMS = 210_240
"""2 x 1000 x 64 embeddings and head + 2 layers x (4 x 64 x 64 attention + 3 x 64 x 128 MLP + 2 x 64 norms) + 64."""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Hub ids


def fake_cache(root: Path, repo_id: str, config: dict, revision: str = "0123abcd") -> Path:
    """A Hugging Face cache holding one repo's config.json, in huggingface_hub's standard layout."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot / "config.json"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache the environment points to (HF_HOME, as a user sets it), offline."""
    home = tmp_path / "hf-home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return home / "hub"


def test_a_cached_config_json_is_used(hf_cache: Path) -> None:
    fake_cache(hf_cache, "tiny-org/tiny-llama", TINY_LLAMA)
    spec = load_config("tiny-org/tiny-llama", options=Options(batch_size=2))
    assert spec.kind == "hf-config" and spec.model_label == "LlamaForCausalLM from tiny-org/tiny-llama"
    assert tuple(spec.batch["input_ids"].shape) == (2, 256)  # as for a config.json: the position table
    assert sum(p.numel() for p in spec.model_factory().parameters()) == TINY_LLAMA_PARAMS
    assert any("config.json from the Hugging Face cache" in n and str(hf_cache) in n for n in spec.notes)


def test_the_cache_wins_over_a_preset_and_hf_hub_cache_over_hf_home(hf_cache: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An id that is also a preset's is read from the cache when it is there: the user's own file."""
    other = tmp_path / "elsewhere"
    fake_cache(other, "openai-community/gpt2", TINY_LLAMA)
    assert load_config("openai-community/gpt2").model_label == "gpt2"  # HF_HOME's cache is empty: the preset
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    spec = load_config("openai-community/gpt2", options=Options(seq_len=16))
    assert spec.model_label == "LlamaForCausalLM from openai-community/gpt2"


def test_a_hub_id_without_a_cached_config_uses_the_matching_preset(hf_cache: Path) -> None:
    spec = load_config("openai-community/gpt2", ["trainer.precision=bf16-mixed"], Options(batch_size=2, seq_len=64))
    assert spec.kind == "native" and spec.model_label == "gpt2"
    assert tuple(spec.batch["input_ids"].shape) == (2, 64) and spec.training.precision == "bf16-mixed"
    assert any("not in the Hugging Face cache" in n and "'gpt2'" in n for n in spec.notes)
    assert load_config("meta-llama/Llama-2-7b-chat-hf").model_label == "llama-2-7b"  # chat release, base shape


def test_an_unknown_hub_id_exits_2_saying_where_memguard_looked(hf_cache: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "meta-llama/Llama-9-7b-hf", "--gpu", "A100-80GB"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("memguard: error: meta-llama/Llama-9-7b-hf: no such file, not in the Hugging Face cache")
    assert f"models--meta-llama--Llama-9-7b-hf/snapshots/*/config.json in {hf_cache}" in err
    assert "memguard never downloads" in err and "hf download meta-llama/Llama-9-7b-hf config.json" in err
    assert "Closest presets: llama-2-7b" in err
    assert "Traceback" not in err


def test_a_missing_yaml_file_is_still_a_missing_file(hf_cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"^configs/typo.yaml: no such file$"):
        load_config("configs/typo.yaml")


def test_the_cache_layout_is_read_without_huggingface_hub(tmp_path: Path) -> None:
    found = fake_cache(tmp_path, "org/name", TINY_LLAMA, revision="feed")
    assert hub._cached_config_by_hand("org/name", tmp_path) == found
    assert hub._cached_config_by_hand("org/other", tmp_path) is None
    assert hub.cached_config("org/name", tmp_path) == found


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_CACHE": "/data/hub"}, "/data/hub"),
    ({"HF_HOME": "/data/hf"}, "/data/hf/hub"),
    ({"XDG_CACHE_HOME": "/data/xdg"}, "/data/xdg/huggingface/hub"),
])
def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict, expected: str) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub.cache_dir() == Path(expected)


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed JSON configs


GPT2_DS = """\
model: {preset: gpt2}
data: {seq_len: 64}
trainer: {devices: 4, strategy: {deepspeed_config: ds.json}}
gpu: A100-80GB
"""


def ds_config(tmp_path: Path, config: dict, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("zero, strategy", [
    ({"stage": 1}, "deepspeed_stage_1"),
    ({"stage": 2}, "deepspeed_stage_2"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "deepspeed_stage_2_offload"),
    ({"stage": 3}, "deepspeed_stage_3"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme"}},
     "deepspeed_stage_3_offload"),
    ({"stage": 3, "offload_optimizer": {"device": "none"}}, "deepspeed_stage_3"),
    ({"stage": 0}, "ddp"),
])
def test_zero_stage_and_offload_become_the_strategy(tmp_path: Path, zero: dict, strategy: str) -> None:
    ds_config(tmp_path, {"zero_optimization": zero})
    spec = load_config(write(tmp_path, GPT2_DS))
    assert spec.strategy == strategy and spec.world_size == 4


def test_an_offload_memguard_cannot_model_is_predicted_without_it_and_said(tmp_path: Path) -> None:
    ds_config(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    spec = load_config(write(tmp_path, GPT2_DS))
    assert spec.strategy == "deepspeed_stage_3"
    assert any("offloading the optimizer at ZeRO stage 3 has no memguard model" in n and "upper bound" in n
               for n in spec.notes)


def test_the_json_fills_micro_batch_accumulation_and_precision(tmp_path: Path) -> None:
    ds_config(tmp_path, {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 8,
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    spec = load_config(write(tmp_path, GPT2_DS))
    t = spec.training
    assert (t.micro_batch_size, t.accumulate_grad_batches, t.precision) == (3, 8, "bf16-mixed")
    assert tuple(spec.batch["input_ids"].shape) == (3, 64)
    assert "batch size 3: train_micro_batch_size_per_gpu from " + str(tmp_path / "ds.json") in spec.notes
    # values the YAML states the same way are no conflict; "auto" (the transformers integration's) is unset
    same = ["data.batch_size=3", "trainer.accumulate_grad_batches=8", "trainer.precision=bf16-mixed"]
    assert load_config(write(tmp_path, GPT2_DS), same).training == t
    ds_config(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "fp16": {"enabled": "auto"},
                         "zero_optimization": {"stage": 2}})
    spec = load_config(write(tmp_path, GPT2_DS), ["trainer.precision=16-mixed"])
    assert spec.training.micro_batch_size == 1 and spec.training.precision == "16-mixed"


@pytest.mark.parametrize("override, json_key", [
    ("data.batch_size=8", "train_micro_batch_size_per_gpu is 4"),
    ("trainer.accumulate_grad_batches=2", "gradient_accumulation_steps is 16"),
    ("trainer.precision=16-mixed", "bf16.enabled is true"),
    ("trainer.precision=32-true", "bf16.enabled is true"),
])
def test_a_conflict_between_yaml_and_json_names_both_keys(tmp_path: Path, override: str, json_key: str) -> None:
    ds = ds_config(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 16,
                              "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    yaml_key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GPT2_DS), [override])
    problem, = info.value.problems
    assert problem.key == yaml_key and problem.file == str(tmp_path / "config.yaml")
    assert f"conflicts with {ds}: {json_key}" in problem.message and value in problem.message


def test_the_batch_size_flag_wins_over_the_json_and_says_so(tmp_path: Path) -> None:
    ds_config(tmp_path, {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
    spec = load_config(write(tmp_path, GPT2_DS), options=Options(batch_size=2))
    assert spec.training.micro_batch_size == 2
    assert any(n.startswith("--batch-size 2 replaces train_micro_batch_size_per_gpu 4") for n in spec.notes)


@pytest.mark.parametrize("content, file, key, message", [
    (None, "config.yaml", "trainer.strategy.deepspeed_config", r"no such file: .*ds.json"),
    ("{\"zero_optimization\": {\"stage\": 2,}}", "config.yaml", "trainer.strategy.deepspeed_config",
     r"ds.json is not valid JSON \(line 1, column 35\)"),
    ("[1, 2]", "config.yaml", "trainer.strategy.deepspeed_config", r"must hold a JSON object"),
    ("{\"zero_optimization\": {\"stage\": 4}}", "ds.json", "zero_optimization.stage",
     r"unknown ZeRO stage 4; DeepSpeed's stages are 0, 1, 2, 3"),
    ("{\"zero_optimization\": {\"stage\": 2, \"offload_optimizer\": {\"device\": \"cpuu\"}}}", "ds.json",
     "zero_optimization.offload_optimizer.device", r"unknown offload device 'cpuu'. Did you mean 'cpu'"),
    ("{\"train_micro_batch_size_per_gpu\": 0}", "ds.json", "train_micro_batch_size_per_gpu",
     r"must be a positive integer, got 0"),
])
def test_a_broken_deepspeed_config_names_the_file_and_key(tmp_path: Path, content: str | None, file: str, key: str,
                                                          message: str) -> None:
    if content is not None:
        (tmp_path / "ds.json").write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GPT2_DS))
    problem, = info.value.problems
    assert (Path(problem.file).name, problem.key) == (file, key)
    assert re.search(message, problem.message), problem.message


def test_the_json_is_found_relative_to_the_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").mkdir()
    ds_config(tmp_path / "configs", {"zero_optimization": {"stage": 3}})
    path = write(tmp_path / "configs", GPT2_DS)
    monkeypatch.chdir(ROOT)
    assert load_config(path).strategy == "deepspeed_stage_3"


def test_lightningcli_deepspeed_strategy_with_a_config_file_or_mapping(tmp_path: Path) -> None:
    (tmp_path / "lit_model.py").write_text((EXAMPLES / "lit_model.py").read_text())
    ds_config(tmp_path, {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
                         "fp16": {"enabled": True},
                         "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    path = write(tmp_path, (EXAMPLES / "lightningcli.yaml").read_text())
    strategy = "trainer.strategy={class_path: lightning.pytorch.strategies.DeepSpeedStrategy, init_args: {config: %s}}"
    spec = load_config(path, [strategy % "ds.json", "trainer.devices=2"])
    assert spec.strategy == "deepspeed_stage_2_offload" and spec.world_size == 2
    inline = '{zero_optimization: {stage: 3}, train_micro_batch_size_per_gpu: 4}'
    with pytest.raises(ConfigError) as info:  # the data module's batch_size is 16
        load_config(path, [strategy % inline, "trainer.devices=2"])
    problem, = info.value.problems
    assert problem.key == "data.init_args.batch_size"
    assert "conflicts with trainer.strategy.init_args.config: train_micro_batch_size_per_gpu is 4" in problem.message
    spec = load_config(path, [strategy % inline, "trainer.devices=2", "data.init_args.batch_size=4"])
    assert spec.strategy == "deepspeed_stage_3" and spec.training.micro_batch_size == 4
    with pytest.raises(ConfigError, match=r"trainer.strategy.init_args.config: must be a path to a DeepSpeed JSON"):
        load_config(path, [strategy % "7"])


def test_deepspeed_from_json_is_predicted_per_rank_over_several_devices(tmp_path: Path) -> None:
    """ZeRO-3 over 4 GPUs holds a quarter of the model states per rank: less than ZeRO-1 (only the optimizer
    state sharded), and offloading both to the host less again."""
    peaks = {}
    for stage, offload in ((1, "none"), (3, "none"), (3, "cpu")):
        ds_config(tmp_path, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
            "stage": stage, "offload_optimizer": {"device": offload}, "offload_param": {"device": offload}}})
        result = run_check(load_config(write(tmp_path, GPT2_DS)))
        assert any("over 4 devices" in n for n in result.notes)
        peaks[(stage, offload)] = result.targets[0].estimate.peak_bytes
    assert peaks[(3, "cpu")] < peaks[(3, "none")] < peaks[(1, "none")]


# ---------------------------------------------------------------------------------------------------------
# Overrides reach what is interpolated from them


def lightningcli(tmp_path: Path, wrap_in_fit: bool = False) -> Path:
    """examples/lightningcli.yaml (the model's seq_len interpolates ${data.init_args.seq_len}), next to its module."""
    (tmp_path / "lit_model.py").write_text((EXAMPLES / "lit_model.py").read_text())
    text = (EXAMPLES / "lightningcli.yaml").read_text()
    assert "seq_len: ${data.init_args.seq_len}" in text
    if wrap_in_fit:
        text = "fit:\n" + textwrap.indent(text, "  ").replace("${data.", "${fit.data.")
    return write(tmp_path, text)


@pytest.mark.parametrize("wrap_in_fit", [False, True])
@pytest.mark.parametrize("overrides, options", [
    (["data.seq_len=1024"], Options()),
    (["data.init_args.seq_len=1024"], Options()),
    ([], Options(seq_len=1024)),
])
def test_a_new_sequence_length_resizes_the_model_too(tmp_path: Path, wrap_in_fit: bool, overrides: list[str],
                                                     options: Options) -> None:
    spec = load_config(lightningcli(tmp_path, wrap_in_fit), overrides, options)
    assert tuple(spec.batch.shape) == (16, 1024)
    model = spec.model_factory()
    assert model.position.num_embeddings == 1024 and model.hparams.seq_len == 1024


def test_the_mirrored_size_is_stated(tmp_path: Path) -> None:
    spec = load_config(lightningcli(tmp_path), ["data.seq_len=1024"])
    assert "data.seq_len 1024 also set as data.init_args.seq_len (was 512), so the model arguments interpolated " \
           "from it follow" in spec.notes


def test_size_flags_flow_into_native_interpolations(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        model:
          class_path: torch.nn.Embedding
          init_args: {num_embeddings: "${data.seq_len}", embedding_dim: 8}
        data: {batch_size: 2, seq_len: 16}
        memguard:
          example_batch: {shape: ["${data.batch_size}", "${data.seq_len}"], dtype: int64}
        """)
    spec = load_config(path, options=Options(batch_size=3, seq_len=32))
    assert spec.model_factory().num_embeddings == 32 and tuple(spec.batch.shape) == (3, 32)
    with pytest.raises(ConfigError) as info:  # an invalid flag is reported once, under its name
        load_config(path, options=Options(seq_len=-1))
    assert [p.key for p in info.value.problems] == ["--seq-len"]


def test_check_json_reports_the_larger_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = lightningcli(tmp_path)
    counts = []
    for seq_len in (512, 1024):
        code = main(["check", str(path), "--gpu", "H100-80GB", "--batch-size", "1", "--set", f"data.seq_len={seq_len}",
                     "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        counts.append(json.loads(out)["config"]["parameters"])
    assert counts[1] - counts[0] == (1024 - 512) * 512  # the position table grew with the sequence
