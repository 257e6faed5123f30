"""A user's script for each memguard front end, run by tests/test_quiet.py in a fresh process so that
imports happen there and what C++ writes to the file descriptors is captured too.

    python tests/quiet_frontends.py estimate|preflight|lightning|hf

Everything this script prints itself starts with "test:". It configures logging and warnings the way a
user might, builds its model (and Trainer), prints "test: ready", calls memguard, and reports whether
memguard left that configuration as it found it. What the libraries print while the user imports them and
builds the Trainer comes before "test: ready"; the test reads what follows.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

USER_LOGGER = "my_project"
READY = "test: ready"


def user_configuration() -> None:
    """A user's own settings: a handler on their logger, a level, a warnings filter."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("test: user log: %(message)s"))
    logger = logging.getLogger(USER_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message="a user's own filter")
    import sympy  # noqa: F401 - torch imports it while tracing, and it adds a warnings filter of its own then


def snapshot() -> tuple:
    """What memguard must leave as it found it."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    levels = {lg.name: lg.level for lg in loggers}
    filters = {(lg.name, i): list(h.filters) for lg in loggers for i, h in enumerate(lg.handlers)}
    return (list(warnings.filters), warnings.showwarning, logging.root.manager.disable, levels, filters,
            list(logging.lastResort.filters) if logging.lastResort else None)


def checked(call: Callable[[], Any]) -> Any:
    """Run a front end; say whether the user's configuration survived, and that the user's logger works."""
    print(READY, flush=True)
    before = snapshot()
    result = call()
    after = snapshot()
    # loggers the libraries created meanwhile are theirs: compare the ones that existed before
    # the user's filters must all still be there, in their order; a library that memguard imports (torchao)
    # may add its own
    same = ([f for f in after[0] if f in before[0]] == before[0] and before[1] is after[1] and before[2] == after[2]
            and all(after[3].get(k) == v for k, v in before[3].items())
            and all(after[4].get(k) == v for k, v in before[4].items()) and before[5] == after[5])
    print("test: user configuration unchanged" if same else "test: USER CONFIGURATION CHANGED", flush=True)
    logging.getLogger(USER_LOGGER).info("after the call")
    return result


class Block(nn.Module):
    """A convolution, a LayerNorm and attention: all probed on the CPU."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.norm(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batch(n: int = 8, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 16, width), torch.randint(0, 10, (n,))


def run_estimate() -> None:
    import memguard

    result = checked(lambda: memguard.estimate(Block(), batch(), loss_fn=loss_fn, device="cpu"))
    print(f"test: estimate peak {result.peak_bytes} bytes", flush=True)


def run_preflight() -> None:
    import memguard

    model = Block(64)
    optimizer = torch.optim.AdamW(model.parameters())
    decision = checked(lambda: memguard.preflight(model, batch(64, 64), optimizer=optimizer, loss_fn=loss_fn,
                                                  device="cpu", budget="1MiB", policy="warn"))
    print(f"test: fits {decision.fits}; planned {decision.plan is not None}", flush=True)
    loaded = sorted(name for name in ("torchao", "bitsandbytes") if name in sys.modules)
    print(f"test: optimizer libraries imported: {', '.join(loaded) or 'none'}", flush=True)


def run_lightning() -> None:
    import pytorch_lightning as pl

    from memguard import MemGuard

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Block(64)
            self.batch_size = 32

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

        def train_dataloader(self) -> Any:
            data = torch.utils.data.TensorDataset(*batch(256, 64))
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

    # Lightning's own warnings in its fit loop, outside memguard's hooks: a user silences them like this
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    guard = MemGuard(budget="1.5MiB", policy="auto")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=[guard], enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False)
    checked(lambda: trainer.fit(Module()))
    print(f"test: fit done after {trainer.global_step} steps; planned {bool(guard.changes)}", flush=True)


def run_hf() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

    from memguard.integrations.hf import MemGuardCallback

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 128, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                                 report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MemGuardCallback(policy="warn",
                                                                                                   budget="300KiB")])
        trainer.remove_callback(PrinterCallback)  # the user's choice: no metrics dict on stdout
        checked(trainer.train)
        print(f"test: trained {trainer.state.global_step} steps", flush=True)


FRONT_ENDS = {"estimate": run_estimate, "preflight": run_preflight, "lightning": run_lightning, "hf": run_hf}

if __name__ == "__main__":
    user_configuration()
    FRONT_ENDS[sys.argv[1]]()
