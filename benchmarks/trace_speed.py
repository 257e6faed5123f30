"""How long memguard takes to trace a large model's training steps, and how much memory it needs.

Each measurement runs in a fresh Python process so that its peak RSS is its own. The timed part starts
after imports: build the model on the meta device, then estimate() (two training steps: forward,
backward, optimizer step, zero_grad). PyTorch's MemTracker, run on the same model under fake tensors, is
timed the same way for comparison.

Usage: python benchmarks/trace_speed.py [--models llama-2-7b llama-2-70b] [--memtracker]
Writes benchmarks/results/trace_speed.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_table  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
import torch, memguard
import memguard.estimation, memguard.trace  # imports are not part of the timed work
from transformers import LlamaConfig, LlamaForCausalLM
from _common import llama_on_meta
name, tool, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = llama_on_meta(name)
ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
if tool == "memguard":
    est = memguard.estimate(model, {{"input_ids": ids, "labels": ids}}, optimizer="adamw",
                            precision="bf16-mixed", device="cuda")
    peak = est.peak_bytes
else:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    with FakeTensorMode() as mode:
        fake = model.to_empty(device="cpu")
        batch = {{"input_ids": torch.zeros(1, seq, dtype=torch.long), "labels": torch.zeros(1, seq, dtype=torch.long)}}
        opt = torch.optim.AdamW(fake.parameters(), foreach=True)
        mt = MemTracker()
        mt.track_external(fake, opt)
        with mt:
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = fake(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        peak = max(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "rss_mib": rss / 1024, "peak_gib": peak / 2**30}}))
"""


def run(name: str, tool: str, seq: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code, name, tool, str(seq)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-2-7b", "llama-2-13b", "llama-2-70b"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--memtracker", action="store_true", help="also time PyTorch's MemTracker (7B only)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        tools = ["memguard"] + (["MemTracker"] if args.memtracker and name == "llama-2-7b" else [])
        for tool in tools:
            r = run(name, tool, args.seq)
            print(name, tool, r, flush=True)
            if "error" in r:
                rows.append([name, tool, "error", "", r["error"][:80]])
            else:
                rows.append([name, tool, f"{r['seconds']:.2f}", f"{r['rss_mib']:.0f}", f"{r['peak_gib']:.2f}"])
    text = write_table(
        "trace_speed.md",
        "Trace speed: batch 1 x seq %d, bf16-mixed, AdamW, two training steps" % args.seq,
        ["model", "tool", "seconds (after imports)", "peak RSS MiB", "predicted peak GiB"],
        rows,
        ["Seconds include building the model on the meta device. Each row is a fresh process.",
         "Rerun: python benchmarks/trace_speed.py --memtracker"],
    )
    print(text)


if __name__ == "__main__":
    main()
