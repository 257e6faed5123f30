"""Tiny models that cover the shapes of real training: each case is small enough to train for real on the
CPU in a test, so memguard's prediction can be checked against a measured peak."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]
    optimizer: str = "adamw"
    precision: str = "32-true"
    gradient_checkpointing: bool | None = None
    zero_grad_before_backward: bool = False
    accumulate: int = 1
    loss_fn: Callable | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.features(x).flatten(1)), y)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(*[ResBlock(32) for _ in range(3)])
        self.head = nn.Linear(32, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class LSTMLM(nn.Module):
    def __init__(self, cell: type = nn.LSTM) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.rnn = cell(64, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return F.cross_entropy(self.head(h).flatten(0, 1), x.flatten())


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads, self.causal = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4, causal: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads, causal)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    """GPT-style decoder with SDPA; optional tied embeddings and in-model checkpointing."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 3, tied: bool = False, ckpt: bool = False,
                 positions: int = 256) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(1, positions, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.ckpt = ckpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class SplitAttention(nn.Module):
    """Separate q/k/v/o projections whose views infer the head count (-1): the layout tensor parallelism
    shards (Llama's, torchtitan's), each rank computing its own heads."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class GatedMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False), nn.Linear(
            4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.RMSNorm(d), SplitAttention(d, heads), nn.RMSNorm(d), GatedMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LlamaLike(nn.Module):
    """A Llama-shaped decoder (RMSNorm, split attention, gated MLP, untied head) for tensor parallelism."""

    def __init__(self, vocab: int = 512, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


def hf_llama_for_tp() -> nn.Module:
    """A small transformers Llama whose heads and MLP split over 2 or 4 ranks (its own tensor-parallel plan)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


def tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False) -> dict[str, Any]:
    """torchtitan's tensor-parallel plan for :class:`LlamaLike` blocks: q/k/v and gate/up column-wise, o and
    down row-wise; with ``sequence_parallel`` the norms work on sequence shards and each block's input is
    gathered from them (PrepareModuleInput), as torchtitan's ``apply_tp`` does; with ``loss_parallel`` the
    head's logits stay sharded over the vocabulary, for a loss and backward run under DTensor's
    ``loss_parallel()``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    out_layout = {"output_layouts": Shard(1)} if sequence_parallel else {}
    plan: dict[str, Any] = {}
    for i in ("*",):
        plan.update({f"blocks.{i}.attn.{p}": ColwiseParallel() for p in "qkv"})
        plan.update({f"blocks.{i}.mlp.{p}": ColwiseParallel() for p in ("gate", "up")})
        plan[f"blocks.{i}.attn.o"] = RowwiseParallel(**out_layout)
        plan[f"blocks.{i}.mlp.down"] = RowwiseParallel(**out_layout)
        if sequence_parallel:
            plan.update({f"blocks.{i}.norm1": SequenceParallel(), f"blocks.{i}.norm2": SequenceParallel()})
            gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan.update({f"blocks.{i}.attn": gather, f"blocks.{i}.mlp": gather})
    if loss_parallel:  # the head's output stays sharded over the vocabulary for the loss
        plan["head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if sequence_parallel:
        plan["emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        plan["norm"] = SequenceParallel()
        plan["head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    return plan


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(512, 128)
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cls = nn.Linear(128, 2)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.cls(self.enc(self.emb(ids))[:, 0]), labels)


class ViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, d: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList(Block(d, causal=False, dropout=0.0) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x[:, 0])), y)


class UNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()

        def blk(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        self.d1, self.d2, self.mid = blk(3, c), blk(c, 2 * c), blk(2 * c, 4 * c)
        self.up2, self.u2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), blk(4 * c, 2 * c)
        self.up1, self.u1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), blk(2 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        u = self.u2(torch.cat([self.up2(m), b], 1))
        u = self.u1(torch.cat([self.up1(u), a], 1))
        return F.binary_cross_entropy_with_logits(self.out(u), mask)


class FrozenBackbone(nn.Module):
    """A frozen feature extractor with a small trainable head (fine-tuning / linear probing)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU())
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.head = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.backbone(x)), y)


class LoRALinear(nn.Module):
    def __init__(self, d: int, r: int = 8) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.a, self.b = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))


class LoRAMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(LoRALinear(512), nn.ReLU(), LoRALinear(512), nn.ReLU(), LoRALinear(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).pow(2).mean()


class TracingAwareMask(nn.Module):
    """Builds a dense attention mask only when transformers' ``is_tracing`` says its positions are traced; an
    eager run reads them and lets SDPA's ``is_causal`` do the masking. The checkpointed blocks keep the mask
    alive until backward, so a trace that takes the tracing branch over-predicts."""

    def __init__(self, vocab: int = 512, d: int = 64, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def block(self, i: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv[i](x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return x + out.transpose(1, 2).reshape(b, t, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers.utils.import_utils import is_tracing

        b, t = ids.shape
        positions = torch.arange(t).expand(b, t)
        mask = None
        if is_tracing(positions) or not bool((positions[:, 0] == 0).all()):
            keep = torch.ones(t, t, dtype=torch.bool).tril()
            mask = torch.zeros(b, self.heads, t, t).masked_fill(~keep, float("-inf"))
        x = self.emb(ids)
        for i in range(len(self.qkv)):
            x = checkpoint(self.block, i, x, mask, use_reentrant=False)
        return F.cross_entropy(self.head(x).flatten(0, 1), ids.flatten())


def _hf_qwen3() -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Qwen3ForCausalLM(cfg)


def _hf_gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4)
    return GPTNeoXForCausalLM(cfg)


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _hf_switch() -> nn.Module:
    """SwitchTransformers' router converts its classifier with ``.to()`` inside every forward."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, num_experts=4, expert_capacity=64)
    return SwitchTransformersForConditionalGeneration(cfg)


def _seq2seq_batch(b: int = 2, t: int = 64) -> dict:
    ids = _ids(b, t)
    return {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}


def _ids(b: int = 4, t: int = 64, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))


def _lm_batch(b: int = 2, t: int = 64) -> dict:
    ids = _ids(b, t)
    return {"input_ids": ids, "labels": ids}


def _img(b: int, c: int, h: int) -> torch.Tensor:
    return torch.randn(b, c, h, h, generator=torch.Generator().manual_seed(0))


CASES = [
    Case("cnn_batchnorm", CNN, lambda: (_img(16, 3, 32), torch.randint(0, 10, (16,)))),
    Case("resnet_like_sgd_momentum", ResNetLike, lambda: _img(8, 3, 64), optimizer="sgd_momentum"),
    Case("lstm", LSTMLM, lambda: _ids(8, 32, 1000)),
    Case("gru_rmsprop", lambda: LSTMLM(nn.GRU), lambda: _ids(8, 32, 1000), optimizer="rmsprop"),
    Case("decoder_sdpa", Decoder, lambda: _ids(4, 64)),
    Case("encoder", Encoder, lambda: (_ids(4, 64), torch.randint(0, 2, (4,)))),
    Case("vit", ViT, lambda: (_img(8, 3, 32), torch.randint(0, 10, (8,)))),
    Case("unet", UNet, lambda: (_img(4, 3, 64), torch.rand(4, 1, 64, 64))),
    Case("tied_weights", lambda: Decoder(tied=True), lambda: _ids(4, 64)),
    Case("frozen_backbone", FrozenBackbone, lambda: (torch.randn(32, 256), torch.randint(0, 10, (32,)))),
    Case("lora_adapters_adam", LoRAMLP, lambda: torch.randn(64, 512), optimizer="adam"),
    Case("in_model_checkpointing", lambda: Decoder(ckpt=True), lambda: _ids(4, 64)),
    Case("memguard_checkpointing", Decoder, lambda: _ids(4, 64), gradient_checkpointing=True),
    Case("decoder_bf16_mixed", Decoder, lambda: _ids(4, 64), precision="bf16-mixed"),
    Case("vit_bf16_true", ViT, lambda: (_img(8, 3, 32), torch.randint(0, 10, (8,))), precision="bf16-true"),
    Case("decoder_lightning_order", Decoder, lambda: _ids(4, 64), zero_grad_before_backward=True),
    Case("decoder_accumulate_3", Decoder, lambda: _ids(4, 64), accumulate=3),
    Case("decoder_accumulate_lightning", Decoder, lambda: _ids(4, 64), accumulate=2, zero_grad_before_backward=True),
    Case("hf_llama", _hf_llama, _lm_batch),
    Case("hf_llama_bf16_mixed_ckpt", _hf_llama, _lm_batch, precision="bf16-mixed", gradient_checkpointing=True),
    Case("hf_gpt2", _hf_gpt2, _lm_batch),
    Case("hf_gpt2_adafactor", _hf_gpt2, _lm_batch, optimizer="adafactor"),
    Case("tracing_aware_mask", TracingAwareMask, lambda: _ids(4, 128)),
    Case("hf_qwen3_ckpt", _hf_qwen3, _lm_batch, gradient_checkpointing=True),
    Case("hf_gpt_neox_ckpt", _hf_gpt_neox, lambda: _lm_batch(4, 256), gradient_checkpointing=True),
    Case("hf_switch_transformers", _hf_switch, _seq2seq_batch),
]
