"""memguard's prediction against the measured CPU peak of real training steps, on the test zoo.

For each case the real steps run on the CPU under torch.profiler's allocator tracking (the ground truth of
tests/groundtruth.py), and memguard.estimate(device="cpu") predicts the same steps. The "24 B/param" column
is the usual rule of thumb for fp32 Adam training (weights + gradients + two moments + ~8 B of slack).

Usage: python benchmarks/accuracy_cpu.py      Writes benchmarks/results/accuracy_cpu.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

from _common import write_table  # noqa: E402
from test_estimate_accuracy import measured, predicted  # noqa: E402
from zoo import CASES  # noqa: E402


def main() -> None:
    rows, errors, rule_errors = [], [], []
    for case in CASES:
        real = measured(case)
        t0 = time.perf_counter()
        est = predicted(case)
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in case.build().parameters())
        rule = 24 * params
        err = (est.peak_bytes - real) / real
        rerr = (rule - real) / real
        errors.append(abs(err))
        rule_errors.append(abs(rerr))
        rows.append([case.name, case.precision, case.optimizer, f"{real:,}", f"{est.peak_bytes:,}", f"{err:+.2%}",
                     f"{rerr:+.1%}", f"{seconds:.2f}"])
        print(rows[-1], flush=True)
    rows.append(["**median abs error**", "", "", "", "", f"{statistics.median(errors):.2%}",
                 f"{statistics.median(rule_errors):.1%}", ""])
    rows.append(["**max abs error**", "", "", "", "", f"{max(errors):.2%}", f"{max(rule_errors):.1%}", ""])
    print(write_table(
        "accuracy_cpu.md",
        "Accuracy on the CPU ground truth (two training steps, peak of live tensor bytes)",
        ["case", "precision", "optimizer", "measured B", "memguard B", "memguard error", "24 B/param error",
         "estimate s"],
        rows,
        ["Measured: torch.profiler CPU allocator events of the real steps (tests/groundtruth.py).",
         "Rerun: python benchmarks/accuracy_cpu.py"],
    ))


if __name__ == "__main__":
    main()
