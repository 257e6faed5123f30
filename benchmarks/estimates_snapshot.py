"""Every estimate of the test zoo and of the published GPU points, to the byte, for before/after checks.

A change that should not alter any prediction (a restructuring, a speed-up) is checked by recording a
snapshot before it and comparing after:

    python benchmarks/estimates_snapshot.py --write /tmp/before.json
    ... change ...
    python benchmarks/estimates_snapshot.py --compare /tmp/before.json   # exit 1 on any difference

Zoo cases (tests/zoo.py) are estimated on the CPU as tests/test_estimate_accuracy.py does; published points
(benchmarks/data/gpu_measurements.yaml) as benchmarks/gpu_measurements.py predicts them, peers left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def _zoo(name: str) -> dict[str, Any]:
    import torch

    import memguard
    from memguard import checkpointing  # noqa: F401
    from zoo import CASES

    case = next(c for c in CASES if c.name == name)
    torch.manual_seed(0)
    est = memguard.estimate(
        case.build(), case.batch(), loss_fn=case.loss_fn, optimizer=case.optimizer, precision=case.precision,
        device="cpu", gradient_checkpointing=case.gradient_checkpointing,
        zero_grad_before_backward=case.zero_grad_before_backward, accumulate_grad_batches=case.accumulate,
    )
    return _numbers(est)


def _numbers(est: Any) -> dict[str, Any]:
    return {
        "peak_bytes": est.peak_bytes, "reserved_bytes": est.reserved_bytes, "device_bytes": est.device_bytes,
        "bound_bytes": est.bound_bytes, "breakdown": {str(k): v for k, v in sorted(est.breakdown.items())},
        "per_rank": list(getattr(est, "per_rank", None) or []),
    }


def _point(index: int) -> tuple[str, dict[str, Any]]:
    import gpu_measurements as gm

    gm._WITH_PEERS = False
    data = gm.load()
    entry = data["measurements"][index]
    with gm._quiet():
        result = gm.predict(entry, data)
    return entry["id"], {"status": result.status, "predicted_bytes": result.predicted_bytes,
                         "reason": result.reason}


def snapshot(jobs: int) -> dict[str, Any]:
    import gpu_measurements as gm
    from zoo import CASES

    names = [c.name for c in CASES]
    points = range(len(gm.load()["measurements"]))
    with ProcessPoolExecutor(jobs) as pool:
        zoo = dict(zip(names, pool.map(_zoo, names)))
        published = dict(pool.map(_point, points))
    return {"zoo": zoo, "published": published}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", type=Path, help="record the snapshot here")
    what.add_argument("--compare", type=Path, help="compare with a recorded snapshot; exit 1 on a difference")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    now = snapshot(args.jobs)
    if args.write:
        args.write.write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"{len(now['zoo'])} zoo estimates and {len(now['published'])} published points -> {args.write}")
        return 0
    before = json.loads(args.compare.read_text())
    now = json.loads(json.dumps(now))  # the same key types as the recorded file
    differ = [(section, key) for section in ("zoo", "published")
              for key in sorted(set(before[section]) | set(now[section]))
              if before[section].get(key) != now[section].get(key)]
    for section, key in differ:
        print(f"{section} {key}: before {before[section].get(key)} now {now[section].get(key)}")
    print(f"{len(differ)} difference(s) in {len(now['zoo'])} zoo estimates and {len(now['published'])} published points")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
