"""Run by tests/test_callback.py: a two-process DDP fit on the CPU (gloo) where each rank gets its own budget.

Usage: python ddp_callback_script.py OUT_DIR BUDGET_RANK0 BUDGET_RANK1 POLICY
Each rank writes what it applied to OUT_DIR/rank{N}.json.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from lit_models import LitDecoder, pl  # noqa: E402
from memguard.act.callback import MemGuard  # noqa: E402

out_dir, b0, b1, policy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rank = int(os.environ.get("LOCAL_RANK", "0"))
probe = policy == "probe"  # budget 1 byte under "warn": record what every configuration needs under DDP
sizing = policy == "max"  # MemGuard(batch_size="max"): the ranks must agree on one batch size
callback = MemGuard(policy="warn" if probe else "auto" if sizing else policy,
                    budget=1 if probe else (b0 if rank == 0 else b1), allow=["precision"],
                    batch_size="max" if sizing else None)
model = LitDecoder()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[callback])
result = {"rank": trainer.global_rank}
try:
    trainer.fit(model)
    result.update(applied=vars(callback.applied) if callback.applied else None, steps=trainer.global_step,
                  dtypes=sorted({str(d) for d in model.seen["dtype"]}), found=callback.found_batch_size,
                  batches=sorted(set(model.seen["batch"])))
    if probe:
        result["tried"] = [[vars(c), need] for c, need in callback.decision.plan.tried]
except Exception as exc:  # noqa: BLE001 - the test checks every rank aborted the same way
    result.update(error=type(exc).__name__, message=str(exc)[:200])
with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
    json.dump(result, fh)
