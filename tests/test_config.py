"""memguard/spec/ (memguard check's config): the config schema, interpolation, --set, every kind of error (all reported at once),
LightningCLI and config.json inputs, and the check's exit-code rules."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from memguard.act.check import run_check
from memguard.losses import forward_sum_loss
from memguard.spec.check_spec import Options
from memguard.spec.config import load_config
from memguard.spec.problems import COMMAND_LINE, ConfigError
from memguard.results import CheckResult, Target, TargetResult
from memguard.estimation import estimate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GPT2 = """\
model: {preset: gpt2}
data: {batch_size: 2, seq_len: 64}
trainer: {precision: bf16-mixed}
gpu: H100-80GB
"""


# ---------------------------------------------------------------------------------------------------------
# The native schema


def test_native_config_becomes_a_spec(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        model: {preset: gpt2}
        data: {batch_size: 4, seq_len: 128}
        optimizer: {name: adamw, lr: 1.0e-4, weight_decay: 0.1}
        trainer: {precision: bf16, gradient_checkpointing: true, accumulate_grad_batches: 2, devices: 2,
                  num_nodes: 3, strategy: ddp}
        gpu: [h100, a100-80gb]
        memguard: {allow: [precision, micro_batch], margin: 0.1, fallback: false}
        """)
    spec = load_config(path)
    assert spec.kind == "native"
    assert spec.model_label == "gpt2"
    assert {k: tuple(v.shape) for k, v in spec.batch.items()} == {"input_ids": (4, 128), "labels": (4, 128)}
    assert spec.batch["input_ids"].device.type == "meta"
    t = spec.training
    assert (t.precision, t.optimizer, t.micro_batch_size, t.accumulate_grad_batches, t.gradient_checkpointing) == (
        "bf16-mixed", "adamw", 4, 2, True)
    assert spec.optimizer == "adamw" and spec.optimizer_kwargs == {"lr": 1e-4, "weight_decay": 0.1}
    assert spec.gpus == ("H100-80GB", "A100-80GB")  # canonical catalog names
    assert (spec.devices, spec.num_nodes, spec.world_size, spec.strategy) == (2, 3, 6, "ddp")
    assert (spec.allow, spec.margin, spec.fallback) == (("precision", "micro_batch"), 0.1, False)
    model = spec.model_factory()
    assert model is spec.model_factory()  # built once, on meta
    assert next(model.parameters()).device.type == "meta"


def test_defaults_are_stated_in_notes(tmp_path: Path) -> None:
    spec = load_config(write(tmp_path, "model: {preset: llama-2-7b}\n"))
    assert spec.training.precision == "32-true" and spec.optimizer == "adamw"
    assert tuple(spec.batch["input_ids"].shape) == (1, 4096)  # the preset's pre-training length
    assert spec.gpus == () and spec.margin == 0.05 and spec.allow is None and spec.fallback
    assert any("seq_len not given: 4096" in n for n in spec.notes)
    assert "no optimizer given: adamw" in spec.notes


def test_interpolation_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MG_TEST_GPU", "L4")
    path = write(tmp_path, """\
        shared: {len: 96}
        model: {preset: gpt2}
        data: {batch_size: 3, seq_len: "${shared.len}"}
        trainer: {precision: 16-mixed}
        gpu: ${oc.env:MG_TEST_GPU}
        """)
    with pytest.raises(ConfigError, match=r"config.yaml: shared: unknown key"):
        load_config(path)  # helper sections are not part of the schema ...
    text = path.read_text().replace("shared: {len: 96}\n", "").replace("${shared.len}", "${data.batch_size}")
    path.write_text(text)
    spec = load_config(path)  # ... but interpolation between real keys works
    assert tuple(spec.batch["input_ids"].shape) == (3, 3)
    assert spec.gpus == ("L4",)


def test_set_overrides_are_merged_before_validation(tmp_path: Path) -> None:
    path = write(tmp_path, GPT2)
    spec = load_config(path, ["trainer.precision=16-true", "data.batch_size=5", "gpu=T4",
                              "optimizer={name: sgd_momentum, lr: 0.1}"])
    assert spec.training.precision == "16-true" and spec.training.micro_batch_size == 5
    assert spec.gpus == ("T4",)
    assert spec.optimizer == "sgd_momentum" and spec.optimizer_kwargs == {"lr": 0.1}
    with pytest.raises(ConfigError, match=r"config.yaml: trainer.precision: Lightning's Trainer does not accept precision 'fp17'"):
        load_config(path, ["trainer.precision=fp17"])


def test_options_win_over_the_file(tmp_path: Path) -> None:
    spec = load_config(write(tmp_path, GPT2), options=Options(
        gpus=("A10G", "T4"), devices=4, num_nodes=2, allow="precision,offload", margin=0.2, fallback=False,
        batch_size=7, seq_len=32))
    assert spec.gpus == ("A10G", "T4") and spec.world_size == 8
    assert spec.allow == ("precision", "offload") and spec.margin == 0.2 and not spec.fallback
    assert tuple(spec.batch["labels"].shape) == (7, 32)
    assert load_config(write(tmp_path, GPT2), options=Options(allow="")).allow == ()


def test_example_batch_tensors(tmp_path: Path) -> None:
    path = write(tmp_path, GPT2 + textwrap.dedent("""\
        memguard:
          example_batch:
            input_ids: {shape: [2, 16], dtype: int64}
            labels: {shape: [2, 16], dtype: long}
        """))
    spec = load_config(path)
    assert {k: (tuple(v.shape), v.dtype) for k, v in spec.batch.items()} == {
        "input_ids": ((2, 16), torch.int64), "labels": ((2, 16), torch.int64)}
    with pytest.raises(ConfigError, match=r"memguard.example_batch.labels.dtype: unknown dtype 'int65'"):
        load_config(path, ["memguard.example_batch.labels.dtype=int65"])


# ---------------------------------------------------------------------------------------------------------
# Every kind of problem, each named with file and key, all in one error


@pytest.mark.parametrize("text, expected", [
    ("model: {preset: gpt2}\ndata: {batch_size: 1, seq_len: [1, 2\n",
     r"config.yaml: line 3, column 1: malformed YAML"),
    ("model: {preset: gpt2}\nmodel: {preset: gpt2}\n",
     r"config.yaml: line 2, column 1: malformed YAML: found duplicate key"),
    ("- model\n", r"config.yaml: the top level must be a mapping"),
    ("model: {preset: gpt2}\ntrainr: {}\n", r"config.yaml: trainr: unknown key. Did you mean 'trainer'\?"),
    ("model: {preset: gpt2}\ntrainer: {precison: bf16-mixed}\n",
     r"trainer.precison: unknown key. Did you mean 'precision'\?"),
    ("model: {preset: gpt2}\ntrainer: {precision: bf17}\n",
     r"config.yaml: trainer.precision: Lightning's Trainer does not accept precision 'bf17'. Did you mean .*'bf16-mixed'"),
    ("model: {preset: llama-2-7bb}\n", r"model.preset: unknown preset 'llama-2-7bb'. Did you mean 'llama-2-7b'"),
    ("model: {preset: gpt2}\noptimizer: adamw9bit\n",
     r"optimizer: unknown optimizer 'adamw9bit'. Did you mean 'adamw8bit'"),
    ("model: {preset: gpt2}\ngpu: Z100\n", r"gpu: unknown GPU 'Z100'"),
    ("model: {preset: gpt2}\ndata: {batch_size: -1}\n", r"data.batch_size: must be a positive integer, got -1"),
    ("model: {preset: gpt2}\ndata: {seq_len: 0}\n", r"data.seq_len: must be a positive integer, got 0"),
    ("model: {preset: gpt2}\ndata: {seq_len: 2048}\n", r"data.seq_len: 2048 is longer than gpt2's 1024 positions"),
    ("model: {preset: vit-b-16}\ndata: {seq_len: 16}\n", r"data.seq_len: 'vit-b-16' takes images"),
    ("model: {preset: gpt2}\ntrainer: {accumulate_grad_batches: 0}\n", r"trainer.accumulate_grad_batches: must be"),
    ("model: {preset: gpt2}\ntrainer: {strategy: fdsp}\n",
     r"trainer.strategy: unknown strategy 'fdsp'. Did you mean 'fsdp'"),
    # names Lightning knows whose memory memguard cannot predict: refused here, never inside the check
    ("model: {preset: gpt2}\ntrainer: {strategy: dp}\n", r"trainer.strategy: unknown strategy 'dp'"),
    ("model: {preset: gpt2}\ntrainer: {strategy: xla}\n", r"trainer.strategy: unknown strategy 'xla'"),
    ("model: {preset: gpt2}\ntrainer: {strategy: deepspeed_stage_3_offload_nvme}\n",
     r"trainer.strategy: unknown strategy 'deepspeed_stage_3_offload_nvme'. Did you mean 'deepspeed_stage_3_offload'"),
    ("model: {preset: gpt2}\ntrainer: {strategy: {class_path: lightning.pytorch.strategies.XLAStrategy}}\n",
     r"trainer.strategy.class_path: memguard does not know the strategy class 'XLAStrategy'"),
    ("model: {preset: gpt2}\ntrainer: {gradient_checkpointing: maybe}\n", r"must be true or false, got 'maybe'"),
    ("model: {preset: gpt2}\nquantization: nf5\n", r"quantization: unknown quantization 'nf5'. Did you mean 'nf4'"),
    ("model: {preset: gpt2}\nlora: {r: 0}\n", r"lora.r: must be a positive integer, got 0"),
    ("model: {preset: gpt2}\nmemguard: {margin: -0.1}\n", r"memguard.margin: must be >= 0 and < 1, got -0.1"),
    ("model: {preset: gpt2}\nmemguard: {allow: [offlaod]}\n",
     r"memguard.allow: unknown knob 'offlaod'. Did you mean 'offload'"),
    ("model: {preset: gpt2, hf_config: x.json}\n", r"model: give exactly one of preset, hf_config or class_path"),
    ("model: {hf_config: missing.json}\n", r"model.hf_config: no such file: .*missing.json"),
    ("model: {class_path: no_such_module.Net}\n",
     r"model.class_path: cannot import 'no_such_module.Net': ModuleNotFoundError"),
    ("model: {class_path: torch.nn.Linearr}\n",
     r"model.class_path: cannot import 'torch.nn.Linearr': module 'torch.nn' has no 'Linearr'. "
     r"Did you mean 'torch.nn.Linear'"),
    ("model: {class_path: torch.optim.SGD}\n", r"model.class_path: 'torch.optim.SGD' is not a torch.nn.Module"),
    ("model: {preset: gpt2}\noptimizer: {class_path: torch.optim.Adamm}\n",
     r"optimizer.class_path: cannot import 'torch.optim.Adamm'.*Did you mean 'torch.optim.Adam'"),
    ("model: {preset: gpt2}\ndata: {batch_size: '${nope}'}\n", r"data.batch_size: Interpolation key 'nope' not found"),
    ("trainer: {}\n", r"model: missing"),
])
def test_each_problem_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_every_strategy_validation_accepts_is_one_the_estimate_runs(tmp_path: Path) -> None:
    """Validation and estimation read one table: a name the config accepts reaches a per-rank prediction
    (or the one-process estimate), never an error inside the check."""
    from memguard import strategies
    from memguard.estimation.distributed import parse_strategy

    for name in strategies.names():
        spec = load_config(write(tmp_path, f"model: {{preset: gpt2}}\ntrainer: {{strategy: {name}, devices: 2}}\n"))
        assert spec.strategy == name
        if not strategies.is_single_process(name):
            assert parse_strategy(name) is not None


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"nowhere.yaml: no such file"):
        load_config("nowhere.yaml")


def test_all_problems_are_listed_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        model: {preset: llama-2-7bb}
        data: {batch_size: 0, seq_len: -5}
        trainer: {precision: bf17, precison: 16-mixed, strategy: fdsp}
        optimizer: adamw9bit
        gpu: Z100
        lora: {r: 8, targets: [q_proj]}
        memguard: {margin: 2}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["trainer.devices=0", "no_equals_sign"],
                    Options(gpus=("A100",), margin=-1, allow="precision,foo"))
    problems = info.value.problems
    keys = [p.key for p in problems]
    assert keys == ["--set", "data.batch_size", "data.seq_len", "trainer.precison", "trainer.precision",
                    "trainer.devices", "trainer.strategy", "lora.targets", "memguard.margin", "gpu",
                    "model.preset", "optimizer", "--gpu", "--allow", "--margin"]
    assert {p.file for p in problems} == {str(path), COMMAND_LINE}
    assert [p.file for p in problems if p.key.startswith("--")] == [COMMAND_LINE] * 4
    text = str(info.value)
    assert text.startswith("15 problems:\n")
    assert "--gpu: GPU name 'A100' is ambiguous: it fits A100-40GB, A100-80GB" in text


def test_a_config_is_never_evaluated_as_code(tmp_path: Path) -> None:
    path = write(tmp_path, "model: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(ConfigError, match=r"malformed YAML: could not determine a constructor"):
        load_config(path)


# ---------------------------------------------------------------------------------------------------------
# LightningCLI fit configs and config.json


def test_lightningcli_config() -> None:
    spec = load_config(EXAMPLES / "lightningcli.yaml")
    assert spec.kind == "lightningcli" and spec.model_label == "LitModel"
    assert tuple(spec.batch.shape) == (16, 512)  # example_input_array (2, 512) resized by the data hints
    assert spec.optimizer == "adamw" and spec.optimizer_kwargs == {"lr": 3e-4, "weight_decay": 0.01}
    assert spec.training.precision == "16-mixed" and spec.training.accumulate_grad_batches == 2
    assert spec.loss_fn is forward_sum_loss  # only example_input_array: the forward is traced
    assert any("resized by the data hints ((2, 512) -> (16, 512))" in n for n in spec.notes)
    model = spec.model_factory()
    assert type(model).__name__ == "LitModel" and model.hparams.vocab_size == 32000  # interpolated from data


def test_lightningcli_without_optimizer_uses_configure_optimizers(tmp_path: Path) -> None:
    text = (EXAMPLES / "lightningcli.yaml").read_text()
    text = text[: text.index("optimizer:")] + "memguard:\n  example_batch: [{shape: [4, 512], dtype: int64}, " \
                                              "{shape: [4, 512], dtype: int64}]\n"
    path = write(tmp_path, text)
    (tmp_path / "lit_model.py").write_text((EXAMPLES / "lit_model.py").read_text())
    spec = load_config(path)
    assert spec.optimizer == "adamw" and spec.optimizer_kwargs["lr"] == 3e-4
    assert "optimizer from LitModel.configure_optimizers(): AdamW" in spec.notes
    assert spec.loss_fn is not forward_sum_loss and spec.loss_fn is not None  # a real batch: training_step
    assert [tuple(t.shape) for t in spec.batch] == [(4, 512), (4, 512)]


def test_lightningcli_wrapped_in_fit_and_strategy_class(tmp_path: Path) -> None:
    text = "fit:\n" + textwrap.indent((EXAMPLES / "lightningcli.yaml").read_text(), "  ").replace(
        "${data.", "${fit.data.")
    path = write(tmp_path, text)
    (tmp_path / "lit_model.py").write_text((EXAMPLES / "lit_model.py").read_text())
    strategy = "trainer.strategy={class_path: lightning.pytorch.strategies.DeepSpeedStrategy, init_args: {stage: 3}}"
    spec = load_config(path, [strategy, "trainer.devices=[0, 1, 2]"])
    assert spec.strategy == "deepspeed_stage_3" and spec.devices == 3


def test_hf_config_json(tmp_path: Path) -> None:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 256, "torch_dtype": "bfloat16"}
    path = write(tmp_path, json.dumps(config), "config.json")
    spec = load_config(path, options=Options(batch_size=3))
    assert spec.kind == "hf-config" and spec.model_label == "LlamaForCausalLM from config.json"
    assert tuple(spec.batch["input_ids"].shape) == (3, 256)
    assert any("from the model's position table" in n for n in spec.notes)
    assert next(spec.model_factory().parameters()).dtype == torch.float32  # precision is trainer's job
    with pytest.raises(ConfigError, match=r"config.json: --seq-len: 4096 is longer than the model's 256 positions"):
        load_config(path, options=Options(seq_len=4096))
    path.write_text(json.dumps({**config, "model_type": "lama"}))
    with pytest.raises(ConfigError, match=r"model.hf_config: unknown model_type 'lama'. Did you mean 'llama'"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON \(line 1, column 2\)"):
        load_config(path)


def test_lora_and_quantization(tmp_path: Path) -> None:
    path = write(tmp_path, GPT2 + "lora: {r: 4, alpha: 8, target_modules: [c_attn]}\nquantization: nf4-dq\n")
    spec = load_config(path)
    model = spec.model_factory()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 12 * 4 * (768 + 3 * 768)  # LoRA A and B on each block's c_attn
    assert spec.quantization == "nf4-dq" and spec.lora.alpha == 8
    with pytest.raises(ConfigError, match=r"lora.target_modules: peft could not add adapters"):
        load_config(path, ["lora.target_modules=[no_such_layer]"])


# ---------------------------------------------------------------------------------------------------------
# The check: exit codes and notes


class _Plan:
    def __init__(self, fits: bool) -> None:
        self.fits = fits


def _result(*outcomes: str) -> CheckResult:
    targets = []
    for outcome in outcomes:
        plan = {"fits": None, "plan": _Plan(True), "nothing": _Plan(False)}[outcome]
        targets.append(TargetResult(Target(outcome, 1, "test"), None, 0, outcome == "fits", plan))
    return CheckResult(spec=None, targets=targets, notes=[])


@pytest.mark.parametrize("outcomes, code", [
    (["fits"], 0), (["plan"], 3), (["nothing"], 1),
    (["fits", "fits"], 0), (["fits", "plan"], 3), (["plan", "nothing", "fits"], 1),
])
def test_exit_code_is_the_worst_targets(outcomes: list[str], code: int) -> None:
    result = _result(*outcomes)
    assert result.exit_code == code
    assert result.deciding.exit_code == code
    assert result.fits == all(o == "fits" for o in outcomes)


def test_run_check_predicts_sharded_strategies_per_rank(tmp_path: Path) -> None:
    single = run_check(load_config(write(tmp_path, GPT2), []))
    spec = load_config(write(tmp_path, GPT2), ["trainer.strategy=fsdp", "trainer.devices=2"])
    result = run_check(spec)
    assert any("'fsdp' over 2 devices (2 per node x 1 node): the numbers are the largest rank's" in n
               for n in result.notes)
    assert result.exit_code == 0 and result.targets[0].target.name == "H100-80GB"
    # sharding parameters, gradients and optimizer state over 2 ranks: each rank holds less than one process
    assert result.targets[0].estimate.peak_bytes < single.targets[0].estimate.peak_bytes
    assert result.parameters == result.trainable == 124_439_808


@pytest.mark.parametrize("zero_grad_before_backward", [True, False], ids=["lightning_order", "plain_order"])
def test_five_accumulated_micro_batches_within_2_percent_of_their_measured_peak(
        zero_grad_before_backward: bool) -> None:
    """memguard traces the first two micro-batches of a step and takes the later ones to repeat the second:
    the estimate for 5 is compared with the real CPU peak of two steps of 5 micro-batches each, measured
    without memguard (tests/groundtruth.py).

    SGD without momentum keeps no optimizer state, so the peak falls in a backward, where the gradients
    accumulated by the earlier micro-batches are alive next to the new ones; the measured peak of a single
    micro-batch per step is lower, so an estimate that left accumulation out would fail. The loss is a
    cross-entropy against labels, as in training (the sum of the output would send an expanded gradient into
    the last linear layer, a kernel-internal copy unrelated to accumulation)."""
    from groundtruth import REAL_OPTIMIZERS, measure_peak

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    torch.manual_seed(1)
    batch = (torch.randn(64, 256), torch.randint(0, 256, (64,)))
    real = {n: measure_peak(build(), batch, REAL_OPTIMIZERS["sgd"], loss_fn=loss_fn, accumulate=n,
                            zero_grad_before_backward=zero_grad_before_backward) for n in (1, 5)}
    assert real[5] > 1.02 * real[1]  # accumulation changes the real peak by more than the tolerance
    est = estimate(build(), batch, loss_fn=loss_fn, optimizer="sgd", device="cpu", accumulate_grad_batches=5,
                   zero_grad_before_backward=zero_grad_before_backward)
    error = (est.peak_bytes - real[5]) / real[5]
    assert abs(error) <= 0.02, f"predicted {est.peak_bytes:,} vs measured {real[5]:,} ({error:+.2%})"


def test_local_gpus_are_used_when_none_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memguard.device import gpus

    info = gpus.GPUInfo(index=0, nvml_index=0, name="NVIDIA A100-SXM4-80GB", uuid="GPU-1", total_bytes=80 * 2**30,
                        free_bytes=20 * 2**30, used_bytes=60 * 2**30, compute_capability=(8, 0), bf16=True)
    monkeypatch.setattr(gpus, "discover", lambda: gpus.Discovery(gpus=[info]))
    result = run_check(load_config(write(tmp_path, GPT2.replace("gpu: H100-80GB\n", ""))))
    target = result.targets[0].target
    assert (target.capacity_bytes, target.catalog.name, target.index) == (20 * 2**30, "A100-80GB", 0)
    assert re.search(r"GPU 0: free memory now", target.source)
