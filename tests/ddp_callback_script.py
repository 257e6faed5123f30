"""Run by tests/test_callback_ddp.py: two-process fits on the CPU (gloo), one launch for every scenario.

Usage: python ddp_callback_script.py OUT_DIR
The scenarios run one after another in the same two processes, each with its own Trainer and budgets per
rank; each rank writes what each scenario applied to OUT_DIR/{scenario}_rank{N}.json:
- probe: budget 1 byte under "warn", what every configuration needs under DDP (the plan's tried list);
- plan: rank 0 fits as configured, rank 1 only with bf16-mixed (budgets read from the probe);
- max: MemGuard(batch_size="max") with 60 MiB on rank 0 and 45 MiB on rank 1: one batch size for both;
- abort: rank 1 cannot fit at all: both ranks stop before the first step;
- model_parallel: ModelParallelStrategy (tensor parallel over both ranks), a budget the run fits: what
  MemGuard predicted for each rank and the steps it trained.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

from torch.utils.data import DataLoader  # noqa: E402

from lit_models import LitDecoder, LitTensorParallel, pl  # noqa: E402
from memguard.act.callback import MemGuard  # noqa: E402
from zoo import _ids  # noqa: E402

out_dir = sys.argv[1]
rank = int(os.environ.get("LOCAL_RANK", "0"))


def write(scenario: str, global_rank: int, result: dict) -> None:
    with open(os.path.join(out_dir, f"{scenario}_rank{global_rank}.json"), "w") as fh:
        json.dump(result, fh)


def run(scenario: str, budgets: tuple[int, int], policy: str, batch_size: str | None = None) -> dict:
    callback = MemGuard(policy=policy, budget=budgets[rank], allow=["precision"], batch_size=batch_size)
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
        if scenario == "probe":
            result["tried"] = [[vars(c), need] for c, need in callback.decision.plan.tried]
    except Exception as exc:  # noqa: BLE001 - the test checks every rank aborted the same way
        result.update(error=type(exc).__name__, message=str(exc)[:200])
    write(scenario, trainer.global_rank, result)
    return result


class TensorParallel(LitTensorParallel):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(_ids(32, 128)), batch_size=8)


def model_parallel() -> None:
    callback = MemGuard(policy="warn", budget=1 << 40)  # fits: one estimate, no plan search
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=pl.strategies.ModelParallelStrategy(), max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(TensorParallel())
    est = callback.decision.estimate
    write("model_parallel", trainer.global_rank,
          {"steps": trainer.global_step, "per_rank": est.per_rank, "notes": est.notes})


probe = run("probe", (1, 1), "warn")
(_, base), (_, bf16) = probe["tried"][0], probe["tried"][1]
run("plan", (base + 2**20, bf16), "auto")  # rank 0 fits as configured, rank 1 only with bf16
run("max", (60 * 2**20, 45 * 2**20), "auto", batch_size="max")  # rank 1's budget allows a smaller batch
run("abort", (2**40, 2**20), "auto")  # rank 1 cannot fit at all
model_parallel()
