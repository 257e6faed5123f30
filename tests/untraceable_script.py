"""A user's script whose model memguard cannot trace, run by tests/test_untraceable_quiet.py in a fresh
process so that everything written to the file descriptors is seen.

    python tests/untraceable_script.py estimate|preflight NoFakeKernel|FakeKernelRaises

It prints "test: ready" before calling memguard and "test: done" after; what lies between must be only
memguard's error (printed by this script with a "test:" prefix).
"""

from __future__ import annotations

import sys

import torch

import memguard
import untraceable_models


def main(front_end: str, model_name: str) -> None:
    model = getattr(untraceable_models, model_name)()
    batch = torch.randn(4, 8)
    print("test: ready", flush=True)
    try:
        if front_end == "estimate":
            memguard.estimate(model, batch, device="cpu")
        else:
            memguard.preflight(model, batch, optimizer="adamw", device="cpu", policy="warn")
    except memguard.TraceError as exc:
        print(f"test: TraceError: {exc}", flush=True)
    print("test: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
