"""Keep other libraries' chatter out of the user's terminal while memguard works.

memguard imports torchao and bitsandbytes, traces models under torch's fake tensors and profiles real CPU
kernels. Those libraries talk while that happens: warnings (deprecations, advice about settings),
log records (torchao's "Failed to load ..._C_mxfp8", torch's "Enum subclass ... register_constant"), and
lines that C++ writes straight to the process's stderr (kineto's ``USDT: ... profiler_start`` on every
profiled kernel). None of it is about the user's run, so memguard prints only its own words.

:func:`quiet` is the one place that decides what is hidden, used by every entry point (``estimate``,
``preflight``, the Lightning and transformers callbacks, ``memguard check``). It changes nothing the user
configured, and puts back everything it touched when the block ends, also on an exception:

- warnings: ``warnings.showwarning`` is wrapped, not ``warnings.filters``. A warning reaches the wrapper
  only after the user's filters let it through, and is shown when the code that issued it is memguard's
  own (a module named ``memguard.*``), whatever ``stacklevel`` attributes it to; others are dropped. The
  user's filters still decide about every warning (an "error" filter still raises).
- logging: records from the libraries memguard drives below ERROR, and torch's fake-tensor internals at
  any level (memguard reports a failed trace itself), are dropped where a logger hands a record to its
  handlers (``logging.Logger.handle``, wrapped for the block). No logger's level, handler or filter
  changes and ``logging.disable`` is not used, so the user's own records, from this thread or any other,
  pass as configured. Wrapping the one method rather than filtering today's handlers also covers the
  loggers and handlers a library sets up while memguard imports it (torch's and transformers' own
  handlers, when ``memguard check`` imports them). Records whose message starts with "memguard" pass:
  the Lightning callback speaks through Lightning's ``rank_zero_info``.
- native output: only inside ``quiet(native_output=True)``, a narrow block around a profiled kernel or a
  library import, file descriptors 1 and 2 point at temporary files; afterwards every line is written
  back except those in the log formats of torch's C++ code (kineto's ``USDT:``/``STAGE:`` lines, c10's
  ``W1206 14:11:09.750000 ...]`` lines). kineto offers no runtime switch for this: ``KINETO_LOG_LEVEL`` is
  read once, when the first profiler of the process starts, and would then silence kineto's messages
  in the user's own profiling for the rest of the run.

Nested use is cheap: only the outermost block installs anything. ``MEMGUARD_DEBUG=1`` in the environment,
or the ``--debug`` flag of ``memguard check`` (:func:`verbose`), turns all of it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO

LIBRARIES = (
    "torch", "torchao", "bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors",
    "kernels", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities",
)
"""Logger namespaces of the libraries memguard drives; their records below ERROR are hidden inside
:func:`quiet`."""

TRACE_INTERNALS = ("torch._subclasses",)
"""Loggers hidden at every level: fake-tensor failures are logged with tracebacks before the exception
reaches memguard, which reports the failed trace in its own words."""

_NATIVE_NOISE = re.compile(
    rb"^(?:(?:VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\] "  # kineto
    rb"|[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] )"  # c10 / glog, and torch's Python log format
)
"""A line written by torch's C++ logging (kineto, c10) rather than by anyone's Python code."""

_ENV_DEBUG = "MEMGUARD_DEBUG"


class _State:
    """Process-wide: warnings and logging are process-wide too, so concurrent blocks share one install."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        self.native_depth = 0
        self.verbose = 0
        self.undo: contextlib.ExitStack | None = None
        self.native_undo: contextlib.ExitStack | None = None


_STATE = _State()


@contextlib.contextmanager
def quiet(*, native_output: bool = False) -> Iterator[None]:
    """Hide third-party warnings and log records for the duration of the block (see the module docstring).

    ``native_output=True`` also filters what C/C++ code writes to the process's stdout and stderr; keep
    such blocks narrow (one profiled kernel, one import), since other threads' output is held back until
    the block ends."""
    if _STATE.verbose or os.environ.get(_ENV_DEBUG, "") not in ("", "0"):
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(_counted("depth", "undo", _install_python_filters))
        if native_output:
            stack.enter_context(_counted("native_depth", "native_undo", _install_native_filter))
        yield


@contextlib.contextmanager
def verbose() -> Iterator[None]:
    """Show everything inside the block, even where memguard would be quiet (``memguard check --debug``)."""
    with _STATE.lock:
        _STATE.verbose += 1
    try:
        yield
    finally:
        with _STATE.lock:
            _STATE.verbose -= 1


@contextlib.contextmanager
def _counted(depth_attr: str, undo_attr: str, install: Any) -> Iterator[None]:
    """Run ``install`` (which fills an ExitStack of undo steps) for the outermost block only, and unwind it
    when the last concurrent or nested block ends."""
    with _STATE.lock:
        if getattr(_STATE, depth_attr) == 0:
            undo = contextlib.ExitStack()
            try:
                install(undo)
            except BaseException:
                undo.close()
                raise
            setattr(_STATE, undo_attr, undo)
        setattr(_STATE, depth_attr, getattr(_STATE, depth_attr) + 1)
    try:
        yield
    finally:
        with _STATE.lock:
            setattr(_STATE, depth_attr, getattr(_STATE, depth_attr) - 1)
            if getattr(_STATE, depth_attr) == 0:
                undo = getattr(_STATE, undo_attr)
                setattr(_STATE, undo_attr, None)
                if undo is not None:
                    undo.close()


def _install_python_filters(undo: contextlib.ExitStack) -> None:
    _wrap_showwarning(undo)
    _filter_log_records(undo)


# ---------------------------------------------------------------------------------------------------------
# Warnings


def _wrap_showwarning(undo: contextlib.ExitStack) -> None:
    """Show only the warnings memguard's own code issues; restore ``warnings.showwarning`` afterwards."""
    original = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if _issued_by_memguard(sys._getframe(1)):
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning

    def restore() -> None:
        if warnings.showwarning is showwarning:
            warnings.showwarning = original

    undo.callback(restore)


def _issued_by_memguard(frame: FrameType | None) -> bool:
    """Whether the Python code that called ``warnings.warn`` lives in memguard: the first frame outside the
    warnings module. A warning from C code has the Python frame that called into it (the import machinery
    while a library loads; the line that called a C++ operator)."""
    while frame is not None and frame.f_globals.get("__name__") == "warnings":
        frame = frame.f_back
    if frame is None:
        return False
    name = frame.f_globals.get("__name__") or ""
    return name == "memguard" or name.startswith("memguard.")


# ---------------------------------------------------------------------------------------------------------
# Logging


class _LibraryChatter(logging.Filter):
    """Drops the driven libraries' records below ERROR (and fake-tensor internals at any level), except the
    ones memguard itself sends through a library's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if _under(name, TRACE_INTERNALS):
            return False
        if record.levelno >= logging.ERROR or not _under(name, LIBRARIES):
            return True
        return _message_of(record).startswith("memguard")


def _under(name: str, namespaces: tuple[str, ...]) -> bool:
    return any(name == ns or name.startswith(ns + ".") for ns in namespaces)


def _message_of(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is not memguard's
        return ""


def _filter_log_records(undo: contextlib.ExitStack) -> None:
    """Drop the libraries' chatter before any handler sees it; put ``Logger.handle`` back afterwards."""
    chatter = _LibraryChatter()
    original = logging.Logger.handle

    def handle(self: logging.Logger, record: logging.LogRecord) -> None:
        if chatter.filter(record):
            original(self, record)

    logging.Logger.handle = handle  # type: ignore[method-assign]

    def restore() -> None:
        if logging.Logger.handle is handle:
            logging.Logger.handle = original  # type: ignore[method-assign]

    undo.callback(restore)


# ---------------------------------------------------------------------------------------------------------
# Native output (file descriptors 1 and 2)


def _install_native_filter(undo: contextlib.ExitStack) -> None:
    """Point fds 1 and 2 at temporary files; on undo, point them back and replay every line that is not
    torch's C++ logging."""
    _flush_all()
    for fd in (1, 2):
        try:
            saved = os.dup(fd)
        except OSError:  # closed (a daemon): nothing to filter
            continue
        try:
            capture = tempfile.TemporaryFile()
        except OSError:  # no writable temporary directory: better a noisy line than a failed check
            os.close(saved)
            continue
        os.dup2(capture.fileno(), fd)
        undo.callback(_replay, fd, saved, capture)
    undo.callback(_flush_all)  # undo runs last-registered-first: flushed before the fds are pointed back


def _replay(fd: int, saved: int, capture: Any) -> None:
    os.dup2(saved, fd)
    os.close(saved)
    try:
        capture.seek(0)
        data = capture.read()
    finally:
        capture.close()
    kept = b"".join(line for line in data.splitlines(keepends=True) if not _NATIVE_NOISE.match(line))
    while kept:
        written = os.write(fd, kept)
        kept = kept[written:]


def _flush_all() -> None:
    """Python's and C's buffered streams, so buffered text lands on the side of the switch it was written."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    libc = _libc()
    if libc is not None:
        libc.fflush(None)


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None))
        except (OSError, TypeError):  # no C library to load by name (Windows)
            _LIBC.append(None)
    return _LIBC[0]
