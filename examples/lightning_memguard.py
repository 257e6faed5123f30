"""MemGuard in a Lightning fit. Runs on the CPU in a few seconds; the budget stands in for a small GPU.

    python examples/lightning_memguard.py

With budget="100MiB" the run does not fit as configured; before the first step MemGuard applies the
cheapest plan that fits (here: micro-batches of 8 with 2 accumulation steps, the same effective batch)
and says so. Try policy="abort" to stop instead, or policy="warn".
"""

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from memguard import MemGuard


class TinyGPT(pl.LightningModule):
    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True, norm_first=True) for _ in range(layers)
        )
        self.head = nn.Linear(d, vocab)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = self.emb(batch)
        mask = nn.Transformer.generate_square_subsequent_mask(batch.shape[1])
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        self.log("loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self) -> DataLoader:
        data = torch.randint(0, self.hparams.vocab, (256, 128))
        return DataLoader(data, batch_size=self.batch_size)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


if __name__ == "__main__":
    guard = MemGuard(policy="auto", budget="100MiB")
    # no progress bar or model summary, so that memguard's lines before the first step stand out
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, callbacks=[guard], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyGPT())
    print(f"example: trained with precision={trainer.precision}, plan: {guard._summary()}")
