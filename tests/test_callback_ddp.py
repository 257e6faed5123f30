"""MemGuard in real multi-process Lightning fits on the CPU (gloo): ranks with different budgets agree on one
plan or one batch size, or abort together; LightningCLI builds the callback from YAML; ModelParallelStrategy
trains on with memguard's fake mesh beside it. The DDP scenarios share one launch (a module fixture); the
file is its own so the test workers share it out."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, list[dict]]:
    """Every scenario of tests/ddp_callback_script.py, run in one two-process launch: each rank's result."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).with_name("ddp_callback_script.py")
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    results = {}
    for scenario in ("probe", "plan", "max", "abort"):
        ranks = [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in (0, 1)
                 if (out / f"{scenario}_rank{r}.json").exists()]
        assert len(ranks) == 2, f"{scenario}: {proc.stderr[-3000:]}"
        results[scenario] = ranks
    return results


@pytest.mark.slow
def test_ddp_ranks_with_different_budgets_apply_the_same_plan(ddp) -> None:
    (base_cfg, base), (bf16_cfg, bf16) = ddp["probe"][0]["tried"][:2]
    assert base_cfg["precision"] != "bf16-mixed" and bf16_cfg["precision"] == "bf16-mixed" and bf16 < base
    results = ddp["plan"]  # rank 0's budget fits as configured, rank 1's only with bf16-mixed
    assert [r.get("error") for r in results] == [None, None]
    assert [r["applied"]["precision"] for r in results] == ["bf16-mixed", "bf16-mixed"]
    assert all(r["dtypes"] == ["torch.bfloat16"] and r["steps"] == 2 for r in results)


@pytest.mark.slow
def test_ddp_ranks_with_different_budgets_agree_on_one_batch_size(ddp) -> None:
    results = ddp["max"]  # 60 MiB on rank 0, 45 MiB on rank 1: rank 1's budget allows a smaller batch
    assert [r.get("error") for r in results] == [None, None], results
    found = {r["found"] for r in results}
    assert len(found) == 1 and 1 < min(found) < 22  # 22 fits rank 0's 60 MiB alone (single-process test)
    assert all(max(r["batches"]) == min(found) for r in results)


@pytest.mark.slow
def test_ddp_ranks_abort_together(ddp) -> None:
    results = ddp["abort"]  # rank 1 cannot fit at all
    assert [r.get("error") for r in results] == ["OutOfMemoryPredicted", "OutOfMemoryPredicted"]


@pytest.mark.slow
def test_lightningcli_config_with_memguard(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  max_steps: 2\n  logger: false\n"
        "  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n    - class_path: memguard.MemGuard\n      init_args:\n        policy: abort\n"
        "        budget: 1MiB\n        allow: [precision]\n"
        "model:\n  batch_size: 8\n"
    )
    main = Path(__file__).with_name("lit_cli_main.py")
    proc = subprocess.run([sys.executable, str(main), "fit", "--config", str(config)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "OutOfMemoryPredicted" in proc.stderr and "1.00 MiB available (budget)" in proc.stderr
    config.write_text(config.read_text().replace("budget: 1MiB", "budget: 8GiB"))
    proc = subprocess.run([sys.executable, str(main), "fit", "--config", str(config)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "It fits" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_model_parallel_strategy_is_predicted_and_training_goes_on(tmp_path) -> None:
    """Under Lightning's ModelParallelStrategy (2 CPU ranks) the callback predicts each rank by running the
    module's configure_model on a fake mesh, the same bytes as memguard.estimate of the module with the
    strategy object; the real run then trains, its collectives untouched by the fake mesh."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("model_parallel_callback_script.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)
               if (tmp_path / f"rank{r}.json").exists()]
    assert len(results) == 2, proc.stderr[-3000:]
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
