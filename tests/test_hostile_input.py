"""Careless and hostile input, answered by memguard's own words: the documented exit code, the key or
argument named, the closest valid values, no traceback, and no verdict printed before an error."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from memguard import InvalidArgumentError, estimate, preflight, validation
from memguard.act.callback import MemGuard
from memguard.cli import main

ROOT = Path(__file__).resolve().parents[1]
GPT2 = str(ROOT / "examples" / "gpt2-small.yaml")


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,words", [
    ("just a sentence here\n", "the top level must be a mapping of sections (model:, data:, trainer: ...), not a plain"),
    ("- model\n- data\n", "the top level must be a mapping of sections (model:, data:, trainer: ...), not a list"),
    ("model: {preset: gpt2}\ntrainer: {precision: fp16}\n",
     "trainer.precision: Lightning's Trainer does not accept precision 'fp16'. Did you mean '16-mixed'?"),
    ("model: {preset: gpt2}\ndata: {batch_size: 1180591620717411303424}\n",
     "data.batch_size: must be at most 2,147,483,647"),
    ("model: {preset: gpt2}\nmemguard: {margin: .nan}\n", "memguard.margin: must be a finite number, got nan"),
    ("model: {preset: gpt2}\nmemguard: {margin: 5%}\n", "memguard.margin: is a fraction, not a percentage"),
    ("model: {preset: gpt2}\nmemguard: {allow: precisoin}\n", "Did you mean 'precision'"),
    ("model: {preset: gpt2}\nlora: {r: 8, target_modules: [c_atn]}\n", "'c_atn': did you mean 'c_attn'"),
])
def test_bad_configs_exit_2_naming_the_key(tmp_path, capsys, text, words) -> None:
    code, out, err = check(capsys, config(tmp_path, text), "--gpu", "A100-80GB")
    assert code == 2 and out == "" and "Traceback" not in err
    assert words in err, err


def test_every_problem_is_reported_at_once(tmp_path, capsys) -> None:
    text = "model: {preset: gpt2}\noptimizer: {name: adamz}\ndata: {seq_len: -3}\ntrainer: {precision: fp16}\n"
    code, _, err = check(capsys, config(tmp_path, text), "--gpu", "A100-80GB")
    assert code == 2 and "3 problems" in err
    assert all(key in err for key in ("optimizer.name", "data.seq_len", "trainer.precision"))


def test_command_line_values_are_checked_before_any_work(tmp_path, capsys) -> None:
    code, out, err = check(capsys, GPT2, "--margin", "nan")
    assert code == 2 and out == "" and "--margin: must be a finite number" in err
    code, out, err = check(capsys, GPT2, "--plot", str(tmp_path / "missing" / "x.png"))
    assert code == 2 and out == "" and "does not exist" in err  # no report, no verdict before the error


def test_a_large_ignored_section_loads_and_an_alias_bomb_does_not(tmp_path, capsys) -> None:
    """20,000 keys under lr_scheduler (OmegaConf's own default refuses more than 10,000 nodes, aliases or
    not); aliases that expand a file a thousandfold are still refused."""
    keys = "\n".join(f"  k{i}: {i}" for i in range(20_000))
    code, _, err = check(capsys, config(tmp_path, f"model: {{preset: gpt2}}\nlr_scheduler:\n{keys}\n"),
                         "--gpu", "A100-80GB", "--batch-size", "1", "--seq-len", "32")
    assert code == 0, err
    bomb = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10 if p else ['x'] * 10)}]\n"
                   for p, c in zip(["", "a", "b", "c", "d"], "abcde"))
    code, out, err = check(capsys, config(tmp_path, bomb + "model: {preset: gpt2}\n"))
    assert code == 2 and out == "" and "aliases expand the document" in err


def test_python_arguments_are_checked_with_their_names() -> None:
    model = torch.nn.Linear(4, 4)
    with pytest.raises(InvalidArgumentError, match=r"estimate\(batch=\) is None"):
        estimate(model, None)
    with pytest.raises(InvalidArgumentError, match="unknown device 'tpu:0'.*Valid: cpu, cuda"):
        estimate(model, torch.randn(2, 4), device="tpu:0")
    for kwargs, words in ((dict(margin=-1), r"MemGuard\(margin=\) must be >= 0 and < 1, got -1"),
                          (dict(margin="5%"), "a fraction, not a percentage: give 0.05 for 5%"),
                          (dict(margin=math.nan), "must be a finite number"),
                          (dict(allow="precisoin"), "Did you mean 'precision'")):
        with pytest.raises(InvalidArgumentError, match=words):
            MemGuard(**kwargs)
    assert MemGuard(allow="precision").allow == ("precision",)  # one knob, not its letters
    assert MemGuard(allow="precision,optimizer").allow == ("precision", "optimizer")
    with pytest.raises(InvalidArgumentError, match=r"preflight\(margin=\) must be >= 0"):
        preflight(model, torch.randn(2, 4), optimizer="adamw", margin=-0.5)


def test_the_shared_checks() -> None:
    assert validation.positive_int(3, "n") == 3
    for bad in (0, -1, True, 2.0, "3", validation.MAX_COUNT + 1):
        with pytest.raises(InvalidArgumentError, match="^n must be"):
            validation.positive_int(bad, "n")
    assert validation.margin(0) == 0.0 and validation.margin(0.5) == 0.5
    for bad in (1.0, -0.01, math.inf, "0.05", None):
        with pytest.raises(InvalidArgumentError, match="^margin "):
            validation.margin(bad)
    assert validation.names("", "allow", ["a"], "knob") == ()
    with pytest.raises(InvalidArgumentError, match="must be a list of knobs"):
        validation.names(3, "allow", ["a"], "knob")


TINY_LLAMA = ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64, '
              '"intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, '
              '"max_position_embeddings": 64}')


def test_a_hundred_thousand_nodes_answer_like_a_few(tmp_path, capsys) -> None:
    """Per-rank work does not grow with identical ranks: FSDP over 8 x 100,000 GPUs is traced as a bounded
    group (the note says so) and answered with exit 0."""
    (tmp_path / "llama.json").write_text(TINY_LLAMA)
    path = config(tmp_path, "model: {hf_config: llama.json}\ndata: {batch_size: 2, seq_len: 32}\n"
                            "trainer: {strategy: fsdp, devices: 8, num_nodes: 100000}\ngpu: A100-80GB\n")
    code, out, err = check(capsys, path)
    assert code == 0, err
    assert "the sharding group has 800,000 ranks: traced as 1,024" in " ".join(out.split())


def test_an_absurd_size_is_a_sentence_not_a_table(tmp_path, capsys) -> None:
    (tmp_path / "llama.json").write_text(TINY_LLAMA)
    path = config(tmp_path, "model: {hf_config: llama.json}\ndata: {batch_size: 1000000000, seq_len: 64}\n"
                            "gpu: A100-80GB\n")
    code, out, err = check(capsys, path, "--no-fallback")
    assert code == 1, err
    text = " ".join(out.split())
    assert "TiB per device" in text and "times the 79.25 GiB available" in text and "Check the batch size" in text
    assert not re.search(r"\d{6,}\.\d%", out) and "as configured [" not in out  # no table of absurd percents


NESTED = """
import torch
from torch import nn


class Settings:
    def __init__(self, width: int = 32):
        self.width = width


class Net(nn.Module):
    def __init__(self, backbone: nn.Module = None, settings: Settings | None = None, extra: object = None):
        super().__init__()
        self.backbone = backbone or nn.Linear(8, 8)
        self.head = nn.Linear(8, settings.width if settings else 8)
        self.example_input_array = torch.zeros(2, 8)

    def forward(self, x):
        return self.head(self.backbone(x))
"""


def test_nested_class_paths_build_only_modules_and_what_the_signature_asks_for(tmp_path, capsys) -> None:
    (tmp_path / "nested_net.py").write_text(NESTED)
    ok = config(tmp_path, "model:\n  class_path: nested_net.Net\n  init_args:\n"
                          "    backbone: {class_path: torch.nn.Linear, init_args: {in_features: 8, out_features: 8}}\n"
                          "    settings: {class_path: nested_net.Settings, init_args: {width: 16}}\ngpu: A100-80GB\n")
    assert check(capsys, ok)[0] == 0
    marker = tmp_path / "ran"
    bad = config(tmp_path, "model:\n  class_path: nested_net.Net\n  init_args:\n"
                           f"    extra: {{class_path: subprocess.Popen, init_args: {{args: [touch, '{marker}']}}}}\n")
    code, out, err = check(capsys, bad, "--gpu", "A100-80GB")
    assert code == 2 and out == "" and not marker.exists()
    assert "model.init_args.extra.class_path: memguard builds only torch modules" in err
