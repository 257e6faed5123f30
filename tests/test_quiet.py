"""memguard prints only its own words: third-party warnings, log records and C++ log lines stay out of the
user's terminal while memguard works, and the user's own logging and warnings configuration is left as
it was (memguard/quiet.py)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from output_rules import after, stray_lines

from memguard import quiet as quiet_module
from memguard.quiet import quiet, verbose

ROOT = Path(__file__).resolve().parent.parent
FRONTENDS = Path(__file__).resolve().parent / "quiet_frontends.py"
READY = "test: ready"

KINETO_LINE = b"USDT:2026-12-06 14:11:09 2618:2618 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
TORCH_LOG_LINE = b"W1206 14:13:05.750000 4002 torch/utils/_pytree.py:630] <enum 'X'> is an Enum subclass\n"


def _issue_from(module_name: str, message: str, stacklevel: int = 1) -> None:
    """Issue a warning from code whose module is ``module_name`` (as if it lived there)."""
    namespace: dict[str, Any] = {"__name__": module_name, "warnings": warnings}
    exec(f"def issue(message):\n    warnings.warn(message, stacklevel={stacklevel})\n", namespace)  # noqa: S102
    namespace["issue"](message)


# ---------------------------------------------------------------------------------------------------------
# In this process: what quiet() hides, and what it puts back


def test_third_party_warnings_hidden_memguard_warnings_shown() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            _issue_from("torchao.quantization", "a library's warning")
            _issue_from("memguard.plan", "memguard: its own warning")
            _issue_from("memguard.act.callback", "memguard: attributed to the caller", stacklevel=2)
        _issue_from("torchao.quantization", "outside the block")
    assert [str(w.message) for w in seen] == ["memguard: its own warning", "memguard: attributed to the caller",
                                              "outside the block"]


def test_user_warning_filters_still_decide() -> None:
    """quiet() changes no filter: a memguard warning the user ignores stays ignored."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="memguard: ignored by the user")
        before = list(warnings.filters)
        with quiet():
            assert warnings.filters == before
            _issue_from("memguard.plan", "memguard: ignored by the user")
        assert warnings.filters == before
    assert seen == []


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


_LOGGERS = ("torchao", "torch.utils._pytree", "torch._subclasses.fake_tensor", "pytorch_lightning.utilities.rank_zero",
            "transformers.trainer", "my_project.training")


@pytest.fixture
def collected() -> Any:
    """One handler on each logger the test uses, with propagation off: libraries imported by earlier tests
    (transformers, Lightning) set their own levels, propagation and handlers, which must not decide this."""
    handler = _Collect()
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, logger.disabled))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.disabled = False
    yield handler
    for logger, level, propagate, disabled in saved:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def test_library_log_records_hidden_user_records_kept(collected: _Collect) -> None:
    handle = logging.Logger.handle
    user = logging.getLogger("my_project.training")
    with quiet():
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8")
        logging.getLogger("torch.utils._pytree").warning("Enum subclass")
        logging.getLogger("torch._subclasses.fake_tensor").error("failed while attempting to run meta")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("memguard: applying plan")
        logging.getLogger("transformers.trainer").error("a library's error")
        user.info("the user's record")
    logging.getLogger("torchao").warning("outside the block")
    assert collected.records == [
        "pytorch_lightning.utilities.rank_zero: memguard: applying plan",
        "transformers.trainer: a library's error",
        "my_project.training: the user's record",
        "torchao: outside the block",
    ]
    assert collected.filters == [] and logging.lastResort.filters == []
    assert logging.Logger.handle is handle


def test_logging_configuration_untouched() -> None:
    loggers = ["torch", "torchao", "transformers", "my_project"]
    logging.getLogger("my_project").setLevel(logging.INFO)
    levels = {name: logging.getLogger(name).level for name in loggers}
    with quiet():
        assert logging.root.manager.disable == logging.NOTSET
        assert {name: logging.getLogger(name).level for name in loggers} == levels
    assert {name: logging.getLogger(name).level for name in loggers} == levels


def test_restored_after_an_exception_and_nesting_is_cheap() -> None:
    showwarning = warnings.showwarning
    with pytest.raises(ValueError), quiet():
        wrapper = warnings.showwarning
        assert wrapper is not showwarning
        with quiet():
            assert warnings.showwarning is wrapper  # nothing installed twice
        assert warnings.showwarning is wrapper  # the inner block does not undo the outer one
        raise ValueError("inside")
    assert warnings.showwarning is showwarning
    assert quiet_module._STATE.depth == 0 and quiet_module._STATE.undo is None


def test_verbose_and_environment_switch_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    showwarning = warnings.showwarning
    with verbose(), quiet(native_output=True):
        assert warnings.showwarning is showwarning
    monkeypatch.setenv("MEMGUARD_DEBUG", "1")
    with quiet(native_output=True):
        assert warnings.showwarning is showwarning


def test_native_output_filtered_and_the_rest_passed_through(capfd: pytest.CaptureFixture[str]) -> None:
    with quiet(native_output=True):
        os.write(2, KINETO_LINE + b"a line from another thread\n")
        os.write(1, TORCH_LOG_LINE + b"stdout is kept\n")
    os.write(2, b"after the block\n")
    out, err = capfd.readouterr()
    assert out == "stdout is kept\n"
    assert err == "a line from another thread\nafter the block\n"


def test_profiled_kernel_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    from torch.autograd.profiler import profile

    x = torch.randn(16, 16)
    with quiet(native_output=True), profile(profile_memory=True, use_cpu=True):
        x @ x
    out, err = capfd.readouterr()
    assert "USDT" not in err + out and "profiler_" not in err + out


def test_stray_line_rule() -> None:
    """The rule the subprocess tests apply catches each kind of noise memguard used to let through."""
    noise = [
        KINETO_LINE.decode().strip(),
        TORCH_LOG_LINE.decode().strip(),
        "Failed to load /site-packages/torchao/_C_mxfp8.so: Could not load this library",
        "/site-packages/torch/nn/modules/transformer.py:392: UserWarning: enable_nested_tensor is True",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ]
    own = ["memguard: predicted 1 GiB needed", "/x/main.py:3: UserWarning: memguard: it does not fit",
           "  memguard.preflight(model, batch)", "test: loss 1.0"]
    assert stray_lines("\n".join(noise + own), prefixes=("test:",)) == noise


# ---------------------------------------------------------------------------------------------------------
# Each front end in a fresh process, as a user runs it


def _run_frontend(name: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("MEMGUARD_DEBUG", "PYTHONWARNINGS")}
    environment.update(env)
    done = subprocess.run([sys.executable, str(FRONTENDS), name], cwd=ROOT, env=environment, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout
    assert READY in done.stdout.splitlines(), done.stdout
    return done.stdout


def _assert_only_memguard(output: str, *library_lines: str) -> str:
    """The output after the script's setup holds memguard's lines, the script's own and ``library_lines``
    (prefixes of lines a library prints outside memguard's hooks, during the user's own training)."""
    tail = after(output, READY)
    assert stray_lines(tail, prefixes=("test:", *library_lines)) == [], output
    assert "test: user configuration unchanged" in tail, output
    assert "test: user log: after the call" in tail, output  # the user's own logger still speaks
    return tail


@pytest.mark.slow
def test_estimate_on_the_cpu_prints_nothing() -> None:
    _assert_only_memguard(_run_frontend("estimate"))


@pytest.mark.slow
def test_estimate_noise_is_seen_when_asked_for() -> None:
    """The control: with MEMGUARD_DEBUG=1 the kernel probes' C++ lines come through, so the test above
    really exercises them."""
    tail = after(_run_frontend("estimate", MEMGUARD_DEBUG="1"), READY)
    assert stray_lines(tail, prefixes=("test:",)), tail


@pytest.mark.slow
def test_preflight_that_plans_prints_only_its_warning() -> None:
    tail = _assert_only_memguard(_run_frontend("preflight"))
    assert "UserWarning: memguard: predicted" in tail  # memguard's own warning (policy="warn") comes through
    assert "test: fits False; planned True" in tail
    expected = [name for name in ("bitsandbytes", "torchao") if importlib.util.find_spec(name) is not None]
    assert f"test: optimizer libraries imported: {', '.join(expected) or 'none'}" in tail


@pytest.mark.slow
def test_lightning_callback_prints_only_its_report() -> None:
    pytest.importorskip("pytorch_lightning")
    tail = _assert_only_memguard(_run_frontend("lightning"), "`Trainer.fit` stopped: `max_steps=2` reached.")
    assert "memguard: applying plan" in tail
    assert "test: fit done after 2 steps; planned True" in tail


@pytest.mark.slow
def test_transformers_callback_prints_only_its_warning() -> None:
    pytest.importorskip("transformers")
    tail = _assert_only_memguard(_run_frontend("hf"))
    assert "UserWarning: memguard: predicted" in tail
    assert "test: trained 2 steps" in tail
