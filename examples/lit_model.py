"""A small LightningModule and DataModule for ``examples/lightningcli.yaml``.

Train it with LightningCLI (``python -m lightning.pytorch.cli``-style scripts, or your own ``main.py`` that
calls ``LightningCLI()``), and check it first with ``memguard check examples/lightningcli.yaml --gpu T4``:
memguard imports ``lit_model.LitModel``, builds it on the meta device and traces a step with its
``example_input_array`` resized to the data module's batch size and sequence length.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl


class LitModel(pl.LightningModule):
    """A small causal transformer language model."""

    def __init__(self, vocab_size: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8,
                 seq_len: int = 512, lr: float = 3e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(seq_len, hidden)
        block = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=False)
        self.example_input_array = torch.zeros(2, seq_len, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class RandomTokens(Dataset):
    def __init__(self, vocab_size: int, seq_len: int, length: int = 1024) -> None:
        self.vocab_size, self.seq_len, self.length = vocab_size, seq_len, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(self.vocab_size, (self.seq_len + 1,))
        return tokens[:-1], tokens[1:]


class TokenDataModule(pl.LightningDataModule):
    """Random token sequences: enough to run the example end to end."""

    def __init__(self, batch_size: int = 16, seq_len: int = 512, vocab_size: int = 32000) -> None:
        super().__init__()
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(self.vocab_size, self.seq_len), batch_size=self.batch_size)
