"""Architecture presets: the published hyperparameters of well-known models, never their weights.

A preset lets ``model: {preset: llama-2-7b}`` (and the accuracy benchmark) stand for a real model without
downloading anything: the hyperparameters below are copied from each model's ``config.json`` as published
on the Hugging Face hub (the hub id is in ``source`` and in the comment above each entry), and :func:`build`
constructs the transformers model from them on the meta device, so even a 405B model costs no memory.

What is copied and what is left out of each ``config.json``:

- copied: every key that shapes the network or its forward pass (sizes, depths, heads, vocabulary,
  activation, norms, dropout, rotary/rope settings, tied embeddings, special token ids, ``use_cache``);
- left out: bookkeeping that does not change the architecture (``architectures``, ``model_type``,
  ``transformers_version``, ``auto_map``, ``_name_or_path``), ``id2label``/``label2id`` (replaced by
  ``num_labels``), and ``torch_dtype``: the model is built in float32 like ``Model(config)`` does, because
  the training precision is memguard's ``precision`` argument, not a property of the architecture.

``seq_len`` / ``image_size`` are the default input of :func:`example_batch`: the context the model was
pre-trained with (at most 8192 for the long-context releases, whose 32K-128K maximum stays in the
hyperparameters) or the image size its classifier was trained at.

``params`` is the exact number of parameters of the model as built, counting tied weights once
(``sum(p.numel() for p in model.parameters())``); the tests rebuild every preset and compare, and compare
the well-known ones with a table of independently published figures.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from memguard import checkpointing
from memguard.errors import InvalidArgumentError, unknown_name

Kind = Literal["causal-lm", "masked-lm", "sequence-classification", "image-classification", "seq2seq"]
InputKind = Literal["tokens", "image"]

_CLASSIFIERS = ("sequence-classification", "image-classification")


@dataclass(frozen=True)
class Preset:
    """One published architecture: which transformers classes to build, from which hyperparameters.

    ``hyperparameters`` is read-only so that a preset cannot be changed by one caller under another's
    feet; :func:`build` works on a deep copy.
    """

    name: str
    kind: Kind
    model_class: str
    config_class: str
    hyperparameters: Mapping[str, Any] = field(hash=False)
    params: int
    input: InputKind
    source: str
    seq_len: int | None = None
    image_size: int | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hyperparameters", MappingProxyType(dict(self.hyperparameters)))

    def config_kwargs(self) -> dict[str, Any]:
        """A fresh, mutable copy of the hyperparameters, for ``ConfigClass(**kwargs)``."""
        return copy.deepcopy(dict(self.hyperparameters))


# -- shared pieces of published configs ---------------------------------------------------------------

def _gpt2(n_embd: int, n_layer: int, n_head: int) -> dict[str, Any]:
    # openai-community/gpt2{,-medium,-large,-xl}: the four sizes differ only in width, depth and heads.
    return dict(vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                layer_norm_epsilon=1e-5, initializer_range=0.02, summary_type="cls_index", summary_use_proj=True,
                summary_activation=None, summary_proj_to_labels=True, summary_first_dropout=0.1,
                bos_token_id=50256, eos_token_id=50256, use_cache=True)


def _bert(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    # google-bert/bert-{base,large}-uncased
    return dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate, hidden_act="gelu", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute",
                use_cache=True)


def _llama2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    # meta-llama/Llama-2-{7b,13b,70b}-hf
    return dict(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu",
                max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5, pretraining_tp=1,
                rope_scaling=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, use_cache=True)


def _llama3(hidden: int, intermediate: int, layers: int, heads: int, *, max_positions: int = 8192,
            rope_factor: float | None = None, tie: bool = False, head_dim: int | None = None) -> dict[str, Any]:
    # meta-llama/Meta-Llama-3-*, Llama-3.1-*, Llama-3.2-*: one tokenizer (128256), 8 KV heads, rope 5e5;
    # 3.1 and 3.2 add the "llama3" rope scaling for their 128K context.
    cfg: dict[str, Any] = dict(
        vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=max_positions,
        initializer_range=0.02, rms_norm_eps=1e-5, pretraining_tp=1, rope_theta=500000.0, attention_bias=False,
        attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=tie, bos_token_id=128000, eos_token_id=128001,
        use_cache=True)
    cfg["rope_scaling"] = None if rope_factor is None else {
        "factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def _mistral(*, rope_theta: float, sliding_window: int | None) -> dict[str, Any]:
    # mistralai/Mistral-7B-v0.1 and v0.2: v0.2 raised rope_theta to 1e6 and dropped the sliding window.
    return dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
                initializer_range=0.02, rms_norm_eps=1e-5, rope_theta=rope_theta, sliding_window=sliding_window,
                attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, use_cache=True)


def _gemma(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    # google/gemma-{2b,7b}: head_dim 256, tied 256K-token embeddings.
    return dict(vocab_size=256000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=256, hidden_act="gelu",
                max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0,
                rope_scaling=None, attention_bias=False, attention_dropout=0.0, pad_token_id=0, eos_token_id=1,
                bos_token_id=2, use_cache=True)


def _gemma2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    # google/gemma-2-{2b,9b}: logit soft-capping and alternating 4096-token sliding-window layers.
    return dict(vocab_size=256000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=256,
                hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                attention_dropout=0.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                query_pre_attn_scalar=256, sliding_window=4096, cache_implementation="hybrid", pad_token_id=0,
                eos_token_id=1, bos_token_id=2, use_cache=True)


def _t5_v1_1(d_model: int, d_ff: int, heads: int, layers: int, vocab: int) -> dict[str, Any]:
    # The T5 v1.1 family (T0 and mT0 inherit it): gated-GELU feed-forward, relative attention, and an
    # lm_head of its own (tie_word_embeddings=False), which transformers 5 no longer honours: see build().
    return dict(vocab_size=vocab, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
                num_heads=heads, relative_attention_num_buckets=32, dropout_rate=0.1, layer_norm_epsilon=1e-6,
                initializer_factor=1.0, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=True)


def _vit(hidden: int, layers: int, heads: int, intermediate: int, patch: int) -> dict[str, Any]:
    # google/vit-*, built as torchvision's vit_*: qkv_bias, no pooler (ViTForImageClassification has none)
    # and layer_norm_eps 1e-6 as in torchvision and the original ViT, where the hub's configs say 1e-12;
    # the epsilon changes no shape and no byte.
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
                hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
                layer_norm_eps=1e-6, image_size=224, patch_size=patch, num_channels=3, qkv_bias=True, num_labels=1000)


# -- the table ----------------------------------------------------------------------------------------

PRESETS: dict[str, Preset] = {p.name: p for p in [
    # openai-community/gpt2 (GPT2LMHeadModel ties lm_head to wte: counted once)
    Preset("gpt2", "causal-lm", "GPT2LMHeadModel", "GPT2Config", _gpt2(768, 12, 12), 124_439_808,
           "tokens", "openai-community/gpt2", seq_len=1024, aliases=("gpt2-small",)),
    # openai-community/gpt2-medium
    Preset("gpt2-medium", "causal-lm", "GPT2LMHeadModel", "GPT2Config", _gpt2(1024, 24, 16), 354_823_168,
           "tokens", "openai-community/gpt2-medium", seq_len=1024),
    # openai-community/gpt2-large
    Preset("gpt2-large", "causal-lm", "GPT2LMHeadModel", "GPT2Config", _gpt2(1280, 36, 20), 774_030_080,
           "tokens", "openai-community/gpt2-large", seq_len=1024),
    # openai-community/gpt2-xl
    Preset("gpt2-xl", "causal-lm", "GPT2LMHeadModel", "GPT2Config", _gpt2(1600, 48, 25), 1_557_611_200,
           "tokens", "openai-community/gpt2-xl", seq_len=1024),
    # google-bert/bert-base-uncased (BertForMaskedLM: decoder tied to the word embeddings, own bias)
    Preset("bert-base-uncased", "masked-lm", "BertForMaskedLM", "BertConfig", _bert(768, 12, 12, 3072),
           109_514_298, "tokens", "google-bert/bert-base-uncased", seq_len=512, aliases=("bert-base",),
           note="the hub checkpoint's 110,106,428 is BertForPreTraining: it adds the pooler (590,592) and the "
                "next-sentence head (1,538), which BertForMaskedLM does not have."),
    # google-bert/bert-large-uncased (the checkpoint, as BertForPreTraining: 336,226,108)
    Preset("bert-large-uncased", "masked-lm", "BertForMaskedLM", "BertConfig", _bert(1024, 24, 16, 4096),
           335_174_458, "tokens", "google-bert/bert-large-uncased", seq_len=512, aliases=("bert-large",)),
    # distilbert/distilbert-base-uncased, with the sequence-classification head (2 labels unless num_labels)
    Preset("distilbert-base-uncased", "sequence-classification", "DistilBertForSequenceClassification",
           "DistilBertConfig",
           dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, activation="gelu",
                max_position_embeddings=512, dropout=0.1, attention_dropout=0.1, qa_dropout=0.1,
                seq_classif_dropout=0.2, sinusoidal_pos_embds=False, tie_weights_=True, initializer_range=0.02,
                pad_token_id=0),
           66_955_010, "tokens", "distilbert/distilbert-base-uncased", seq_len=512, aliases=("distilbert",),
           note="2-label classification head: 66,362,880 in DistilBertModel + 592,130 in the head."),
    # meta-llama/Llama-2-7b-hf
    Preset("llama-2-7b", "causal-lm", "LlamaForCausalLM", "LlamaConfig", _llama2(4096, 11008, 32, 32, 32),
           6_738_415_616, "tokens", "meta-llama/Llama-2-7b-hf", seq_len=4096),
    # meta-llama/Llama-2-13b-hf
    Preset("llama-2-13b", "causal-lm", "LlamaForCausalLM", "LlamaConfig", _llama2(5120, 13824, 40, 40, 40),
           13_015_864_320, "tokens", "meta-llama/Llama-2-13b-hf", seq_len=4096),
    # meta-llama/Llama-2-70b-hf
    Preset("llama-2-70b", "causal-lm", "LlamaForCausalLM", "LlamaConfig", _llama2(8192, 28672, 80, 64, 8),
           68_976_648_192, "tokens", "meta-llama/Llama-2-70b-hf", seq_len=4096),
    # meta-llama/Meta-Llama-3-8B
    Preset("llama-3-8b", "causal-lm", "LlamaForCausalLM", "LlamaConfig", _llama3(4096, 14336, 32, 32),
           8_030_261_248, "tokens", "meta-llama/Meta-Llama-3-8B", seq_len=8192),
    # meta-llama/Meta-Llama-3-70B
    Preset("llama-3-70b", "causal-lm", "LlamaForCausalLM", "LlamaConfig", _llama3(8192, 28672, 80, 64),
           70_553_706_496, "tokens", "meta-llama/Meta-Llama-3-70B", seq_len=8192),
    # meta-llama/Llama-3.1-8B (default seq_len: the 8K pre-training context, not the 128K maximum)
    Preset("llama-3.1-8b", "causal-lm", "LlamaForCausalLM", "LlamaConfig",
           _llama3(4096, 14336, 32, 32, max_positions=131072, rope_factor=8.0),
           8_030_261_248, "tokens", "meta-llama/Llama-3.1-8B", seq_len=8192,
           aliases=("meta-llama/Meta-Llama-3.1-8B",)),
    # meta-llama/Llama-3.1-70B
    Preset("llama-3.1-70b", "causal-lm", "LlamaForCausalLM", "LlamaConfig",
           _llama3(8192, 28672, 80, 64, max_positions=131072, rope_factor=8.0),
           70_553_706_496, "tokens", "meta-llama/Llama-3.1-70B", seq_len=8192,
           aliases=("meta-llama/Meta-Llama-3.1-70B",)),
    # meta-llama/Llama-3.1-405B
    Preset("llama-3.1-405b", "causal-lm", "LlamaForCausalLM", "LlamaConfig",
           _llama3(16384, 53248, 126, 128, max_positions=131072, rope_factor=8.0),
           405_853_388_800, "tokens", "meta-llama/Llama-3.1-405B", seq_len=8192,
           aliases=("meta-llama/Meta-Llama-3.1-405B",)),
    # meta-llama/Llama-3.2-1B (tied embeddings)
    Preset("llama-3.2-1b", "causal-lm", "LlamaForCausalLM", "LlamaConfig",
           _llama3(2048, 8192, 16, 32, max_positions=131072, rope_factor=32.0, tie=True, head_dim=64),
           1_235_814_400, "tokens", "meta-llama/Llama-3.2-1B", seq_len=8192),
    # meta-llama/Llama-3.2-3B (tied embeddings)
    Preset("llama-3.2-3b", "causal-lm", "LlamaForCausalLM", "LlamaConfig",
           _llama3(3072, 8192, 28, 24, max_positions=131072, rope_factor=32.0, tie=True, head_dim=128),
           3_212_749_824, "tokens", "meta-llama/Llama-3.2-3B", seq_len=8192),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (the Chat-v1.0 model shares the config)
    Preset("tinyllama-1.1b", "causal-lm", "LlamaForCausalLM", "LlamaConfig",
           dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=2048,
                initializer_range=0.02, rms_norm_eps=1e-5, pretraining_tp=1, rope_theta=10000.0, rope_scaling=None,
                attention_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, use_cache=True),
           1_100_048_384, "tokens", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", seq_len=2048,
           aliases=("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama")),
    # mistralai/Mistral-7B-v0.1
    Preset("mistral-7b", "causal-lm", "MistralForCausalLM", "MistralConfig",
           _mistral(rope_theta=10000.0, sliding_window=4096), 7_241_732_096, "tokens",
           "mistralai/Mistral-7B-v0.1", seq_len=8192,
           aliases=("mistral-7b-v0.1", "mistralai/Mistral-7B-Instruct-v0.1")),
    # mistralai/Mistral-7B-Instruct-v0.2 (the base v0.2 was published by Mistral as a raw checkpoint only)
    Preset("mistral-7b-v0.2", "causal-lm", "MistralForCausalLM", "MistralConfig",
           _mistral(rope_theta=1000000.0, sliding_window=None), 7_241_732_096, "tokens",
           "mistralai/Mistral-7B-Instruct-v0.2", seq_len=8192, aliases=("mistral-community/Mistral-7B-v0.2",)),
    # microsoft/phi-2
    Preset("phi-2", "causal-lm", "PhiForCausalLM", "PhiConfig",
           dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, hidden_act="gelu_new", max_position_embeddings=2048,
                initializer_range=0.02, layer_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                partial_rotary_factor=0.4, qk_layernorm=False, resid_pdrop=0.1, embd_pdrop=0.0,
                attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
                use_cache=True),
           2_779_683_840, "tokens", "microsoft/phi-2", seq_len=2048),
    # microsoft/Phi-3-mini-4k-instruct
    Preset("phi-3-mini-4k", "causal-lm", "Phi3ForCausalLM", "Phi3Config",
           dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
                original_max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5,
                rope_theta=10000.0, rope_scaling=None, sliding_window=2047, attention_bias=False,
                attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=32000, pad_token_id=32000, use_cache=True),
           3_821_079_552, "tokens", "microsoft/Phi-3-mini-4k-instruct", seq_len=4096, aliases=("phi-3-mini",)),
    # google/gemma-2b
    Preset("gemma-2b", "causal-lm", "GemmaForCausalLM", "GemmaConfig", _gemma(2048, 16384, 18, 8, 1),
           2_506_172_416, "tokens", "google/gemma-2b", seq_len=8192),
    # google/gemma-7b
    Preset("gemma-7b", "causal-lm", "GemmaForCausalLM", "GemmaConfig", _gemma(3072, 24576, 28, 16, 16),
           8_537_680_896, "tokens", "google/gemma-7b", seq_len=8192),
    # google/gemma-2-2b
    Preset("gemma-2-2b", "causal-lm", "Gemma2ForCausalLM", "Gemma2Config", _gemma2(2304, 9216, 26, 8, 4),
           2_614_341_888, "tokens", "google/gemma-2-2b", seq_len=8192),
    # google/gemma-2-9b
    Preset("gemma-2-9b", "causal-lm", "Gemma2ForCausalLM", "Gemma2Config", _gemma2(3584, 14336, 42, 16, 8),
           9_241_705_984, "tokens", "google/gemma-2-9b", seq_len=8192),
    # tiiuae/falcon-7b (multi-query attention, parallel attention/MLP, tied embeddings)
    Preset("falcon-7b", "causal-lm", "FalconForCausalLM", "FalconConfig",
           dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, multi_query=True,
                parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False,
                apply_residual_connection_post_layernorm=False, layer_norm_epsilon=1e-5, hidden_dropout=0.0,
                attention_dropout=0.0, initializer_range=0.02, bos_token_id=11, eos_token_id=11, use_cache=True),
           6_921_720_704, "tokens", "tiiuae/falcon-7b", seq_len=2048),
    # stabilityai/stablelm-base-alpha-3b (a GPT-NeoX architecture; StableLmForCausalLM is the later 3B-4E1T)
    Preset("stablelm-base-alpha-3b", "causal-lm", "GPTNeoXForCausalLM", "GPTNeoXConfig",
           dict(vocab_size=50688, hidden_size=4096, num_hidden_layers=16, num_attention_heads=32,
                intermediate_size=16384, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                max_position_embeddings=4096, initializer_range=0.02, layer_norm_eps=1e-5,
                use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                use_cache=True),
           3_637_321_728, "tokens", "stabilityai/stablelm-base-alpha-3b", seq_len=4096,
           note="the model card says only '3B'; 3,637,321,728 is the count of the published architecture."),
    # bigscience/bloomz-7b1 (ALiBi, tied embeddings; the hub's "n_embed" is hidden_size)
    Preset("bloomz-7b1", "causal-lm", "BloomForCausalLM", "BloomConfig",
           dict(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32, layer_norm_epsilon=1e-5,
                initializer_range=0.02, apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
                attention_dropout=0.0, pretraining_tp=1, slow_but_exact=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=3, unk_token_id=0, use_cache=True),
           7_069_016_064, "tokens", "bigscience/bloomz-7b1", seq_len=2048),
    # bigscience/T0_3B (T5 v1.1 LM-adapted XL)
    Preset("t0-3b", "seq2seq", "T5ForConditionalGeneration", "T5Config", _t5_v1_1(2048, 5120, 32, 24, 32128),
           2_849_757_184, "tokens", "bigscience/T0_3B", seq_len=512, aliases=("t0",)),
    # bigscience/mt0-xxl (mT5-XXL)
    Preset("mt0-xxl", "seq2seq", "MT5ForConditionalGeneration", "MT5Config", _t5_v1_1(4096, 10240, 64, 24, 250112),
           12_921_057_280, "tokens", "bigscience/mt0-xxl", seq_len=512),
    # google/vit-base-patch16-224 = torchvision vit_b_16 (1000 classes)
    Preset("vit-b-16", "image-classification", "ViTForImageClassification", "ViTConfig", _vit(768, 12, 12, 3072, 16),
           86_567_656, "image", "google/vit-base-patch16-224", image_size=224, aliases=("vit-base-patch16-224",)),
    # google/vit-large-patch16-224 = torchvision vit_l_16
    Preset("vit-l-16", "image-classification", "ViTForImageClassification", "ViTConfig",
           _vit(1024, 24, 16, 4096, 16), 304_326_632, "image", "google/vit-large-patch16-224", image_size=224,
           aliases=("vit-large-patch16-224",)),
    # google/vit-huge-patch14-224-in21k with a 1000-class head = torchvision vit_h_14 at 224 px
    # (IMAGENET1K_SWAG_LINEAR_V1; the 518 px E2E weights have a longer position table: 633,470,440)
    Preset("vit-h-14", "image-classification", "ViTForImageClassification", "ViTConfig",
           _vit(1280, 32, 16, 5120, 14), 632_045_800, "image", "google/vit-huge-patch14-224-in21k", image_size=224,
           aliases=("vit-huge-patch14-224",)),
    # microsoft/resnet-50 = torchvision resnet50 (same layers, 1000 classes)
    Preset("resnet50", "image-classification", "ResNetForImageClassification", "ResNetConfig",
           dict(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False, num_labels=1000),
           25_557_032, "image", "microsoft/resnet-50", image_size=224),
]}


# -- lookup -------------------------------------------------------------------------------------------

def _key(name: str) -> str:
    """Spelling-insensitive key: case, "-", "_", "." and spaces do not matter ("Llama-2-7B" = "llama2_7b")."""
    return re.sub(r"[-_.\s]", "", name.lower())


def _index() -> dict[str, str]:
    index: dict[str, str] = {}
    for preset in PRESETS.values():
        spellings = (preset.name, preset.source, preset.source.rsplit("/", 1)[-1], *preset.aliases,
                     *(a.rsplit("/", 1)[-1] for a in preset.aliases))
        for spelling in spellings:
            key = _key(spelling)
            if index.setdefault(key, preset.name) != preset.name:
                raise RuntimeError(f"presets {index[key]!r} and {preset.name!r} share the spelling {spelling!r}")
    return index


_INDEX = _index()

# Chat and instruction-tuned releases ("-chat-hf", "-Instruct", "-it") keep their base model's architecture.
_VARIANT_SUFFIX = re.compile(r"[-_.\s](hf|chat|instruct|it)$", re.IGNORECASE)


def names() -> list[str]:
    """The canonical preset names, sorted."""
    return sorted(PRESETS)


def get(name: str | Preset) -> Preset:
    """The preset called ``name``, forgiving about spelling: ``"Llama-2-7B"``, ``"llama2_7b"``, the hub id
    ``"meta-llama/Llama-2-7b-hf"`` and its chat release ``"meta-llama/Llama-2-7b-chat-hf"`` all find
    ``llama-2-7b``, so a config can name a model the way its user knows it. Unknown names raise an
    :class:`~memguard.errors.InvalidArgumentError` that suggests the closest ones."""
    if isinstance(name, Preset):
        return name
    if not isinstance(name, str):
        raise InvalidArgumentError(f"a preset name must be a string, got {type(name).__name__}")
    found = None
    for spelling in (name, name.rsplit("/", 1)[-1]):
        while found is None:
            found = _INDEX.get(_key(spelling))
            shorter = _VARIANT_SUFFIX.sub("", spelling.strip())
            if shorter == spelling:
                break
            spelling = shorter
    if found is None:
        raise unknown_name("preset", name, PRESETS)
    return PRESETS[found]


# -- building -----------------------------------------------------------------------------------------

def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "building a preset needs the 'transformers' package: pip install 'memguard[transformers]'") from exc
    return transformers


def build(preset: str | Preset, *, num_labels: int | None = None, gradient_checkpointing: bool = False
          ) -> torch.nn.Module:
    """The preset's transformers model with every parameter and buffer on the meta device.

    Nothing is downloaded: the config is made from the preset's hyperparameters, and the model is constructed
    under ``torch.device("meta")`` so that no memory is used however large it is. ``num_labels`` resizes the
    head of the classification presets; ``gradient_checkpointing`` turns activation checkpointing on the way
    memguard does for a real run (:func:`memguard.checkpointing.enable`: transformers' own switch where the
    model has one, else ``torch.utils.checkpoint`` around its repeated blocks).
    """
    preset = get(preset)
    kwargs = preset.config_kwargs()
    if num_labels is not None:
        if preset.kind not in _CLASSIFIERS:
            raise InvalidArgumentError(
                f"num_labels applies to classification presets only; {preset.name!r} is a {preset.kind} model")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise InvalidArgumentError(f"num_labels must be a positive integer, got {num_labels!r}")
        kwargs["num_labels"] = num_labels
    transformers = _transformers()
    config = getattr(transformers, preset.config_class)(**kwargs)
    with torch.device("meta"):
        model = getattr(transformers, preset.model_class)(config)
    if kwargs.get("tie_word_embeddings") is False:
        _untie_output_embeddings(model)
    if gradient_checkpointing:
        try:
            checkpointing.enable(model)
        except ValueError as exc:
            raise InvalidArgumentError(f"cannot checkpoint {preset.name!r}: {exc}") from exc
    return model


def _untie_output_embeddings(model: torch.nn.Module) -> None:
    """Give the output projection its own weight where the published model has one but the config class
    ties it anyway.

    transformers 5 forces ``tie_word_embeddings=True`` in ``T5Config``/``MT5Config``; when it loads a
    T5 v1.1 checkpoint (T0, mT0) it finds a different ``lm_head.weight`` and leaves the two untied, so
    the trained model has ``vocab_size * d_model`` more parameters than ``Model(config)`` builds
    (65.8M for T0_3B, 1.02B for mt0-xxl). This does here what ``from_pretrained`` does there, and keeps a
    later ``tie_weights()`` from re-tying them.
    """
    output, input_ = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or input_ is None or output.weight is not input_.weight:
        return
    output.weight = torch.nn.Parameter(torch.empty_like(input_.weight))
    name = next(n for n, m in model.named_modules() if m is output) + ".weight"
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop(name, None)
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict) and name in keys:
        model._tied_weights_keys = {k: v for k, v in keys.items() if k != name}


def example_batch(preset: str | Preset, batch_size: int, seq_len: int | None = None, image_size: int | None = None,
                  device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """A training batch of the preset's input shape, as the model's forward takes it (``model(**batch)``).

    - causal-lm and masked-lm: ``input_ids`` and ``labels``, both ``(batch_size, seq_len)``;
    - sequence-classification: ``input_ids`` ``(batch_size, seq_len)`` and ``labels`` ``(batch_size,)``;
    - seq2seq: ``input_ids`` and ``labels``, both ``(batch_size, seq_len)``; the model derives the decoder
      inputs from the labels, as in training;
    - image-classification: ``pixel_values`` ``(batch_size, channels, image_size, image_size)`` and ``labels``.

    The values are zeros (token 0, class 0): the memory of a step depends on shapes, not values. The
    tensors are on the meta device unless ``device`` says otherwise.
    """
    preset = get(preset)
    _positive("batch_size", batch_size)
    if preset.input == "image":
        if seq_len is not None:
            raise InvalidArgumentError(f"{preset.name!r} takes images: give image_size, not seq_len")
        size = preset.image_size if image_size is None else _positive("image_size", image_size)
        fixed = preset.hyperparameters.get("image_size")
        if fixed is not None and size != fixed:
            raise InvalidArgumentError(
                f"{preset.name!r} is built for {fixed}x{fixed} images (its position embeddings are that long); "
                f"got image_size={size}")
        channels = preset.hyperparameters.get("num_channels", 3)
        return {"pixel_values": torch.zeros(batch_size, channels, size, size, device=device),
                "labels": torch.zeros(batch_size, dtype=torch.long, device=device)}
    if image_size is not None:
        raise InvalidArgumentError(f"{preset.name!r} takes tokens: give seq_len, not image_size")
    length = preset.seq_len if seq_len is None else _positive("seq_len", seq_len)
    ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    if preset.kind == "sequence-classification":
        labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    else:
        labels = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": labels}


def _positive(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{what} must be a positive integer, got {value!r}")
    return value
