"""Run by tests/test_callback.py: a two-process Lightning fit under ModelParallelStrategy on the CPU (gloo),
MemGuard with a budget the run fits, reporting what it predicted.

Usage: python model_parallel_callback_script.py OUT_DIR
Each rank writes its prediction and the steps it trained to OUT_DIR/rank{N}.json.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

from torch.utils.data import DataLoader  # noqa: E402

from lit_models import LitTensorParallel, pl  # noqa: E402
from memguard.act.callback import MemGuard  # noqa: E402
from zoo import _ids  # noqa: E402


class Lit(LitTensorParallel):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(_ids(32, 128)), batch_size=8)


callback = MemGuard(policy="warn", budget=1 << 40)  # fits: one estimate, no plan search
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=pl.strategies.ModelParallelStrategy(), max_steps=2,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[callback])
trainer.fit(Lit())
est = callback.decision.estimate
with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as fh:
    json.dump({"steps": trainer.global_step, "per_rank": est.per_rank, "notes": est.notes}, fh)
