"""How fast memguard predicts, and how much memory it needs, from a 125M to a 70B model.

Three things are timed, each in a fresh process so that its peak RSS is its own:

- ``estimate``: ``memguard.estimate(model, batch, optimizer="adamw", precision="bf16-mixed", device="cuda",
  gpu="A100-80GB")`` on a model built on the meta device (batch 1 x seq 4096). Wall seconds count from
  after the imports: building the model on meta plus the estimate.
- ``check``: the command ``memguard check CONFIG --gpu A100-80GB --json``, CONFIG a temporary YAML
  (``model: {preset: NAME}``, ``data: {batch_size: 1, seq_len: 4096}``, ``optimizer: adamw``,
  ``trainer: {precision: bf16-mixed}``). Wall seconds of the whole command, interpreter start and imports
  included, since that is what a user waits for; when the run does not fit, the command also plans
  fallbacks, and that is timed too.
- ``MemTracker``: PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` around the same two
  training steps (forward under bf16 autocast, backward, AdamW foreach step, zero_grad) of the model turned
  into fake tensors (``FakeTensorMode``, ``to_empty``), for the models where that takes reasonable time.

Each measurement runs twice and the faster run is kept (the machine may be shared with other work).

Usage: python benchmarks/speed.py [--models 125M 1B 7B 13B 70B] [--repeats 2] [--memtracker 125M 1B 7B]
Writes benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import LLAMA_SHAPES, write_table  # noqa: E402

BENCH = Path(__file__).parent
GPU = "A100-80GB"
SEQ = 4096

MODELS = {
    # label: (preset name, or None for the llama-125m shape of _common.LLAMA_SHAPES, which no preset has)
    "125M": None,
    "1B": "llama-3.2-1b",
    "7B": "llama-2-7b",
    "13B": "llama-2-13b",
    "70B": "llama-2-70b",
}

CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {bench!r})
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
import memguard, memguard.estimation, memguard.trace, memguard.presets
from _common import llama_on_meta
label, preset, tool, seq, gpu = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = llama_on_meta("llama-125m") if preset == "-" else memguard.presets.build(preset)
params = sum(p.numel() for p in model.parameters())
if tool == "estimate":
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    est = memguard.estimate(model, {{"input_ids": ids, "labels": ids}}, optimizer="adamw",
                            precision="bf16-mixed", device="cuda", gpu=gpu)
    peak = est.peak_bytes
else:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    with FakeTensorMode(allow_non_fake_inputs=True):  # to_empty reads the meta parameters
        fake = model.to_empty(device="cpu")
        ids = torch.zeros(1, seq, dtype=torch.long)
        batch = {{"input_ids": ids, "labels": ids}}
        opt = torch.optim.AdamW(fake.parameters(), foreach=True)
        mt = MemTracker()
        mt.track_external(fake, opt, ids)
        with mt:
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = fake(**batch).loss
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
                mt.reset_mod_stats()
        peak = sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "rss_mib": rss / 1024, "import_rss_mib": rss0 / 1024,
                  "peak_bytes": int(peak), "params": params}}))
"""


def _last_json(text: str) -> dict | None:
    """The whole output as JSON (``check --json`` prints an indented document), else its last JSON line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _spawn(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str, float, float]:
    """Run cmd; (exit code, stdout, stderr, wall seconds, peak RSS MiB of the child from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -9
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status) if status != -9 else -9
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), wall, usage.ru_maxrss / 1024


def in_process(label: str, tool: str, timeout: float) -> dict:
    """One measurement of estimate / MemTracker in a fresh interpreter."""
    preset = MODELS[label] or "-"
    code = CHILD.format(bench=str(BENCH))
    rc, out, err, _wall, _rss = _spawn([sys.executable, "-c", code, label, preset, tool, str(SEQ), GPU], timeout)
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return {"error": "timed out" if rc == -9 else (lines[-1][:120] if lines else f"exit {rc}")}
    data = _last_json(out)
    return data if data is not None else {"error": "no result printed"}


def _memguard_cli() -> list[str] | None:
    exe = shutil.which("memguard") or str(Path(sys.executable).with_name("memguard"))
    if Path(exe).exists():
        return [exe]
    return [sys.executable, "-m", "memguard"]


def _check_config(label: str, folder: Path) -> Path:
    preset = MODELS[label]
    if preset is None:  # no preset has the 125M Llama shape: give its config.json instead
        from transformers import LlamaConfig

        cfg = LlamaConfig(max_position_embeddings=SEQ, **LLAMA_SHAPES["llama-125m"])
        cfg.to_json_file(str(folder / "llama-125m.json"))
        model = "model: {hf_config: llama-125m.json}"
    else:
        model = f"model: {{preset: {preset}}}"
    path = folder / f"{label}.yaml"
    path.write_text(f"{model}\ndata: {{batch_size: 1, seq_len: {SEQ}}}\noptimizer: adamw\n"
                    "trainer: {precision: bf16-mixed}\n")
    return path


def check_available() -> str | None:
    """None when ``memguard check`` exists, else why not."""
    rc, _out, err, _w, _r = _spawn([*_memguard_cli(), "check", "--help"], 120)
    if rc != 0:
        return (err.strip().splitlines() or [f"exit {rc}"])[-1][:120]
    return None


def cli_check(label: str, folder: Path, timeout: float) -> dict:
    config = _check_config(label, folder)
    rc, out, err, wall, rss = _spawn([*_memguard_cli(), "check", str(config), "--gpu", GPU, "--json"], timeout)
    if rc == -9:
        return {"error": f"timed out after {timeout:.0f} s"}
    if rc not in (0, 1, 3):
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return {"error": f"exit {rc}: {lines[-1][:120] if lines else ''}"}
    data = _last_json(out) or {}
    verdict = {0: "fits", 1: "does not fit", 3: "fits with plan"}[rc]
    plan = data.get("plan") if isinstance(data, dict) else None
    if isinstance(plan, dict) and plan.get("tried"):
        verdict += f" ({plan['tried']} plans tried)"
    configured = data.get("as_configured") if isinstance(data, dict) else None
    peak = configured.get("peak_bytes") if isinstance(configured, dict) else _find_peak(data)
    return {"seconds": wall, "rss_mib": rss, "verdict": verdict, "peak_bytes": peak}


def _find_peak(data) -> int | None:
    """The first ``peak_bytes`` in the check's JSON, wherever its schema puts it."""
    if isinstance(data, dict):
        if isinstance(data.get("peak_bytes"), int):
            return data["peak_bytes"]
        values = data.values()
    elif isinstance(data, list):
        values = data
    else:
        return None
    for v in values:
        found = _find_peak(v)
        if found is not None:
            return found
    return None


def best_of(repeats: int, measure) -> dict:
    """Run ``measure`` ``repeats`` times; keep the fastest successful run."""
    runs = []
    for _ in range(repeats):
        runs.append(measure())
        if "timed out" in runs[-1].get("error", ""):
            break  # a second try would time out too
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    best = min(good, key=lambda r: r["seconds"])
    best["all_seconds"] = [round(r["seconds"], 2) for r in good]
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--memtracker", nargs="*", default=["125M", "1B", "7B"], choices=list(MODELS),
                        help="models to time MemTracker on (under fake tensors)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to one measurement")
    parser.add_argument("--check-timeout", type=float, default=300, help="seconds allowed to one `memguard check`")
    parser.add_argument("--no-check", action="store_true", help="skip the `memguard check` command")
    parser.add_argument("--output", default="speed.md", help="file name under benchmarks/results")
    args = parser.parse_args(argv)

    check_missing = "skipped (--no-check)" if args.no_check else check_available()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            tools = ["estimate", "check"] + (["MemTracker"] if label in args.memtracker else [])
            for tool in tools:
                if tool == "check":
                    if check_missing:
                        r = {"error": f"n/a: `memguard check` unavailable ({check_missing})"}
                    else:
                        r = best_of(args.repeats, lambda label=label: cli_check(label, Path(tmp), args.check_timeout))
                else:
                    r = best_of(args.repeats, lambda label=label, tool=tool: in_process(label, tool, args.timeout))
                results[(label, tool)] = r
                print(label, tool, r, flush=True)

    params = {label: next((r["params"] for (lab, _t), r in results.items() if lab == label and "params" in r), None)
              for label in args.models}
    names = {label: MODELS[label] or "llama-125m shape" for label in args.models}
    tool_names = {"estimate": "memguard.estimate", "check": "memguard check (CLI)", "MemTracker": "MemTracker (fake)"}
    for (label, tool), r in results.items():
        who = f"{label} ({names[label]}, {params[label] / 1e9:.2f}B)" if params[label] else f"{label} ({names[label]})"
        if "error" in r:
            rows.append([who, tool_names[tool], "n/a", "n/a", "n/a", r["error"]])
            continue
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else ""
        extra = r.get("verdict", "")
        if "all_seconds" in r and len(r["all_seconds"]) > 1:
            extra = (extra + "; " if extra else "") + "runs: " + ", ".join(f"{s:.2f}" for s in r["all_seconds"])
        rows.append([who, tool_names[tool], f"{r['seconds']:.2f}", f"{r['rss_mib']:.0f}", peak, extra])

    ratios = []
    for label in args.models:
        a, b = results.get((label, "estimate")), results.get((label, "MemTracker"))
        if a and b and "error" not in a and "error" not in b:
            ratios.append(f"- {label}: memguard.estimate / MemTracker time = {a['seconds']:.2f} / "
                          f"{b['seconds']:.2f} s = {a['seconds'] / b['seconds']:.2f} "
                          f"(MemTracker {b['seconds'] / a['seconds']:.1f}x slower)")
    text = write_table(
        args.output,
        f"Speed and memory: batch 1 x seq {SEQ}, bf16-mixed, AdamW, target {GPU}, two training steps",
        ["model", "tool", "seconds", "peak RSS MiB", "predicted peak GiB", "notes"],
        rows,
        ["Each row is the faster of %d runs, each in a fresh process (the machine was shared with other work, "
         "so single runs vary); the notes list every run's seconds." % args.repeats,
         "",
         "- memguard.estimate: seconds after imports (model built on the meta device + estimate); peak RSS of "
         "the whole process, imports included.",
         "- memguard check (CLI): wall seconds and peak RSS of the command `memguard check CONFIG --gpu "
         f"{GPU} --json`, interpreter start and imports included; when the run does not fit as configured "
         "the command also searches for a plan, which is included. The 125M model has no preset: its "
         "config.json is given as `model: {hf_config: ...}`.",
         "- memguard check predicts a Lightning run by default (its config key `zero_grad_before_backward` "
         "defaults to true: the previous step's gradients live through the next forward), so its as-configured "
         "peak is above the bare estimate's by up to one set of fp32 gradients. When the run does not fit, most "
         "of its time is the plan search (the number of plans tried is in the notes).",
         "- MemTracker (fake): PyTorch's MemTracker around the same two steps on fake tensors "
         "(FakeTensorMode, model.to_empty), AdamW foreach, CPU bf16 autocast; seconds after imports. Its "
         "predicted peak is the fake CPU step's (no CUDA kernels or allocator model), so it differs from "
         "memguard's CUDA prediction.",
         "",
         "Time ratios:", "", *(ratios or ["- none measured"]),
         "",
         "Rerun: python benchmarks/speed.py"],
    )
    print(text)


if __name__ == "__main__":
    main()
