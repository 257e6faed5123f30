"""How long ``memguard check`` takes end to end, and how much memory it needs, as a user runs it.

Each measurement is one ``memguard check`` process (imports, config loading, building the model on the meta
device, tracing, and the plan when one is searched), timed from outside; its peak RSS comes from the
kernel's accounting of that child (``os.wait4``), so runs do not contaminate each other. The config is
``examples/llama-2-7b.yaml`` (batch 1 x 4096 tokens, bf16-mixed, AdamW, A100-80GB), and the same with the
llama-2-70b preset. Neither fits an A100-80GB as configured, so:

- "as configured" (``--no-fallback``) measures one estimate: the targets (7B under 6 s and 1.5 GiB RSS,
  70B under 15 s) apply to it;
- "with plan" (the default) adds the planner's search, one estimate per candidate configuration.

Usage: python benchmarks/check_speed.py [--repeat 2] [--plan-70b]
Writes benchmarks/results/check_speed.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "examples/llama-2-7b.yaml"
TARGETS = {("llama-2-7b", "as configured"): (6.0, 1.5), ("llama-2-70b", "as configured"): (15.0, None)}
"""(seconds, GiB of RSS) each measurement should stay under; None: no target."""


def command() -> list[str]:
    script = shutil.which("memguard") or str(Path(sys.executable).with_name("memguard"))
    return [script] if Path(script).exists() else [sys.executable, "-m", "memguard"]


def measure(preset: str, with_plan: bool) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS bytes, exit code) of one ``memguard check`` run. CPU time (user +
    system) is what the run would take alone on an idle core; wall time grows with the machine's load."""
    argv = [*command(), "check", CONFIG, "--gpu", "A100-80GB", "--set", f"model.preset={preset}"]
    if not with_plan:
        argv.append("--no-fallback")
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode() if child.stderr else ""
    if child.returncode not in (0, 1, 3):
        raise SystemExit(f"memguard check failed ({child.returncode}):\n{stderr}")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, cpu, usage.ru_maxrss * 1024, child.returncode  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement (the machine may be busy)")
    parser.add_argument("--plan-70b", action="store_true", help="also time the 70B plan search (minutes)")
    args = parser.parse_args()
    cases = [("llama-2-7b", False), ("llama-2-7b", True), ("llama-2-70b", False)]
    if args.plan_70b:
        cases.append(("llama-2-70b", True))
    rows = []
    for preset, with_plan in cases:
        mode = "with plan" if with_plan else "as configured"
        for run in range(1, args.repeat + 1):
            seconds, cpu, rss, code = measure(preset, with_plan)
            limit_s, limit_gib = TARGETS.get((preset, mode), (None, None))
            verdict = []
            if limit_s is not None:
                verdict.append(f"{'ok' if seconds < limit_s else 'over'} (< {limit_s:g} s)")
            if limit_gib is not None:
                verdict.append(f"{'ok' if rss < limit_gib * 2**30 else 'over'} (< {limit_gib:g} GiB)")
            rows.append([preset, mode, str(run), f"{seconds:.1f}", f"{cpu:.1f}", f"{rss / 2**30:.2f}", str(code),
                         ", ".join(verdict) or "-"])
            print(" | ".join(rows[-1]), flush=True)
    notes = [
        "Wall time of the whole command (interpreter start, imports, config, model on meta, trace, plan, report);",
        "CPU s: its user + system time, close to what it takes on an idle machine (the check is single-threaded",
        "for the most part); peak RSS of that process from os.wait4. Exit code 1: does not fit as configured;",
        "3: fits with the plan. The machine may be running other work: compare runs, not single numbers.",
        f"Load average when the runs finished: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} cores.",
    ]
    print(write_table("check_speed.md", "memguard check: end-to-end time and memory",
                      ["model", "mode", "run", "wall s", "CPU s", "peak RSS (GiB)", "exit", "target (wall)"], rows,
                      notes))


if __name__ == "__main__":
    main()
