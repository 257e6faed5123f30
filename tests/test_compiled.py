"""torch.compile: the compiled training step predicted against the real compiled step on the CPU (inductor).

Each model is written here for one mechanism (fusion of a pointwise chain, SDPA, BatchNorm, autocast,
checkpointing, per-block compile, a graph break). The truth is the real peak of live tensor bytes of two
compiled AdamW steps (tests/groundtruth.py), measured without memguard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import memguard
from groundtruth import measure_compiled_peak, measure_peak
from memguard.trace.compiled import CompileSpec, find_compiled

TOLERANCE = 0.03


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


class GatedBlock(nn.Module):
    """A long pointwise chain between matrix products: inductor fuses it, eager keeps every intermediate."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.norm, self.up, self.gate, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        u, v = self.up(h), self.gate(h)
        return x + self.down(F.silu(u) * v * torch.tanh(u) + 0.5 * u)


class Attention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out, self.norm = heads, nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, layers: int = 1, checkpointed: bool = False, graph_break: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.layers = nn.ModuleList(Attention() for _ in range(layers))
        self.head = nn.Linear(64, 256)
        self.checkpointed, self.graph_break = checkpointed, graph_break

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = checkpoint(layer, x, use_reentrant=False) if self.checkpointed else layer(x)
            if self.graph_break and i == 0:
                torch._dynamo.graph_break()
        return F.cross_entropy(self.head(x).flatten(0, 1), tokens.flatten())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 16), (16, 32)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features, self.head = nn.Sequential(*layers), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def decoder_loss(model, tokens):
    return model(tokens)


TOKENS = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))


def _compare(model, batch, *, compile_fn=torch.compile, loss_fn=None, precision="32-true", autocast=None):
    truth = measure_compiled_peak(model, batch, adamw, compile_fn=compile_fn, loss_fn=loss_fn, autocast_dtype=autocast)
    est = memguard.estimate(compile_fn(model), batch, optimizer="adamw", device="cpu", loss_fn=loss_fn,
                            precision=precision)
    assert est.compiled.startswith("compiled (inductor)"), est.notes
    assert abs(est.peak_bytes - truth) <= TOLERANCE * truth, (est.peak_bytes, truth)
    return est, truth


def test_a_fused_pointwise_chain_is_predicted_compiled_not_eager() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(GatedBlock(), GatedBlock())
    batch = torch.randn(8, 64, 64)
    est, truth = _compare(model, batch)
    eager_truth = measure_peak(model, batch, adamw)
    # the mechanism matters here: eager keeps the chain's intermediates, so eager would be far off
    assert eager_truth > 1.2 * truth
    eager = memguard.estimate(model, batch, optimizer="adamw", device="cpu")
    assert abs(eager.peak_bytes - eager_truth) <= 0.02 * eager_truth
    # compile=False predicts the compiled model as eager: the same figure as the plain model's
    assert memguard.estimate(torch.compile(model), batch, optimizer="adamw", device="cpu",
                             compile=False).peak_bytes == eager.peak_bytes
    # compile=True predicts the plain model as torch.compile(model) runs
    assert memguard.estimate(model, batch, optimizer="adamw", device="cpu", compile=True).peak_bytes == est.peak_bytes


def test_decoder_with_sdpa() -> None:
    torch.manual_seed(0)
    _compare(Decoder(), TOKENS, loss_fn=decoder_loss)


def test_convnet_with_batchnorm() -> None:
    torch.manual_seed(0)
    _compare(ConvNet(), torch.randn(8, 3, 32, 32))


def test_bf16_mixed_under_compile() -> None:
    torch.manual_seed(0)
    _compare(nn.Sequential(GatedBlock()), torch.randn(8, 64, 64), precision="bf16-mixed",
             autocast=torch.bfloat16)


def test_checkpointing_under_compile() -> None:
    torch.manual_seed(0)
    _compare(Decoder(checkpointed=True), TOKENS, loss_fn=decoder_loss)


def test_per_block_compile() -> None:
    torch.manual_seed(0)

    def per_block(model: nn.Module) -> nn.Module:
        for layer in model.layers:
            layer.compile()
        return model

    est, _ = _compare(Decoder(layers=2), TOKENS, compile_fn=per_block, loss_fn=decoder_loss)
    assert "layers.0" in est.compiled and "layers.1" in est.compiled and "whole model" not in est.compiled


def test_a_graph_break_runs_each_graph_on_its_own() -> None:
    torch.manual_seed(0)
    _compare(Decoder(layers=2, graph_break=True), TOKENS, loss_fn=decoder_loss)


def test_compile_spec_reads_what_torch_compile_was_given() -> None:
    model = nn.Linear(4, 4)
    (part,) = find_compiled(torch.compile(model, mode="max-autotune-no-cudagraphs", fullgraph=True))
    assert part.path == "" and part.spec.backend == "inductor" and part.spec.fullgraph
    assert part.spec.options.get("max_autotune") is True
    (part,) = find_compiled(torch.compile(model, backend="aot_eager"))
    assert part.spec.backend == "aot_eager"
    assert CompileSpec.parse({"mode": "max-autotune"}).options["max_autotune"] is True
    with pytest.raises(memguard.InvalidArgumentError, match="compile: mode must be one of"):
        CompileSpec.parse({"mode": "fastest"})
    with pytest.raises(memguard.InvalidArgumentError, match="compile: unknown torch.compile backend or mode "
                                                            "'inductr'. Did you mean 'inductor'"):
        CompileSpec.parse("inductr")
    assert CompileSpec.parse("aot_eager").backend == "aot_eager"


def test_a_backend_memguard_cannot_run_is_predicted_eager_and_says_so() -> None:
    model = nn.Sequential(GatedBlock())
    batch = torch.randn(2, 8, 64)

    def custom(gm, example_inputs):
        return gm.forward

    est = memguard.estimate(torch.compile(model, backend=custom), batch, optimizer="adamw", device="cpu")
    assert est.compiled == ""
    assert any("predicted as eager" in n for n in est.notes)
    assert est.peak_bytes == memguard.estimate(model, batch, optimizer="adamw", device="cpu").peak_bytes


def test_lightning_fit_of_a_compiled_module_is_predicted_compiled() -> None:
    import warnings

    from lit_models import pl
    from memguard.act.callback import MemGuard
    from torch.utils.data import DataLoader

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(GatedBlock())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self(batch).square().mean()

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.randn(16, 64, 64), batch_size=8)

    torch.manual_seed(0)
    lit = Lit()
    guard = MemGuard(policy="warn", budget="4GiB")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(torch.compile(lit))
    est = guard.decision.estimate
    assert trainer.global_step == 1
    assert est.compiled == "compiled (inductor): whole model", est.notes
    batch = torch.randn(8, 64, 64)
    eager = memguard.estimate(lit, batch, optimizer="adamw", device="cpu", compile=False,
                              loss_fn=lambda m, b: m.training_step(b, 0), zero_grad_before_backward=True)
    assert est.peak_bytes < eager.peak_bytes  # the fused chain is not kept, as in the compiled run


def test_a_config_compile_key_predicts_the_compiled_step(tmp_path) -> None:
    from memguard.act.check import run_check
    from memguard.spec.problems import ConfigError
    from memguard.spec.config import load_config

    path = tmp_path / "config.yaml"
    base = ("model: {class_path: torch.nn.Linear, init_args: {in_features: 64, out_features: 64}}\n"
            "optimizer: adamw\ngpu: A100-80GB\nmemguard: {example_batch: {shape: [8, 64], dtype: float32}}\n")
    path.write_text(base + "compile: {mode: max-autotune-no-cudagraphs}\n")
    result = run_check(load_config(path))
    assert result.targets[0].estimate.compiled == "compiled (inductor): whole model"
    assert any("max_autotune" in n for n in result.targets[0].estimate.notes)
    path.write_text(base + "trainer: {compile: true}\n")
    assert load_config(path).compile == CompileSpec()
    path.write_text(base + "compile: {mode: fastest}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: compile: mode must be one of default, reduce-overhead"):
        load_config(path)


def test_transformers_torch_compile_arguments_are_read(tmp_path) -> None:
    from transformers import TrainingArguments

    from memguard.integrations.hf import _compile_of

    args = TrainingArguments(output_dir=str(tmp_path), torch_compile=True, report_to=[],
                             torch_compile_mode="max-autotune-no-cudagraphs")
    spec = CompileSpec.parse(_compile_of(args))
    assert spec.backend == "inductor" and spec.options["max_autotune"] is True
    assert _compile_of(TrainingArguments(output_dir=str(tmp_path), report_to=[])) is None


def test_a_distributed_strategy_says_the_compiled_model_is_predicted_eager() -> None:
    model = nn.Sequential(GatedBlock())
    est = memguard.estimate(torch.compile(model), torch.randn(2, 8, 64), optimizer="adamw", device="cpu",
                            strategy="ddp", world_size=2)
    assert any("distributed strategy is predicted as eager" in n for n in est.notes), est.notes


def test_the_real_compiled_run_after_an_estimate_computes_what_eager_computes() -> None:
    """memguard's analysis compiles with no-op kernels: nothing of it may be reused by the user's real compile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU())
    batch = torch.randn(4, 16)
    memguard.estimate(torch.compile(model), batch, optimizer="adamw", device="cpu")
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(batch), model(batch))
