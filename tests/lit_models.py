"""Small LightningModules for the callback tests: they record what training really ran with."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - either package works
    import pytorch_lightning as pl

from zoo import LlamaLike, tp_plan, Decoder


class Tokens(Dataset):
    def __init__(self, n: int = 64, t: int = 64, vocab: int = 512) -> None:
        self.data = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class LitDecoder(pl.LightningModule):
    """A GPT-style decoder; records activation dtypes, batch sizes and optimizer classes seen in training."""

    def __init__(self, batch_size: int = 8, lr: float = 1e-3, layers: int = 3, d: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.net = Decoder(layers=layers, d=d)
        self.seen: dict[str, list] = {"dtype": [], "batch": [], "optimizer": [], "lr": []}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        h = self.net.emb(batch)
        self.seen["dtype"].append(self.net.head(h).dtype)  # the dtype a matmul runs in right now
        self.seen["batch"].append(batch.shape[0])
        if self.trainer.optimizers:  # empty while memguard traces this step before training
            inner = self.trainer.optimizers[0]
            self.seen["optimizer"].append(type(inner).__name__)
            self.seen["lr"].append(float(inner.param_groups[0]["lr"]))  # torchao keeps it in a tensor
        loss = self.net(batch)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(), batch_size=self.batch_size)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LitTensorParallel(pl.LightningModule):
    """Lightning's ModelParallelStrategy pattern: configure_model parallelises the Llama-shaped decoder over
    ``self.device_mesh`` (torchtitan's plan on "tensor_parallel", FSDP2 over "data_parallel")."""

    def __init__(self, d: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.model = LlamaLike(d=d, layers=layers)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(self.model, self.device_mesh["tensor_parallel"], tp_plan())
        dp = self.device_mesh["data_parallel"]
        if dp.size() > 1:
            for i, block in enumerate(self.model.blocks):
                fully_shard(block, mesh=dp, reshard_after_forward=i < len(self.model.blocks) - 1)
            fully_shard(self.model, mesh=dp)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=1e-3)
