"""A fixed budget of generated careless and hostile configs through ``memguard check``, with the outcome of each.

Every config comes from tests/hostile_configs.py (seeds 0 to N-1; random structures, types, sizes, unicode,
nesting, class paths that must never run) and is checked in this process, as a user's ``memguard check``
would run it. Counted: each exit code, and every breach of the contract: an exit code outside 0-3, a
traceback or an unexpected-error line on stderr, anything on stdout after an exit 2 (a verdict the exit code
contradicts), a class built that memguard must refuse (its marker file appears), and answers slower than
10 s.

Usage: python benchmarks/fuzz_inputs.py [N]     (default 300)    Writes benchmarks/results/fuzz_inputs.md.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

from _common import write_table  # noqa: E402
from hostile_configs import MARKER, write  # noqa: E402
from memguard.cli import main  # noqa: E402

SLOW_S = 10.0
MEANINGS = {0: "fits as configured", 1: "does not fit", 2: "invalid input, named", 3: "fits with the plan"}


def run(seed: int) -> tuple[object, float, list[str]]:
    """(exit code, seconds, breaches of the contract) for config ``seed``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write(seed, folder)
        out, err = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: object = main(["check", str(path), "--gpu", "A100-80GB"])
            except BaseException as exc:  # noqa: BLE001 - counted, never expected
                code = f"raised {type(exc).__name__}"
        seconds = time.perf_counter() - started
        breaches = []
        if code not in MEANINGS:
            breaches.append(f"exit {code}")
        if "Traceback" in err.getvalue() or "--debug for the traceback" in err.getvalue():
            breaches.append("traceback or unexpected error")
        if code == 2 and out.getvalue():
            breaches.append("output after an error")
        if (folder / MARKER).exists():
            breaches.append("built a refused class")
        if seconds > SLOW_S:
            breaches.append(f"slower than {SLOW_S:g} s")
        return code, seconds, breaches


def main_(n: int) -> None:
    codes: Counter = Counter()
    times: list[float] = []
    breaches: list[tuple[int, str]] = []
    for seed in range(n):
        code, seconds, found = run(seed)
        codes[code] += 1
        times.append(seconds)
        breaches += [(seed, b) for b in found]
        if found:
            print(seed, code, found, flush=True)
    rows = [[str(code), MEANINGS.get(code, "outside the contract"), str(count)]  # type: ignore[arg-type]
            for code, count in sorted(codes.items(), key=lambda kv: str(kv[0]))]
    kinds = Counter(b for _, b in breaches)
    rows += [["breaches", kind, str(count)] for kind, count in sorted(kinds.items())] or [["breaches", "none", "0"]]
    times.sort()
    print(write_table(
        "fuzz_inputs.md", f"{n} generated careless and hostile configs through memguard check",
        ["exit code", "meaning", "configs"], rows,
        [f"Configs: tests/hostile_configs.py, seeds 0-{n - 1}; each checked in-process against an A100-80GB.",
         f"Seconds per config: median {statistics.median(times):.2f}, 95th percentile "
         f"{times[int(0.95 * (n - 1))]:.2f}, max {times[-1]:.2f} (the first includes imports).",
         "Breaches counted: an exit code outside 0-3, a traceback or unexpected-error line, stdout after exit 2, "
         f"a refused class built (its marker file), more than {SLOW_S:g} s.",
         "Rerun: python benchmarks/fuzz_inputs.py [N]"]))


if __name__ == "__main__":
    main_(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
