"""MemGuard in real multi-process Lightning fits on the CPU (gloo): ranks with different budgets agree on one
plan or one batch size, or abort together; ModelParallelStrategy trains on with memguard's fake mesh beside
it. Every scenario shares one two-process launch (a module fixture); the file is its own so the test workers
share it out."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> "Launch":
    """Every scenario of tests/ddp_callback_script.py, run in one two-process launch: each rank's result."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).with_name("ddp_callback_script.py")
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    return Launch({scenario: [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in (0, 1)
                              if (out / f"{scenario}_rank{r}.json").exists()]
                   for scenario in ("probe", "plan", "max", "abort", "model_parallel")}, proc.stderr)


class Launch:
    """Each scenario's per-rank results; a scenario that did not finish on both ranks fails its own tests
    with what the launch printed."""

    def __init__(self, results: dict[str, list[dict]], stderr: str) -> None:
        self.results, self.stderr = results, stderr

    def __getitem__(self, scenario: str) -> list[dict]:
        ranks = self.results[scenario]
        assert len(ranks) == 2, f"{scenario}: {self.stderr[-3000:]}"
        return ranks


@pytest.mark.slow
def test_ddp_ranks_with_different_budgets_apply_the_same_plan(launch) -> None:
    (base_cfg, base), (bf16_cfg, bf16) = launch["probe"][0]["tried"][:2]
    assert base_cfg["precision"] != "bf16-mixed" and bf16_cfg["precision"] == "bf16-mixed" and bf16 < base
    results = launch["plan"]  # rank 0's budget fits as configured, rank 1's only with bf16-mixed
    assert [r.get("error") for r in results] == [None, None]
    assert [r["applied"]["precision"] for r in results] == ["bf16-mixed", "bf16-mixed"]
    assert all(r["dtypes"] == ["torch.bfloat16"] and r["steps"] == 2 for r in results)


@pytest.mark.slow
def test_ddp_ranks_with_different_budgets_agree_on_one_batch_size(launch) -> None:
    results = launch["max"]  # 60 MiB on rank 0, 45 MiB on rank 1: rank 1's budget allows a smaller batch
    assert [r.get("error") for r in results] == [None, None], results
    found = {r["found"] for r in results}
    assert len(found) == 1 and 1 < min(found) < 22  # 22 fits rank 0's 60 MiB alone (single-process test)
    assert all(max(r["batches"]) == min(found) for r in results)


@pytest.mark.slow
def test_ddp_ranks_abort_together(launch) -> None:
    results = launch["abort"]  # rank 1 cannot fit at all
    assert [r.get("error") for r in results] == ["OutOfMemoryPredicted", "OutOfMemoryPredicted"]


@pytest.mark.slow
def test_model_parallel_strategy_is_predicted_and_training_goes_on(launch) -> None:
    """Under Lightning's ModelParallelStrategy (2 CPU ranks) the callback predicts each rank by running the
    module's configure_model on a fake mesh, the same bytes as memguard.estimate of the module with the
    strategy object; the real run then trains, its collectives untouched by the fake mesh."""
    results = launch["model_parallel"]
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lit_models import LitTensorParallel
    from memguard.estimation.distributed import estimate_distributed
    from zoo import _ids

    expected = estimate_distributed(LitTensorParallel(), _ids(8, 128), strategy=ModelParallelStrategy(tensor_parallel_size=2),
                                    world_size=2, device="cpu", zero_grad_before_backward=True,
                                    loss_fn=lambda m, b: m.training_step(b, 0))
    for r in results:
        assert r["steps"] == 2
        assert r["per_rank"] == expected.per_rank
        assert "configure_model" in r["notes"][0]
