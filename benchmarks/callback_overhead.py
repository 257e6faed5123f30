"""What MemGuard adds to the start of a Lightning fit: a 1B-parameter Llama (Llama-3.2-1B shape) on the CPU.

The time is measured inside the callback's hooks (setup, where it decides, and on_fit_start), in a real
``Trainer.fit`` with the CPU accelerator, batch 1 x 256 tokens, AdamW, one training step.

Usage: python benchmarks/callback_overhead.py      Writes benchmarks/results/callback_overhead.md.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_table  # noqa: E402

warnings.filterwarnings("ignore")

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from memguard import presets  # noqa: E402
from memguard.act.callback import MemGuard  # noqa: E402


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        preset = presets.get("llama-3.2-1b")
        cfg = AutoConfig.for_model("llama", **preset.config_kwargs())
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=1e-5)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([torch.randint(0, 1000, (256,)) for _ in range(2)], batch_size=1)


class Timed(MemGuard):
    spent = 0.0

    def setup(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        t0 = time.perf_counter()
        super().setup(*args, **kwargs)
        Timed.spent += time.perf_counter() - t0

    def on_fit_start(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        t0 = time.perf_counter()
        super().on_fit_start(*args, **kwargs)
        Timed.spent += time.perf_counter() - t0


def main() -> None:
    model = Lit()
    params = sum(p.numel() for p in model.parameters())
    callback = Timed(policy="warn", budget="64GiB")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    t0 = time.perf_counter()
    trainer.fit(model)
    total = time.perf_counter() - t0
    est = callback.decision.estimate
    rows = [[f"{params:,}", "1 x 256", f"{Timed.spent:.2f}", f"{total:.1f}", f"{est.peak_bytes / 2**30:.2f}",
             est.peak_phase]]
    print(write_table("callback_overhead.md", "MemGuard's overhead at the start of a Lightning fit (CPU accelerator)",
                      ["parameters", "batch x seq", "seconds in MemGuard hooks", "whole fit (1 step) s",
                       "predicted peak GiB", "peak phase"], rows,
                      ["Rerun: python benchmarks/callback_overhead.py"]))


if __name__ == "__main__":
    main()
