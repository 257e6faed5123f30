"""The ``memguard`` command line.

Exit codes:

- 0: success: ``check``: the run fits as configured (on every GPU checked); ``gpus``: also when no GPU is
  visible (having none is a fact, not an error);
- 1: ``check``: the run does not fit even with the allowed fallbacks (on at least one GPU);
- 2: invalid input: a usage error, an unknown name, a config problem, any error memguard raises about its
  input, or a configuration memguard could not evaluate. The message goes to stderr, with a traceback only
  under ``--debug``;
- 3: ``check``: the run fits only with the plan's changes (on every GPU that is not fine as configured).

With several ``--gpu`` the worst outcome decides: 1 if any GPU fits nothing allowed, else 3 if any needs
its plan, else 0.

Diagnostics go to stderr; ``--json`` output to stdout. Each subcommand is a function in ``_HANDLERS`` that
takes the parsed arguments and returns the exit code; the real work happens in the library.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from memguard.errors import MemguardError

EXIT_OK = 0
EXIT_INVALID = 2


def run() -> None:
    """The ``memguard`` console command: :func:`main`, then leave without tearing the interpreter down.

    Unloading torch and transformers module by module at exit takes about a second, longer than some
    checks, and a finished command needs none of it: its output is flushed and every file it wrote is
    closed before :func:`main` returns."""
    global _FREEZE_AFTER_STARTUP
    _FREEZE_AFTER_STARTUP = True
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run ``memguard`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("memguard: error: a command is required (see memguard --help)", file=sys.stderr)
        return EXIT_INVALID
    try:
        return _HANDLERS[args.command](args)
    except BrokenPipeError:  # `memguard gpus --json | head`: the reader left, nothing to report
        _silence_stdout()
        return EXIT_OK
    except (MemguardError, ImportError) as exc:  # ImportErrors name the package to install
        if args.debug:
            traceback.print_exc()
        print(f"memguard: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # noqa: BLE001 - a failure inside a user's model or ours: no traceback unasked
        if args.debug:
            traceback.print_exc()
        print(f"memguard: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INVALID


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of ``_HANDLERS``."""
    parser = argparse.ArgumentParser(
        prog="memguard",
        description="Predict the peak GPU memory of a training run before it starts.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action=_VersionAction, help="print memguard's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gpus = commands.add_parser("gpus", help="list the GPUs this process can use, or the GPU catalog",
                               description="List the GPUs this process can use (NVML), or the GPU catalog.")
    gpus.add_argument("--json", action="store_true", help="print JSON on stdout")
    gpus.add_argument("--catalog", action="store_true", help="list the GPU models memguard knows offline")
    gpus.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    presets = commands.add_parser("presets", help="list the model presets memguard builds without weights",
                                  description="List the model presets (published architectures, never weights) "
                                              "that model: {preset: NAME} and Hub ids fall back to.")
    presets.add_argument("--json", action="store_true", help="print JSON on stdout")
    presets.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check", help="predict whether a training config fits a GPU, and plan fallbacks if not",
        description="Predict the peak GPU memory of a training config (memguard YAML, a LightningCLI fit config, "
                    "a transformers config.json or a Hugging Face Hub id, read from the local cache or a preset) "
                    "without a GPU, and plan the cheapest change that fits. "
                    "Exit codes: 0 fits, 1 nothing allowed fits, 2 invalid input, 3 fits only with the plan.",
    )
    check.add_argument("config", metavar="CONFIG",
                       help="memguard YAML, LightningCLI fit YAML, config.json, or a Hub id such as "
                            "meta-llama/Llama-2-7b-hf (never downloaded)")
    check.add_argument("--gpu", action="append", default=[], metavar="NAME",
                       help="a GPU from the catalog (repeat to compare); default: the config's gpu, else this "
                            "machine's GPUs")
    check.add_argument("--devices", type=int, metavar="N", help="devices per node (overrides trainer.devices)")
    check.add_argument("--num-nodes", type=int, metavar="N", help="nodes (overrides trainer.num_nodes)")
    check.add_argument("--json", action="store_true", help="print JSON on stdout")
    check.add_argument("--plot", metavar="FILE", help="also draw the breakdown and timeline to FILE.png or FILE.html")
    check.add_argument("--no-fallback", action="store_true", help="do not search for a plan when it does not fit")
    check.add_argument("--allow", metavar="KNOB,KNOB",
                       help="knobs the planner may turn: precision, optimizer, micro_batch, checkpointing, offload")
    check.add_argument("--margin", type=float, metavar="F", help="safety margin, e.g. 0.05 for 5%%")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (OmegaConf dotlist, repeatable), e.g. trainer.precision=16-mixed")
    check.add_argument("--batch-size", type=int, metavar="N", help="samples per batch (overrides the config)")
    check.add_argument("--seq-len", type=int, metavar="N", help="tokens per sample (overrides the config)")
    check.add_argument("--image-size", type=int, metavar="N", help="pixels per side (overrides the config)")
    check.add_argument("--max-batch-size", action="store_true",
                       help="also find the largest batch size that fits each GPU, as configured and with the plan")
    check.add_argument("--min-gpus", action="store_true",
                       help="also find the fewest GPUs of each model given that fit, per strategy (DDP, ZeRO-2, "
                            "FSDP, ZeRO-3): devices on one node first (--devices sets how many a node has, "
                            "default 8), then nodes")
    check.add_argument("--max-seq-len", action="store_true",
                       help="also find the longest sequence that fits each GPU, as configured and with the plan")
    check.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class _VersionAction(argparse.Action):
    """``memguard --version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"memguard {version()}")
        parser.exit(EXIT_OK)


def version() -> str:
    """The installed package's version (importlib.metadata), else the source tree's ``__version__``: a
    checkout run without ``pip install`` has no metadata."""
    from importlib import metadata

    try:
        return metadata.version("memguard")
    except metadata.PackageNotFoundError:
        from memguard import __version__

        return __version__


# ---------------------------------------------------------------------------------------------------------
# memguard presets


def _cmd_presets(args: argparse.Namespace) -> int:
    """``memguard presets [--json]``: every preset with its parameter count, kind and Hub id."""
    from memguard import presets

    rows = [_preset_json(presets.PRESETS[name]) for name in presets.names()]
    if args.json:
        print(json.dumps({"presets": rows}, indent=2))
        return EXIT_OK
    from memguard.report import render_table

    headers = ["name", "parameters", "kind", "input", "hub id", "aliases"]
    table = [[r["name"], f"{r['parameters']:,}", r["kind"], _input_cell(r), r["hub_id"], ", ".join(r["aliases"])]
             for r in rows]
    print(render_table(headers, table, align="<><<<<"))
    return EXIT_OK


def _preset_json(preset: Any) -> dict[str, Any]:
    """One preset as JSON-ready data."""
    return {"name": preset.name, "parameters": preset.params, "kind": preset.kind, "input": preset.input,
            "seq_len": preset.seq_len, "image_size": preset.image_size, "hub_id": preset.source,
            "aliases": list(preset.aliases)}


def _input_cell(row: dict[str, Any]) -> str:
    """The default input: tokens per sample or pixels per side."""
    return f"{row['seq_len']} tokens" if row["input"] == "tokens" else f"{row['image_size']} px"


# ---------------------------------------------------------------------------------------------------------
# memguard gpus


def _cmd_gpus(args: argparse.Namespace) -> int:
    """``memguard gpus [--json] [--catalog]``."""
    if args.catalog:
        return _print_catalog(args.json)
    from memguard.device.gpus import discover

    found = discover()
    if args.json:
        payload = {"gpus": [_gpu_json(g) for g in found.gpus], "error": found.error}
        print(json.dumps(payload, indent=2))
    elif found.gpus:
        print(_gpu_table(found.gpus))
    if found.error:
        print(found.error, file=sys.stderr)
    for gpu in found.gpus:
        if gpu.error:
            print(f"GPU {gpu.index} ({gpu.name}): {gpu.error}", file=sys.stderr)
    return EXIT_OK


def _gpu_json(gpu: Any) -> dict[str, Any]:
    """A discovered GPU as JSON-ready data; sizes stay in bytes."""
    return asdict(gpu)  # tuples (compute capability, MIG devices) become JSON lists


def _gpu_table(gpus: list[Any]) -> str:
    """The visible GPUs as a text table."""
    from memguard.report import render_table
    from memguard.units import format_bytes

    headers = ["index", "name", "total", "free", "used", "other processes", "compute", "bf16", "MIG"]
    rows = []
    for g in gpus:
        if g.error and not g.total_bytes:
            rows.append([g.index, g.name, "-", "-", "-", "-", "-", "-", f"error: {g.error}"])
            continue
        cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}" if g.compute_capability else "?"
        rows.append([
            g.index, g.name, format_bytes(g.total_bytes), format_bytes(g.free_bytes), format_bytes(g.used_bytes),
            format_bytes(g.other_process_bytes), cc, "yes" if g.bf16 else "no", _mig_cell(g),
        ])
    return render_table(headers, rows, align="<<>>>>><<")


def _mig_cell(gpu: Any) -> str:
    """MIG state in a few words: off, the selected device, or how many instances exist."""
    if not gpu.mig_mode:
        return "off"
    if gpu.selected_mig:
        return gpu.mig[0].name if gpu.mig else gpu.selected_mig
    return f"on ({len(gpu.mig)} instance{'' if len(gpu.mig) == 1 else 's'})"


def _print_catalog(as_json: bool) -> int:
    """``memguard gpus --catalog``: the GPU models memguard can plan for without the hardware."""
    from memguard.device.catalog import CATALOG
    from memguard.report import render_table
    from memguard.units import format_bytes

    if as_json:
        print(json.dumps({"catalog": [asdict(gpu) for gpu in CATALOG]}, indent=2))
        return EXIT_OK
    headers = ["name", "arch", "compute", "total", "usable", "context", "bf16", "attention", "NVML"]
    rows = [
        [g.name, g.architecture, f"{g.compute_capability[0]}.{g.compute_capability[1]}",
         format_bytes(g.total_bytes), format_bytes(g.usable_bytes), format_bytes(g.context_bytes),
         "yes" if g.bf16 else "no", ",".join(g.attention), "yes" if g.nvml else "no"]
        for g in CATALOG
    ]
    print(render_table(headers, rows, align="<<<>>><<<"))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# memguard check


def _cmd_check(args: argparse.Namespace) -> int:
    """``memguard check CONFIG ...``: load, check, print; the exit code is the check's."""
    from memguard import report

    if args.plot:
        problem = _plot_problem(args.plot, report.PLOT_SUFFIXES)
        if problem:
            print(f"memguard: error: --plot {args.plot}: {problem}", file=sys.stderr)
            return EXIT_INVALID
    with _quiet_libraries(args.debug):
        with _startup():
            from dataclasses import replace

            from memguard.act.check import min_gpus, run_check, size_check
            from memguard.spec.check_spec import Options
            from memguard.spec.config import load_config

            options = Options(gpus=tuple(args.gpu), devices=args.devices, num_nodes=args.num_nodes,
                              allow=args.allow, margin=args.margin, fallback=False if args.no_fallback else None,
                              batch_size=args.batch_size, seq_len=args.seq_len, image_size=args.image_size)
            spec = load_config(args.config, args.set, options)
        result = run_check(spec)
        for flag, knob in ((args.max_batch_size, "batch_size"), (args.max_seq_len, "seq_len")):
            if flag:
                size_check(result, knob, lambda n, k=knob: load_config(args.config, args.set,
                                                                        replace(options, **{k: n})))
        if args.min_gpus:
            min_gpus(result, per_node=args.devices or 8)
    written = report.plot(result, args.plot) if args.plot else None  # before the verdict: a failure is exit 2 alone
    if args.json:
        print(json.dumps(report.to_json(result), indent=2))
    else:
        print(report.render_check(result))
    if written:
        print(f"memguard: wrote {written}", file=sys.stderr)
    return result.exit_code


def _plot_problem(path: str, suffixes: tuple[str, ...]) -> str | None:
    """What stops ``--plot PATH`` from being written, found before any work: a wrong suffix, a folder that
    does not exist or cannot be written, a folder in the file's place, matplotlib missing for a PNG."""
    import importlib.util
    from pathlib import Path

    if not path.lower().endswith(suffixes):
        return "the file must end in .png, .html or .htm"
    target = Path(path).expanduser()
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        return f"the folder {str(folder)!r} does not exist"
    if target.is_dir():
        return "is a folder"
    if not os.access(folder, os.W_OK):
        return f"the folder {str(folder)!r} is not writable"
    if path.lower().endswith(".png") and importlib.util.find_spec("matplotlib") is None:
        return "a PNG needs matplotlib: pip install 'memguard[plot]' (or write .html)"
    return None


_FREEZE_AFTER_STARTUP = False
"""Set by the console command (:func:`run`), whose process ends with the check; not when ``main`` is called
from a longer-lived Python process."""


@contextlib.contextmanager
def _startup() -> Iterator[None]:
    """Importing torch and transformers and building the model create millions of long-lived objects and
    almost no garbage cycles; the cyclic collector's full passes over them take about half a second of a
    check and free nothing, so it is off until the model exists. The console command then also moves them
    out of the collector's reach (``gc.freeze``): the trace's own collections, which still free its cycles,
    stop re-walking them (another half second for a 7B check)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _FREEZE_AFTER_STARTUP:
            gc.freeze()
        if enabled:
            gc.enable()


def _quiet_libraries(debug: bool) -> contextlib.AbstractContextManager:
    """Keep third-party warnings, log chatter and C++ log lines out of the report (memguard.quiet, as for
    the library API), unless --debug asks for everything."""
    from memguard.quiet import quiet, verbose

    return verbose() if debug else quiet()


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "gpus": _cmd_gpus,
    "presets": _cmd_presets,
    "check": _cmd_check,
}


if __name__ == "__main__":
    run()
